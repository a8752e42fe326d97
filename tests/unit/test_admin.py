"""The admin console's pure parts: command parsing, result-set encoding, SHOW CONFIG's masking, the
required-claims check, the tenant ledger's bound, one console client's message loop, and PAUSE /
RESUME in the pool on a fake clock."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from proxy import admin
from proxy.admin import Command, ConsoleError, ConsoleSession, Operator, Result, TenantLedger, Verb, parse_command
from proxy.backend import UpstreamError
from proxy.config import ConfigError, load
from proxy.pool import EVERY_DATABASE, TransactionPool
from proxy.protocol import errors, messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import MessageReader
from test_pool_clock import Record, new_pool, pooled_backend


@pytest.mark.parametrize("text, command", [
    ("SHOW POOLS", Command(Verb.SHOW, "POOLS")),
    ("show clients;", Command(Verb.SHOW, "CLIENTS")),
    ("  Show\tServers ;  ", Command(Verb.SHOW, "SERVERS")),
    ("SHOW STATS", Command(Verb.SHOW, "STATS")),
    ("SHOW TENANTS", Command(Verb.SHOW, "TENANTS")),
    ("SHOW CONFIG;", Command(Verb.SHOW, "CONFIG")),
    ("PAUSE", Command(Verb.PAUSE)),
    ("pause App", Command(Verb.PAUSE, "app")),  # unquoted names fold to lower case, as in Postgres
    ('RESUME "App"', Command(Verb.RESUME, "App")),
    ('RESUME "we""ird"', Command(Verb.RESUME, 'we"ird')),
    ("RESUME;", Command(Verb.RESUME)),
    ("KILL TENANT 'Acme'", Command(Verb.KILL_TENANT, "Acme")),
    ("kill tenant 'o''brien; x'", Command(Verb.KILL_TENANT, "o'brien; x")),
    ("KILL TENANT bare-id", Command(Verb.KILL_TENANT, "bare-id")),
    ("KILL CLIENT 17", Command(Verb.KILL_CLIENT, "17")),
    ("reload;", Command(Verb.RELOAD)),
])
def test_commands_parse(text: str, command: Command) -> None:
    assert parse_command(text) == command


@pytest.mark.parametrize("text", [
    "SHOW", "SHOW DATABASES", "SHOW POOLS extra", "'SHOW' POOLS", "PAUSE a b", "KILL TENANT", "KILL CLIENT x",
    "KILL CLIENT -1", "KILL 'acme'", "RELOAD now", "SELECT 1", "KILL TENANT 'unterminated", "DROP TABLE x; SHOW POOLS",
])
def test_anything_else_is_a_syntax_error_listing_the_commands(text: str) -> None:
    with pytest.raises(ConsoleError) as caught:
        parse_command(text)
    assert caught.value.sqlstate == errors.SYNTAX_ERROR
    assert caught.value.hint is not None and "SHOW POOLS" in caught.value.hint and "KILL TENANT 'id'" in caught.value.hint


def messages_of(data: bytes) -> list[tuple[bytes, bytes]]:
    reader = MessageReader(1 << 20)
    reader.feed(data)
    return list(reader)


def test_a_result_set_encodes_as_postgres_sends_one() -> None:
    result = Result("SHOW", [("database", admin.TEXT), ("cl_active", admin.INT8)], [("app", 3), (None, 0)])
    (t, description), (d1, row1), (d2, row2), (c, tag) = messages_of(result.encode())
    assert (t, d1, d2, c) == (b"T", b"D", b"D", b"C")
    assert description == (struct.pack("!h", 2) + b"database\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
                           + b"cl_active\0" + struct.pack("!ihihih", 0, 0, 20, 8, -1, 0))
    assert messages.parse_data_row(row1) == [b"app", b"3"]
    assert messages.parse_data_row(row2) == [None, b"0"]
    assert tag == b"SHOW\0"


def test_a_command_without_rows_answers_its_tag_after_its_notices() -> None:
    (n, notice), (c, tag) = messages_of(Result("KILL", notices=["2 ended"]).encode())
    assert (n, c, tag) == (b"N", b"C", b"KILL\0")
    assert messages.parse_error_fields(notice)["M"] == "2 ended"


ENVIRONMENT = {
    "PGTP_UPSTREAM_USER": "app", "PGTP_UPSTREAM_DATABASE": "app", "PGTP_UPSTREAM_PASSWORD": "upstream-password-1",
    "PGTP_JWT_SECRET": "j" * 40, "PGTP_TENANT_SIGNING_KEY": "s" * 40, "PGTP_POOL_SIZE": "7",
    "PGTP_ADMIN_REQUIRED_CLAIMS": '{"role": "proxy-admin"}',
}


def test_show_config_masks_every_secret_and_shows_the_rest() -> None:
    rows = {key: (value, default) for key, value, default in admin.config_rows(load(None, ENVIRONMENT))}
    assert rows["jwt.secret"] == rows["tenant.signing_key"] == rows["upstream.password"] == ("<set>", "")
    assert rows["jwt.secret_file"] == ("", "")
    assert rows["pool.size"] == ("7", "20")
    assert rows["guard.enabled"] == ("true", "true")
    assert rows["admin.required_claims"] == ('{"role": "proxy-admin"}', "{}")
    assert rows["jwt.algorithms"] == ('["HS256"]', '["HS256"]')
    text = repr(rows)
    for secret in ("upstream-password-1", "j" * 40, "s" * 40):
        assert secret not in text


def test_show_config_masks_the_secrets_inside_tables() -> None:
    """A mapped role's password sits inside the `[roles] map` table; it is masked like a top-level one."""
    roles = '{"viewer": {"user": "app_viewer", "password": "viewer-password-1"}, "editor": {"user": "app_editor"}}'
    rows = {key: value for key, value, _ in admin.config_rows(
        load(None, {**ENVIRONMENT, "PGTP_ROLES_ROLE_CLAIM": "role", "PGTP_ROLES_MAP": roles}))}
    assert "viewer-password-1" not in repr(rows)
    assert json.loads(rows["roles.map"]) == {"viewer": {"user": "app_viewer", "password": "<set>"},
                                             "editor": {"user": "app_editor"}}



