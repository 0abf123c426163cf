"""The API handler type (SPEC §12): HTTP calls through httpx with the engine's classification
of what a response means for the step (``tasker_core::http_outcome``).

    class FetchOrderHandler(APIMixin, StepHandler):
        handler_name = "fetch_order"
        base_url = "https://api.example.com"

        def call(self, context):
            try:
                response = self.get(f"/orders/{context.get_input('order_id')}")
            except httpx.ConnectError as e:
                return self.connection_error(e, "fetching order")
            except httpx.TimeoutException as e:
                return self.timeout_error(e, "fetching order")
            return self.api_success(response) if response.ok else self.api_failure(response)

``async def call`` handlers use the awaitable forms ``aget``, ``apost``, ``aput``, ``apatch``,
``adelete`` and ``arequest``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import httpx

from tasker_core import _native
from tasker_core.context import StepContext
from tasker_core.types import StepHandlerResult

__all__ = ["APIMixin", "ApiResponse"]

# The step a handler is running, so that its ``handler.initialization`` can configure the
# client without being passed to every request (one handler instance serves many threads).
_current_step: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar(
    "tasker_api_step", default=None
)


class ApiResponse:
    """An HTTP response with what it means for the step: ``ok`` (2xx), ``is_retryable`` (5xx,
    408, 429), ``is_client_error``, ``is_server_error`` and ``retry_after`` (seconds the
    server asked to wait, from ``Retry-After`` as seconds or an HTTP-date). The httpx
    response is ``raw``; ``status_code``, ``headers``, ``text``, ``content`` and ``json()``
    read through to it."""

    def __init__(self, response: httpx.Response):
        self.raw = response
        ok, retryable, client_error, server_error = _native.http_status_class(response.status_code)
        self.ok: bool = ok
        self.is_retryable: bool = retryable
        self.is_client_error: bool = client_error
        self.is_server_error: bool = server_error
        header = response.headers.get("retry-after")
        self.retry_after: float | None = (
            None if header is None else _native.http_retry_after(header)
        )

    @property
    def status_code(self) -> int:
        return self.raw.status_code

    @property
    def headers(self) -> httpx.Headers:
        return self.raw.headers

    @property
    def text(self) -> str:
        return self.raw.text

    @property
    def content(self) -> bytes:
        return self.raw.content

    @property
    def url(self) -> str:
        return str(self.raw.url)

    def json(self) -> Any:
        """The body parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return self.raw.json()

    @property
    def body(self) -> Any:
        """The body as JSON when it parses, else its text; ``None`` when empty."""
        if not self.raw.content:
            return None
        try:
            return self.raw.json()
        except ValueError:
            return self.raw.text

    def _wire(self) -> str:
        """The response as the engine's ``HttpResponse`` (JSON text)."""
        request = self.raw.request
        wire: dict[str, Any] = {
            "status": self.raw.status_code,
            "method": request.method,
            "url": str(request.url),
            "reason": self.raw.reason_phrase,
        }
        header = self.raw.headers.get("retry-after")
        if header is not None:
            wire["retry_after"] = header
        wire["body"] = self.body
        try:
            return json.dumps(wire, allow_nan=False)
        except ValueError:
            # JSON with NaN or Infinity, which the engine's JSON has no words for.
            wire["body"] = self.raw.text
            return json.dumps(wire)

    def __repr__(self) -> str:
        return f"<ApiResponse {self.raw.request.method} {self.url} {self.status_code}>"


