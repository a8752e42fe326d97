"""An idle pooled server connection that the server ends (its FATAL on its own, or its end of the stream)
leaves the pool at once, before `connection_lost` (a turn of the event loop later): a checkout in
between must not hand a client the dead connection. A notice while idle keeps it."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.backend import BackendConnection, Lifecycle
from proxy.pool import TransactionPool
from proxy.protocol import errors, messages

from test_pool_clock import new_pool


class Transport:
    """What the pool and the connection use of a transport; closing is recorded, connection_lost is not
    called (the event loop would call it later)."""

    def __init__(self) -> None:
        self.closing = False
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_extra_info(self, name: str) -> Any:
        return None

    def is_reading(self) -> bool:
        return True


def idle_connection(pool: TransactionPool) -> BackendConnection:
    backend = BackendConnection(max_prepared_statements=10)
    backend.connection_made(Transport())  # type: ignore[arg-type]
    backend.process_id = 4242
    backend.queue.status = b"I"
    backend.pool_key = ("app", ())
    backend.on_close = lambda: pool._lost(backend)
    pool._open["app"] = 1
    pool.servers.add(backend)
    pool.move(backend, Lifecycle.IDLE)
    return backend


@pytest.mark.parametrize("end", ["fatal", "end of stream"])
def test_an_idle_connection_the_server_ended_is_not_handed_out(end: str) -> None:
    """The server's FATAL on its own, or its end of stream: the connection is closed at once, before the
    loop's next turn would deliver connection_lost."""
    pool, _ = new_pool(kind=TransactionPool)
    assert isinstance(pool, TransactionPool)
    backend = idle_connection(pool)
    if end == "fatal":
        backend.data_received(messages.error_response("FATAL", errors.ADMIN_SHUTDOWN,
                                                      "terminating connection due to administrator command"))
    else:
        backend.eof_received()
    assert backend.closed
    assert pool.take("app", "tenant") is None


def test_a_notice_while_idle_keeps_the_connection() -> None:
    pool, _ = new_pool(kind=TransactionPool)
    assert isinstance(pool, TransactionPool)
    backend = idle_connection(pool)
    backend.data_received(messages.notice_response("01000", "a notice"))
    assert not backend.closed
    assert pool.take("app", "tenant") is backend
