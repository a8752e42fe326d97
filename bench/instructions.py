"""User-space instructions per transaction of the proxy, counted by callgrind: a measure of a change's CPU
cost that the machine's noise does not move (repeat runs agree within 0.5%, where CPU time per
transaction moves by 20% between runs on a shared 2-core machine).

    .venv/bin/python bench/instructions.py --mode transaction --clients 64 [--tree DIR | --rev REV]

Starts a throwaway Postgres (as `bench/run` does), runs the proxy of this checkout (or of `--tree`, or
of git revision `--rev` in a temporary worktree) under `valgrind --tool=callgrind`, and runs
`pgbench -S` twice with different numbers of transactions per client. Logins and warm-up cost the same
in both runs, so the difference of the two runs' counts over the difference of their transactions is the
count per transaction. Under valgrind the proxy is the bottleneck by far, so in transaction mode every
client waits for a server connection: the checkout, hand-over and release path of S3 at its busiest.

Counts are instructions, not time: a cache miss or a system call counts as little as an add. They say
which of two versions of the proxy's own code does less work; `bench/run` says how fast it is. Run it on
a quiet machine: under heavy load the bytes of several messages arrive in fewer or more reads, and the
count moves with them (a run beside two test suites counted twice as many in session mode). The proxy
runs with PYTHONHASHSEED=0: with a random seed, dict and set layouts differ between processes and the
count moved by up to 3% between runs of the same code. Where the checkout lives changes memory layout
too: the same code counted 2% apart from the main checkout and from a worktree, each repeatably. Measure
both builds with `--rev` or `--tree`, and read a difference under 2% as none.
Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Target, free_port, running_bench, write_config  # noqa: E402

from proxy.demo import wait_for_port  # noqa: E402

STARTUP_SECONDS = 300.0  # the proxy imports and starts about 50 times slower under callgrind
DUMP_SECONDS = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("session", "transaction"), default="transaction")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--pool", type=int, default=8, help="server connections in transaction mode (default 8)")
    parser.add_argument("--protocol", choices=("simple", "extended", "prepared"), default="simple",
                        help="pgbench's query mode, -M (default simple)")
    parser.add_argument("--transactions", type=int, nargs=2, default=(5, 40), metavar=("FEW", "MANY"),
                        help="transactions per client in the two runs (default 5 40)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tree", type=Path, help="a checkout of the proxy (default: this one)")
    where.add_argument("--rev", help="a git revision, checked out in a temporary worktree")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed: apt-get install valgrind")
    if args.rev:
        with tempfile.TemporaryDirectory() as directory:
            tree = Path(directory) / "tree"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), args.rev], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                report(args, tree, args.rev)
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        return
    report(args, (args.tree or REPO).resolve(), str(args.tree or "this checkout"))


def report(args: argparse.Namespace, tree: Path, label: str) -> None:
    few, many = args.transactions
    with running_bench(10.0) as bench, tempfile.TemporaryDirectory() as dumps:
        bench.load_data(1)
        port = free_port()
        size = args.pool if args.mode == "transaction" else args.clients + 10
        settings = {"pool": {"size": size, "mode": args.mode, "max_client_connections": 20_000}, "": {"log_level": "warning"}}
        config = write_config(bench.workdir / "instructions.toml", bench.pg, bench.db, port, settings)
        out = Path(dumps) / "callgrind.out"
        proxy = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", sys.executable, "-m", "proxy", "run",
             "--config", str(config)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"},
        )
        try:
            wait_for_port(port, proxy, deadline=STARTUP_SECONDS)
            target = Target("proxy", port, "bench", "", "disable")

            def run(per_client: int) -> tuple[int, int]:
                """Transactions of one pgbench run, and the instructions the proxy spent meanwhile."""
                dump(proxy.pid, Path(dumps))  # zeroes the counters
                output = bench.pgbench(target, ["-S", "-M", args.protocol, "-c", str(args.clients), "-j", "2", "-t", str(per_client)],
                                       bench.password_for(target))
                done = int(re.search(r"number of transactions actually processed: (\d+)", output).group(1))  # type: ignore[union-attr]
                return done, dump(proxy.pid, Path(dumps))

            run(2)  # warm-up: the server connections, the proxy's own statements
            few_done, few_count = run(few)
            many_done, many_count = run(many)
        finally:
            proxy.send_signal(signal.SIGINT)
            try:
                proxy.wait(DUMP_SECONDS)
            except subprocess.TimeoutExpired:
                proxy.kill()
    per_transaction = (many_count - few_count) / (many_done - few_done)
    print(f"{label}: {args.mode} mode, {args.protocol} protocol, {args.clients} clients: {per_transaction:,.0f} instructions per transaction "
          f"({few_count:,} over {few_done} transactions, {many_count:,} over {many_done})")


def dump(pid: int, directory: Path) -> int:
    """Have callgrind write its counts since the last dump (and zero them); return the total."""
    for old in directory.glob("callgrind.out.*"):
        old.unlink()
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + DUMP_SECONDS
    while time.monotonic() < deadline:
        for path in directory.glob("callgrind.out.*"):
            found = re.search(r"^(?:summary|totals):\s+(\d+)", path.read_text(errors="replace"), re.MULTILINE)
            if found:
                return int(found.group(1))
        time.sleep(0.2)
    raise RuntimeError("callgrind wrote no counts")


if __name__ == "__main__":
    main()
