"""Roles from the token, end to end: the role claim chooses the upstream login role, each role has its
own pools, and a viewer's session never gets an editor's privileges, whatever SQL it sends.

The expected values come from Postgres itself: the same attacks run directly as the viewer role get
the same answer as through the proxy, because the boundary is the login role (the viewer is not a
member of the editor role), not a `SET ROLE` the session could undo.
"""

from __future__ import annotations

import json
import os
import shutil
import secrets
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo import TenantDatabase, prepare_database, write_config
from proxy.embedded import EmbeddedPostgres, free_port
from proxy.hardening import hardening_sql
from proxy.protocol import messages
from support import ACME, REPO, ROWS, ProxyProcess, RawClient, startup, wait_until

VIEWER, EDITOR, AUDITOR = "roles_viewer", "roles_editor", "roles_auditor"
ROLE_CLAIM = "https://example.com/role"  # an Auth0-style namespaced claim
DATABASE = "roles_app"
INSERT = f"INSERT INTO leads (tenant_id, name, email) VALUES ('{ACME}', 'hostile', 'h@acme.test')"

# What a hostile viewer tries, each on its own; the DO block and roles_run() need plpgsql, which the
# fixture grants the viewer (against the hardening) so that dynamic SQL really runs.
ATTACKS = [
    f"SET ROLE {EDITOR}",
    f"SET SESSION AUTHORIZATION {EDITOR}",
    "SET SESSION AUTHORIZATION DEFAULT",
    f"SELECT set_config('role', '{EDITOR}', false)",
    f"SELECT set_config('session_authorization', '{EDITOR}', false)",
    f"DO $$ BEGIN EXECUTE 'SET ROLE {EDITOR}'; END $$",
    f"DO $$ BEGIN PERFORM set_config('role', '{EDITOR}', false); EXECUTE $i${INSERT}$i$; END $$",
    f"SELECT public.roles_run('SET ROLE {EDITOR}')",
    f"SELECT public.roles_run($i${INSERT}$i$)",
    "RESET ROLE",
    "RESET SESSION AUTHORIZATION",
    "RESET ALL",
    "DISCARD ALL",
    f"BEGIN; SET LOCAL ROLE {EDITOR}; {INSERT}; COMMIT",
    f"SET ROLE {EDITOR}; {INSERT}",
]


@pytest.fixture(scope="module")
def roles_db(pg: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory) -> tuple[TenantDatabase, dict[str, str]]:
    """A database of its own with the viewer (SELECT), editor (SELECT, INSERT) and auditor (a member of
    the viewer: what the doctor must flag) login roles, each hardened like the main one."""
    db = prepare_database(pg, DATABASE, "roles_main")
    passwords = {role: secrets.token_urlsafe(18) for role in (VIEWER, EDITOR, AUDITOR)}
    pg.psql("".join(f"CREATE ROLE {role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '{password}';"
                    f"GRANT CONNECT ON DATABASE {DATABASE} TO {role};" for role, password in passwords.items())
            + f"GRANT {VIEWER} TO {AUDITOR};")
    pg.psql(hardening_sql(VIEWER) + hardening_sql(EDITOR) + hardening_sql(AUDITOR), DATABASE)
    pg.psql(
        f"GRANT SELECT ON leads TO {VIEWER};\n"
        f"GRANT SELECT, INSERT ON leads TO {EDITOR};\n"
        f"GRANT USAGE ON SEQUENCE leads_id_seq TO {EDITOR};\n"
        f"GRANT USAGE ON LANGUAGE plpgsql TO {VIEWER};\n"
        "CREATE FUNCTION public.roles_run(statement text) RETURNS text LANGUAGE plpgsql\n"
        "    AS $$ BEGIN EXECUTE statement; RETURN current_user; END $$;\n"
        f"GRANT EXECUTE ON FUNCTION public.roles_run(text) TO {VIEWER};\n",
        DATABASE,
    )
    password_file = tmp_path_factory.mktemp("roles") / "editor.password"
    password_file.write_text(passwords[EDITOR] + "\n")
    return db, {**passwords, "editor_file": str(password_file)}


def role_sections(passwords: dict[str, str]) -> dict[str, dict[str, Any]]:
    """[roles] with the viewer's password inline and the editor's in a file."""
    return {
        "roles": {"role_claim": ROLE_CLAIM},
        "roles.map.viewer": {"user": VIEWER, "password": passwords[VIEWER]},
        "roles.map.editor": {"user": EDITOR, "password_file": passwords["editor_file"]},
    }


