"""The lifecycle's pure parts: which stop a signal asks for, when a drain may end a session, what a reload
may change without a restart and what it does to the pool (fake clock); the signing key's rotation in
the context builder, in a session-mode relay (no sockets, no clock) and in the verifier SQL; and the new
configuration keys."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from relay_harness import (
    BIND_COMPLETE, CLOSE_COMPLETE, PARSE_COMPLETE, Z_BLOCK, Z_IDLE, RelayPair, Server, complete, data_row,
)
from test_pool_clock import new_pool, pooled_backend
from proxy import config
from proxy.backend import BackendConnection, Lifecycle
from proxy.pool import TransactionPool
from proxy.lifecycle import (
    Shutdown, Stop, at_idle_point, connection_changed, keep_restart_only, latest, restart_needed,
)
from proxy.protocol import messages
from proxy.relay.session import State
from proxy.tenant import ContextBuilder, hmac_pads, sign
from proxy.verifier import verifier_sql

BASE = f"""
[upstream]
user = "app"
database = "app"
[jwt]
secret = "{"s" * 40}"
[tenant]
signing_key = "{"k" * 40}"
"""
SELECT_1 = messages.query("SELECT 1")
SESSION_CONTEXT_SET = (PARSE_COMPLETE + BIND_COMPLETE + data_row(b"acme", b"p", b"{}", b"q") + complete("SELECT 1")
                       + CLOSE_COMPLETE + CLOSE_COMPLETE + Z_IDLE)


def settings(tmp_path: Path, extra: str = "", top: str = "") -> config.Settings:
    """Settings from BASE, with `top` (top-level keys) before it and `extra` after (in [tenant] unless
    it opens a section)."""
    path = tmp_path / "proxy.toml"
    path.write_text(top + BASE + extra)
    return config.load(path, environ={})


# -- signals --------------------------------------------------------------------------------------

def test_sigterm_drains_and_sigint_during_a_drain_stops_at_once() -> None:
    async def scenario() -> list[Stop | None]:
        shutdown = Shutdown()
        seen = [shutdown.stop]
        shutdown.request(Stop.DRAIN)
        seen.append(shutdown.stop)
        assert shutdown.requested.is_set() and not shutdown.immediate.is_set()
        shutdown.request(Stop.IMMEDIATE)
        seen.append(shutdown.stop)
        shutdown.request(Stop.DRAIN)  # a late SIGTERM does not turn a stop back into a drain
        seen.append(shutdown.stop)
        assert shutdown.immediate.is_set()
        return seen

    assert asyncio.run(scenario()) == [None, Stop.DRAIN, Stop.IMMEDIATE, Stop.IMMEDIATE]


# -- idle points ----------------------------------------------------------------------------------

def logged_in_session(transaction_mode: bool = False) -> tuple[RelayPair, Server]:
    pair, server = RelayPair(transaction_mode=transaction_mode), Server(101)
    pair.attach(server)
    if not transaction_mode:
        pair.server(SESSION_CONTEXT_SET)
    return pair, server


def test_sessions_not_logged_in_idle_or_waiting_are_at_an_idle_point() -> None:
    for state in (State.STARTUP, State.AUTHENTICATING, State.VERIFYING):
        assert at_idle_point(state, greeted=False, relay=None)
    assert at_idle_point(State.IDLE, greeted=True, relay=None)
    assert at_idle_point(State.WAITING, greeted=True, relay=None)
    assert not at_idle_point(State.CLOSED, greeted=True, relay=None)


def test_a_session_between_transactions_is_at_an_idle_point_and_one_inside_is_not() -> None:
    pair, _ = logged_in_session()
    relay = pair.relay
    assert at_idle_point(State.ACTIVE, True, relay)
    pair.client(messages.query("BEGIN"))
    assert not at_idle_point(State.ACTIVE, True, relay)  # the server owes the reply
    pair.server(complete("BEGIN") + Z_BLOCK)
    assert not at_idle_point(State.ACTIVE, True, relay)  # inside a transaction block
    pair.client(messages.query("COMMIT"))
    pair.server(complete("COMMIT") + Z_IDLE)
    assert at_idle_point(State.ACTIVE, True, relay)


def test_a_session_inside_an_extended_query_group_or_a_message_is_not_at_an_idle_point() -> None:
    pair, _ = logged_in_session()
    relay = pair.relay
    pair.client(messages.parse("", "SELECT 1"), messages.bind("", "", []))
    assert not at_idle_point(State.ACTIVE, True, relay)  # no Sync yet
    pair.client(messages.execute(""), messages.sync())
    pair.server(PARSE_COMPLETE + BIND_COMPLETE + data_row(b"1") + complete("SELECT 1") + Z_IDLE)
    assert at_idle_point(State.ACTIVE, True, relay)
    pair.client(SELECT_1[:3])
    assert not at_idle_point(State.ACTIVE, True, relay)  # half a message


def test_preparing_is_not_an_idle_point() -> None:
    pair, server = RelayPair(transaction_mode=False), Server(101)
    pair.client(SELECT_1)
    pair.attach(server)
    assert not at_idle_point(State.PREPARING, True, pair.relay)


# -- reload ---------------------------------------------------------------------------------------

def test_reload_keeps_the_running_values_of_keys_that_need_a_restart(tmp_path: Path) -> None:
    running = settings(tmp_path)
    loaded = settings(tmp_path, '[pool]\nmode = "transaction"\nsize = 7\n[http]\nlisten = "127.0.0.1:7001"\n',
                      top='listen = "127.0.0.1:7000"\nworkers = 2\n')
    assert restart_needed(running, loaded) == ["listen", "workers", "http.listen", "pool.mode"]
    kept = keep_restart_only(running, loaded)
    assert (kept.listen_port, kept.workers, kept.http.listen, kept.pool.mode) == (6432, 1, None, "session")
    assert kept.pool.size == 7  # what may change does
    assert restart_needed(running, kept) == []


def test_reload_keeps_the_tenant_setting_names(tmp_path: Path) -> None:
    running = settings(tmp_path)
    loaded = settings(tmp_path, 'setting = "app.tenant"\n')
    assert restart_needed(running, loaded) == ["tenant.setting"]
    assert keep_restart_only(running, loaded).tenant.setting == "app.current_tenant"


def test_a_worker_started_again_reads_the_configuration_as_it_is_now(tmp_path: Path) -> None:
    running = settings(tmp_path)
    newer = dataclasses.replace(running, pool=dataclasses.replace(running.pool, size=3, mode="transaction"))

    def broken() -> config.Settings:
        raise config.ConfigError("jwt.secret: must be at least 32 bytes")

    assert latest(running, lambda: newer).pool.size == 3
    assert latest(running, lambda: newer).pool.mode == "session"
    assert latest(running, broken) is running


def test_only_what_makes_a_server_connection_retires_connections(tmp_path: Path) -> None:
    upstream = settings(tmp_path).upstream
    assert not connection_changed(upstream, dataclasses.replace(upstream, connect_timeout_seconds=1.0))
    assert not connection_changed(upstream, dataclasses.replace(upstream, databases=["app", "other"], database=None))
    assert connection_changed(upstream, dataclasses.replace(upstream, password="new"))
    assert connection_changed(upstream, dataclasses.replace(upstream, port=5433))


# -- signing key rotation -------------------------------------------------------------------------

def test_the_context_builder_signs_with_the_new_key_after_a_rotation() -> None:
    builder = ContextBuilder("app.current_tenant", "tenant_proxy.proof", "old-key-" + "o" * 32)
    before = builder.values("acme", 7, 2_000_000_000, "{}")
    builder.rotate("new-key-" + "n" * 32)
    after = builder.values("acme", 7, 2_000_000_000, "{}")
    assert before[1] == sign(b"old-key-" + b"o" * 32, "acme", 7, 2_000_000_000)
    assert after[1] == sign(b"new-key-" + b"n" * 32, "acme", 7, 2_000_000_000)
    assert builder.transaction_messages("acme", 7, 2_000_000_000) != b""
    assert after[1].encode() in builder.transaction_messages("acme", 7, 2_000_000_000, "{}")


def rotating_session() -> tuple[RelayPair, Server, ContextBuilder]:
    pair, server = RelayPair(transaction_mode=False), Server(101)
    builder = ContextBuilder("app.tenant", "app.tenant_proof", "old-key-" + "o" * 32)
    pair.relay.context = builder
    pair.attach(server)
    pair.server(SESSION_CONTEXT_SET)
    return pair, server, builder


def new_context(builder: ContextBuilder, server: Server) -> bytes:
    return b"".join(raw for raw, _ in builder.session_messages("acme", server.process_id, 2_000_000_000, '{"sub":"alice"}'))


def test_an_idle_session_signs_its_context_again_at_once_and_before_its_next_query() -> None:
    pair, server, builder = rotating_session()
    builder.rotate("new-key-" + "n" * 32)
    start = len(pair.hooks.upstream)
    pair.relay.mode.sign_again()  # type: ignore[union-attr]
    assert pair.upstream_since(start) == [new_context(builder, server)]
    assert pair.client(SELECT_1) == [SELECT_1]  # pipelined behind its own Sync group: runs under the new proof
    assert pair.server(SESSION_CONTEXT_SET + complete("SELECT 1") + Z_IDLE) == complete("SELECT 1") + Z_IDLE


def test_a_session_inside_an_extended_query_group_signs_again_after_its_sync() -> None:
    pair, server, builder = rotating_session()
    parse = messages.parse("", "SELECT 1")
    pair.client(parse)
    builder.rotate("new-key-" + "n" * 32)
    start = len(pair.hooks.upstream)
    pair.relay.mode.sign_again()  # type: ignore[union-attr]
    assert pair.upstream_since(start) == []  # a Sync now would split the client's group
    sync = messages.sync()
    assert pair.client(sync) == [sync + new_context(builder, server)]


def test_a_session_inside_a_block_signs_again_after_a_rollback() -> None:
    pair, server, builder = rotating_session()
    pair.client(messages.query("BEGIN"))
    pair.server(complete("BEGIN") + Z_BLOCK)
    builder.rotate("new-key-" + "n" * 32)
    start = len(pair.hooks.upstream)
    pair.relay.mode.sign_again()  # type: ignore[union-attr]
    assert pair.upstream_since(start) == [new_context(builder, server)]
    pair.server(SESSION_CONTEXT_SET[:-len(Z_IDLE)] + Z_BLOCK)  # set inside the block: a ROLLBACK would undo it
    rollback = messages.query("ROLLBACK")
    assert pair.client(rollback) == [rollback + new_context(builder, server)]


def test_verifier_sql_installs_the_previous_key_beside_the_current_one_or_removes_it() -> None:
    current, previous = "current-" + "c" * 32, "previous-" + "p" * 32
    both = verifier_sql("app.t", "tenant_proxy.proof", current, previous_signing_key=previous)
    assert f"VALUES (1, decode('{hmac_pads(current.encode())[0].hex()}'" in both
    assert f"VALUES (2, decode('{hmac_pads(previous.encode())[0].hex()}'" in both
    assert "DELETE FROM tenant_proxy.signing_key" not in both
    alone = verifier_sql("app.t", "tenant_proxy.proof", current)
    assert "VALUES (2," not in alone and "DELETE FROM tenant_proxy.signing_key WHERE id = 2;" in alone
    assert "INSERT INTO tenant_proxy.signing_key" not in verifier_sql("app.t", "tenant_proxy.proof", None)


# -- configuration ----------------------------------------------------------------------------------

def test_shutdown_timeout_defaults_to_30_seconds_and_is_range_checked(tmp_path: Path) -> None:
    assert settings(tmp_path).shutdown_timeout == 30.0
    assert settings(tmp_path, "").tenant.previous_signing_key is None
    path = tmp_path / "bad.toml"
    path.write_text("shutdown_timeout = -1\n" + BASE)
    with pytest.raises(config.ConfigError, match="shutdown_timeout: must be between 0 and 86400, got -1"):
        config.load(path, environ={})
    assert config.load(tmp_path / "proxy.toml", environ={"PGTP_SHUTDOWN_TIMEOUT": "2.5"}).shutdown_timeout == 2.5


@pytest.mark.parametrize(("value", "problem"), [
    ("short", "tenant.previous_signing_key: must be at least 32 bytes"),
    ("k" * 40, "tenant.previous_signing_key: must differ from tenant.signing_key"),
])
def test_previous_signing_key_is_checked(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(config.ConfigError, match=problem):
        settings(tmp_path, f'previous_signing_key = "{value}"\n')


def test_previous_signing_key_from_a_file_is_never_shown(tmp_path: Path) -> None:
    (tmp_path / "previous").write_text("p" * 40 + "\n")
    loaded = settings(tmp_path, f'previous_signing_key_file = "{tmp_path / "previous"}"\n')
    assert loaded.tenant.previous_signing_key == "p" * 40
    assert "p" * 40 not in repr(loaded)


# -- the pool on reload (fake clock, no sockets) ----------------------------------------------------

def two_idle_connections() -> tuple[TransactionPool, list[BackendConnection]]:
    pool, loop = new_pool(kind=TransactionPool)
    assert isinstance(pool, TransactionPool)
    pool.settings = dataclasses.replace(pool.settings, size=2)
    backends = [pooled_backend(pool, loop), pooled_backend(pool, loop)]
    pool._open["app"] = 2
    for backend in backends:
        pool.release(backend)
    assert [b.lifecycle for b in backends] == [Lifecycle.IDLE, Lifecycle.IDLE]
    return pool, backends


def test_a_smaller_pool_size_closes_the_idle_connections_above_it() -> None:
    pool, backends = two_idle_connections()
    pool.reconfigure(pool.upstream, dataclasses.replace(pool.settings, size=1), retire=False)
    assert sorted(b.lifecycle.value for b in backends) == [Lifecycle.CLOSED.value, Lifecycle.IDLE.value]
    assert pool.settings.size == 1


def test_new_upstream_settings_close_idle_connections_and_retire_those_in_use() -> None:
    pool, backends = two_idle_connections()
    in_use = pool.take("app", "acme")
    assert in_use is not None
    pool.reconfigure(pool.upstream, pool.settings, retire=True)
    assert [b.lifecycle for b in backends if b is not in_use] == [Lifecycle.CLOSED]
    assert in_use.lifecycle is Lifecycle.ACTIVE  # its client goes on
    pool.retire(in_use)
    pool.release(in_use)
    assert in_use.lifecycle is Lifecycle.CLOSED  # not kept when its client is done
