"""The embedded benchmark with Python handlers: what `tasker-bench` measures with Rust handlers
(linear-4 and diamond-4 single-task latency, throughput of many linear-4 tasks submitted at
once), on an embedded SQLite file, with the same templates and the same `bench.add` handler
written in Python. Prints numbers; it is not a test. Run it with `./run bench python`, which
also runs the Rust benchmark so the two can be compared.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasker_core import StepContext, StepHandler, StepHandlerResult, Tasker, TaskHandle

LINEAR = """
name: linear_add
namespace_name: bench
version: "1.0.0"
identity_strategy: always_unique
steps:
  - { name: add_1, handler: { callable: bench.add, initialization: { add: 1 } }, retry: { max_attempts: 3 } }
  - { name: add_2, handler: { callable: bench.add, initialization: { add: 2 } }, retry: { max_attempts: 3 }, dependencies: [add_1] }
  - { name: add_3, handler: { callable: bench.add, initialization: { add: 3 } }, retry: { max_attempts: 3 }, dependencies: [add_2] }
  - { name: add_4, handler: { callable: bench.add, initialization: { add: 4 } }, retry: { max_attempts: 3 }, dependencies: [add_3] }
"""  # noqa: E501

DIAMOND = """
name: diamond_add
namespace_name: bench
version: "1.0.0"
identity_strategy: always_unique
steps:
  - { name: d_start, handler: { callable: bench.add, initialization: { add: 1 } }, retry: { max_attempts: 3 } }
  - { name: d_left, handler: { callable: bench.add, initialization: { add: 2 } }, retry: { max_attempts: 3 }, dependencies: [d_start] }
  - { name: d_right, handler: { callable: bench.add, initialization: { add: 3 } }, retry: { max_attempts: 3 }, dependencies: [d_start] }
  - { name: d_join, handler: { callable: bench.add, initialization: { add: 0 } }, retry: { max_attempts: 3 }, dependencies: [d_left, d_right] }
"""  # noqa: E501


class Add(StepHandler):
    """Adds the step's `add` to the sum of its parents' values (or to the context's `x`)."""

    handler_name = "bench.add"

    def call(self, context: StepContext) -> StepHandlerResult:
        add = int(context.get_config("add", 0))
        parents = context.raw.get("definition", {}).get("dependencies") or []
        if parents:
            base = sum(int(context.get_dependency_field(p, "value") or 0) for p in parents)
        else:
            base = int(context.get_input_or("x", 0))
        return StepHandlerResult.success(result={"value": base + add})


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * p))]


def latency(
    tasker: Tasker, name: str, last: str, n: int, warmup: int, expect: Callable[[int], int]
) -> None:
    samples: list[float] = []
    for i in range(n + warmup):
        start = time.perf_counter()
        task = tasker.run_task(name, namespace="bench", context={"x": i}, timeout=30)
        took = time.perf_counter() - start
        value = (task.results.get(last) or {}).get("value")
        if not task.is_complete or value != expect(i):
            raise SystemExit(f"{name} task {task.uuid} ended {task.status} with {value}")
        if i >= warmup:
            samples.append(took)
    print(
        f"{name:<12} single-task latency over {n} tasks: p50 {ms(percentile(samples, 0.5))}  "
        f"p95 {ms(percentile(samples, 0.95))}  max {ms(max(samples))}"
    )


def throughput(tasker: Tasker, n: int, clients: int) -> None:
    # All tasks are submitted at once by concurrent callers; the engine commits concurrent
    # creations in groups.
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        handles: list[TaskHandle] = list(
            pool.map(
                lambda i: tasker.create_task("linear_add", namespace="bench", context={"x": i}),
                range(n),
            )
        )
    created = time.perf_counter() - start
    failed = sum(1 for h in handles if not h.wait(timeout=300).is_complete)
    wall = time.perf_counter() - start
    print(
        f"linear_add   throughput, {n} concurrent tasks: {n / wall:.0f} tasks/s, "
        f"{n * 4 / wall:.0f} steps/s (wall {ms(wall)}, creation {ms(created)}, "
        f"not complete: {failed})"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--throughput-tasks", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8, help="threads submitting tasks")
    parser.add_argument("--concurrency", type=int, default=4, help="handler threads")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:{Path(tmp) / 'bench.db'}"
        with Tasker(url, handlers=[Add], concurrency=args.concurrency) as tasker:
            tasker.register_template(LINEAR)
            tasker.register_template(DIAMOND)
            print(
                "embedded SQLite (WAL, synchronous=normal), in-process Python handlers "
                f"({args.concurrency} threads, Python {sys.version.split()[0]})"
            )
            n, warmup = args.latency_tasks, args.warmup
            latency(tasker, "linear_add", "add_4", n, warmup, lambda x: x + 10)
            latency(tasker, "diamond_add", "d_join", n, warmup, lambda x: 2 * x + 7)
            throughput(tasker, args.throughput_tasks, args.clients)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