@pytest.fixture
def start_proxy(pg: EmbeddedPostgres, roles_db: tuple[TenantDatabase, dict[str, str]], tmp_path: Path) -> Iterator[Any]:
    db, passwords = roles_db
    started: list[ProxyProcess] = []

    def factory(mode: str, guard: bool = True, http: str | None = None) -> ProxyProcess:
        overrides = {"pool": {"mode": mode, "size": 1}, "guard": {"enabled": guard}, "http": {"listen": http},
                     **role_sections(passwords)}
        process = ProxyProcess(pg, db, tmp_path, overrides).start()
        started.append(process)
        return process

    yield factory
    for process in started:
        process.stop()


def connect(proxy: ProxyProcess, role: str | None, **claims: Any) -> psycopg.Connection[Any]:
    token = proxy.token(**({ROLE_CLAIM: role} if role is not None else {}), **claims)
    return psycopg.connect(proxy.dsn(database=DATABASE), password=token, autocommit=True)


def identity(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute("SELECT current_user, session_user, has_table_privilege('leads', 'INSERT')").fetchone()
    assert row is not None
    return tuple(row)


def insert_state(conn: psycopg.Connection[Any]) -> str | None:
    """The SQLSTATE an INSERT into leads fails with, None when it succeeds (and is then rolled back)."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(INSERT)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def run_attack(conn: psycopg.Connection[Any], attack: str) -> str | None:
    """Send one attack as a simple Query (several statements allowed); the SQLSTATE it failed with."""
    try:
        psycopg.ClientCursor(conn).execute(attack)
    except psycopg.Error as exc:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.execute("ROLLBACK")
        return exc.sqlstate
    return None


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_each_token_logs_in_as_its_mapped_role(start_proxy: Any, mode: str) -> None:
    proxy = start_proxy(mode)
    with connect(proxy, "viewer") as viewer, connect(proxy, "editor") as editor:
        assert identity(viewer) == (VIEWER, VIEWER, False)
        assert identity(editor) == (EDITOR, EDITOR, True)
        # the greeting's ParameterStatus comes from the client's own role's pool
        assert viewer.info.parameter_status("session_authorization") == VIEWER
        assert editor.info.parameter_status("session_authorization") == EDITOR
        with connect(proxy, "viewer") as again:  # greeted from what the viewer pool learned, with no login upstream
            assert again.info.parameter_status("session_authorization") == VIEWER
        for conn in (viewer, editor):  # the tenant boundary holds for both roles
            assert conn.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[ACME],)
        assert insert_state(viewer) == "42501"
        assert insert_state(editor) is None
    starts = wait_until(lambda: [line for line in proxy.log().splitlines() if "session start" in line] or None)
    assert any(f"login_role={VIEWER}" in line for line in starts) and any(f"login_role={EDITOR}" in line for line in starts)


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "no-guard"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_hostile_viewer_never_gets_the_editors_privileges(
    start_proxy: Any, pg: EmbeddedPostgres, roles_db: tuple[TenantDatabase, dict[str, str]], mode: str, guard: bool
) -> None:
    proxy = start_proxy(mode, guard)
    db, passwords = roles_db
    direct = psycopg.connect(host="127.0.0.1", port=pg.port, user=VIEWER, password=passwords[VIEWER],
                             dbname=DATABASE, autocommit=True)
    with connect(proxy, "viewer") as viewer, connect(proxy, "editor") as editor, direct:
        for attack in ATTACKS:
            directly = run_attack(direct, attack)
            through_proxy = run_attack(viewer, attack)
            assert directly is not None or attack.startswith(("RESET", "DISCARD", "SET SESSION AUTHORIZATION DEFAULT")), attack
            if not guard and directly is not None:  # what Postgres refuses, it refuses through the proxy too
                assert through_proxy == directly, attack
            assert identity(viewer) == (VIEWER, VIEWER, False), attack
            assert identity(direct) == (VIEWER, VIEWER, False), attack
            assert insert_state(viewer) == "42501", attack
            assert insert_state(editor) is None, attack  # the editor's session is untouched
    hostile = pg.psql("SELECT count(*) FROM leads WHERE name = 'hostile'", DATABASE).strip()
    assert hostile == "0"


def login_error(proxy: ProxyProcess, token: str) -> dict[str, str]:
    client = RawClient(proxy.port)
    try:
        client.send(startup(database=DATABASE))
        assert client.read_message() == (b"R", struct.pack("!i", messages.AUTH_CLEARTEXT_PASSWORD))
        client.send(messages.password_message(token))
        return client.error()
    finally:
        client.close()


@pytest.mark.parametrize("claims, reason", [
    ({ROLE_CLAIM: "admin"}, f'the token\'s "{ROLE_CLAIM}" claim names a role this proxy does not map'),
    ({"role": "editor"}, f'the token has no "{ROLE_CLAIM}" claim'),
    ({ROLE_CLAIM: ["editor"]}, f'the token\'s "{ROLE_CLAIM}" claim is not a string'),
])
def test_a_token_without_a_mapped_role_is_refused_with_28000(start_proxy: Any, claims: dict[str, Any], reason: str) -> None:
    proxy = start_proxy("transaction")
    token = proxy.token(**claims)
    error = login_error(proxy, token)
    assert error["C"] == "28000" and error["S"] == "FATAL"
    assert error["M"].startswith(reason), error
    assert "admin" not in error["M"] and token not in proxy.log()
    with connect(proxy, "viewer") as viewer:  # the proxy serves on
        assert identity(viewer)[0] == VIEWER


def backend(conn: psycopg.Connection[Any]) -> tuple[int, str]:
    row = conn.execute("SELECT pg_backend_pid(), current_user").fetchone()
    assert row is not None
    return row[0], row[1]


def test_transaction_mode_never_shares_a_server_connection_between_roles(
    start_proxy: Any, pg: EmbeddedPostgres
) -> None:
    proxy = start_proxy("transaction")
    seen: dict[str, set[tuple[int, str]]] = {VIEWER: set(), EDITOR: set()}
    with connect(proxy, "viewer") as viewer_a, connect(proxy, "viewer") as viewer_b, \
            connect(proxy, "editor") as editor_a, connect(proxy, "editor") as editor_b:
        for _ in range(10):
            for role, conn in ((VIEWER, viewer_a), (EDITOR, editor_a), (VIEWER, viewer_b), (EDITOR, editor_b)):
                seen[role].add(backend(conn))
        with viewer_a.transaction():  # the viewer's only connection is held: the editors still get theirs
            seen[VIEWER].add(backend(viewer_a))
            seen[EDITOR].add(backend(editor_a))
            seen[EDITOR].add(backend(editor_b))
    assert {user for _, user in seen[VIEWER]} == {VIEWER}
    assert {user for _, user in seen[EDITOR]} == {EDITOR}
    viewer_pids = {pid for pid, _ in seen[VIEWER]}
    editor_pids = {pid for pid, _ in seen[EDITOR]}
    assert not viewer_pids & editor_pids
    assert len(viewer_pids) == len(editor_pids) == 1  # [pool] size = 1: one connection per role, shared by its clients


def waiting_clients(port: int) -> float:
    """The proxy's pgtp_clients_waiting gauge for the roles database (all login roles' pools)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "pgtp_clients_waiting" and sample.labels.get("database") == DATABASE)


