"""A cancel racing the end of a client's statement, through transaction pooling (found by a breaker helper).

Directly, a CancelRequest that arrives after the statement ended is ignored, and a completed SET stays
for the session. Through the proxy the cancel can land in the proxy's settings read-back that follows
a SET: outside a block the read-back is sent again, so the value is not lost; inside a block none is
sent any more but behind a group that may end it, so the client's block is not aborted by the proxy's
own statement. The race is timing: each test sends a few hundred statements of slightly different
lengths, each followed at once by a cancel.

Last, a cancel racing the client's next statement: Postgres 15 signals the backend twice for one
CancelRequest (the process, then its process group) and closes the cancel connection after both, which
libpq's PQcancel waits for; the proxy must not close the client's cancel connection sooner.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from contextlib import suppress
from functools import partial
from typing import Any

from differential import Wire, render, send_cancel
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ACME, GLOBEX, ProxyProcess, cancel_when_running, wait_until

TRANSACTION = {"pool": {"mode": "transaction", "size": 1}}
ROUNDS = 300


class Keyed:
    """A raw protocol connection to the proxy that kept its BackendKeyData, to cancel with."""

    def __init__(self, proxy: ProxyProcess, tenant: str) -> None:
        self.port = proxy.port
        self.wire = Wire(socket.create_connection(("127.0.0.1", proxy.port), timeout=10), tenant)
        self.wire.send(messages.startup_message({"user": "alice", "database": "app"}))
        deadline = time.monotonic() + 10
        while True:
            kind, body = self.wire.read_message(deadline)
            assert kind != b"E", render((kind, body))
            if kind == b"R" and messages.parse_authentication(body)[0] == messages.AUTH_CLEARTEXT_PASSWORD:
                self.wire.send(messages.password_message(proxy.token(tenant)))
            elif kind == b"K":
                self.pid, self.key = messages.parse_backend_key_data(body)
            elif kind == b"Z":
                break

    def cancel(self) -> None:
        """Send a CancelRequest and wait until the proxy closes that connection (it has acted on it)."""
        send_cancel(self.port, (self.pid, self.key), 5)

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.wire.send(messages.query(sql))
        return self.wire.read_ready(timeout=10)


def outcome(replies: list[tuple[bytes, bytes]]) -> str:
    """The SQLSTATE of the first error, or "completed"."""
    found = [messages.parse_error_fields(body).get("C", "?") for kind, body in replies if kind == b"E"]
    return found[0] if found else "completed"


def shown(conn: Keyed, setting: str) -> bytes:
    rows = [messages.parse_data_row(body)[0] for kind, body in conn.query(f"SHOW {setting}") if kind == b"D"]
    assert rows and rows[0] is not None
    return rows[0]


def test_a_set_that_completed_survives_a_late_cancel_and_another_tenants_turn(make_proxy: Any) -> None:
    """`SELECT pg_sleep(tiny); SET work_mem = ...` and at once a cancel: either the statement is cancelled
    (57014, nothing set) or it completes and the value stays, also after another tenant used the one
    server connection (which resets it and applies the client's settings again at its next turn)."""
    proxy = make_proxy(TRANSACTION)
    acme, globex = Keyed(proxy, ACME), Keyed(proxy, GLOBEX)
    value = shown(acme, "work_mem")
    lost = []
    try:
        for round_ in range(ROUNDS):
            wanted = f"{3001 + 2 * round_}kB"
            acme.wire.send(messages.query(f"SELECT pg_sleep({(round_ % 100) * 0.00002:.5f}); SET work_mem = '{wanted}'"))
            acme.cancel()
            result = outcome(acme.wire.read_ready(timeout=10))
            assert result in ("completed", "57014"), result
            if result == "completed":
                value = wanted.encode()
            assert outcome(globex.query("SELECT count(*) FROM leads")) == "completed"
            now = shown(acme, "work_mem")
            if now != value:
                lost.append((round_, value, now))
                value = now
    finally:
        acme.wire.close()
        globex.wire.close()
    assert not lost, f"completed SETs lost after a late cancel: {lost[:5]} ({len(lost)} of {ROUNDS})"
    assert proxy.alive()


def test_a_cancel_racing_statements_inside_a_block_after_a_set_keeps_the_session(make_proxy: Any) -> None:
    """After a SET inside a block, the proxy reads the client's settings back only behind a group that
    may end the block (a read inside it is thrown away, and a cancel landing there aborted the client's
    block and ended the session, in 2 to 33 of 300 rounds). Directly, each cancel either fails the
    statement (57014) or is ignored."""
    proxy = make_proxy(TRANSACTION)
    acme = Keyed(proxy, ACME)

    def begin_with_a_set() -> None:
        # A round's cancel that reached the server only after its statement failed lands on one of these,
        # as a late cancel does directly (it hits whatever the backend runs then): start over.
        for _ in range(5):
            if all(outcome(acme.query(sql)) == "completed" for sql in ("ROLLBACK", "BEGIN", "SET work_mem = '2MB'")):
                return
        raise AssertionError("could not begin a block with a SET in 5 tries")

    try:
        begin_with_a_set()
        for round_ in range(ROUNDS):
            acme.wire.send(messages.query(f"SELECT pg_sleep({(round_ % 100) * 0.00002:.5f})"))
            acme.cancel()
            result = outcome(acme.wire.read_ready(timeout=10))
            assert result in ("completed", "57014"), (round_, result)
            if result == "57014":
                begin_with_a_set()
        assert shown(acme, "work_mem") == b"2MB"
    finally:
        acme.wire.close()
    assert proxy.alive()


def test_a_short_statement_timeout_inside_a_block_ends_no_session(make_proxy: Any) -> None:
    """`SET statement_timeout = '1ms'` inside a block, then many short statements: directly all complete;
    the proxy's read-back no longer runs inside the block under that timeout."""
    proxy = make_proxy(TRANSACTION)
    acme = Keyed(proxy, ACME)
    try:
        for _ in range(10):
            for sql in ["BEGIN", "SET statement_timeout = '1ms'"] + ["SELECT 1"] * 20 + ["ROLLBACK"]:
                assert outcome(acme.query(sql)) == "completed", sql
    finally:
        acme.wire.close()



class HeldCancels:
    """A TCP forwarder in front of Postgres, the proxy's upstream: it passes every connection on, and
    keeps each cancel connection (a CancelRequest first) open after Postgres closed it, until `release`
    is set, as a postmaster late with its second signal would."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.acted = threading.Event()  # Postgres closed a cancel connection: it has signalled the backend
        self.release = threading.Event()
        self._connections: list[socket.socket] = []  # the proxy's side of each
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        """End every connection and thread: none may outlive the test (a thread left in this process may
        take the signal a later test sends itself, test_worker_signals' SIGHUP, and die of it)."""
        self.release.set()
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._threads[0].join(10)
        for connection in self._connections:
            with suppress(OSError):  # one that ended is closed already
                connection.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                proxy_side, _ = self.listener.accept()
            except OSError:
                return
            self._connections.append(proxy_side)
            self._threads.append(threading.Thread(target=self._serve, args=(proxy_side,), daemon=True))
            self._threads[-1].start()

    def _serve(self, proxy_side: socket.socket) -> None:
        with proxy_side, socket.create_connection(("127.0.0.1", self.upstream_port)) as server_side:
            head = proxy_side.recv(8, socket.MSG_WAITALL)
            server_side.sendall(head)
            if len(head) == 8 and struct.unpack("!ii", head)[1] == messages.CANCEL_REQUEST_CODE:
                server_side.sendall(proxy_side.recv(8, socket.MSG_WAITALL))
                server_side.recv(1)  # Postgres closes it once it has signalled the backend
                self.acted.set()
                self.release.wait(60)
                return
            while True:
                for side in select.select([proxy_side, server_side], [], [])[0]:
                    data = side.recv(65536)
                    if not data:
                        return
                    (server_side if side is proxy_side else proxy_side).sendall(data)


def test_the_cancel_connection_closes_only_once_the_server_has_acted_on_the_cancel(
    make_proxy: Any, pg: EmbeddedPostgres
) -> None:
    """The proxy closed a client's cancel connection as soon as it had read the CancelRequest, before
    passing it on: PQcancel returned at once, and a client that then sent its next statement (once the
    first signal had cancelled the running one) could have that one cancelled by the second signal
    (57014 on `SELECT count(*)` after a cancelled `pg_sleep`, in full-suite runs on a loaded machine).
    Now it stays open until Postgres has closed the cancel connection the proxy opened, on whichever
    worker the CancelRequest lands (each round's new connection may reach either)."""
    held = HeldCancels(pg.port)
    proxy = make_proxy({"": {"workers": 2}, "upstream": {"port": held.port},
                        "client": {"startup_timeout_seconds": 60}})  # the cancel connection's longest wait
    wait_until(lambda: proxy.log().count("listening on") == 2)
    acme = Keyed(proxy, ACME)
    cancels: list[socket.socket] = []
    try:
        for round_ in range(6):
            held.acted.clear()
            held.release.clear()
            marker = f"held_cancel_{round_}"
            cancel = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            cancels.append(cancel)
            watcher = cancel_when_running(pg, partial(cancel.sendall, messages.cancel_request(acme.pid, acme.key)), marker)
            acme.wire.send(messages.query(f"SELECT pg_sleep(20) /* {marker} */"))
            watcher.join()
            assert outcome(acme.wire.read_ready(timeout=10)) == "57014"  # the first signal
            wait_until(held.acted.is_set)
            cancel.setblocking(False)
            try:
                closed = cancel.recv(1) == b""
            except BlockingIOError:
                closed = False
            assert not closed, f"round {round_}: the proxy closed the cancel connection before the server had acted on it"
            held.release.set()
            cancel.settimeout(10)
            assert cancel.recv(1) == b""
            assert outcome(acme.query("SELECT count(*) FROM leads")) == "completed"
    finally:
        held.close()
        acme.wire.close()
        for cancel in cancels:
            cancel.close()
    assert proxy.alive()
