"""The cost of one tenant_proxy.current_tenant() call, in microseconds, measured with pgbench.

Starts a throwaway Postgres, installs this checkout's verifier, and runs pgbench scripts on one client,
interleaved: one calls the verifier CALLS times in one statement, another does the same statement around
pg_backend_pid() (with --per-statement: STATEMENTS statements of one call each, as a policy calls it).
The difference of their latencies over the calls is the verifier's own cost per call.
With --sql OTHER_VERIFIER.sql, that file's current_tenant() is installed beside it (as
tenant_proxy.current_tenant_compared()) and measured in the same runs, so both see the same noise.
Usage: python bench/verifier_cost.py [--sql OTHER_VERIFIER.sql] [--runs N] [--seconds S].
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

CALLS = 1000
# Sets a valid context for this backend (as a superuser, who may read the key), so every call verifies.
CONTEXT = (
    "SELECT set_config('app.current_tenant', 'acme', false),"
    " set_config('tenant_proxy.proof', e.x || ':' || encode(sha256(outer_pad || sha256(inner_pad"
    " || convert_to(pg_backend_pid()::text || ':' || e.x || ':acme', 'UTF8'))), 'hex'), false)"
    " FROM tenant_proxy.signing_key, (SELECT '99999999999'::text AS x) e;\n"
)
STATEMENTS = 200
CALLS_IN_ONE_STATEMENT = CONTEXT + "SELECT count({function}) FROM generate_series(1, " + str(CALLS) + ");\n"
# As a policy calls it: once per statement, in a sub-select, so each call has a new call context (and a
# SECURITY DEFINER function with SET reads its settings again). EXECUTE plans the statement each time;
# the baseline pays that too. Server side, so no round trip adds its noise.
CALLS_IN_STATEMENTS = CONTEXT + (
    "DO $$ BEGIN FOR i IN 1.." + str(STATEMENTS) + " LOOP EXECUTE 'SELECT (SELECT {function})'; END LOOP; END $$;\n")


def compared_function(path: Path) -> str:
    """The current_tenant() definition of another verifier.sql, renamed current_tenant_compared()."""
    text = path.read_text()
    start = text.index("CREATE OR REPLACE FUNCTION tenant_proxy.current_tenant()")
    end = text.index("$verifier$;", start) + len("$verifier$;")
    return (text[start:end].replace("tenant_proxy.current_tenant()", "tenant_proxy.current_tenant_compared()")
            .replace("@SETTING@", "'app.current_tenant'").replace("@PROOF_SETTING@", "'tenant_proxy.proof'"))


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
    parser.add_argument("--per-statement", action="store_true",
                        help=f"{STATEMENTS} statements of one call each (EXECUTE in a DO block), as a policy calls it,"
                        f" instead of {CALLS} calls in one")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        pg = EmbeddedPostgres().start()
        try:
            db = prepare_database(pg)
            functions = {"baseline": "pg_backend_pid()", "current_tenant": "tenant_proxy.current_tenant()"}
            if args.sql is not None:
                pg.psql(compared_function(args.sql), db.database)
                functions[f"compared ({args.sql.name})"] = "tenant_proxy.current_tenant_compared()"
            for function in list(functions.values())[1:]:
                check = pg.psql(CONTEXT + f"SELECT {function};", db.database).split()
                if check[-1] != "acme":
                    raise RuntimeError(f"{function} does not verify the benchmark's context: {check}")
            Path(workdir).chmod(0o755)
            paths = {}
            for index, (name, function) in enumerate(functions.items()):
                paths[name] = Path(workdir) / f"script{index}.sql"
                paths[name].write_text((CALLS_IN_STATEMENTS if args.per_statement else CALLS_IN_ONE_STATEMENT)
                                       .format(function=function))
                paths[name].chmod(0o644)
            costs: dict[str, list[float]] = {name: [] for name in list(functions)[1:]}
            for run in range(args.runs):
                latencies = {name: latency_ms(pg, path, args.seconds) for name, path in paths.items()}
                for name in costs:
                    calls = STATEMENTS if args.per_statement else CALLS
                    costs[name].append((latencies[name] - latencies["baseline"]) * 1000 / calls)
                print(f"run {run + 1}: " + ", ".join(f"{name} {values[-1]:.2f} us" for name, values in costs.items()),
                      flush=True)
            for name, values in costs.items():
                print(f"{name}: median {statistics.median(values):.2f} us per call"
                      f" ({', '.join(f'{c:.2f}' for c in values)})")
            if len(costs) == 2:  # the same runs' difference is steadier than the difference of medians
                current, compared = costs.values()
                print(f"compared minus current_tenant, median of the runs' differences:"
                      f" {statistics.median(b - a for a, b in zip(current, compared)):.2f} us per call")
        finally:
            pg.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