def test_show_config_masks_secrets_inside_tables_and_urls(tmp_path: Any) -> None:
    """The login roles' passwords in [roles.map], a previous signing key, and credentials in a URL's
    user part (jwks_url) are secrets too, wherever they sit in a value."""
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[roles]\nrole_claim = "role"\n'
        '[roles.map.viewer]\nuser = "viewer"\npassword = "viewer-password-1"\n'
        '[roles.map."odd \\"key"]\nuser = "odd"\npassword = "odd-password-2"\n'
        '[tenant]\nprevious_signing_key = "' + "p" * 40 + '"\n'
        '[jwt]\njwks_url = "https://ops:url-password-3@idp.example/jwks?x=1"\n'
    )
    environment = {k: v for k, v in ENVIRONMENT.items() if k != "PGTP_JWT_SECRET"}
    environment["PGTP_JWT_ALGORITHMS"] = "RS256"
    rows = {key: value for key, value, _ in admin.config_rows(load(config, environment))}
    text = repr(rows)
    for secret in ("viewer-password-1", "odd-password-2", "p" * 40, "url-password-3"):
        assert secret not in text
    assert json.loads(rows["roles.map"]) == {"viewer": {"user": "viewer", "password": "<set>"},
                                             'odd "key': {"user": "odd", "password": "<set>"}}
    assert rows["jwt.jwks_url"] == "https://ops:<set>@idp.example/jwks?x=1"
    assert rows["tenant.previous_signing_key"] == "<set>"


def test_with_several_issuers_the_console_names_the_issuer(tmp_path: Any) -> None:
    """Every issuer of [[jwt.issuers]] can mint `role = "proxy-admin"` (a customer's own Entra tenant
    assigns app roles): the console must name the issuers it trusts, or the configuration is refused."""
    issuers = [{"issuer": "https://a.example/", "jwks_url": "https://a.example/jwks"},
               {"issuer": "https://b.example/", "jwks_url": "https://b.example/jwks"}]
    environment = {k: v for k, v in ENVIRONMENT.items() if k != "PGTP_JWT_SECRET"}
    environment.update(PGTP_JWT_ALGORITHMS="RS256", PGTP_JWT_ISSUERS=json.dumps(issuers))
    with pytest.raises(ConfigError, match=r"admin.required_claims: with several \[\[jwt.issuers\]\]"):
        load(None, environment)
    environment["PGTP_ADMIN_REQUIRED_CLAIMS"] = '{"role": "proxy-admin", "iss": "https://a.example/"}'
    assert load(None, environment).admin.required_claims["iss"] == ["https://a.example/"]