def test_a_full_role_pool_queues_only_its_own_clients(start_proxy: Any) -> None:
    """Transaction mode, one connection per role: while a viewer holds the viewer's connection, a second
    viewer waits in the viewer pool's queue and then gets that same connection; editors are not held up."""
    http_port = free_port()
    proxy = start_proxy("transaction", http=f"127.0.0.1:{http_port}")
    with connect(proxy, "viewer") as viewer_a, connect(proxy, "viewer") as viewer_b, connect(proxy, "editor") as editor:
        results: list[tuple[int, str]] = []
        with viewer_a.transaction():
            held = backend(viewer_a)
            waiting = threading.Thread(target=lambda: results.append(backend(viewer_b)))
            waiting.start()
            wait_until(lambda: waiting_clients(http_port) == 1)
            assert backend(editor)[1] == EDITOR and not results
        waiting.join(timeout=30)
        assert results == [held]
        assert waiting_clients(http_port) == 0


def test_session_mode_keeps_each_roles_connections_in_its_own_pool(start_proxy: Any) -> None:
    proxy = start_proxy("session")
    with connect(proxy, "viewer") as viewer:
        first = backend(viewer)
    with connect(proxy, "editor") as editor:
        second = backend(editor)
    with connect(proxy, "viewer") as viewer:
        third = backend(viewer)
    assert first[1] == third[1] == VIEWER and second[1] == EDITOR
    assert second[0] != first[0]
    assert third[0] == first[0]  # the viewer's connection came back to the viewer's pool and served again