class APIMixin:
    """HTTP methods and outcome helpers for handlers that call an API.

    Configuration, from the lowest priority: the class attributes ``base_url``,
    ``default_timeout`` (seconds), ``default_headers`` and ``follow_redirects``; the same
    keys (``base_url``, ``timeout``, ``headers``) in the handler's constructor config; in
    the step's ``handler.initialization``; and keyword arguments of each request (passed to
    httpx: ``params=``, ``json=``, ``headers=``, ``timeout=``...).
    """

    base_url: ClassVar[str] = ""
    default_timeout: ClassVar[float] = 30.0
    default_headers: ClassVar[Mapping[str, str]] = {}
    follow_redirects: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        call = cls.__dict__.get("call")
        if call is not None and not getattr(call, "_tasker_api_scoped", False):
            cls.call = _scoped(call)  # type: ignore[attr-defined]

    # -- configuration ----------------------------------------------------------------------
    def _settings(self) -> tuple[str, float, tuple[tuple[str, str], ...]]:
        base_url, timeout = self.base_url, float(self.default_timeout)
        headers = dict(self.default_headers)
        sources: list[Any] = [getattr(self, "config", None)]
        step = _current_step.get()
        if step is not None:
            sources.append(step.step_config)
        for source in sources:
            if not isinstance(source, Mapping):
                continue
            base_url = str(source.get("base_url", base_url))
            if source.get("timeout") is not None:
                timeout = float(source["timeout"])
            if isinstance(source.get("headers"), Mapping):
                headers.update({str(k): str(v) for k, v in source["headers"].items()})
        return base_url, timeout, tuple(sorted(headers.items()))

    def _clients(self) -> _Clients:
        clients: _Clients | None = self.__dict__.get("_tasker_http_clients")
        if clients is None:
            with _setup_lock:
                clients = self.__dict__.setdefault("_tasker_http_clients", _Clients())
        assert clients is not None
        return clients

    def _client(self) -> httpx.Client:
        key = self._settings()
        clients = self._clients()
        with clients.lock:
            client = clients.sync.get(key)
            if client is None:
                client = clients.sync[key] = httpx.Client(**_client_options(key, self))
        return client

    def _async_client(self) -> httpx.AsyncClient:
        key = self._settings()
        clients = self._clients()
        # An async client belongs to the event loop it was first used on.
        loop = asyncio.get_running_loop()
        with clients.lock:
            per_loop = clients.by_loop.setdefault(loop, {})
            client = per_loop.get(key)
            if client is None:
                client = per_loop[key] = httpx.AsyncClient(**_client_options(key, self))
        return client

    # -- requests ---------------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> ApiResponse:
        """Sends a request (``path`` relative to ``base_url``, or absolute). Raises
        ``httpx.ConnectError`` / ``httpx.TimeoutException`` when no response came: catch
        them and return :meth:`connection_error` / :meth:`timeout_error`."""
        return ApiResponse(self._client().request(method, path, **kwargs))

    def get(self, path: str, **kwargs: Any) -> ApiResponse:
        """``GET path``."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> ApiResponse:
        """``POST path`` (``json=`` for a JSON body)."""
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> ApiResponse:
        """``PUT path``."""
        return self.request("PUT", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> ApiResponse:
        """``PATCH path``."""
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> ApiResponse:
        """``DELETE path``."""
        return self.request("DELETE", path, **kwargs)

    async def arequest(self, method: str, path: str, **kwargs: Any) -> ApiResponse:
        """:meth:`request` for ``async def`` handlers."""
        return ApiResponse(await self._async_client().request(method, path, **kwargs))

    async def aget(self, path: str, **kwargs: Any) -> ApiResponse:
        """``GET path``, awaitable."""
        return await self.arequest("GET", path, **kwargs)

    async def apost(self, path: str, **kwargs: Any) -> ApiResponse:
        """``POST path``, awaitable."""
        return await self.arequest("POST", path, **kwargs)

    async def aput(self, path: str, **kwargs: Any) -> ApiResponse:
        """``PUT path``, awaitable."""
        return await self.arequest("PUT", path, **kwargs)

    async def apatch(self, path: str, **kwargs: Any) -> ApiResponse:
        """``PATCH path``, awaitable."""
        return await self.arequest("PATCH", path, **kwargs)

    async def adelete(self, path: str, **kwargs: Any) -> ApiResponse:
        """``DELETE path``, awaitable."""
        return await self.arequest("DELETE", path, **kwargs)

    # -- outcomes ---------------------------------------------------------------------------
    def api_success(
        self, response: ApiResponse, result: dict[str, Any] | None = None
    ) -> StepHandlerResult:
        """A success: ``result``, else the response body (a JSON object as it is, an empty
        body as ``{}``, anything else under ``data``), with the status, method and URL as
        metadata. Refuses a response that is not 2xx."""
        given = None if result is None else json.dumps(result, allow_nan=False)
        return StepHandlerResult.from_outcome(_native.http_success(response._wire(), given))

    def api_failure(
        self,
        response: ApiResponse,
        message: str | None = None,
        error_code: str | None = None,
    ) -> StepHandlerResult:
        """A failure classified from the status: 4xx permanent except 408 and 429; 5xx, 408
        and 429 retryable, waiting what ``Retry-After`` asks (``retry_after_seconds``).
        Error code ``HTTP_<status>`` unless ``error_code`` is given."""
        outcome = _native.http_failure(response._wire(), message)
        result = StepHandlerResult.from_outcome(outcome)
        if error_code is not None:
            result.error_code = error_code
        return result

    def connection_error(
        self, exc: BaseException | str, operation: str | None = None
    ) -> StepHandlerResult:
        """A retryable failure (``CONNECTION_ERROR``) for a request that could not connect;
        ``operation`` says what the handler was doing ("fetching order")."""
        return StepHandlerResult.from_outcome(
            _native.http_connection_failure(_detail(exc), operation)
        )

    def timeout_error(
        self, exc: BaseException | str, operation: str | None = None
    ) -> StepHandlerResult:
        """A retryable ``timeout`` failure (``TIMEOUT``) for a request that got no response in
        time."""
        return StepHandlerResult.from_outcome(_native.http_timeout_failure(_detail(exc), operation))


def _detail(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return exc
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scoped(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` with the step it runs visible to the mixin's configuration."""
    if inspect.iscoroutinefunction(call):

        @functools.wraps(call)
        async def async_scoped(self: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
            token = _current_step.set(context if isinstance(context, StepContext) else None)
            try:
                return await call(self, context, *args, **kwargs)
            finally:
                _current_step.reset(token)

        async_scoped._tasker_api_scoped = True  # type: ignore[attr-defined]
        return async_scoped

    @functools.wraps(call)
    def scoped(self: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
        token = _current_step.set(context if isinstance(context, StepContext) else None)
        try:
            return call(self, context, *args, **kwargs)
        finally:
            _current_step.reset(token)

    scoped._tasker_api_scoped = True  # type: ignore[attr-defined]
    return scoped


_ClientKey = tuple[str, float, tuple[tuple[str, str], ...]]

_setup_lock = threading.Lock()


class _Clients:
    """A handler instance's HTTP clients, one per configuration: httpx.Client is
    thread-safe and keeps its connections, so every worker thread shares it; an async client
    is kept per event loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sync: dict[_ClientKey, httpx.Client] = {}
        self.by_loop: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[_ClientKey, httpx.AsyncClient]
        ] = weakref.WeakKeyDictionary()


def _client_options(key: _ClientKey, handler: APIMixin) -> dict[str, Any]:
    base_url, timeout, headers = key
    return {
        "base_url": base_url,
        "timeout": timeout,
        "headers": dict(headers),
        "follow_redirects": handler.follow_redirects,
    }