def test_admin_settings_are_checked() -> None:
    loaded = load(None, ENVIRONMENT)
    assert loaded.admin.enabled and loaded.admin.required_claims == {"role": ["proxy-admin"]}
    assert not load(None, {k: v for k, v in ENVIRONMENT.items() if "ADMIN" not in k}).admin.enabled
    bad = {**ENVIRONMENT, "PGTP_ADMIN_REQUIRED_CLAIMS": '{"a..b": "x", "groups": []}', "PGTP_ADMIN_MAX_TENANTS": "0",
           "PGTP_ADMIN_LISTEN_UNIX": "/nonexistent-dir/.s.PGSQL.6432", "PGTP_UPSTREAM_DATABASE": "pgtenantproxy"}
    with pytest.raises(Exception) as caught:
        load(None, bad)
    problems = str(caught.value).splitlines()
    assert any(p.startswith("admin.required_claims: claim path 'a..b'") for p in problems)
    assert "admin.required_claims: 'groups' lists no accepted value" in problems
    assert "admin.max_tenants: must be between 1 and 1000000, got 0" in problems
    assert "admin.listen_unix: directory /nonexistent-dir does not exist" in problems
    assert any(p.startswith("upstream.databases: 'pgtenantproxy' is the admin console's name") for p in problems)


@pytest.mark.parametrize("claims, refusal", [
    ({"role": "proxy-admin", "org": {"id": 7}}, None),
    ({"role": ["reader", "proxy-admin"], "org": {"id": 7.0}}, None),
    ({"role": "reader", "org": {"id": 7}}, 'token claim "role" does not grant access to the admin console'),
    ({"org": {"id": 7}}, 'token claim "role" does not grant access to the admin console'),
    ({"role": "proxy-admin", "org": {"id": "7"}}, 'token claim "org.id" does not grant access to the admin console'),
    ({"role": "proxy-admin", "org": {"id": True}}, 'token claim "org.id" does not grant access to the admin console'),
])
def test_required_claims(claims: dict[str, Any], refusal: str | None) -> None:
    assert admin.authorize(claims, {"role": ["proxy-admin"], "org.id": [7, 8]}) == refusal


def test_without_required_claims_no_token_enters() -> None:
    assert admin.authorize({"role": "proxy-admin"}, {}) == "the admin console accepts no token logins"


def test_the_tenant_ledger_is_bounded() -> None:
    ledger = TenantLedger(max_tenants=2)
    for tenant in ("a", "b", "c", "d", "a"):
        ledger.add(tenant, transactions=1, received=10, sent=20)
    assert ledger.totals == {"a": [2, 2, 20, 40], "b": [1, 1, 10, 20], "_other": [2, 2, 20, 40]}


class FakeConsole:
    """Runs nothing: answers every command with a one-row result, records what it ran."""

    def __init__(self) -> None:
        self.ran: list[Command] = []

    def run(self, command: Command) -> Result:
        self.ran.append(command)
        return Result("SHOW", [("answer", admin.TEXT)], [("42",)])


def session() -> tuple[ConsoleSession, FakeConsole, list[bytes], list[bool]]:
    console, written, closed = FakeConsole(), [], []
    session = ConsoleSession(console, Operator("token", "ops"), "10.0.0.1:5", "ops",  # type: ignore[arg-type]
                             written.append, lambda: closed.append(True), 1 << 16)
    return session, console, written, closed


def test_a_console_client_is_answered_query_by_query() -> None:
    console_session, console, written, closed = session()
    query = messages.query("SHOW POOLS")
    console_session.data_received(query[:3])
    assert written == []
    console_session.data_received(query[3:] + messages.query(" ;") + messages.query("nonsense"))
    first, empty, refused = (messages_of(reply) for reply in written)
    assert [t for t, _ in first] == [b"T", b"D", b"C", b"Z"] and console.ran == [Command(Verb.SHOW, "POOLS")]
    assert empty == [(b"I", b""), (b"Z", b"I")]
    assert refused[0][0] == b"E" and messages.parse_error_fields(refused[0][1])["C"] == errors.SYNTAX_ERROR
    console_session.data_received(messages.terminate())
    assert closed == [True]


