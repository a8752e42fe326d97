"""Where the proxy's CPU time per transaction goes: the kernel (system calls, TCP, waking the peer), the
Python interpreter, the event loop (uvloop) and the C library, sampled by perf's software clock while
pgbench runs, for this checkout and for another revision, alternated.

    .venv/bin/python bench/cpu_split.py [--rev REV] [--mode transaction] [--clients 32] [--runs 3] [--duration 12]

`bench/run` says how much CPU a transaction costs; `bench/instructions.py` counts the proxy's own
instructions, but weighs a string search (many simple instructions a cycle) like a Python call (few). This
says in which layer the time of two versions differs: perf samples the proxy process on its CPU clock
(`perf record -e cpu-clock`, no hardware counters needed), each sample is 1/frequency seconds of CPU, and
the samples are split by the shared object they fall in. Figures are microseconds per transaction, the
median of `--runs` runs of each version. The machine's noise moves them as it moves `bench/run`'s (a
few percent between runs on a quiet 2-core machine): run it with nothing else running.
Needs perf (`apt-get install linux-perf`) and, for `--rev`, git.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Bench, Target, free_port, running_bench, write_config  # noqa: E402

from proxy.demo import wait_for_port  # noqa: E402

FREQUENCY = 1999  # samples per second of CPU (an odd rate, so sampling does not beat with the loop's timers)
LAYERS = (("kernel", "[kernel"), ("interpreter", "libpython"), ("event loop", "uvloop"), ("event loop", "loop.cpython"),
          ("C library", "libc."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", help="a git revision to compare with, checked out in a temporary worktree")
    parser.add_argument("--mode", choices=("session", "transaction"), default="transaction")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--pool", type=int, default=8, help="server connections in transaction mode (default 8)")
    parser.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple", help="pgbench -M")
    parser.add_argument("--runs", type=int, default=3, help="runs of each version, alternated (default 3)")
    parser.add_argument("--duration", type=int, default=12, help="seconds of each pgbench run (default 12)")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("perf is not installed: apt-get install linux-perf")
    with worktree(args.rev) as other:
        trees = [("this checkout", REPO)] + ([(args.rev, other)] if other is not None else [])
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in trees}
        with running_bench(float(args.duration)) as bench, tempfile.TemporaryDirectory() as scratch:
            bench.load_data(1)
            for _ in range(args.runs):
                for label, tree in trees:
                    results[label].append(measure(bench, tree, args, Path(scratch)))
    layers = ["total", *dict(LAYERS), "other"]
    print(f"{args.mode} mode, {args.protocol} protocol, {args.clients} clients: CPU microseconds per transaction, "
          f"median of {args.runs} runs")
    print(f"{'':16}" + "".join(f"{layer:>13}" for layer in layers))
    for label, runs in results.items():
        print(f"{label[:16]:16}" + "".join(f"{statistics.median(run[layer] for run in runs):13.1f}" for layer in layers))


@contextmanager
def worktree(rev: str | None) -> Iterator[Path | None]:
    if rev is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as directory:
        tree = Path(directory) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


def measure(bench: Bench, tree: Path, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """One pgbench run through the proxy of `tree` under perf: microseconds per transaction by layer."""
    port = free_port()
    size = args.pool if args.mode == "transaction" else args.clients + 10
    settings = {"pool": {"size": size, "mode": args.mode, "max_client_connections": 20_000}, "": {"log_level": "warning"}}
    config = write_config(scratch / "cpu_split.toml", bench.pg, bench.db, port, settings)
    proxy = subprocess.Popen([sys.executable, "-m", "proxy", "run", "--config", str(config)], cwd=tree,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(tree)})
    samples = scratch / "perf.data"
    try:
        wait_for_port(port, proxy)
        target = Target("proxy", port, "bench", "", "disable")
        password = bench.password_for(target)
        bench.pgbench(target, ["-S", "-M", args.protocol, "-c", str(args.clients), "-j", "2", "-t", "20"], password)  # warm-up
        perf = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", str(FREQUENCY), "-o", str(samples), "-p", str(proxy.pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        output = bench.pgbench(target, ["-S", "-M", args.protocol, "-c", str(args.clients), "-j", "2", "-T", str(args.duration)], password)
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
    finally:
        proxy.send_signal(signal.SIGINT)
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
    done = int(re.search(r"number of transactions actually processed: (\d+)", output).group(1))  # type: ignore[union-attr]
    return split(samples, done)


def split(samples: Path, transactions: int) -> dict[str, float]:
    """perf's samples by shared object, as CPU microseconds per transaction in each layer."""
    report = subprocess.run(["perf", "report", "-i", str(samples), "--stdio", "--sort", "dso", "-F", "sample,dso"],
                            check=True, capture_output=True, text=True).stdout
    per: dict[str, float] = {layer: 0.0 for layer in ["total", *dict(LAYERS), "other"]}
    for line in report.splitlines():
        found = re.match(r"\s*(\d+)\s+(\S.*?)\s*$", line)
        if line.startswith("#") or found is None:
            continue
        micros = int(found.group(1)) / FREQUENCY / transactions * 1e6
        layer = next((name for name, prefix in LAYERS if found.group(2).startswith(prefix) or prefix in found.group(2)), "other")
        per[layer] += micros
        per["total"] += micros
    return per


if __name__ == "__main__":
    main()
