"""Transaction pooling state without sockets: statement renaming and preparing, eviction, and what a
checkout sends to a server connection."""

from __future__ import annotations

import struct

from proxy.parameters import ProtectedSettings
from proxy.protocol import messages
from proxy.tenant import ContextBuilder
from proxy.transaction import (
    CLIENT_REPLY,
    NEVER_PREPARED,
    OWN_CLOSE,
    RESET_SERVER,
    RESET_SETTINGS,
    STATEMENT_OVERHEAD,
    ClientStatements,
    Outgoing,
    Reply,
    ServerState,
    ServerStatements,
    checkout_messages,
    context_intact,
    session_settings,
    statement_for,
)

CONTEXT = ContextBuilder("app.current_tenant", "tenant_proxy.proof", "k" * 32)


def parse_body(name: bytes, query: bytes, types: tuple[int, ...] = ()) -> bytes:
    return name + b"\0" + query + b"\0" + struct.pack(f"!h{len(types)}I", len(types), *types)


def bind_body(portal: bytes, statement: bytes) -> bytes:
    return portal + b"\0" + statement + b"\0" + b"\0\0\0\0\0\0"


def kinds(out: Outgoing) -> list[tuple[bytes, Reply | None]]:
    return [(raw[:1], reply) for raw, reply in out]


def test_named_parse_is_renamed_and_closed_first() -> None:
    client, server, out = ClientStatements(1 << 20), ServerStatements(10), []
    client.parse(parse_body(b"s1", b"SELECT 1"), server, out)
    statement = statement_for(parse_body(b"", b"SELECT 1")[1:])
    assert client.by_name[b"s1"] == statement
    assert out[0] == (messages.close_statement(statement.server_name), OWN_CLOSE)
    assert out[1] == (messages.message(b"P", statement.server_name + b"\0" + statement.definition), Reply(False, statement.server_name))
    assert statement.server_name in server.pending


def test_same_text_and_types_share_a_server_name_and_types_matter() -> None:
    first = statement_for(parse_body(b"", b"SELECT $1")[1:])
    assert first == statement_for(parse_body(b"", b"SELECT $1")[1:])
    assert first != statement_for(parse_body(b"", b"SELECT $1", (23,))[1:])


def test_unnamed_parse_passes_unchanged() -> None:
    client, server, out = ClientStatements(1 << 20), ServerStatements(10), []
    body = parse_body(b"", b"SELECT 1")
    client.parse(body, server, out)
    assert out == [(messages.message(b"P", body), CLIENT_REPLY)]
    assert client.by_name == {}


def test_bind_prepares_a_missing_statement_and_renames() -> None:
    client, out = ClientStatements(1 << 20), []
    client.parse(parse_body(b"s1", b"SELECT 1"), ServerStatements(10), [])
    server = ServerStatements(10)  # another server connection, without the statement
    client.bind(bind_body(b"", b"s1"), server, out)
    name = client.by_name[b"s1"].server_name
    assert kinds(out) == [(b"C", OWN_CLOSE), (b"P", Reply(True, name)), (b"B", None)]
    assert out[2][0] == messages.message(b"B", bind_body(b"", name))
    out.clear()
    client.bind(bind_body(b"p", b"s1"), server, out)  # pending counts as present
    assert kinds(out) == [(b"B", None)]
    server.confirmed(name)
    out.clear()
    client.describe(b"Ss1\0", server, out)
    assert out == [(messages.message(b"D", b"S" + name + b"\0"), None)]


def test_unknown_names_and_portals_pass_unchanged() -> None:
    client, server, out = ClientStatements(1 << 20), ServerStatements(10), []
    client.bind(bind_body(b"", b"nope"), server, out)
    client.describe(b"Pportal\0", server, out)
    client.close(b"Pportal\0", out)
    assert [raw for raw, _ in out] == [
        messages.message(b"B", bind_body(b"", b"nope")),
        messages.message(b"D", b"Pportal\0"),
        messages.message(b"C", b"Pportal\0"),
    ]


def test_close_forgets_the_statement_but_leaves_the_shared_one() -> None:
    client, server, out = ClientStatements(1 << 20), ServerStatements(10), []
    client.parse(parse_body(b"s1", b"SELECT 1"), server, [])
    client.close(b"Ss1\0", out)
    assert out == [(messages.close_statement(NEVER_PREPARED), CLIENT_REPLY)]
    assert b"s1" not in client.by_name


