"""psql 15 itself, beyond `psql -c`: scripts of meta-commands and of the variables that change what psql
sends (AUTOCOMMIT, ON_ERROR_ROLLBACK, FETCH_COUNT, SINGLESTEP) run on stdin directly against Postgres and
through the proxy in both pool modes, and their outputs compared.

Directly, psql logs in as the application role and a prefix script (its own `-f`, so the script's line
numbers stay the same) sets the tenant's signed context as the proxy would, from the signing key, so
Row-Level Security gives both runs the same rows. Normalised: the user name and port that \\conninfo and
\\c show (the proxy's client logs in as alice), and \\timing's figures. The documented differences are
asserted as such (refusals with their messages), never skipped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.demo import LEADS, TenantDatabase
from proxy.embedded import EmbeddedPostgres
from support import ACME, GLOBEX, ProxyProcess, unprotected_table

MODES = {"session": {"pool": {"mode": "session"}}, "transaction": {"pool": {"mode": "transaction", "size": 2}}}
TARGETS = ["session", "transaction"]
ACME_NAMES = [name for name, _ in LEADS["acme"]]
GLOBEX_NAMES = [name for name, _ in LEADS["globex"]]

# Sets the tenant's context on the direct connection as the proxy does (proxy/tenant.py's proof for this
# backend), then forgets the variables it used, so that the script starts as a proxied session does.
CONTEXT_PREFIX = r"""\set QUIET on
SELECT pg_backend_pid() AS ctx_pid \gset
\set ctx_proof `"$CTX_PYTHON" -c 'import hmac, hashlib, os, sys, time; e = int(time.time()) + 3600; m = "%s:%d:%s" % (sys.argv[1], e, os.environ["CTX_TENANT"]); print("%d:%s" % (e, hmac.new(os.environ["CTX_KEY"].encode(), m.encode(), hashlib.sha256).hexdigest()))' :ctx_pid`
SELECT set_config('app.current_tenant', :'ctx_tenant', false), set_config('tenant_proxy.proof', :'ctx_proof', false) \gset ctx_
\unset ctx_pid
\unset ctx_proof
\unset ctx_set_config
\unset ctx_tenant
\unset QUIET
"""


class Runs:
    """psql against Postgres directly (with the context set) and through a proxy in each pool mode."""

    def __init__(self, pg: EmbeddedPostgres, db: TenantDatabase, workdir: Path) -> None:
        self.pg, self.db = pg, db
        self.prefix = workdir / "context.sql"
        self.prefix.write_text(CONTEXT_PREFIX)
        self.proxies = {mode: ProxyProcess(pg, db, workdir, overrides).start() for mode, overrides in MODES.items()}

    def stop(self) -> None:
        for proxy in self.proxies.values():
            proxy.stop()

    def command(self, target: str, tenant: str = ACME) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable"}
        args = ["psql", "-X", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1"]
        if target == "direct":
            env.update(PGPASSWORD=self.db.app_password, CTX_KEY=self.db.signing_key, CTX_TENANT=tenant, CTX_PYTHON=sys.executable)
            args += ["-d", self.db.database, "-p", str(self.pg.port), "-U", self.db.app_role, "-v", f"ctx_tenant={tenant}",
                     "-f", str(self.prefix)]
        else:
            proxy = self.proxies[target]
            env.update(PGPASSWORD=proxy.token(tenant))
            args += ["-d", "app", "-p", str(proxy.port), "-U", "alice"]
        return args + ["-f", "-"], env

    def run(self, target: str, script: str, tenant: str = ACME) -> str:
        """psql's stdout and stderr (a marker between them) for `script` on stdin, normalised."""
        args, env = self.command(target, tenant)
        result = subprocess.run(args, input=script, capture_output=True, text=True, env=env, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        return normalise(result.stdout + "\n--- stderr ---\n" + result.stderr)


def normalise(output: str) -> str:
    output = re.sub(r'as user "(tenant_app|alice)"', 'as user "USER"', output)
    output = re.sub(r'at port "\d+"', 'at port "PORT"', output)
    return re.sub(r"Time: [0-9.]+ ms", "Time: N ms", output)


@pytest.fixture(scope="module")
def runs(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    started = Runs(pg, tenant_db, tmp_path_factory.mktemp("psql"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def scratch(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[str]:
    """A table without Row-Level Security (COPY FROM refuses tables under it), emptied by each script."""
    with unprotected_table(pg, tenant_db, "psql_scratch", "n int, t text", grants="SELECT, INSERT, UPDATE, DELETE") as name:
        yield name


def assert_same(runs: Runs, mode: str, script: str, tenant: str = ACME) -> str:
    expected = runs.run("direct", script, tenant)
    got = runs.run(mode, script, tenant)
    assert got == expected
    others = GLOBEX_NAMES if tenant == ACME else ACME_NAMES
    assert not any(name in got for name in others), got  # never another tenant's leads
    return got


META_COMMANDS = r"""SELECT current_setting('app.current_tenant') AS tenant, count(*) FROM leads;
SELECT name FROM leads ORDER BY id;
\conninfo
\encoding
\dt
\dv
\dn
\dx
\df tenant_proxy.*
\du
\dp leads
\l
\dconfig
\dconfig search_path
\dconfig *.current_tenant
\d leads
\d+ leads
\sf tenant_proxy.claim
\lo_list
"""

DISPLAY = r"""\x
SELECT id, name FROM leads ORDER BY id;
\x off
\pset null <null>
SELECT name, NULL AS n FROM leads ORDER BY id LIMIT 1;
SELECT format('SELECT %L AS v, count(*) FROM leads', g) FROM generate_series(1, 2) g \gexec
SELECT 'SELECT 1/0', 'SELECT name FROM leads ORDER BY id' \gexec
SELECT count(*) AS cnt, min(name) AS first FROM leads \gset
\echo :cnt :first
SELECT 1 AS a, 2 AS b \gset p_
\echo :p_a :p_b
SELECT 'a' AS r, 'x' AS c, 1 AS v UNION ALL SELECT 'a', 'y', 2 UNION ALL SELECT 'b', 'x', 3 \crosstabview
SELECT name, tenant_id::text AS t, 1 AS v FROM leads \crosstabview name t v
\set flag true
\if :flag
\echo flag-true
\elif :{?nosuch}
\echo elif
\else
\echo else
\endif
\if :{?nosuch}
\echo has-nosuch
\elif :{?cnt}
\echo has-cnt
\endif
\timing on
SELECT 1 AS timed;
\timing off
SELECT name, id FROM leads \gdesc
SELECT name FROM leads ORDER BY id \g (format=csv tuples_only=on)
SELECT 1/0;
\errverbose
\set VERBOSITY verbose
SELECT * FROM nosuch;
\set VERBOSITY default
\copy leads (name, email) TO STDOUT
\copy (SELECT name FROM leads ORDER BY id) TO STDOUT WITH CSV HEADER
COPY (SELECT name FROM leads ORDER BY id) TO STDOUT;
\encoding LATIN1
SHOW client_encoding;
SELECT name FROM leads ORDER BY id;
\encoding UTF8
SET work_mem = '2MB';
\dconfig work_mem
BEGIN;
SET LOCAL work_mem = '3MB';
\dconfig work_mem
ROLLBACK;
SHOW work_mem;
\set SINGLESTEP on
SELECT 'stepped' AS s;

SELECT 'skipped' AS s;
x
\set SINGLESTEP off
"""

COPY_IN = r"""DELETE FROM psql_scratch;
\copy psql_scratch (n, t) FROM STDIN
10	ten
11	eleven
\.
COPY psql_scratch (n, t) FROM STDIN;
12	twelve
\.
\copy psql_scratch (n, t) FROM STDIN WITH CSV
13,thirteen
14,"four, teen"
\.
SELECT n, t FROM psql_scratch ORDER BY n;
\copy leads (name, email) FROM STDIN
Copy Person	copy@x.test
\.
SELECT count(*) FROM leads;
DELETE FROM psql_scratch;
"""

VARIABLES = r"""DELETE FROM psql_scratch;
\set AUTOCOMMIT off
SELECT count(*) FROM leads;
INSERT INTO psql_scratch VALUES (1, 'a');
SELECT count(*) FROM psql_scratch;
ROLLBACK;
SELECT count(*) FROM psql_scratch;
SELECT name FROM leads ORDER BY id;
COMMIT;
SET work_mem = '1MB';
SET TRANSACTION ISOLATION LEVEL SERIALIZABLE;
SHOW transaction_isolation;
SELECT count(*) FROM leads;
ROLLBACK;
SHOW work_mem;
INSERT INTO leads (name, email) VALUES ('Tmp', 'tmp@x.test') RETURNING name;
SELECT currval('leads_id_seq') > 0 AS has_currval, count(*) FROM leads;
ROLLBACK;
\echo :AUTOCOMMIT
\set AUTOCOMMIT on
\set ON_ERROR_ROLLBACK on
BEGIN;
INSERT INTO psql_scratch VALUES (2, 'b');
SELECT 1/0;
SELECT count(*) FROM psql_scratch;
SELECT name FROM leads ORDER BY id;
SET work_mem = '5MB';
SELECT 1/0;
SHOW work_mem;
RESET work_mem;
SELECT 1/0;
SHOW work_mem;
ROLLBACK;
BEGIN;
SELECT 1/0;
SELECT count(*) FROM leads;
COMMIT;
\set ON_ERROR_ROLLBACK off
\set FETCH_COUNT 1
SELECT name FROM leads ORDER BY id;
SELECT current_setting('app.current_tenant') AS t, g FROM generate_series(1, 3) g;
SELECT 1/(3 - g) AS q FROM generate_series(1, 5) g;
SELECT count(*) FROM leads;
BEGIN;
SELECT name FROM leads ORDER BY id;
COMMIT;
\set AUTOCOMMIT off
\set ON_ERROR_ROLLBACK on
SELECT name FROM leads ORDER BY id;
SELECT 1/(3 - g) AS q FROM generate_series(1, 5) g;
SELECT name FROM leads ORDER BY id;
COMMIT;
\unset FETCH_COUNT
\set ON_ERROR_ROLLBACK off
\set AUTOCOMMIT on
BEGIN;
SET LOCAL work_mem = '1MB';
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ;
SHOW transaction_isolation;
SELECT count(*) FROM leads;
COMMIT;
DELETE FROM psql_scratch;
"""


@pytest.mark.parametrize("mode", TARGETS)
@pytest.mark.parametrize("script", [META_COMMANDS, DISPLAY], ids=["meta-commands", "display"])
def test_psql_meta_commands_as_directly(runs: Runs, mode: str, script: str) -> None:
    got = assert_same(runs, mode, script)
    assert 'You are connected to database "app" as user "USER"' in got or "\\conninfo" not in script
    assert "Ada Lovelace" in got


@pytest.mark.parametrize("mode", TARGETS)
def test_psql_copy_from_stdin_as_directly(runs: Runs, scratch: str, mode: str) -> None:
    got = assert_same(runs, mode, COPY_IN)
    assert " 14 | four, teen" in got and "COPY FROM not supported with row-level security" in got


@pytest.mark.parametrize("mode", TARGETS)
def test_psql_variables_as_directly(runs: Runs, scratch: str, mode: str) -> None:
    """AUTOCOMMIT off (psql sends BEGIN), ON_ERROR_ROLLBACK (SAVEPOINT / RELEASE / ROLLBACK TO around each
    statement), FETCH_COUNT (DECLARE / FETCH / CLOSE in a block). Before the fix, transaction mode put the
    context in front of `SET work_mem` after psql's BEGIN, and the SET TRANSACTION behind it failed with
    25001 "must be called before any query"."""
    got = assert_same(runs, mode, VARIABLES)
    assert "must be called before any query" not in got and " serializable" in got and " repeatable read" in got


@pytest.mark.parametrize("mode", TARGETS)
def test_psql_as_another_tenant(runs: Runs, mode: str) -> None:
    got = assert_same(runs, mode, "SELECT name FROM leads ORDER BY id;\n\\set FETCH_COUNT 1\nSELECT name FROM leads ORDER BY id;\n",
                      tenant=GLOBEX)
    assert all(name in got for name in GLOBEX_NAMES)


def test_repeatable_read_snapshot_is_taken_after_lock(runs: Runs, pg: EmbeddedPostgres, scratch: str) -> None:
    """`BEGIN ISOLATION LEVEL REPEATABLE READ; LOCK TABLE ...; SELECT`: Postgres takes the snapshot after
    the lock is granted (LOCK runs without one), so the SELECT sees what the lock's previous holder
    committed. Before the fix, transaction mode's context in front of the LOCK took the snapshot first."""
    script = ("BEGIN ISOLATION LEVEL REPEATABLE READ;\nLOCK TABLE psql_scratch IN ROW EXCLUSIVE MODE;\n"
              "SELECT count(*) AS after_lock FROM psql_scratch;\nCOMMIT;\n")
    seen = {}
    for target in ["direct", *TARGETS]:
        pg.psql("DELETE FROM psql_scratch", database="app")
        holder = subprocess.Popen(
            [str(pg.bindir / "psql"), "-X", "-q", "-h", str(pg.socket_dir), "-p", str(pg.port), "-U", "postgres", "-d", "app",
             "-f", "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        assert holder.stdin is not None
        holder.stdin.write("BEGIN;\nLOCK TABLE psql_scratch IN EXCLUSIVE MODE;\nINSERT INTO psql_scratch VALUES (1, 'x');\n"
                           "SELECT pg_sleep(1.5);\nCOMMIT;\n")
        holder.stdin.close()
        time.sleep(0.5)  # the holder has its lock
        seen[target] = re.findall(r"^\s+(\d+)$", runs.run(target, script), re.M)
        holder.wait(20)
    pg.psql("DELETE FROM psql_scratch", database="app")
    assert seen == {"direct": ["1"], "session": ["1"], "transaction": ["1"]}


@pytest.mark.parametrize("mode", TARGETS)
def test_psql_documented_refusals(runs: Runs, mode: str) -> None:
    """\\password (ALTER ROLE, 42501), the large-object commands (FunctionCall), \\encoding SJIS (a client
    encoding the guard refuses); psql carries on after each. \\c logs in again with the same token."""
    script = ("\\password\nsecret1\nsecret1\n\\lo_import /etc/hostname\n\\lo_unlink 12345\n\\encoding SJIS\n\\encoding\n"
              "\\c\n\\conninfo\nSELECT count(*) FROM leads;\n")
    got = runs.run(mode, script)
    assert "ALTER ROLE is not allowed through pg-tenant-proxy" in got
    assert got.count("the FunctionCall protocol message is not supported through pg-tenant-proxy") == 2
    assert "SJIS: invalid encoding name or conversion procedure not found" in got and re.search(r"^UTF8$", got, re.M)
    assert 'You are now connected to database "app" as user "USER".' in got
    assert re.search(r"count \n-------\n +2\n", got), got
    # directly: the same password set again, large objects refused by privilege, SJIS taken
    direct = runs.run("direct", script.replace("secret1", runs.db.app_password))
    assert "ALTER ROLE" not in direct and "permission denied for function lo_creat" in direct and re.search(r"^SJIS$", direct, re.M)


def test_savepoint_before_set_transaction_is_documented(runs: Runs) -> None:
    """docs/pool-modes.md: SAVEPOINT takes the context in front in transaction mode, so SET TRANSACTION
    behind it gets "must be called before any query" (psql's ON_ERROR_ROLLBACK sends SAVEPOINT)."""
    script = "\\set ON_ERROR_ROLLBACK on\nBEGIN;\nSET TRANSACTION ISOLATION LEVEL SERIALIZABLE;\nCOMMIT;\n"
    for target in ("direct", "session"):
        assert "must not be called in a subtransaction" in runs.run(target, script)
    assert "SET TRANSACTION ISOLATION LEVEL must be called before any query" in runs.run("transaction", script)


@pytest.mark.parametrize("mode", TARGETS)
def test_psql_watch_as_directly(runs: Runs, mode: str) -> None:
    """\\watch (psql 15 has no count): stopped with SIGINT, as Ctrl-C would; every round shows the tenant's rows."""
    rounds = {}
    for target in ("direct", mode):
        args, env = runs.command(target)
        process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("SELECT string_agg(name, ',' ORDER BY id) AS names FROM leads \\watch 0.1\n")
        process.stdin.flush()
        time.sleep(1.5)
        process.send_signal(signal.SIGINT)
        process.stdin.close()
        output = process.stdout.read()
        process.wait(10)
        rounds[target] = set(re.findall(r"^ (\S.*)$", output, re.M)) - {"names"}
        assert output.count("(every 0.1s)") >= 3, output
    assert rounds[mode] == rounds["direct"] == {",".join(ACME_NAMES)}


def test_two_tenants_concurrently_in_transaction_mode(runs: Runs) -> None:
    """ACME and GLOBEX psql sessions interleaving their transactions (FETCH_COUNT cursors, AUTOCOMMIT off,
    ON_ERROR_ROLLBACK) over two server connections: each sees only its own leads, every time."""
    script = "".join(
        "\\set FETCH_COUNT 1\nSELECT name FROM leads ORDER BY id;\n\\unset FETCH_COUNT\n\\set AUTOCOMMIT off\n"
        "\\set ON_ERROR_ROLLBACK on\nSELECT 1/0;\nSELECT name FROM leads ORDER BY id;\nCOMMIT;\n\\set AUTOCOMMIT on\n"
        for _ in range(15))
    outputs: dict[str, list[str]] = {ACME: [], GLOBEX: []}

    def run(tenant: str) -> None:
        outputs[tenant].append(runs.run("transaction", script, tenant))

    threads = [threading.Thread(target=run, args=(tenant,)) for tenant in (ACME, GLOBEX, ACME, GLOBEX)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for tenant, names, others in ((ACME, ACME_NAMES, GLOBEX_NAMES), (GLOBEX, GLOBEX_NAMES, ACME_NAMES)):
        assert len(outputs[tenant]) == 2
        for output in outputs[tenant]:
            rows = re.findall(r"^ (\S[^|\n]*?)\s*$", output, re.M)
            assert rows.count(names[0]) == 30 and not any(name in output for name in others), output
