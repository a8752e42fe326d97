"""The admin console (`pgtenantproxy`) under attack, against a real proxy process: tenant tokens whose
role claim has an odd type or sits at another path never enter; whatever bytes a console client sends
(NUL bytes, a huge Query, COPY messages, pipelined and multi-statement text, a Terminate in the middle)
end at most that client, never the proxy; KILL TENANT ends only the tenant it names, quotes and all."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX, ProxyProcess, RawClient, wait_until
from proxy.protocol import errors, messages

ADMIN = {"admin.required_claims": {"role": "proxy-admin"}}


@pytest.fixture(scope="module")
def proxy(pg: Any, tenant_db: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("console"), ADMIN).start()
    yield process
    process.stop()


def console_login(proxy: ProxyProcess, token: str) -> tuple[RawClient, list[tuple[bytes, bytes]]]:
    client = RawClient(proxy.port)
    client.send(messages.startup_message({"user": "ops", "database": "pgtenantproxy"}))
    client.read_message()
    client.send(messages.password_message(token))
    return client, client.read_until(b"Z")


def console(proxy: ProxyProcess) -> RawClient:
    client, seen = console_login(proxy, proxy.token(role="proxy-admin"))
    assert seen[-1] == (b"Z", b"I"), seen
    return client


def still_serving(proxy: ProxyProcess) -> None:
    assert proxy.alive()
    client = console(proxy)
    client.send(messages.query("SHOW STATS"))
    assert client.read_until(b"Z")[-1] == (b"Z", b"I")
    client.close()


@pytest.mark.parametrize("claims", [
    {"role": ["viewer", "proxy-admin "]}, {"role": {"proxy-admin": True}}, {"role": 1}, {"role": True},
    {"role": None}, {"Role": "proxy-admin"}, {"app": {"role": "proxy-admin"}}, {"role": "PROXY-ADMIN"},
    {"role": "proxy-admin\x00"}, {"role": [["proxy-admin"]]},
])
def test_a_tenant_token_with_an_odd_role_claim_stays_out(proxy: ProxyProcess, claims: dict[str, Any]) -> None:
    client, seen = console_login(proxy, proxy.token(**claims))
    assert seen[-1][0] == b"E"
    error = messages.parse_error_fields(seen[-1][1])
    assert error["C"] in (errors.INVALID_AUTHORIZATION, errors.INVALID_PASSWORD), error  # the NUL: a bad token
    assert client.closed()


def test_a_token_signed_with_another_key_stays_out(proxy: ProxyProcess) -> None:
    client, seen = console_login(proxy, proxy.token(role="proxy-admin", secret="x" * 40))
    assert seen[-1][0] == b"E" and messages.parse_error_fields(seen[-1][1])["C"] == errors.INVALID_PASSWORD


@pytest.mark.parametrize("attack, sqlstate", [
    (messages.message(b"Q", b"SHOW POOLS\x00; KILL TENANT 'x'\x00"), errors.PROTOCOL_VIOLATION),
    (messages.message(b"Q", b"SHOW \xff\xfe POOLS\x00"), errors.PROTOCOL_VIOLATION),
    (messages.message(b"Q", b"SHOW " + b"x" * 60_000 + b"\x00"), errors.SYNTAX_ERROR),
    (messages.message(b"d", b"copy data") + messages.message(b"c", b""), errors.PROTOCOL_VIOLATION),
    (messages.message(b"f", b"no\x00"), errors.PROTOCOL_VIOLATION),
    (messages.message(b"p", b"password\x00"), errors.PROTOCOL_VIOLATION),
    (b"Q\x7f\xff\xff\xff", errors.PROTOCOL_VIOLATION),
    (b"Q\x00\x00\x00\x02", errors.PROTOCOL_VIOLATION),
])
def test_console_input_ends_at_most_its_client(proxy: ProxyProcess, attack: bytes, sqlstate: str) -> None:
    client = console(proxy)
    client.send(attack)
    seen = client.read_until(b"Z")
    assert seen[-1][0] == b"E" and messages.parse_error_fields(seen[-1][1])["C"] == sqlstate, seen
    still_serving(proxy)


def test_pipelined_and_multi_statement_text_is_one_command_per_query(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as tenant:
        client = console(proxy)
        client.send(messages.query("SHOW POOLS; KILL TENANT '" + ACME + "'") + messages.query("SHOW STATS")
                    + messages.query("KILL TENANT '" + ACME + "' ; SHOW POOLS") + messages.query(";;"))
        answers: list[list[bytes]] = []
        while len(answers) < 4:
            answer = [client.read_message()]
            while answer[-1][0] != b"Z":
                answer.append(client.read_message())
            answers.append([kind if kind != b"E" else messages.parse_error_fields(body)["C"].encode()
                            for kind, body in answer])
        syntax = errors.SYNTAX_ERROR.encode()
        assert answers == [[syntax, b"Z"], [b"T", b"D", b"C", b"Z"], [syntax, b"Z"], [b"I", b"Z"]]
        assert tenant.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (ACME,)
        client.close()


def test_terminate_in_the_middle_of_a_command(proxy: ProxyProcess) -> None:
    client = console(proxy)
    query = messages.query("SHOW CLIENTS")
    client.send(query[:7] + messages.terminate())  # a Query cut short, then Terminate inside its body
    client.send(query[7:] + messages.terminate() + messages.query("SHOW STATS"))
    seen: list[bytes] = []
    try:
        while True:
            seen.append(client.read_message()[0])
    except (ConnectionError, OSError):
        pass
    assert b"E" not in seen or seen.count(b"E") == 1
    still_serving(proxy)


@pytest.mark.parametrize("spelling", ["'{tenant}'' OR ''1'", "'{prefix}%'", "'{prefix}'",
                                      "\"{tenant}\" x", "'{tenant} '"])
def test_kill_tenant_ends_only_the_tenant_it_names(proxy: ProxyProcess, spelling: str) -> None:
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as acme, \
            psycopg.connect(proxy.dsn(), password=proxy.token(GLOBEX), autocommit=True) as globex:
        client = console(proxy)
        text = spelling.format(tenant=ACME, prefix=ACME[:8])
        client.send(messages.query(f"KILL TENANT {text}"))
        seen = client.read_until(b"Z")
        notices = [messages.parse_error_fields(body)["M"] for kind, body in seen if kind == b"N"]
        refused = [messages.parse_error_fields(body)["C"] for kind, body in seen if kind == b"E"]
        assert refused == [errors.SYNTAX_ERROR] or (len(notices) == 1 and notices[0].startswith("0 client")), seen
        for conn, tenant in ((acme, ACME), (globex, GLOBEX)):
            assert conn.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (tenant,)
        client.close()


def test_kill_tenant_ends_exactly_that_tenant(proxy: ProxyProcess) -> None:
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as acme, \
            psycopg.connect(proxy.dsn(), password=proxy.token(GLOBEX), autocommit=True) as globex:
        client = console(proxy)
        client.send(messages.query(f"KILL TENANT '{ACME}'"))
        client.read_until(b"Z")
        with pytest.raises(psycopg.OperationalError):
            wait_until(lambda: acme.execute("SELECT 1") and False, deadline=5)
        assert globex.execute("SELECT tenant_proxy.current_tenant()").fetchone() == (GLOBEX,)
        client.close()