def test_eviction_closes_the_least_recently_used_not_in_use() -> None:
    server = ServerStatements(2)
    for name in (b"a", b"b"):
        server.confirmed(name)
    server.has(b"a")  # a is now the most recent
    server.in_use = {b"a", b"b"}
    assert list(server.evictions()) == []  # both in use: the bound waits
    server.in_use = set()
    assert list(server.evictions()) == [b"b"]  # the least recently used
    assert list(server.ready) == [b"a"]


def test_checkout_of_a_fresh_connection_sets_settings_and_context() -> None:
    state = ServerState(ServerStatements(10))
    plan = checkout_messages(state, CONTEXT, 42, "t1", 1000, {"application_name": "app"})
    assert plan.groups == 1
    assert b"set_config($1, $2, false)" in plan.request and b"application_name" in plan.request
    assert CONTEXT.proof("t1", 42, 1000).encode() in plan.request
    assert (state.tenant, state.context_expires_at, state.settings) == ("t1", 1000, {"application_name": "app"})
    assert checkout_messages(state, CONTEXT, 42, "t1", 1000, {"application_name": "app"}).groups == 0
    assert checkout_messages(state, CONTEXT, 42, "t1", 900, {"application_name": "app"}).groups == 0  # a later expiry covers it


def test_checkout_for_another_tenant_resets_everything_first() -> None:
    state = ServerState(ServerStatements(10), tenant="t1", context_expires_at=1000, settings={"search_path": "x"})
    state.statements.confirmed(b"s")
    plan = checkout_messages(state, CONTEXT, 42, "t2", 500, {})
    assert plan.request.startswith(RESET_SERVER) and plan.groups == 2
    assert state.statements.ready == {} and state.settings == {} and state.tenant == "t2"
    assert b"t1" not in plan.request


def test_checkout_resets_settings_the_client_does_not_have() -> None:
    state = ServerState(ServerStatements(10), tenant="t1", context_expires_at=1000, settings={"search_path": "x", "TimeZone": "UTC"})
    plan = checkout_messages(state, CONTEXT, 42, "t1", 1000, {"timezone": "UTC"})
    assert plan.request.startswith(RESET_SETTINGS)
    assert CONTEXT.proof("t1", 42, 1000).encode() in plan.request  # RESET ALL took the context too
    state = ServerState(ServerStatements(10), tenant="t1", context_expires_at=1000, settings={"search_path": "x"})
    plan = checkout_messages(state, CONTEXT, 42, "t1", 1000, {"search_path": "y"})
    assert not plan.request.startswith(RESET_SETTINGS) and b"search_path" in plan.request
    assert b"tenant_proxy.proof" not in plan.request  # the context is still in force


def test_session_settings_drop_protected_names() -> None:
    protected = ProtectedSettings(["app.current_tenant", "tenant_proxy.proof"], ["app."])
    rows = [[b"search_path", b"public"], [b"app.current_tenant", b"x"], [b"tenant_proxy.proof", b"y"], [b"app.other", b"z"]]
    assert session_settings(rows, protected) == {"search_path": "public"}


def test_context_intact_compares_tenant_and_proof() -> None:
    proof = CONTEXT.proof("t1", 42, 1000).encode()
    rows = [[b"app.current_tenant", b"t1"], [b"tenant_proxy.proof", proof], [b"search_path", b"x"]]
    assert context_intact(rows, CONTEXT, "t1", 42, 1000)
    assert not context_intact(rows, CONTEXT, "t1", 43, 1000)
    assert not context_intact([[b"app.current_tenant", b"t2"], rows[1]], CONTEXT, "t1", 42, 1000)
    assert not context_intact(rows[2:], CONTEXT, "t1", 42, 1000)


def test_client_statements_are_bounded_in_bytes() -> None:
    first, second = parse_body(b"s1", b"SELECT 1"), parse_body(b"s2", b"SELECT 2")
    one = len(b"s1") + len(first) - len(b"s1\0") + STATEMENT_OVERHEAD  # name, definition, overhead
    client, server = ClientStatements(2 * one), ServerStatements(10)
    assert client.room_for(first)
    client.parse(first, server, [])
    assert client.size == one
    client.parse(first, server, [])  # parsed again under the same name: replaced, not counted twice
    assert client.size == one
    assert client.room_for(second)
    client.parse(second, server, [])
    assert not client.room_for(parse_body(b"s3", b"SELECT 3"))
    assert client.room_for(parse_body(b"s2", b"SELECT 9"))  # a namesake frees its own room
    assert client.room_for(parse_body(b"", b"SELECT 3 + 4 + 5"))  # the unnamed statement is not kept
    client.close(b"S" + b"s1\0", [])
    assert client.size == one and client.room_for(parse_body(b"s3", b"SELECT 3"))
