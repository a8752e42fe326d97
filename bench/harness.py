"""Benchmark harness: pg-tenant-proxy beside PgBouncer and direct Postgres, in one run.

Starts a tuned throwaway Postgres, the proxy and PgBouncer with equivalent settings, runs each
scenario against each target interleaved (A B C A B C ...), and reports medians with ratios to direct
and to PgBouncer. `bench/run` is the entry point; it prepares the environment first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.demo import TenantDatabase, prepare_database, wait_for_port, write_config
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.protocol import messages
from proxy.tokens import mint

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TENANT_COUNT = 100
ROWS_PER_TENANT = 1000
LOOKUP_ROWS_PER_TENANT = 200  # S8's table


@dataclass
class Target:
    """One thing pgbench connects to."""

    name: str
    port: int
    user: str
    password: str
    sslmode: str = "disable"  # libpq's, for pgbench's connections


@dataclass
class Result:
    """All runs of one scenario on one target."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


@dataclass
class Scenario:
    name: str
    title: str
    unit: str
    targets: list[str]
    run: Callable[[Target, float], float]
    once: bool = False  # a second run in the same process would measure something else
    note: str = ""


class Bench:
    """Owns the processes of one benchmark run."""

    def __init__(self, workdir: Path, duration: float) -> None:
        self.workdir = workdir
        self.duration = duration
        self.tls_cert, self.tls_key = write_certificate(workdir)
        self.pg = EmbeddedPostgres(
            settings={
                "max_connections": "400",
                "shared_buffers": "256MB",
                "max_wal_size": "2GB",
                "log_min_messages": "warning",
                # For S9; the other targets connect with sslmode disable (PgBouncer's default too).
                "ssl": "on",
                "ssl_cert_file": str(self.tls_cert),
                "ssl_key_file": str(self.tls_key),
            }
        ).start()
        self.db: TenantDatabase = prepare_database(self.pg, database="bench")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.pids: dict[str, int] = {}
        self.targets: dict[str, Target] = {}
        self.commands: list[str] = []
        self.tokens: dict[str, str] = {}
        self.tenants = [str(uuid.UUID(int=i + 1, version=4)) for i in range(TENANT_COUNT)]
        self.rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.rsa_public_file = workdir / "rs256.pem"
        self.rsa_public_file.write_bytes(
            self.rsa_private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )

    # -- setup -----------------------------------------------------------------------------------

    def load_data(self, scale: int) -> None:
        pgbench = str(self.pg.bindir / "pgbench")
        subprocess.run(
            [pgbench, "-i", "-q", "-s", str(scale), "-h", str(self.pg.socket_dir), "-p", str(self.pg.port),
             "-U", "postgres", "bench"],
            check=True, capture_output=True,
        )
        role = self.db.app_role
        values = ",".join(f"('{t}')" for t in self.tenants)
        self.pg.psql(
            f"GRANT SELECT, INSERT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO {role};"
            f"CREATE TABLE tenants (tenant_id uuid PRIMARY KEY); INSERT INTO tenants VALUES {values};"
            "CREATE TABLE orders (tenant_id uuid NOT NULL, id int NOT NULL, customer text, amount numeric,"
            " PRIMARY KEY (tenant_id, id));"
            f"INSERT INTO orders SELECT t.tenant_id, g, 'customer ' || g, g * 1.5 FROM tenants t,"
            f" generate_series(1, {ROWS_PER_TENANT}) g;"
            "CREATE TABLE orders_plain AS SELECT * FROM orders; ALTER TABLE orders_plain ADD PRIMARY KEY (tenant_id, id);"
            "ALTER TABLE orders ENABLE ROW LEVEL SECURITY; ALTER TABLE orders FORCE ROW LEVEL SECURITY;"
            "CREATE POLICY strict ON orders USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);"
            "ALTER TABLE orders_plain ENABLE ROW LEVEL SECURITY; ALTER TABLE orders_plain FORCE ROW LEVEL SECURITY;"
            "CREATE POLICY plain ON orders_plain USING (tenant_id = current_setting('app.current_tenant', true)::uuid);"
            "CREATE TABLE lookups (tenant_id uuid NOT NULL, id int NOT NULL, customer text, amount numeric,"
            " PRIMARY KEY (tenant_id, id));"
            f"INSERT INTO lookups SELECT tenant_id, id, customer, amount FROM orders WHERE id <= {LOOKUP_ROWS_PER_TENANT};"
            "CREATE TABLE lookups_plain AS SELECT * FROM lookups; ALTER TABLE lookups_plain ADD PRIMARY KEY (tenant_id, id);"
            "ALTER TABLE lookups ENABLE ROW LEVEL SECURITY; ALTER TABLE lookups FORCE ROW LEVEL SECURITY;"
            "CREATE POLICY strict ON lookups USING (tenant_id = (SELECT tenant_proxy.current_tenant())::uuid);"
            "ALTER TABLE lookups_plain ENABLE ROW LEVEL SECURITY; ALTER TABLE lookups_plain FORCE ROW LEVEL SECURITY;"
            "CREATE POLICY plain ON lookups_plain USING (tenant_id = current_setting('app.current_tenant', true)::uuid);"
            f"GRANT SELECT ON orders, orders_plain, lookups, lookups_plain TO {role}; ANALYZE;",
            "bench",
        )

    def start_proxy(self, name: str, overrides: dict[str, dict[str, object]] | None = None, sslmode: str = "disable",
                    checkout: Path = REPO) -> Target:
        """The proxy of this checkout (or of `checkout`: another revision's tree, see `--baseline`)."""
        port = free_port()
        settings: dict[str, dict[str, object]] = {"pool": {"size": 300, "max_client_connections": 20_000},
                                                  "": {"log_level": "warning"}, **(overrides or {})}
        if checkout == REPO:  # S6 holds 10,000 clients of one tenant; an older revision has no such key
            settings.setdefault("client", {}).setdefault("max_connections_per_tenant", 20_000)
        config = write_config(self.workdir / f"{name}.toml", self.pg, self.db, port, settings)
        log = open(self.workdir / f"{name}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "proxy", "run", "--config", str(config)],
            stderr=log, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
        )
        shown = ", ".join(f"{section + '.' if section else ''}{key}={value}"
                          for section, values in settings.items() for key, value in values.items())
        return self._started(Target(name, port, "bench", "", sslmode), process,
                             f"pg-tenant-proxy run --config {config.name}  # {shown}")

    def start_pgbouncer(self, name: str, pool_mode: str, pool_size: int = 300, tls: bool = False) -> Target:
        """PgBouncer in `pool_mode`; with `tls`, TLS required from clients and to Postgres (S9)."""
        port = free_port()
        directory = self.workdir / name
        directory.mkdir()
        tls_lines = (f"client_tls_sslmode = require\nclient_tls_cert_file = {self.tls_cert}\n"
                     f"client_tls_key_file = {self.tls_key}\nserver_tls_sslmode = require\n") if tls else ""
        (directory / "userlist.txt").write_text(f'"{self.db.app_role}" "{self.db.app_password}"\n')
        (directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"bench = host=127.0.0.1 port={self.pg.port} dbname=bench\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = plain\nauth_file = {directory / 'userlist.txt'}\n"
            f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = 20000\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {directory / 'pgbouncer.log'}\npidfile = {directory / 'pgbouncer.pid'}\n"
            + tls_lines
        )
        kwargs: dict[str, object] = {}
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres", "postgres")
            for path in directory.iterdir():
                shutil.chown(path, "postgres", "postgres")
            kwargs = {"user": "postgres", "group": "postgres", "extra_groups": []}
        process = subprocess.Popen(  # type: ignore[call-overload]
            ["pgbouncer", str(directory / "pgbouncer.ini")], stderr=subprocess.DEVNULL, cwd=directory, **kwargs
        )
        shown = f"pool_mode={pool_mode}, auth_type=plain, default_pool_size={pool_size}" + (
            ", client_tls_sslmode=require, server_tls_sslmode=require" if tls else "")
        return self._started(Target(name, port, self.db.app_role, self.db.app_password, "require" if tls else "disable"),
                             process, f"pgbouncer pgbouncer.ini  # {shown}")

    def start_copier(self, name: str) -> Target:
        """The byte-copying reference (`bench/copy_proxy.py`): the floor of any Python uvloop proxy."""
        port = free_port()
        process = subprocess.Popen([sys.executable, str(HERE / "copy_proxy.py"), str(port), str(self.pg.port)])
        return self._started(Target(name, port, self.db.app_role, self.db.app_password), process,
                             "python bench/copy_proxy.py PORT POSTGRES_PORT  # copies bytes, nothing else")

    def _started(self, target: Target, process: subprocess.Popen[bytes], command: str) -> Target:
        """Register a target whose process was just started, once it accepts connections."""
        self.processes.append(process)
        self.pids[target.name] = process.pid
        wait_for_port(target.port, process)
        self.commands.append(command)
        self.targets[target.name] = target
        return target

    def pid_of(self, target: Target) -> int:
        return self.pids[target.name]

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self.pg.stop()

    # -- running ---------------------------------------------------------------------------------

    def token(self, tenant: str, key: str = "hs") -> str:
        cache_key = f"{key}:{tenant}"
        if cache_key not in self.tokens:
            claims = {"tenant_id": tenant, "sub": "bench", "exp": int(time.time()) + 24 * 3600}
            if key == "hs":
                self.tokens[cache_key] = mint(self.db.jwt_secret, claims)
            else:
                self.tokens[cache_key] = jwt.encode(claims, self.rsa_private, algorithm="RS256")
        return self.tokens[cache_key]

    def pgbench_process(self, target: Target, args: list[str], password: str, record: bool = True
                        ) -> subprocess.Popen[str]:
        command = [str(self.pg.bindir / "pgbench"), "-n", "-h", "127.0.0.1", "-p", str(target.port),
                   "-U", target.user, *args, "bench"]
        if record:
            shown = " ".join(a if not a.startswith(str(self.workdir)) else Path(a).name for a in command[1:])
            self.commands.append(f"pgbench {shown}  # against {target.name}")
        env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": target.sslmode}
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def finish(self, process: subprocess.Popen[str], target: Target) -> str:
        stdout, stderr = process.communicate(timeout=self.duration * 4 + 120)
        if process.returncode != 0:
            raise RuntimeError(f"pgbench against {target.name} failed: {stderr.strip()[-500:]}")
        return stdout

    def pgbench(self, target: Target, args: list[str], password: str) -> str:
        return self.finish(self.pgbench_process(target, args, password), target)

    def password_for(self, target: Target, tenant: str | None = None) -> str:
        if target.name.startswith("proxy"):
            return self.token(tenant or self.tenants[0], "rs" if "rs256" in target.name else "hs")
        return target.password


