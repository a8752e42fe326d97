"""The benchmark harness starts all targets and parses one scenario (a smoke test, not a measurement)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from harness import Result, cpu_seconds, log_findings, percentile, shortfalls, targets, tps_of  # noqa: E402


def test_tps_parsing() -> None:
    output = "latency average = 0.5 ms\ntps = 31234.567890 (without initial connection time)\n"
    assert tps_of(output) == pytest.approx(31234.56789)
    assert tps_of("tps = 4048.842095 (including reconnection times)\n") == pytest.approx(4048.842095)
    with pytest.raises(RuntimeError):
        tps_of("pgbench: error")


def test_cpu_seconds_counts_descendants() -> None:
    """A busy child's CPU time shows in this process's total, as a proxy's workers show in its own."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        deadline = time.monotonic() + 60
        while cpu_seconds(spinner.pid) < 1.0:
            assert time.monotonic() < deadline, "the child never got a second of CPU"
            time.sleep(0.05)
        own = sum(os.times()[:2])
        assert cpu_seconds(os.getpid()) - own >= 1.0 - 1e-6  # sums of clock ticks: 4.44 - 3.44 is 0.9999999999999996
    finally:
        spinner.kill()
        spinner.wait()


def test_shortfalls_say_by_how_much_and_where_the_time_goes() -> None:
    def table(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, Result]]:
        return {scenario: {target: Result([value]) for target, value in row.items()} for scenario, row in rows.items()}

    results = table({"S1": {"pgbouncer": 20000, "proxy": 18000, "copy": 20500},
                     "S4": {"pgbouncer": 6000, "proxy": 9600},
                     "S7-p50": {"direct": 100, "pgbouncer": 130, "proxy": 160, "copy": 140}})
    lines = "\n".join(shortfalls(results, table({"S1": {"proxy": 28.0, "pgbouncer": 20.0}})))
    assert "**S1** is 10% short" in lines and "proxy 28.0 us, PgBouncer 20.0 us" in lines and "reaches 1.02x" in lines
    assert "**S4**" not in lines  # 1.6x: met
    assert "adds 60 us per query, 2.00x PgBouncer's 30 us" in lines and "reference adds 40 us" in lines
    assert shortfalls(table({"S1": {"pgbouncer": 100, "proxy": 120}}), {}) == []


def test_s8_target_compares_the_transaction_mode_proxy_with_pgbouncer() -> None:
    results = {"S8": {"direct": Result([8000]), "pgbouncer-tx": Result([5000]), "proxy-tx": Result([3500])}}
    assert "| S8 proxy TPS >= 2.0x the app's SET LOCAL pattern through PgBouncer (transaction mode) | 0.70x | no |" \
        in targets(results)
    lines = "\n".join(shortfalls(results, {"S8": {"proxy-tx": Result([170.0]), "pgbouncer-tx": Result([107.0])}}))
    assert "**S8** is at 0.70x, 65% short of 2x" in lines and "proxy 170.0 us, PgBouncer (four statements) 107.0 us" in lines
    results["S8"]["proxy-tx"] = Result([10500])
    assert shortfalls(results, {}) == []


def test_log_findings_count_the_proxies_messages(tmp_path: Path) -> None:
    (tmp_path / "proxy-tx.log").write_text("2026-01-01 00:00:00 WARNING pool: waited\n" * 3
                                           + "2026-01-01 00:00:01 ERROR relay: broken\n")
    (tmp_path / "proxy.log").write_text("")
    (tmp_path / "pgbouncer.log").write_text("noise\n")
    lines = log_findings(SimpleNamespace(workdir=tmp_path))  # type: ignore[arg-type]
    assert lines[2:] == ["- proxy-tx: 4 lines; 3x `WARNING pool: waited`; 1x `ERROR relay: broken`"]
    (tmp_path / "quiet").mkdir()
    assert log_findings(SimpleNamespace(workdir=tmp_path / "quiet"))[2:] == ["- none"]  # type: ignore[arg-type]


def test_percentile() -> None:
    assert percentile([5, 1, 3, 2, 4], 0.5) == 3
    assert percentile(list(range(100)), 0.99) == 99


@pytest.mark.skipif(shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists(),
                    reason="PgBouncer is installed by .ci/run and bench/run")
def test_harness_runs_one_scenario(tmp_path: Path) -> None:
    output = tmp_path / "RESULTS.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "harness.py"), "--quick", "--only", "S1", "--runs", "1",
         "--duration", "1", "--scale", "1", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={"PATH": "/usr/sbin:/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = output.read_text()
    for target in ("direct", "pgbouncer", "proxy"):
        assert f"| S1 pgbench -S, 16 clients, simple protocol, session mode | {target} |" in text
    assert "vs PgBouncer" in text and "## Commands" in text
    assert "| S1 | proxy |" in text and "| S1 | pgbouncer |" in text  # CPU per transaction
