"""The embedded benchmark with Python handlers: what `tasker-bench` measures with Rust handlers
(linear-4 and diamond-4 single-task latency, throughput of many linear-4 tasks submitted at
once), on an embedded SQLite file, with the same templates and the same `bench.add` handler
written in Python (`bench_handlers.py`). Prints numbers; it is not a test.

`./run bench python` runs it with `--rust-bench PATH`: the Rust benchmark runs first with the
same arguments and the multi-thread tokio runtime (the one the Python binding runs the engine
on), and the two are compared line by line.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_handlers import Add

from tasker_core import Tasker, TaskHandle

# The Rust benchmark's templates.
TEMPLATES = Path(__file__).resolve().parents[2] / "bench" / "templates"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round((len(ordered) - 1) * p))]


def latency(
    tasker: Tasker,
    name: str,
    last: str,
    n: int,
    warmup: int,
    expect: Callable[[int], int],
) -> float:
    """Prints and returns the p50 of `n` single tasks run one after the other."""
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
    return percentile(samples, 0.5)


def throughput(tasker: Tasker, n: int) -> float:
    """Prints and returns the steps per second of `n` linear tasks submitted at once."""
    # All tasks are submitted at once, as the Rust benchmark does; the engine commits them in
    # groups.
    start = time.perf_counter()
    handles: list[TaskHandle] = tasker.create_tasks(
        "linear_add", [{"x": i} for i in range(n)], namespace="bench"
    )
    created = time.perf_counter() - start
    failed = sum(1 for h in handles if not h.wait(timeout=300).is_complete)
    wall = time.perf_counter() - start
    print(
        f"linear_add   throughput, {n} concurrent tasks: {n / wall:.0f} tasks/s, "
        f"{n * 4 / wall:.0f} steps/s (wall {ms(wall)}, creation {ms(created)}, "
        f"not complete: {failed})"
    )
    return n * 4 / wall


def rust_numbers(bench: str, args: argparse.Namespace) -> dict[str, float]:
    """Runs the Rust benchmark with the same workload; returns its p50s (seconds) and
    throughput (steps/s) by measure name."""
    cmd = [
        bench,
        "--runtime",
        "multi",
        "--latency-tasks",
        str(args.latency_tasks),
        "--warmup",
        str(args.warmup),
        "--throughput-tasks",
        str(args.throughput_tasks),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print("-- Rust handlers (tasker-bench --runtime multi):")
    print(out.rstrip())
    found: dict[str, float] = {}
    for line in out.splitlines():
        if m := re.match(r"(\w+)\s+single-task latency .*? p50 ([\d.]+) ms", line):
            found[m.group(1)] = float(m.group(2)) / 1000
        elif m := re.match(r"linear_add\s+throughput.*? ([\d.]+) steps/s", line):
            found["throughput"] = float(m.group(1))
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--latency-tasks", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--throughput-tasks", type=int, default=1000)
    # The Rust engine runs up to 32 handlers at once by default (`Config::concurrency`): the
    # Python pool gets as many threads, so both sides may have as many steps in flight.
    parser.add_argument("--concurrency", type=int, default=32, help="handler threads")
    parser.add_argument("--rust-bench", help="tasker-bench to compare with (release build)")
    args = parser.parse_args(argv)
    rust = rust_numbers(args.rust_bench, args) if args.rust_bench else {}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:{Path(tmp) / 'bench.db'}"
        with Tasker(url, handlers=[Add], concurrency=args.concurrency) as tasker:
            for name in ("linear_add", "diamond_add"):
                tasker.register_template((TEMPLATES / f"{name}.yaml").read_text())
            print(
                "-- embedded SQLite (WAL, synchronous=normal), in-process Python handlers "
                f"({args.concurrency} threads, Python {sys.version.split()[0]})"
            )
            n, warmup = args.latency_tasks, args.warmup
            py = {
                "linear_add": latency(tasker, "linear_add", "add_4", n, warmup, lambda x: x + 10),
                "diamond_add": latency(
                    tasker, "diamond_add", "d_join", n, warmup, lambda x: 2 * x + 7
                ),
                "throughput": throughput(tasker, args.throughput_tasks),
            }
    if rust:
        print("-- Python handlers compared with Rust handlers:")
        for name in ("linear_add", "diamond_add"):
            if name in rust:
                extra = (py[name] - rust[name]) * 1000
                print(f"{name:<12} p50: {extra:+.2f} ms per task (target: at most +0.50 ms)")
        if "throughput" in rust:
            share = py["throughput"] / rust["throughput"] * 100
            print(f"linear_add   throughput: {share:.0f} % of Rust's (target: at least 70 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
