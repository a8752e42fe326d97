"""ProxyServer's CancelRequests: the connection that brought one is closed (its `done` is called) only
once the cancel was acted on: the upstream server closed the connection that carried it, the session's
relay found nothing to cancel, or the session ended. Postgres closes a cancel connection only after it
has signalled the backend (Postgres 15 signals it twice), and libpq's PQcancel waits for that before it
returns; a proxy that closed it sooner let a client's next statement meet the second signal.

The upstream send is a fake that waits for the test; no sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy import server as server_module
from proxy.backend import BackendConnection
from proxy.config import UpstreamSettings
from proxy.server import ProxyServer
from test_drain_and_reload import settings

DEADLINE = 10.0


class Upstream:
    """The upstream server's side of each CancelRequest sent: the backend keys asked for, and a close
    (the server has signalled the backend) that waits until the test allows it."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.started = asyncio.Event()
        self.closes = asyncio.Event()

    async def send_cancel(self, settings: UpstreamSettings, process_id: int, secret_key: int) -> None:
        self.sent.append(process_id)
        self.started.set()
        await self.closes.wait()


class Session:
    """A logged-in client as ProxyServer sees it; `outstanding` says what its relay does with a cancel
    (`ClientConnection.cancel`): pass it to its server connection, or drop it (nothing to cancel)."""

    def __init__(self, server: ProxyServer, outstanding: bool) -> None:
        self.server = server
        self.outstanding = outstanding
        self.backend = BackendConnection(10)
        self.backend.process_id = 4242
        self.process_id, self.secret_key = 7, 1234

    def cancel(self) -> None:
        if self.outstanding:
            self.server.send_cancel(self.backend, self)  # type: ignore[arg-type]
        else:
            self.server.cancel_settled(self)  # type: ignore[arg-type]


class Done:
    """A CancelRequest connection's `done`: set once it may close."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def __call__(self) -> None:
        assert not self.event.is_set(), "done twice"
        self.event.set()


@pytest.fixture
def upstream(monkeypatch: pytest.MonkeyPatch) -> Upstream:
    fake = Upstream()
    monkeypatch.setattr(server_module, "send_cancel", fake.send_cancel)
    return fake


def proxy_with(tmp_path: Path, outstanding: bool) -> tuple[ProxyServer, Session]:
    server = ProxyServer(settings(tmp_path))
    session = Session(server, outstanding)
    server._keys[session.process_id] = session  # type: ignore[assignment]
    return server, session


async def test_the_cancel_connection_closes_only_once_the_server_has_acted_on_the_cancel(
    tmp_path: Path, upstream: Upstream
) -> None:
    server, session = proxy_with(tmp_path, outstanding=True)
    done = Done()
    server.cancel(session.process_id, session.secret_key, done)
    await asyncio.wait_for(upstream.started.wait(), DEADLINE)
    assert upstream.sent == [4242] and session.backend.cancels_in_flight == 1
    assert not done.event.is_set()  # the upstream server has not closed its cancel connection yet
    upstream.closes.set()
    await asyncio.wait_for(done.event.wait(), DEADLINE)
    assert session.backend.cancels_in_flight == 0


async def test_a_cancel_with_nothing_to_cancel_or_a_wrong_key_is_done_at_once(tmp_path: Path, upstream: Upstream) -> None:
    server, session = proxy_with(tmp_path, outstanding=False)
    dropped, wrong_key, no_session = Done(), Done(), Done()
    server.cancel(session.process_id, session.secret_key, dropped)
    server.cancel(session.process_id, session.secret_key + 1, wrong_key)
    server.cancel(session.process_id + 2, session.secret_key, no_session)
    assert dropped.event.is_set() and wrong_key.event.is_set() and no_session.event.is_set()
    assert upstream.sent == []


async def test_a_cancel_the_relay_holds_back_is_done_when_sent_or_when_the_session_ends(
    tmp_path: Path, upstream: Upstream
) -> None:
    """The relay holds a cancel while the statement waits for a server connection or behind a group of
    the proxy's own: both CancelRequests wait for the one cancel it sends; one that is still held when
    the session ends is done then."""
    server, session = proxy_with(tmp_path, outstanding=False)
    session.cancel = lambda: None  # type: ignore[method-assign]  # held back: neither sent nor dropped yet
    first, second = Done(), Done()
    server.cancel(session.process_id, session.secret_key, first)
    server.cancel(session.process_id, session.secret_key, second)
    assert not first.event.is_set() and not second.event.is_set()
    server.send_cancel(session.backend, session)  # type: ignore[arg-type]
    await asyncio.wait_for(upstream.started.wait(), DEADLINE)
    assert not first.event.is_set()
    upstream.closes.set()
    await asyncio.wait_for(asyncio.gather(first.event.wait(), second.event.wait()), DEADLINE)
    assert upstream.sent == [4242]

    held = Done()
    server.cancel(session.process_id, session.secret_key, held)
    assert not held.event.is_set()
    server.forget(session)  # type: ignore[arg-type]
    assert held.event.is_set()
