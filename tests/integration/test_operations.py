"""Running it in production, against real proxy processes: the health, readiness and metrics endpoint,
JSON and escaped logs, client transport policy, the Unix socket, and clear errors for busy ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from certificates import make_certificates
from support import ACME, GLOBEX, REPO, ROWS, ProxyProcess, RawClient, get, login, startup, wait_until
from proxy.config import ListenError
from proxy.demo import prepare_database, write_config
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.listeners import bind_unix
from proxy.protocol import messages


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    status, text = get(port, "/metrics")
    assert status == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def refused_login(proxy: ProxyProcess, password: str, user: str = "alice") -> dict[str, str]:
    client = RawClient(proxy.port)
    try:
        client.send(startup(user))
        client.read_message()
        client.send(messages.password_message(password))
        return client.error()
    finally:
        client.close()


def startup_refusal(proxy: ProxyProcess) -> dict[str, str]:
    """The ErrorResponse a plaintext client gets for its StartupMessage."""
    client = RawClient(proxy.port)
    try:
        client.send(startup())
        return client.error()
    finally:
        client.close()


def with_http(overrides: dict[str, dict[str, Any]] | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
    port = free_port()
    settings = overrides or {}
    return port, {**settings, "http": {"listen": f"127.0.0.1:{port}", **settings.get("http", {})}}


def auth(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], result: str, reason: str = "") -> float:
    return samples.get("pgtp_auth_total", {}).get((("reason", reason), ("result", result)), 0.0)


def test_metrics_move_with_logins_and_parse(make_proxy: Any) -> None:
    http, overrides = with_http()
    proxy = make_proxy(overrides)
    assert get(http, "/healthz") == (200, "ok\n")
    wait_until(lambda: get(http, "/readyz") == (200, "ready\n"))
    before = scrape(http)
    assert proxy.psql(proxy.token(), "SELECT 1").returncode == 0
    assert refused_login(proxy, proxy.token(secret="x" * 40))["C"] == "28P01"
    assert refused_login(proxy, proxy.token(ttl=-100))["C"] == "28P01"
    after = scrape(http)
    assert auth(after, "ok") == auth(before, "ok") + 1
    assert auth(after, "refused", "signature") == auth(before, "refused", "signature") + 1
    assert auth(after, "refused", "expired") == auth(before, "refused", "expired") + 1
    for name in ("pgtp_transactions_total", "pgtp_queries_total", "pgtp_context_sets_total",
                 "pgtp_tenant_switches_total", "pgtp_checkout_wait_seconds_count", "pgtp_workers_reporting"):
        assert name in after, name
    for name in ("pgtp_transactions_total", "pgtp_queries_total", "pgtp_context_sets_total"):  # session mode's SELECT 1
        assert after[name][()] >= before[name][()] + 1, name
    assert after["pgtp_bytes_total"].keys() == {(("direction", "received"),), (("direction", "sent"),)}
    assert get(http, "/nothing")[0] == 404


def test_metrics_count_what_the_relay_and_the_pool_do(make_proxy: Any) -> None:
    """Transaction mode, one server connection: two tenants' sessions each run one transaction on it."""
    http, overrides = with_http({"pool": {"mode": "transaction", "size": 1}})
    proxy = make_proxy(overrides)
    wait_until(lambda: get(http, "/readyz") == (200, "ready\n"))
    before = scrape(http)
    for tenant in (ACME, GLOBEX):
        assert proxy.psql(proxy.token(tenant=tenant), "SELECT count(*) FROM leads").returncode == 0
    after = scrape(http)

    def moved(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after[name][labels] - before.get(name, {}).get(labels, 0.0)

    assert moved("pgtp_transactions_total") >= 2 and moved("pgtp_queries_total") >= 2
    assert moved("pgtp_context_sets_total") >= 2  # one per transaction in transaction mode
    assert moved("pgtp_tenant_switches_total") >= 1  # the one server connection went from acme to globex
    assert moved("pgtp_checkout_wait_seconds_count") >= 2
    assert moved("pgtp_bytes_total", (("direction", "received"),)) > 0
    assert moved("pgtp_bytes_total", (("direction", "sent"),)) > 0
    assert after["pgtp_server_connections"] == {(("database", "app"), ("state", "idle")): 1.0}


def test_metrics_count_for_every_worker(make_proxy: Any) -> None:
    http, overrides = with_http({"": {"workers": 2}})
    proxy = make_proxy(overrides)
    wait_until(lambda: scrape(http)["pgtp_workers_reporting"][()] == 2)
    for _ in range(6):
        assert refused_login(proxy, "not-a-token")["C"] == "28P01"
    for _ in range(4):  # whichever worker takes the scrape answers for both
        assert auth(scrape(http), "refused", "malformed") == 6


def test_readiness_flips_when_the_upstream_stops(tmp_path: Path) -> None:
    cluster = EmbeddedPostgres().start()
    proxy = None
    try:
        db = prepare_database(cluster)
        http, overrides = with_http({"http": {"upstream_check_interval": 0.1}})
        proxy = ProxyProcess(cluster, db, tmp_path, overrides).start()
        wait_until(lambda: get(http, "/readyz")[0] == 200)
        cluster.stop()
        status, reason = wait_until(lambda: (answer := get(http, "/readyz"))[0] == 503 and answer)
        assert reason.startswith(f"upstream 127.0.0.1:{cluster.port} unreachable") and reason.count("\n") == 1
        assert get(http, "/healthz")[0] == 200
    finally:
        if proxy is not None:
            proxy.stop()
        cluster.stop()


FORGED_USER = "mallory\n2026-01-01T00:00:00+0000 INFO session start client=10.9.9.9:1 user=admin"


def test_json_log_lines_parse_and_hold_the_audit_fields(make_proxy: Any) -> None:
    http, overrides = with_http({"": {"log_format": "json", "log_level": "debug"}})
    proxy = make_proxy(overrides)
    assert get(http, "/healthz")[0] == 200
    good = proxy.token(sub="json-check", jti="jti-1")
    assert proxy.psql(good, "SELECT 1").returncode == 0
    bad = proxy.token(secret="y" * 40, iss="https://idp.example", aud="app")
    refused_login(proxy, bad, user=FORGED_USER)
    lines = wait_until(lambda: (text := proxy.log()).count('"session_end"') and text.count('"login_refused"') and text)
    events = [json.loads(line) for line in lines.splitlines()]  # every line parses
    start = next(e for e in events if e.get("event") == "session_start")
    end = next(e for e in events if e.get("event") == "session_end")
    refused = next(e for e in events if e.get("event") == "login_refused")
    assert start["tenant"] == ACME and start["sub"] == "json-check" and start["jti"] == "jti-1"
    assert start["client"].startswith("127.0.0.1:") and start["database"] == "app"
    assert start["login_role"] == proxy.db.app_role  # no [roles]: the [upstream] user
    assert end["duration"] >= 0 and end["bytes_received"] > 0 and end["bytes_sent"] > 0
    assert refused["user"] == FORGED_USER and refused["reason_label"] == "signature"
    assert (refused["alg"], refused["iss"], refused["aud"]) == ("HS256", "https://idp.example", "app")
    debug = [e for e in events if e["level"] == "debug"]
    assert {"readiness check", "http request"} <= {e["message"] for e in debug}
    for secret in (good, bad, bad.split(".")[2], proxy.db.jwt_secret, proxy.db.signing_key):
        assert secret not in lines


def test_a_newline_in_the_startup_user_cannot_forge_a_text_line(make_proxy: Any) -> None:
    proxy = make_proxy()
    refused_login(proxy, "not-a-token", user=FORGED_USER)
    log = wait_until(lambda: "login refused" in proxy.log() and proxy.log())
    assert not [line for line in log.splitlines() if line.startswith("2026-01-01")]
    assert 'user="mallory\\n2026-01-01T00:00:00+0000 INFO session start' in log


def audit_events(proxy: ProxyProcess, client: RawClient) -> list[dict[str, Any]]:
    """The audit events about `client` of a proxy that logs JSON lines, in order."""
    address = "127.0.0.1:%d" % client.sock.getsockname()[1]
    events = [json.loads(line) for line in proxy.log().splitlines()]
    return [event for event in events if event.get("client") == address and event["logger"] == "pg_tenant_proxy.audit"]


def checkout_refused_after_login(proxy: ProxyProcess, before_query: Any = None
                                 ) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """A holder logs in and opens a block (it holds a server connection), a waiter logs in (greeted without a
    server connection: the pool knows the server's parameters) and sends a query: the waiter's FATAL
    ErrorResponse and, once its session ended, its audit events. `before_query` runs before that query."""
    holder, waiter = RawClient(proxy.port), RawClient(proxy.port)
    try:
        login(holder, proxy.token(ACME))
        holder.send(messages.query("BEGIN"))
        assert holder.read_until(b"Z")[-1] == (b"Z", b"T")
        login(waiter, proxy.token(GLOBEX))
        if before_query is not None:
            before_query()
        waiter.send(messages.query("SELECT 1"))
        fields = waiter.error()
        assert fields["S"] == "FATAL" and waiter.closed()
        events = wait_until(lambda: (seen := audit_events(proxy, waiter)) and seen[-1]["event"] == "session_end"
                            and seen)
    finally:
        holder.close()
        waiter.close()
    return fields, events


def test_a_checkout_timeout_after_the_login_is_audited_as_checkout_failed(make_proxy: Any) -> None:
    """Transaction mode, the one server connection held by another client's block: a logged-in client's
    transaction waits `checkout_timeout` and gets 53300, which ends its session. Its login succeeded: its
    audit trail is session_start, checkout_failed, session_end, and pgtp_auth_total counts no refusal."""
    pool = {"mode": "transaction", "size": 1, "checkout_timeout": 0.5}
    http, overrides = with_http({"": {"log_format": "json"}, "pool": pool})
    proxy = make_proxy(overrides)
    fields, events = checkout_refused_after_login(proxy)
    assert fields["C"] == "53300" and 'pool for database "app" is full' in fields["M"]
    assert [event["event"] for event in events] == ["session_start", "checkout_failed", "session_end"]
    failed = events[1]
    assert (failed["level"], failed["sqlstate"], failed["reason"]) == ("warning", "53300", fields["M"])
    assert (failed["tenant"], failed["sub"], failed["user"], failed["database"]) == (GLOBEX, "tester", "alice", "app")
    samples = scrape(http)
    assert auth(samples, "ok") == 2
    assert not [value for labels, value in samples["pgtp_auth_total"].items() if ("result", "refused") in labels]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_an_upstream_refusing_a_logged_in_clients_server_connection_is_not_a_login_refusal(
        make_proxy: Any, pg: EmbeddedPostgres, tenant_db: Any, mode: str) -> None:
    """A logged-in client needs a new server connection and the upstream refuses it (its role may no longer
    log in): the client gets the upstream's FATAL 28000, audited as checkout_failed after its session_start."""
    proxy = make_proxy({"": {"log_format": "json"}, "pool": {"mode": mode, "size": 2}})
    role = tenant_db.app_role

    def refuse_logins() -> None:
        pg.psql(f"ALTER ROLE {role} NOLOGIN")

    try:
        fields, events = checkout_refused_after_login(proxy, refuse_logins)
    finally:
        pg.psql(f"ALTER ROLE {role} LOGIN")
    assert fields["C"] == "28000" and "not permitted to log in" in fields["M"]
    assert [event["event"] for event in events] == ["session_start", "checkout_failed", "session_end"]
    assert (events[1]["sqlstate"], events[1]["reason"], events[1]["tenant"]) == ("28000", fields["M"], GLOBEX)


@pytest.fixture(scope="module")
def certs() -> Iterator[tuple[Path, Path, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="pgtp-ops-certs-"))
    yield make_certificates(directory)
    subprocess.run(["rm", "-rf", str(directory)], check=False)


def test_client_sslmode_require_refuses_plaintext(make_proxy: Any, certs: tuple[Path, Path, Path]) -> None:
    _, cert, key = certs
    proxy = make_proxy({"tls": {"cert_file": str(cert), "key_file": str(key), "client_sslmode": "require"}})
    refusal = startup_refusal(proxy)
    assert refusal["C"] == "28000" and refusal["M"] == "this proxy accepts only TLS connections"
    assert "sslmode=require" in refusal["H"]
    assert proxy.psql(proxy.token(), "SELECT 1").returncode == 2  # psql with sslmode=disable
    with psycopg.connect(proxy.dsn().replace("sslmode=disable", "sslmode=require"), password=proxy.token()) as conn:
        assert conn.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[ACME],)


