"""The cost of one tenant_proxy.current_tenant() call, in microseconds, measured with pgbench.

Starts a throwaway Postgres, installs the verifier (this checkout's, or the file given), and runs two
pgbench scripts on one client, interleaved: one calls the verifier CALLS times in one statement, the other
does the same statement around pg_backend_pid(). The difference of their median latencies over CALLS is
the verifier's own cost per call. Usage: python bench/verifier_cost.py [--sql OLD_VERIFIER.sql].
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from proxy.demo import prepare_database  # noqa: E402
from proxy.embedded import EmbeddedPostgres  # noqa: E402
from proxy.verifier import verifier_sql  # noqa: E402

CALLS = 1000
# Sets a valid context for this backend (as a superuser, who may read the key), so every call verifies.
CONTEXT = (
    "SELECT set_config('app.current_tenant', 'acme', false),"
    " set_config('tenant_proxy.proof', e.x || ':' || encode(sha256(outer_pad || sha256(inner_pad"
    " || convert_to(pg_backend_pid()::text || ':' || e.x || ':acme', 'UTF8'))), 'hex'), false)"
    " FROM tenant_proxy.signing_key, (SELECT '99999999999'::text AS x) e;\n"
)
SCRIPTS = {
    "verifier": CONTEXT + f"SELECT count(tenant_proxy.current_tenant()) FROM generate_series(1, {CALLS});\n",
    "baseline": CONTEXT + f"SELECT count(pg_backend_pid()) FROM generate_series(1, {CALLS});\n",
}


def latency_ms(pg: EmbeddedPostgres, script: Path, seconds: int) -> float:
    result = subprocess.run(
        [str(pg.bindir / "pgbench"), "-n", "-c", "1", "-T", str(seconds), "-f", str(script),
         "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", "postgres", "app"],
        capture_output=True, text=True, check=True,
    )
    match = re.search(r"latency average = ([0-9.]+) ms", result.stdout)
    if match is None:
        raise RuntimeError(f"no latency in pgbench output:\n{result.stdout[-500:]}")
    return float(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sql", type=Path, help="a verifier.sql to install instead of this checkout's")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        pg = EmbeddedPostgres().start()
        try:
            db = prepare_database(pg)
            if args.sql is not None:
                pg.psql(args.sql.read_text().replace("@SETTING@", "'app.current_tenant'")
                        .replace("@PROOF_SETTING@", "'tenant_proxy.proof'")
                        .replace("@CLAIMS_SETTING@", "'request.jwt.claims'")
                        .replace("@CLAIMS_PROOF_SETTING@", "'tenant_proxy.claims_proof'") + "COMMIT;\n", db.database)
            else:
                pg.psql(verifier_sql("app.current_tenant", "tenant_proxy.proof", None), db.database)
            check = pg.psql(CONTEXT + "SELECT tenant_proxy.current_tenant();", db.database).split()
            if check[-1] != "acme":
                raise RuntimeError(f"the verifier does not verify the benchmark's context: {check}")
            paths = {name: Path(workdir) / f"{name}.sql" for name in SCRIPTS}
            for name, path in paths.items():
                path.write_text(SCRIPTS[name])
                path.chmod(0o644)
            Path(workdir).chmod(0o755)
            costs: list[float] = []
            for run in range(args.runs):
                verifier, baseline = (latency_ms(pg, paths[name], args.seconds) for name in ("verifier", "baseline"))
                costs.append((verifier - baseline) * 1000 / CALLS)
                print(f"run {run + 1}: {costs[-1]:.2f} us per call", flush=True)
            print(f"median: {statistics.median(costs):.2f} us per call ({', '.join(f'{c:.2f}' for c in costs)})")
        finally:
            pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