def test_the_extended_protocol_is_refused_once_per_group() -> None:
    console_session, console, written, _ = session()
    console_session.data_received(messages.parse("", "SHOW POOLS") + messages.bind("", "", []) + messages.execute())
    console_session.data_received(messages.sync())
    replies = [m for reply in written for m in messages_of(reply)]
    assert [t for t, _ in replies] == [b"E", b"Z"] and console.ran == []
    assert messages.parse_error_fields(replies[0][1])["C"] == errors.FEATURE_NOT_SUPPORTED


def test_a_message_no_frontend_sends_after_login_is_a_protocol_violation() -> None:
    console_session, _, _, _ = session()
    with pytest.raises(ProtocolViolation):
        console_session.data_received(messages.password_message("again"))


def test_pause_holds_waiters_and_resume_hands_idle_connections_first() -> None:
    pool, loop = new_pool(kind=TransactionPool)
    assert isinstance(pool, TransactionPool)
    backend = pooled_backend(pool, loop)
    pool.release(backend)  # idle in the pool
    pool.pause("app")
    assert pool.take("app", "acme") is None and pool.full("app", "acme") and pool.is_paused("app")
    assert not pool.is_paused("other")
    waiting = Record(loop)
    pool.queue("app", loop.time() + 2.0, waiting, "acme")
    loop.advance(1001.0)
    assert pool.oldest_wait("app") == 1.0
    pool.resume("app")
    assert waiting.results == [(1001.0, backend)] and pool.holds("app", "acme") == 1
    assert pool.oldest_wait("app") == 0.0


def test_pause_of_every_database_and_a_waiter_past_its_deadline() -> None:
    pool, loop = new_pool(kind=TransactionPool)
    pool.pause()
    assert pool.paused == {EVERY_DATABASE} and pool.is_paused("any")
    late = Record(loop)
    pool.queue("any", loop.time() + 2.0, late, "acme")
    assert not pool._wake("any")  # a connection coming back is kept while paused
    loop.advance(1002.0)
    ((_, result),) = late.results
    assert isinstance(result, UpstreamError) and result.sqlstate == errors.CANNOT_CONNECT_NOW
    assert result.text == 'database "any" is paused and was not resumed within 2 s'
    pool.resume()
    assert pool.paused == set()


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_or_is_refused_with_a_console_error(text: str) -> None:
    try:
        command = parse_command(text)
    except ConsoleError as exc:
        assert exc.sqlstate == errors.SYNTAX_ERROR
    else:
        assert isinstance(command.verb, Verb)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_bytes_are_answered_or_are_a_protocol_violation(data: bytes) -> None:
    console_session, _, _, _ = session()
    try:
        console_session.data_received(data)
    except ProtocolViolation:
        pass


@pytest.mark.parametrize("client, admin", [
    ("{dir}", "{dir}"),
    ("{dir}", "{dir}/"),
    ("{dir}", "{dir}/.s.PGSQL.6432"),
    ("{dir}/.s.PGSQL.6432", "{dir}"),
    ("{dir}/../{name}", "{dir}"),
])
def test_the_admin_socket_cannot_be_the_client_socket_however_it_is_written(
        tmp_path: Path, client: str, admin: str) -> None:
    """A directory names `<dir>/.s.PGSQL.<listen port>`; one socket file written two ways is refused by
    `check`, not found by `run` as 'another server listens there' (its own client socket)."""
    directory = tmp_path / "sockets"
    directory.mkdir()
    names = {"dir": str(directory), "name": directory.name}
    environment = {**ENVIRONMENT, "PGTP_LISTEN": "127.0.0.1:6432", "PGTP_LISTEN_UNIX": client.format(**names),
                   "PGTP_ADMIN_LISTEN_UNIX": admin.format(**names)}
    with pytest.raises(ConfigError) as caught:
        load(None, environment)
    assert "admin.listen_unix: must differ from listen_unix (the admin socket needs no token)" in caught.value.problems
    apart = {**environment, "PGTP_ADMIN_LISTEN_UNIX": str(directory / ".s.PGSQL.6433")}
    assert load(None, apart).admin_socket_path == str(directory / ".s.PGSQL.6433")