def doctor(config: Path) -> tuple[int, dict[str, Any]]:
    result = subprocess.run([sys.executable, "-m", "proxy", "doctor", "--config", str(config), "--json"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, {f["check"]: f for f in json.loads(result.stdout)["findings"]}


def test_doctor_checks_each_mapped_role(pg: EmbeddedPostgres, roles_db: tuple[TenantDatabase, dict[str, str]],
                                        tmp_path: Path) -> None:
    db, passwords = roles_db
    sections = role_sections(passwords)
    config = write_config(tmp_path / "doctor.toml", pg, db, 6432, sections)
    status, findings = doctor(config)
    assert findings["mapped roles are members of one another"]["status"] == "ok"
    viewer = f"mapped role {VIEWER} (role claim 'viewer')"
    editor = f"mapped role {EDITOR} (role claim 'editor')"
    assert findings[f"{viewer}: upstream role can use a procedural language"]["status"] == "fail"  # granted above
    assert findings[f"{editor}: upstream role can use a procedural language"]["status"] == "ok"
    assert findings[f"{editor}: upstream role bypasses RLS"]["status"] == "ok"
    assert status == 1

    sections["roles.map.auditor"] = {"user": AUDITOR, "password": passwords[AUDITOR]}
    config = write_config(tmp_path / "doctor.toml", pg, db, 6432, sections)
    status, findings = doctor(config)
    separation = findings["mapped roles are members of one another"]
    assert separation["status"] == "fail" and separation["objects"] == [f"{AUDITOR} is a member of {VIEWER}"]
    assert f"REVOKE {VIEWER} FROM {AUDITOR};" in separation["fix"]
    assert status == 1


def test_sql_hardens_every_mapped_role(pg: EmbeddedPostgres, roles_db: tuple[TenantDatabase, dict[str, str]],
                                       tmp_path: Path) -> None:
    db, passwords = roles_db
    config = write_config(tmp_path / "sql.toml", pg, db, 6432, role_sections(passwords))
    result = subprocess.run([sys.executable, "-m", "proxy", "sql", "--config", str(config)],
                            capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    for role in (db.app_role, VIEWER, EDITOR):
        assert f"SET LOCAL pg_tenant_proxy.upstream_role = '{role}';" in result.stdout


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_a_token_file_renewed_to_another_role_ends_the_session(
    pg: EmbeddedPostgres, roles_db: tuple[TenantDatabase, dict[str, str]], tmp_path: Path, mode: str
) -> None:
    """A session logged in with `[client] token_file` goes on with the file's renewed token; when the
    renewed token maps to another login role (the editor's token replaced by a viewer's), the session
    cannot keep running on the editor's connections: it ends with 28000, as one whose tenant changed."""
    db, passwords = roles_db
    socket_dir = Path(tempfile.mkdtemp(prefix="pgtp-role-"))
    token_file = socket_dir / "token"
    overrides = {"pool": {"mode": mode, "size": 1}, "": {"listen_unix": str(socket_dir)},
                 "client": {"token_file": str(token_file)}, **role_sections(passwords)}
    proxy = ProxyProcess(pg, db, tmp_path, overrides)
    token_file.write_text(proxy.token(**{ROLE_CLAIM: "editor"}))
    proxy.start()
    try:
        dsn = f"host={socket_dir} port={proxy.port} user=alice dbname={DATABASE}"
        with psycopg.connect(dsn, password="unused", autocommit=True) as conn:
            assert identity(conn) == (EDITOR, EDITOR, True)
            replaced = token_file.with_name("token.new")
            replaced.write_text(proxy.token(**{ROLE_CLAIM: "viewer"}))
            os.replace(replaced, token_file)

            def ended() -> bool:
                try:
                    assert identity(conn) == (EDITOR, EDITOR, True)
                except psycopg.OperationalError as exc:  # the FATAL, unless the client wrote after the close
                    assert exc.sqlstate in ("28000", None), exc
                    return True
                return False

            wait_until(ended, deadline=15)
        assert "the token file names another role" in proxy.log()
        with psycopg.connect(dsn, password="unused", autocommit=True) as again:  # a new session: the viewer
            assert identity(again) == (VIEWER, VIEWER, False)
    finally:
        proxy.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)
