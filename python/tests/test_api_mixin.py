"""APIMixin against a real HTTP server on 127.0.0.1 (``http.server`` in a thread): every
classification, ``Retry-After`` in both forms, connection refused, timeouts, sync and async
requests, configuration, and API handlers running in a real engine."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tasker_core import StepContext, StepHandler, StepHandlerResult
from tasker_core.errors import ValidationError
from tasker_core.step_handler.mixins import APIMixin, ApiResponse


class FakeApi:
    """The outside world: a scripted HTTP API that records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.flaky_failures: dict[str, int] = {}
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(url.query).items()}
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                with api.lock:
                    api.requests.append(
                        {
                            "method": self.command,
                            "path": url.path,
                            "headers": dict(self.headers.items()),
                            "body": body,
                            "at": time.monotonic(),
                        }
                    )
                status, headers, payload = api.route(self.command, url.path, query, body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if payload != b"":
                    self.send_header(
                        "content-type", headers.get("content-type", "application/json")
                    )
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def route(
        self, method: str, path: str, query: dict[str, str], body: str
    ) -> tuple[int, dict[str, str], Any]:
        parts = path.strip("/").split("/")
        headers: dict[str, str] = {}
        if "retry_after" in query:
            headers["Retry-After"] = query["retry_after"]
        if parts[0] == "status":
            return int(parts[1]), headers, {"status": int(parts[1])}
        if parts[0] == "empty":
            return 204, {}, b""
        if parts[0] == "text":
            return 200, {"content-type": "text/plain"}, b"plain words"
        if parts[0] == "list":
            return 200, {}, [1, 2, 3]
        if parts[0] == "redirect":
            return 302, {"Location": "/status/200"}, b""
        if parts[0] == "slow":
            # Answers only when the test is over (the client gives up long before).
            self.release.wait(10)
            return 200, {}, {"late": True}
        if parts[0] == "echo":
            return 200, {}, {"method": method, "path": path, "body": body}
        if parts[0] == "orders":
            order_id = parts[1]
            if order_id.startswith("missing"):
                return 404, {}, {"error": f"no order {order_id}"}
            if order_id.startswith("flaky"):
                with self.lock:
                    left = self.flaky_failures.setdefault(order_id, 1)
                    self.flaky_failures[order_id] = left - 1
                if left > 0:
                    return 503, {"Retry-After": "1"}, {"error": "maintenance"}
            return 200, {}, {"order_id": order_id, "total": 42.5}
        if parts[0] == "customers":
            return 200, {}, {"customer_id": parts[1], "tier": "gold"}
        return 404, {}, {"error": "no route"}

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    server = FakeApi()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A URL whose port is bound but not listening: connecting is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


class Client(APIMixin, StepHandler):
    handler_name = "client"


def client_for(url: str, **attrs: Any) -> Client:
    cls = type("ConfiguredClient", (Client,), {"base_url": url, **attrs})
    return cls()


# -- classification ---------------------------------------------------------------------------
PERMANENT = [400, 401, 403, 404, 405, 409, 410, 422]
RETRYABLE = [408, 429, 500, 502, 503, 504]


@pytest.mark.parametrize("status", [200, 201, 202])
def test_2xx_is_ok_and_succeeds_with_the_body(api, status):
    client = client_for(api.url)
    response = client.get(f"/status/{status}")
    assert isinstance(response, ApiResponse)
    assert (response.ok, response.is_retryable) == (True, False)
    assert (response.is_client_error, response.is_server_error) == (False, False)
    result = client.api_success(response)
    assert result.success is True
    assert result.result == {"status": status}
    assert result.metadata == {
        "status_code": status,
        "method": "GET",
        "url": f"{api.url}/status/{status}",
    }


@pytest.mark.parametrize("status", PERMANENT)
def test_4xx_fails_permanently(api, status):
    client = client_for(api.url)
    response = client.get(f"/status/{status}")
    assert (response.ok, response.is_retryable, response.is_client_error) == (False, False, True)
    failure = client.api_failure(response)
    assert failure.success is False
    assert str(failure.error_type) == "permanent_error"
    assert failure.retryable is False
    assert failure.error_code == f"HTTP_{status}"
    assert failure.message.startswith(f"GET {api.url}/status/{status} returned HTTP {status}")
    assert failure.metadata["response_body"] == {"status": status}
    assert failure.retry_after_seconds is None


@pytest.mark.parametrize("status", RETRYABLE)
def test_5xx_408_and_429_are_retryable(api, status):
    client = client_for(api.url)
    response = client.get(f"/status/{status}")
    assert (response.ok, response.is_retryable) == (False, True)
    assert response.is_server_error is (status >= 500)
    assert response.is_client_error is (status < 500)
    failure = client.api_failure(response)
    assert str(failure.error_type) == "retryable_error"
    assert failure.retryable is True
    assert failure.error_code == f"HTTP_{status}"
    assert failure.retry_after_seconds is None


def test_an_unfollowed_redirect_fails_permanently(api):
    client = client_for(api.url, follow_redirects=False)
    response = client.get("/redirect")
    assert response.status_code == 302
    assert (response.ok, response.is_retryable) == (False, False)
    failure = client.api_failure(response)
    assert (str(failure.error_type), failure.retryable) == ("permanent_error", False)
    # Followed by default.
    assert client_for(api.url).get("/redirect").status_code == 200


# -- Retry-After ------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_in_seconds_is_honoured(api, status):
    client = client_for(api.url)
    response = client.get(f"/status/{status}", params={"retry_after": "7"})
    assert response.retry_after == 7.0
    failure = client.api_failure(response)
    assert failure.retry_after_seconds == 7.0
    assert failure.to_outcome()["retry_after_seconds"] == 7.0
    assert failure.metadata["retry_after"] == "7"


def test_retry_after_as_an_http_date_is_honoured(api):
    client = client_for(api.url)
    date = email.utils.formatdate(time.time() + 120, usegmt=True)
    response = client.get("/status/503", params={"retry_after": date})
    assert response.retry_after is not None and 117 <= response.retry_after <= 120
    failure = client.api_failure(response)
    assert failure.retry_after_seconds is not None and 117 <= failure.retry_after_seconds <= 120
    # A date already past asks for no wait.
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert client.get("/status/503", params={"retry_after": past}).retry_after == 0.0


def test_an_unreadable_retry_after_leaves_the_engines_backoff(api):
    client = client_for(api.url)
    response = client.get("/status/503", params={"retry_after": "whenever"})
    assert response.retry_after is None
    failure = client.api_failure(response)
    assert failure.retryable is True and failure.retry_after_seconds is None
    assert failure.metadata["retry_after"] == "whenever"


def test_retry_after_on_a_permanent_failure_does_not_make_it_retryable(api):
    client = client_for(api.url)
    failure = client.api_failure(client.get("/status/403", params={"retry_after": "5"}))
    assert failure.retryable is False and failure.retry_after_seconds is None


# -- no response ------------------------------------------------------------------------------
def test_connection_refused_is_a_retryable_connection_error(refused_url):
    client = client_for(refused_url)
    with pytest.raises(httpx.ConnectError) as caught:
        client.get("/orders/1")
    failure = client.connection_error(caught.value, "fetching order")
    assert (str(failure.error_type), failure.retryable) == ("retryable_error", True)
    assert failure.error_code == "CONNECTION_ERROR"
    assert failure.message.startswith("connection failed while fetching order: ConnectError")
    assert failure.metadata == {"operation": "fetching order"}


def test_a_timeout_is_a_retryable_timeout(api):
    client = client_for(api.url, default_timeout=0.2)
    with pytest.raises(httpx.TimeoutException) as caught:
        client.get("/slow")
    failure = client.timeout_error(caught.value)
    assert (str(failure.error_type), failure.retryable) == ("timeout", True)
    assert failure.error_code == "TIMEOUT"
    assert failure.message.startswith("request timed out: ReadTimeout")


# -- bodies, methods, misuse ----------------------------------------------------------------
def test_success_results_from_other_bodies(api):
    client = client_for(api.url)
    assert client.api_success(client.get("/list")).result == {"data": [1, 2, 3]}
    assert client.api_success(client.get("/text")).result == {"data": "plain words"}
    empty = client.get("/empty")
    assert empty.body is None and empty.status_code == 204
    assert client.api_success(empty).result == {}
    custom = client.api_success(client.get("/list"), result={"count": 3})
    assert custom.result == {"count": 3}


def test_every_method_sends_its_request(api):
    client = client_for(api.url)
    sent = {
        "POST": client.post("/echo", json={"a": 1}),
        "PUT": client.put("/echo", json={"b": 2}),
        "PATCH": client.patch("/echo", json={"c": 3}),
        "DELETE": client.delete("/echo"),
        "GET": client.get("/echo"),
    }
    for method, response in sent.items():
        assert response.json()["method"] == method
    assert json.loads(sent["POST"].json()["body"]) == {"a": 1}
    assert json.loads(sent["PATCH"].json()["body"]) == {"c": 3}


def test_misuse_is_refused_with_a_clear_error(api):
    client = client_for(api.url)
    with pytest.raises(ValidationError, match="api_success needs a 2xx response, got 500"):
        client.api_success(client.get("/status/500"))
    with pytest.raises(ValidationError, match="api_failure needs a failed response, got 200"):
        client.api_failure(client.get("/status/200"))


def test_api_failure_message_and_code_can_be_given(api):
    client = client_for(api.url)
    failure = client.api_failure(
        client.get("/status/404"), message="order not found", error_code="ORDER_NOT_FOUND"
    )
    assert (failure.message, failure.error_code) == ("order not found", "ORDER_NOT_FOUND")
    assert failure.retryable is False


# -- configuration ----------------------------------------------------------------------------
def test_headers_and_base_url_from_class_constructor_and_step_config(api, refused_url):
    class Configured(APIMixin, StepHandler):
        handler_name = "configured"
        base_url = refused_url
        default_headers: ClassVar[dict[str, str]] = {"X-Level": "class", "X-Class": "yes"}

        def call(self, context: StepContext) -> StepHandlerResult:
            return self.api_success(self.get("/echo"))

    # The step's handler.initialization wins over the class attributes.
    context = StepContext.build(
        step_config={"base_url": api.url, "headers": {"X-Level": "step"}, "timeout": 5}
    )
    assert Configured().call(context).success is True
    headers = api.requests[-1]["headers"]
    assert (headers["X-Level"], headers["X-Class"]) == ("step", "yes")

    # The constructor's config over the class; per-request headers over everything.
    handler = Configured({"base_url": api.url, "headers": {"X-Level": "constructor"}})
    handler.get("/echo", headers={"X-Extra": "call"})
    headers = api.requests[-1]["headers"]
    assert (headers["X-Level"], headers["X-Extra"]) == ("constructor", "call")

    # Outside a step only the class and constructor apply.
    with pytest.raises(httpx.ConnectError):
        Configured().get("/echo")


# -- async ------------------------------------------------------------------------------------
class AsyncClient(APIMixin, StepHandler):
    handler_name = "async_client"

    async def call(self, context: StepContext) -> StepHandlerResult:
        try:
            response = await self.aget(f"/customers/{context.get_input('customer_id')}")
        except httpx.ConnectError as e:
            return self.connection_error(e, "fetching customer")
        except httpx.TimeoutException as e:
            return self.timeout_error(e, "fetching customer")
        return self.api_success(response) if response.ok else self.api_failure(response)


def test_async_requests(api, refused_url):
    ok = StepContext.build(input_data={"customer_id": "c1"}, step_config={"base_url": api.url})
    result = asyncio.run(AsyncClient().call(ok))
    assert result.result == {"customer_id": "c1", "tier": "gold"}

    refused = StepContext.build(
        input_data={"customer_id": "c1"}, step_config={"base_url": refused_url}
    )
    failure = asyncio.run(AsyncClient().call(refused))
    assert failure.error_code == "CONNECTION_ERROR"

    async def every_method() -> list[str]:
        client = client_for(api.url)
        sent = [
            await client.apost("/echo", json={}),
            await client.aput("/echo"),
            await client.apatch("/echo"),
            await client.adelete("/echo"),
            await client.arequest("GET", "/echo"),
        ]
        return [r.json()["method"] for r in sent]

    assert asyncio.run(every_method()) == ["POST", "PUT", "PATCH", "DELETE", "GET"]


def test_async_failures_classify_alike(api):
    async def fetch(status: int) -> StepHandlerResult:
        client = client_for(api.url)
        return client.api_failure(
            await client.aget(f"/status/{status}", params={"retry_after": "3"})
        )

    retryable = asyncio.run(fetch(503))
    assert (retryable.retryable, retryable.retry_after_seconds) == (True, 3.0)
    permanent = asyncio.run(fetch(404))
    assert (permanent.retryable, str(permanent.error_type)) == (False, "permanent_error")


# -- in a real engine -------------------------------------------------------------------------
TEMPLATE = """
name: api_order
namespace_name: api_test
version: "1.0.0"
steps:
  - name: fetch_order
    handler:
      callable: fetch_order
      initialization: {{ base_url: "{url}" }}
    dependencies: []
    retry:
      {{ retryable: true, max_attempts: 3, backoff: exponential, backoff_base_ms: 10 }}
  - name: fetch_customer
    handler:
      callable: async_client
      initialization: {{ base_url: "{url}" }}
    dependencies: [fetch_order]
    retry:
      {{ retryable: true, max_attempts: 3, backoff: exponential, backoff_base_ms: 10 }}
"""


def test_a_503_with_retry_after_is_retried_after_that_wait_then_succeeds(tasker, api):
    from seeds.handlers.api import FetchOrderHandler  # the seed's handler, unchanged

    tasker.register_template(TEMPLATE.format(url=api.url))
    tasker.register_handler(FetchOrderHandler)
    tasker.register_handler(AsyncClient)

    task = tasker.run_task(
        "api_order",
        namespace="api_test",
        context={"order_id": "flaky-7", "customer_id": "c9"},
        timeout=30,
    )

    assert task.status == "complete", task
    order = task.steps["fetch_order"]
    assert order.attempts == 2
    assert order.result == {"order_id": "flaky-7", "total": 42.5}
    assert task.results["fetch_customer"] == {"customer_id": "c9", "tier": "gold"}
    calls = [r for r in api.requests if r["path"] == "/orders/flaky-7"]
    assert len(calls) == 2
    # The engine's own backoff would have been 10 ms; Retry-After asked for a second.
    assert calls[1]["at"] - calls[0]["at"] >= 0.95
    retry = [
        t
        for t in tasker.transitions(task.uuid)["steps"]
        if t.get("step_name") == "fetch_order" and t.get("event") == "retry_decided"
    ]
    assert len(retry) == 1, tasker.transitions(task.uuid)


def test_a_404_fails_the_step_permanently(tasker, api):
    from seeds.handlers.api import FetchOrderHandler

    tasker.register_template(TEMPLATE.format(url=api.url))
    tasker.register_handler(FetchOrderHandler)
    tasker.register_handler(AsyncClient)

    task = tasker.run_task(
        "api_order", namespace="api_test", context={"order_id": "missing-1"}, timeout=30
    )

    assert task.status == "blocked_by_failures", task
    step = task.steps["fetch_order"]
    assert (step.state, step.attempts) == ("error", 1)
    assert step.error["error_type"] == "permanent_error"
    assert step.error["error_code"] == "HTTP_404"
    assert step.error["retryable"] is False
    assert "returned HTTP 404 Not Found" in step.error["message"]
    assert task.steps["fetch_customer"].state == "pending"
    assert len([r for r in api.requests if r["path"] == "/orders/missing-1"]) == 1


def test_connection_refused_in_the_engine_is_retried_until_exhausted(tasker, refused_url):
    from seeds.handlers.api import FetchOrderHandler

    tasker.register_template(TEMPLATE.format(url=refused_url))
    tasker.register_handler(FetchOrderHandler)
    tasker.register_handler(AsyncClient)

    task = tasker.run_task(
        "api_order", namespace="api_test", context={"order_id": "o-1"}, timeout=30
    )

    step = task.steps["fetch_order"]
    assert (step.state, step.attempts) == ("error", 3)
    assert step.error["error_code"] == "CONNECTION_ERROR"
    assert step.error["message"].startswith("connection failed while fetching order")