def test_client_certificates_with_verify_ca(make_proxy: Any, certs: tuple[Path, Path, Path]) -> None:
    ca, cert, key = certs
    proxy = make_proxy({"tls": {"cert_file": str(cert), "key_file": str(key), "client_sslmode": "verify-ca",
                                "client_ca_file": str(ca)}})
    tls = proxy.dsn().replace("sslmode=disable", "sslmode=require")
    with pytest.raises(psycopg.OperationalError, match="FATAL:  this proxy requires a client certificate"):
        psycopg.connect(tls, password=proxy.token())
    # The test CA's server certificate serves as a client certificate signed by the same CA.
    with psycopg.connect(f"{tls} sslcert={cert} sslkey={key}", password=proxy.token()) as conn:
        assert conn.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[ACME],)


def test_unix_socket_with_psql_and_allowed_networks_over_tcp(make_proxy: Any, tmp_path: Path) -> None:
    directory = Path(tempfile.mkdtemp(prefix="pgtp-sock-"))  # short: a socket path has at most 107 bytes
    try:
        proxy = make_proxy({"": {"listen_unix": str(directory)}, "client": {"allowed_networks": ["10.0.0.0/8"]}})
        socket_file = directory / f".s.PGSQL.{proxy.port}"
        assert socket_file.is_socket()
        refusal = startup_refusal(proxy)
        assert refusal["C"] == "28000" and refusal["M"] == "connections from 127.0.0.1 are not allowed"
        result = subprocess.run(
            ["psql", "-X", "-A", "-t", f"host={directory} port={proxy.port} user=alice dbname=app",
             "-c", "SELECT count(*) FROM leads"],
            capture_output=True, text=True, env={**os.environ, "PGPASSWORD": proxy.token()}, timeout=30, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(ROWS[ACME])
        proxy.stop()
        assert not socket_file.exists()
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.mark.parametrize("which", ["listen", "http.listen"])
def test_a_busy_port_at_run_is_one_line(pg: EmbeddedPostgres, tenant_db: Any, tmp_path: Path, which: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        port = busy if which == "listen" else free_port()
        http = {"http": {"listen": f"127.0.0.1:{busy}"}} if which == "http.listen" else {}
        config = write_config(tmp_path / "busy.toml", pg, tenant_db, port, http)
        result = run_cli("run", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pg-tenant-proxy: {which}: cannot listen on 127.0.0.1:{busy}: address already in use"
        " (another server listens there: stop it or change the key)"
    ]


def test_bad_key_material_at_run_is_one_line_per_problem(pg: EmbeddedPostgres, tenant_db: Any, tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    config = write_config(tmp_path / "bad.toml", pg, tenant_db, free_port(), {
        "jwt": {"algorithms": ["RS256"], "secret": None, "public_key_file": str(pem)},
        "upstream": {"port": 99999},
    })
    for command in ("run", "check"):
        result = run_cli(command, "--config", str(config))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert sorted(result.stderr.splitlines()) == [
            f"pg-tenant-proxy: configuration error: jwt.public_key_file: {pem} is not a PEM public key (ValueError)",
            "pg-tenant-proxy: configuration error: upstream.port: must be between 1 and 65535, got 99999",
        ]


def test_check_connect(pg: EmbeddedPostgres, tenant_db: Any, tmp_path: Path) -> None:
    config = write_config(tmp_path / "good.toml", pg, tenant_db, free_port())
    result = run_cli("check", "--config", str(config), "--connect")
    assert result.returncode == 0, result.stderr
    assert "valid and the upstream and verifier answer" in result.stdout
    wrong_key = write_config(tmp_path / "key.toml", pg, tenant_db, free_port(), {"tenant": {"signing_key": "w" * 40}})
    result = run_cli("check", "--config", str(wrong_key), "--connect")
    assert result.returncode == 2 and result.stderr.startswith("pg-tenant-proxy: tenant.signing_key: verifier check")
    wrong_password = write_config(tmp_path / "pw.toml", pg, tenant_db, free_port(), {"upstream": {"password": "nope"}})
    result = run_cli("check", "--config", str(wrong_password), "--connect")
    assert result.returncode == 2 and result.stderr.startswith("pg-tenant-proxy: upstream: cannot log in as tenant_app")
    assert "nope" not in result.stderr and "w" * 40 not in result.stderr


def test_demo_refuses_a_taken_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = run_cli("demo", "--no-serve", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert "is already in use" in result.stderr and "--port" in result.stderr
    assert "Starting a throwaway Postgres" not in result.stdout


def test_the_endpoint_survives_garbage(make_proxy: Any) -> None:
    http, overrides = with_http()
    make_proxy(overrides)
    for payload in (b"\x00" * 20_000, b"GET\r\n\r\n", b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 3000):
        with socket.create_connection(("127.0.0.1", http), timeout=10) as raw:
            try:
                raw.sendall(payload)
                raw.shutdown(socket.SHUT_WR)
                assert raw.recv(65536) == b""  # closed without an answer
            except ConnectionResetError:
                pass
    assert get(http, "/healthz") == (200, "ok\n")


def test_unix_socket_files_left_behind(tmp_path: Path) -> None:
    path = str(tmp_path / ".s.PGSQL.1")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on: a proxy that died
    sock = bind_unix(path)
    try:
        assert oct(os.stat(path).st_mode & 0o777) == "0o770"
        with pytest.raises(ListenError, match="another server listens there"):
            bind_unix(path)
    finally:
        sock.close()
    plain = tmp_path / "file"
    plain.write_text("")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        bind_unix(str(plain))