def write_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (P-256), readable by the postgres user that
    Postgres and PgBouncer run as: the TLS of S9 (clients use sslmode=require, which checks no name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now.replace(year=now.year + 1)).sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    if os.geteuid() == 0:
        for path in (cert_file, key_file):
            shutil.chown(path, "postgres", "postgres")
    return cert_file, key_file


def tps_of(output: str) -> float:
    match = re.search(r"tps = ([0-9.]+) \((without|excluding|including)", output)
    if match is None:
        raise RuntimeError(f"no tps in pgbench output:\n{output[-500:]}")
    return float(match.group(1))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def pgbench_latencies(bench: Bench, target: Target, args: list[str]) -> list[float]:
    """Per-transaction latencies in microseconds from pgbench's transaction log."""
    prefix = bench.workdir / f"latency-{target.name}-{time.monotonic_ns()}"
    bench.pgbench(target, [*args, "-l", f"--log-prefix={prefix}"], bench.password_for(target))
    latencies: list[float] = []
    for path in bench.workdir.glob(f"{prefix.name}*"):
        for line in path.read_text().splitlines():
            latencies.append(float(line.split()[2]))
        path.unlink()
    return latencies


def build_scenarios(bench: Bench, quick: bool, tenants: int = 64, pool: int = 8) -> list[Scenario]:
    duration = str(int(bench.duration))
    select_only = ["-S", "-c", "16", "-j", "2", "-T", duration]

    def s1(target: Target, _: float) -> float:
        return tps_of(bench.pgbench(target, [*select_only, "-M", "simple"], bench.password_for(target)))

    def s2(mode: str) -> Callable[[Target, float], float]:
        def run(target: Target, _: float) -> float:
            return tps_of(bench.pgbench(target, [*select_only, "-M", mode], bench.password_for(target)))

        return run

    def s3(mode: str) -> Callable[[Target, float], float]:
        def run(target: Target, _: float) -> float:
            args = ["-S", "-c", "64", "-j", "2", "-T", duration, "-M", mode]
            return tps_of(bench.pgbench(target, args, bench.password_for(target)))

        return run

    def tenant_workload(name: str, table: str, rows: int, tenants: int, clients: int
                        ) -> Callable[[Target, float], float]:
        """One pgbench process per tenant, `clients // tenants` clients each, indexed lookups on `table`
        under RLS: through a proxy the plain SELECT (its token names the tenant, the strict policy checks
        the verified context); elsewhere the application's own pattern, BEGIN; SET LOCAL; SELECT; COMMIT
        on `table`_plain, whose policy reads the setting."""
        def run(target: Target, _: float) -> float:
            processes = []
            for index, tenant in enumerate(bench.tenants[:tenants]):
                if target.name.startswith("proxy"):
                    body = f"SELECT id, customer, amount FROM {table} WHERE id = :id;\n"
                else:
                    body = (f"BEGIN;\nSET LOCAL app.current_tenant = '{tenant}';\n"
                            f"SELECT id, customer, amount FROM {table}_plain WHERE id = :id;\nCOMMIT;\n")
                script = bench.workdir / f"{name}-{target.name}-{index}.sql"
                script.write_text(f"\\set id random(1, {rows})\n" + body)
                processes.append(bench.pgbench_process(
                    target, ["-c", str(clients // tenants), "-j", "1", "-T", duration, "-f", str(script)],
                    bench.password_for(target, tenant), record=index == 0,
                ))
            return sum(tps_of(bench.finish(process, target)) for process in processes)

        return run

    def s6(target: Target, _: float) -> float:
        """Bytes of resident memory per idle logged-in client (the process's RSS growth / clients)."""
        pid = bench.pid_of(target)
        return asyncio.run(_idle_rss_per_client(pid, target.port, target.user, bench.password_for(target),
                                                IDLE_CLIENTS))

    def s5(target: Target, _: float) -> float:
        args = ["-S", "-C", "-c", "8", "-j", "2", "-T", duration]
        return tps_of(bench.pgbench(target, args, bench.password_for(target)))

    kept: dict[str, list[list[float]]] = {}  # S7-p50's runs, for S7-p99 to read

    def s7(fraction: float, first: bool) -> Callable[[Target, float], float]:
        """One percentile of a 1-client run. The first S7 scenario runs pgbench and keeps the latencies;
        the second reads the same runs, in order."""

        def run(target: Target, _: float) -> float:
            runs = kept.setdefault(target.name, [])
            if not first and runs:
                return percentile(runs.pop(0), fraction)
            latencies = pgbench_latencies(bench, target, ["-S", "-c", "1", "-j", "1", "-T", duration])
            if first:
                runs.append(latencies)
            return percentile(latencies, fraction)

        return run

    def guard_cost(kind: str) -> Callable[[Target, float], float]:
        def run(_: Target, __: float) -> float:
            return guard_microseconds(kind)

        return run

    def s10(target: Target, _: float) -> float:
        """Issue 12's input 3: every transaction runs set_config(..., true) then a lookup."""
        script = bench.workdir / "set-config.sql"
        script.write_text("\\set aid random(1, 100000 * :scale)\n"
                          "BEGIN;\nSELECT set_config('statement_timeout', '5s', true);\n"
                          "SELECT abalance FROM pgbench_accounts WHERE aid = :aid;\nEND;\n")
        args = ["-f", str(script), "-c", "64", "-j", "2", "-T", duration, "-M", "simple"]
        return tps_of(bench.pgbench(target, args, bench.password_for(target)))

    proxy_pair = ["direct", "pgbouncer", "proxy"]
    with_copy = proxy_pair if quick else [*proxy_pair, "copy"]
    transaction_trio = ["direct", "pgbouncer-tx", "proxy-tx"]
    s8_title = ("tenant workload, {clients} clients of {tenants} tenants over a pool of " + str(pool)
                + f": the proxy's plain SELECT vs BEGIN; SET LOCAL; SELECT; COMMIT by the app ({LOOKUP_ROWS_PER_TENANT}"
                " rows per tenant; direct: one backend per client)")
    scenarios = [
        Scenario("S1", "pgbench -S, 16 clients, simple protocol, session mode", "TPS",
                 proxy_pair if quick else [*with_copy, "proxy-2w"], s1),
        Scenario("S8", s8_title.format(clients=tenants, tenants=tenants), "TPS", transaction_trio,
                 tenant_workload("s8", "lookups", LOOKUP_ROWS_PER_TENANT, tenants, tenants)),
        Scenario("S7-p50", "1 client pgbench -S, latency p50", "us", with_copy, s7(0.50, first=True)),
        Scenario("S7-p99", "1 client pgbench -S, latency p99", "us", with_copy, s7(0.99, first=False)),
    ]
    if not quick:
        scenarios[2:2] = [
            Scenario("S8-200", s8_title.format(clients=200, tenants=100), "TPS", transaction_trio,
                     tenant_workload("s8-200", "lookups", LOOKUP_ROWS_PER_TENANT, 100, 200)),
            Scenario("S9", "S1 with TLS: pgbench -S, 16 clients, sslmode=require to the target, and TLS from the"
                     " proxy and PgBouncer to Postgres", "TPS", ["direct-tls", "pgbouncer-tls", "proxy-tls"], s1),
            Scenario("S2-ext", "pgbench -S -M extended, 16 clients", "TPS", proxy_pair, s2("extended")),
            Scenario("S2-prep", "pgbench -S -M prepared, 16 clients", "TPS", proxy_pair, s2("prepared")),
            Scenario("S3", f"transaction mode, pgbench -S, 64 clients over a pool of {pool}", "TPS", transaction_trio, s3("simple")),
            Scenario("S3-ext", f"transaction mode, pgbench -S -M extended, 64 clients over a pool of {pool}", "TPS",
                     transaction_trio, s3("extended")),
            Scenario("S3-prep", f"transaction mode, pgbench -S -M prepared, 64 clients over a pool of {pool} (PgBouncer"
                     " 1.18 cannot: it has no prepared statements in transaction mode)", "TPS",
                     ["direct", "proxy-tx"], s3("prepared")),
            Scenario("S4", "tenant workload, 16 tenants x 1 client: proxy context vs SET LOCAL by the app", "TPS",
                     proxy_pair, tenant_workload("s4", "orders", ROWS_PER_TENANT, 16, 16)),
            Scenario("S5", "connection storm, pgbench -S -C, 8 clients (connections/s)", "TPS",
                     ["pgbouncer", "proxy", "proxy-rs256"], s5),
            Scenario("S6", f"{IDLE_CLIENTS:,} idle clients: resident memory per client (one run: a second one"
                     " would reuse the memory the first grew)", "bytes", ["pgbouncer", "proxy"], s6, once=True),
            Scenario("G1", "pgbench -S, 16 clients: guard on vs off", "TPS", ["proxy", "proxy-noguard"], s1),
            Scenario("S10", f"transaction mode, 64 clients over a pool of {pool}: BEGIN; set_config(..., true);"
                     " SELECT; END (issue 12's input 3)", "TPS", transaction_trio, s10),
            Scenario("G2-scan", "guard decision, new text cleared by the pre-scan", "us", ["guard"], guard_cost("scan")),
            Scenario("G2-parse", "guard decision, new text parsed by pglast", "us", ["guard"],
                     guard_cost("parse")),
            Scenario("G2-hit", "guard decision, parsed text seen before (cache)", "us", ["guard"],
                     guard_cost("hit")),
        ]
    return scenarios


IDLE_CLIENTS = 10_000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _log_in(port: int, user: str, password: str) -> asyncio.StreamWriter:
    """One client that logs in (cleartext password) and then stays idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(messages.startup_message({"user": user, "database": "bench"}))
    sent_password = False
    while True:
        kind = await reader.readexactly(1)
        body = await reader.readexactly(int.from_bytes(await reader.readexactly(4), "big") - 4)
        if kind == b"R" and body[:4] == b"\0\0\0\3" and not sent_password:
            writer.write(messages.password_message(password))
            sent_password = True
        elif kind == b"E":
            raise RuntimeError(f"login refused: {messages.parse_error_fields(body).get('M')}")
        elif kind == b"Z":
            return writer


async def _idle_rss_per_client(pid: int, port: int, user: str, password: str, count: int) -> float:
    before = rss_kib(pid)
    writers: list[asyncio.StreamWriter] = []
    for start in range(0, count, 200):
        writers += await asyncio.gather(*(_log_in(port, user, password) for _ in range(min(200, count - start))))
    after = rss_kib(pid)
    for writer in writers:
        writer.close()
    return (after - before) * 1024 / count


GUARD_SAMPLES = {
    # Text the pre-scan clears without parsing: pgbench -S and typical reads and writes.
    "scan": [
        "SELECT abalance FROM pgbench_accounts WHERE aid = {n}",
        "UPDATE pgbench_accounts SET abalance = abalance + {n} WHERE aid = 42",
        "SELECT o.id, o.amount FROM orders o JOIN tenants t USING (tenant_id) WHERE o.id = {n} ORDER BY 2 LIMIT 10",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, {n}, 5, now())",
    ],
    # Text the parser must see: SET statements, upserts, multi-statement queries.
    "parse": [
        "SET statement_timeout = {n}",
        "INSERT INTO t (id, v) VALUES ({n}, 1) ON CONFLICT (id) DO UPDATE SET v = excluded.v",
        "BEGIN; UPDATE pgbench_accounts SET abalance = 0 WHERE aid = {n}; COMMIT",
        "SET app.current_tenant = '{n}'",
    ],
}


def guard_microseconds(kind: str, rounds: int = 4000) -> float:
    """Median microseconds of one guard decision: new text cleared by the pre-scan ("scan"), new text
    parsed ("parse"), or parsed text seen before ("hit")."""
    from proxy.guard import Guard
    from proxy.parameters import ProtectedSettings

    guard = Guard(ProtectedSettings(["app.current_tenant", "tenant_proxy.proof"], ["app.", "request.jwt."]), False)
    samples = GUARD_SAMPLES["parse" if kind == "hit" else kind]
    for sql in samples:
        guard.check(sql.format(n=0))
    timings: list[float] = []
    for n in range(rounds):
        sql = samples[n % len(samples)].format(n=0 if kind == "hit" else n + 1)
        start = time.perf_counter_ns()
        guard.check(sql)
        timings.append((time.perf_counter_ns() - start) / 1000)
    return statistics.median(timings)


NOT_AVAILABLE = {
    "S3-prep on PgBouncer": "PgBouncer 1.18 has no prepared statements in transaction mode (pgbench -M prepared fails)",
}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process and all its descendants (a proxy's workers), in seconds."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        total += times.get(current, 0.0)
        stack += children.get(current, [])
    return total


def run_all(bench: Bench, scenarios: list[Scenario], runs: int
            ) -> tuple[dict[str, dict[str, Result]], dict[str, dict[str, Result]]]:
    """Every scenario on every target, interleaved; the values, and for TPS scenarios the CPU
    microseconds per transaction of the target's processes (not for direct Postgres)."""
    results: dict[str, dict[str, Result]] = {s.name: {t: Result() for t in s.targets} for s in scenarios}
    cpu: dict[str, dict[str, Result]] = {}
    for scenario in scenarios:
        for run in range(1 if scenario.once else runs):
            for target_name in scenario.targets:
                pid = bench.pids.get(target_name)
                before = cpu_seconds(pid) if pid else 0.0
                try:
                    value = scenario.run(bench.targets[target_name], bench.duration)
                except RuntimeError as exc:
                    print(f"  {scenario.name} {target_name}: failed: {exc}", flush=True)
                    continue
                results[scenario.name][target_name].values.append(value)
                if pid and scenario.unit == "TPS" and value > 0:
                    used = (cpu_seconds(pid) - before) * 1e6 / (value * bench.duration)
                    cpu.setdefault(scenario.name, {}).setdefault(target_name, Result()).values.append(used)
                print(f"  {scenario.name} run {run + 1}/{runs} {target_name:12s} {value:12.1f} {scenario.unit}",
                      flush=True)
    return results, cpu


def cpu_table(scenarios: list[Scenario], cpu: dict[str, dict[str, Result]]) -> list[str]:
    """CPU per transaction of each proxy, PgBouncer and the copying reference: a steadier figure than
    TPS on a noisy machine, and the one that says what the proxy's own work costs."""
    lines = [
        "CPU time of the target's own processes per transaction (user + system, from /proc; medians):",
        "",
        "| scenario | target | CPU per transaction | vs PgBouncer |",
        "|---|---|---|---|",
    ]
    for scenario in scenarios:
        row = cpu.get(scenario.name, {})
        bouncer = next((result.median for name, result in row.items() if name.startswith("pgbouncer")), None)
        for name, result in row.items():
            ratio = f"{result.median / bouncer:.2f}x" if bouncer else "-"
            lines.append(f"| {scenario.name} | {name} | {result.median:.1f} us | {ratio} |")
    return lines


def table(scenarios: list[Scenario], results: dict[str, dict[str, Result]]) -> list[str]:
    lines = [
        "| scenario | target | median | runs | vs direct | vs PgBouncer |",
        "|---|---|---|---|---|---|",
    ]
    for scenario in scenarios:
        row = results[scenario.name]
        direct = next((result.median for name, result in row.items() if name.startswith("direct")), None)
        bouncer = next((result.median for name, result in row.items() if name.startswith("pgbouncer")), None)
        for name, result in row.items():
            ratio_direct = f"{result.median / direct:.2f}x" if direct else "-"
            ratio_bouncer = f"{result.median / bouncer:.2f}x" if bouncer else "-"
            runs = ", ".join(f"{v:.0f}" for v in result.values)
            lines.append(
                f"| {scenario.name} {scenario.title} | {name} | {result.median:.1f} {scenario.unit} | {runs} |"
                f" {ratio_direct} | {ratio_bouncer} |"
            )
    lines += ["", *targets(results)]
    return lines


def median_of(table: dict[str, dict[str, Result]], scenario: str, target: str) -> float | None:
    result = table.get(scenario, {}).get(target)
    return result.median if result is not None and result.values else None


def median_ratio(table: dict[str, dict[str, Result]], scenario: str, target: str, reference: str) -> float | None:
    value, base = median_of(table, scenario, target), median_of(table, scenario, reference)
    return value / base if value is not None and base else None


@dataclass(frozen=True)
class RatioTarget:
    """A target on the ratio of a target's median to a reference's, at least `bound`; `cpu` names the
    CPU-per-transaction figures and `why` says where the time goes when it is missed."""

    label: str
    scenario: str
    target: str
    reference: str
    bound: float
    cpu: tuple[tuple[str, str], ...] = ()
    why: str = ""


RATIO_TARGETS = [
    RatioTarget(
        "S1 proxy TPS >= 1.0x PgBouncer", "S1", "proxy", "pgbouncer", 1.0,
        (("proxy", "proxy"), ("pgbouncer", "PgBouncer"), ("copy", "the copying reference")),
        " What the proxy spends beyond the reference is its own Python (header scanning, the guard's"
        " pre-scan, reply tracking); beyond PgBouncer, CPython and uvloop's cost per event (PROFILE.md, session mode).",
    ),
    RatioTarget(
        "S4 proxy TPS >= 1.5x app-does-it-itself through PgBouncer", "S4", "proxy", "pgbouncer", 1.5,
        (("proxy", "proxy"), ("pgbouncer", "PgBouncer (four statements)")),
        " Each of the proxy's statements runs the verifier, about 25 us of Postgres CPU (a plpgsql call"
        " and a read of the key table), where the application's policy reads a setting (PROFILE.md, the verifier).",
    ),
    RatioTarget(
        "S8 proxy TPS >= 2.0x the app's SET LOCAL pattern through PgBouncer (transaction mode)", "S8", "proxy-tx",
        "pgbouncer-tx", 2.0,
        (("proxy-tx", "proxy"), ("pgbouncer-tx", "PgBouncer (four statements)")),
        " With 64 tenants over 8 connections almost every checkout switches tenant: before the client's"
        " SELECT the proxy pipelines its reset (one call of tenant_proxy.reset_session()), the client's"
        " settings and the context Bind/Execute/Close, about 12 server messages per transaction it tracks in"
        " Python, where PgBouncer relays the application's four statements untouched; the proxy's own CPU is"
        " the bottleneck on two cores (PROFILE.md, the tenant workload).",
    ),
    RatioTarget("S5 proxy (HS256) connections/s >= 0.5x PgBouncer", "S5", "proxy", "pgbouncer", 0.5),
    RatioTarget(
        "S3 transaction mode TPS >= 1.0x PgBouncer", "S3", "proxy-tx", "pgbouncer-tx", 1.0,
        (("proxy-tx", "proxy"), ("pgbouncer-tx", "PgBouncer")),
        " The proxy makes fewer system calls than PgBouncer here; the difference is the interpreter, about"
        " 40% of the proxy's CPU: checkout, reply tracking, the guard (PROFILE.md, transaction mode).",
    ),
]


def targets(results: dict[str, dict[str, Result]]) -> list[str]:
    """The performance targets, each with its measured ratio and whether it is met."""
    lines = ["| target | measured | met |", "|---|---|---|"]
    checks = [(goal.label, median_ratio(results, goal.scenario, goal.target, goal.reference), goal.bound, True)
              for goal in RATIO_TARGETS]
    p50 = results.get("S7-p50", {})
    if all(name in p50 and p50[name].values for name in ("direct", "pgbouncer", "proxy")):
        direct = p50["direct"].median
        added_proxy, added_bouncer = p50["proxy"].median - direct, p50["pgbouncer"].median - direct
        copying = f", the copying reference {p50['copy'].median - direct:.0f} us" if "copy" in p50 and p50["copy"].values else ""
        lines.insert(0, f"Added p50 latency per query: proxy {added_proxy:.0f} us, PgBouncer {added_bouncer:.0f} us{copying}.\n")
        checks.append(("S7 added p50 latency <= 1.2x PgBouncer's",
                       added_proxy / added_bouncer if added_bouncer > 0 else None, 1.2, False))
    guard = median_ratio(results, "G1", "proxy", "proxy-noguard")
    if guard is not None:
        lines.insert(0, f"pgbench -S TPS with the guard on / off: {guard:.2f}x.\n")
    for name, value, bound, at_least in checks:
        if value is None:
            lines.append(f"| {name} | not measured | - |")
        else:
            met = value >= bound if at_least else value <= bound
            lines.append(f"| {name} | {value:.2f}x | {'yes' if met else 'no'} |")
    idle = results.get("S6", {}).get("proxy")
    if idle is not None and idle.values:
        lines.append(f"| S6 <= 8 kB RSS per idle client | {idle.median / 1024:.1f} kB | {'yes' if idle.median <= 8192 else 'no'} |")
    else:
        lines.append("| S6 <= 8 kB RSS per idle client | not measured | - |")
    return lines


def shortfalls(results: dict[str, dict[str, Result]], cpu: dict[str, dict[str, Result]]) -> list[str]:
    """For each target this run missed: by how much, and where the time goes (this run's CPU figures,
    and the findings of bench/PROFILE.md)."""
    lines: list[str] = []
    for goal in RATIO_TARGETS:
        ratio = median_ratio(results, goal.scenario, goal.target, goal.reference)
        if not goal.why or ratio is None or ratio >= goal.bound:
            continue
        if goal.bound == 1.0:
            line = f"- **{goal.scenario}** is {(1 - ratio) * 100:.0f}% short of PgBouncer's TPS."
        else:
            line = f"- **{goal.scenario}** is at {ratio:.2f}x, {(goal.bound - ratio) / goal.bound * 100:.0f}% short of {goal.bound:g}x."
        figures = [f"{label} {value:.1f} us" for target, label in goal.cpu
                   if (value := median_of(cpu, goal.scenario, target)) is not None]
        if figures:
            line += f" CPU per transaction: {', '.join(figures)}."
        copy = median_ratio(results, goal.scenario, "copy", goal.reference)
        if copy is not None:
            line += f" The copying reference, which does nothing but copy, reaches {copy:.2f}x."
        lines.append(line + goal.why)
    direct, proxy, bouncer, copy_p50 = (median_of(results, "S7-p50", name) for name in ("direct", "proxy", "pgbouncer", "copy"))
    if direct is not None and proxy is not None and bouncer is not None and bouncer > direct:
        added, reference = proxy - direct, bouncer - direct
        if added > 1.2 * reference:
            lines.append(
                f"- **S7**: the proxy adds {added:.0f} us per query, {added / reference:.2f}x PgBouncer's {reference:.0f} us"
                f" (the target is 1.2x)."
                + (f" The copying reference adds {copy_p50 - direct:.0f} us ({(copy_p50 - direct) / reference:.2f}x):"
                   " CPython and uvloop per event, before any work; the rest is the proxy's own Python."
                   if copy_p50 is not None else "")
            )
    if not lines:
        return []
    return ["Targets missed, by how much, and where the time goes:", "", *lines]


def log_findings(bench: Bench) -> list[str]:
    """What the proxies logged at warning level or above during the run (a healthy run logs nothing):
    per log, the number of lines and the most frequent messages, without timestamps."""
    lines: list[str] = []
    for path in sorted(bench.workdir.glob("proxy*.log")):
        logged = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if not logged:
            continue
        counts: dict[str, int] = {}
        for line in logged:
            message = re.sub(r"^\S+ \S+ ", "", line)[:200]
            counts[message] = counts.get(message, 0) + 1
        common = sorted(counts.items(), key=lambda item: -item[1])[:5]
        lines.append(f"- {path.stem}: {len(logged)} lines; " + "; ".join(f"{n}x `{m}`" for m, n in common))
    return ["Proxy logs (warnings and errors):", "", *(lines or ["- none"])]


def version(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip().splitlines()[0]
    except (OSError, IndexError):
        return "unknown"


def write_results(path: Path, bench: Bench, args: argparse.Namespace, lines: list[str], elapsed: float) -> None:
    machine = [
        f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- cores: {os.cpu_count()}, memory: {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2**30} GiB",
        f"- Python {platform.python_version()}, {version([str(bench.pg.bindir / 'postgres'), '--version'])},"
        f" {version(['pgbouncer', '--version'])}",
        f"- mode: {'quick' if args.quick else 'full'}, {args.runs} runs per target, {bench.duration:.0f} s each,"
        f" interleaved; total {elapsed / 60:.1f} min",
        "- everything on one machine: Postgres, the proxy, PgBouncer and pgbench share the cores",
    ]
    text = [
        "# Benchmark results",
        "",
        "Produced by `bench/run" + (" --quick" if args.quick else "") + "`. Medians of the runs listed; ratios are"
        " of medians. Latency is pgbench's per-transaction latency (client side).",
        "",
        *machine,
        "",
        *lines,
        "",
        "Where the time goes, and what was done about it: `bench/PROFILE.md`.",
        "",
        "Not measured in this run:",
        "",
        *[f"- {name}: {reason}" for name, reason in NOT_AVAILABLE.items()],
        "",
        "## Commands",
        "",
        "```",
        *dict.fromkeys(bench.commands),
        "```",
        "",
    ]
    path.write_text("\n".join(text))


@contextmanager
def running_bench(duration: float) -> Iterator[Bench]:
    workdir = Path(tempfile.mkdtemp(prefix="pgtp-bench-"))
    workdir.chmod(0o755)
    bench = Bench(workdir, duration)
    try:
        yield bench
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="S1, S8 and S7 only, shorter runs (about 4 minutes)")
    parser.add_argument("--runs", type=int, help="runs per target (default 3)")
    parser.add_argument("--duration", type=float, help="seconds per pgbench run")
    parser.add_argument("--only", help="comma-separated scenario names, e.g. S1,S7-p50")
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale factor (default 10)")
    parser.add_argument("--tenants", type=int, default=64, help="S8: tenants, one client each (default 64)")
    parser.add_argument("--pool", type=int, default=8,
                        help="server connections of the transaction-mode proxy and PgBouncer (S3, S8; default 8)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--baseline", metavar="REV",
                        help="also run S1, S2-ext, S2-prep, S3, S3-ext, S3-prep and S10 on the proxy of git revision REV"
                             " (targets proxy-base, proxy-tx-base)")
    args = parser.parse_args(argv)
    args.runs = args.runs or 3
    duration = args.duration or (5.0 if args.quick else 12.0)
    started = time.monotonic()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # S6 holds 10,000 connections per target
    with running_bench(duration) as bench:
        print("Loading data ...", flush=True)
        bench.load_data(scale=args.scale)
        bench.targets["direct"] = Target("direct", bench.pg.port, bench.db.app_role, bench.db.app_password)
        bench.start_pgbouncer("pgbouncer", "session")
        bench.start_proxy("proxy")
        bench.start_pgbouncer("pgbouncer-tx", "transaction", pool_size=args.pool)
        bench.start_proxy("proxy-tx", {"pool": {"mode": "transaction", "size": args.pool, "max_client_connections": 20_000}})
        scenarios = build_scenarios(bench, args.quick, args.tenants, args.pool)
        bench.targets["guard"] = Target("guard", 0, "", "")
        if not args.quick:
            bench.start_proxy("proxy-noguard", {"guard": {"enabled": False}})
            bench.targets["direct-tls"] = Target("direct-tls", bench.pg.port, bench.db.app_role, bench.db.app_password,
                                                 "require")
            bench.start_pgbouncer("pgbouncer-tls", "session", tls=True)
            bench.start_proxy("proxy-tls", {"tls": {"cert_file": str(bench.tls_cert), "key_file": str(bench.tls_key)},
                                            "upstream": {"sslmode": "require"}}, sslmode="require")
            bench.start_proxy("proxy-2w", {"": {"workers": 2, "log_level": "warning"}})
            bench.start_copier("copy")
            bench.start_proxy("proxy-rs256", {"jwt": {"algorithms": ["RS256"], "secret": None,
                                                     "public_key_file": str(bench.rsa_public_file)}})
        if args.baseline:
            baseline = bench.workdir / "baseline"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(baseline), args.baseline],
                           check=True, capture_output=True)
            bench.start_proxy("proxy-base", checkout=baseline)
            bench.start_proxy("proxy-tx-base", {"pool": {"mode": "transaction", "size": args.pool,
                                                         "max_client_connections": 20_000}}, checkout=baseline)
            for scenario in scenarios:
                if scenario.name in ("S1", "S2-ext", "S2-prep"):
                    scenario.targets = [*scenario.targets, "proxy-base"]
                elif scenario.name in ("S3", "S3-ext", "S3-prep", "S10"):
                    scenario.targets = [*scenario.targets, "proxy-tx-base"]
        if args.only:
            wanted = set(args.only.split(","))
            scenarios = [s for s in scenarios if s.name in wanted]
        results, cpu = run_all(bench, scenarios, args.runs)
        lines = [*table(scenarios, results), "", *cpu_table(scenarios, cpu), "", *shortfalls(results, cpu), "",
                 *log_findings(bench)]
        print("\n".join(lines))
        write_results(args.output, bench, args, lines, time.monotonic() - started)
        print(f"\nWrote {args.output}")
        if args.baseline:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(bench.workdir / "baseline")],
                           check=False, capture_output=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
