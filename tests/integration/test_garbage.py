"""Bad input of any kind never takes the proxy down: random bytes before and after login."""

from __future__ import annotations

import random
import struct
from typing import Any

from proxy.protocol import messages
from support import ACME, ROWS, ProxyProcess, RawClient, login


def _noise(rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 300))
    if choice == 1:  # a plausible header with a wild length
        return bytes([rng.randrange(256)]) + struct.pack("!i", rng.choice([-1, 0, 3, 4, 5, 2**31 - 1])) + rng.randbytes(8)
    if choice == 2:  # a startup packet with garbage parameters
        body = struct.pack("!i", messages.PROTOCOL_3_0) + rng.randbytes(rng.randrange(40))
        return struct.pack("!i", len(body) + 4) + body
    if choice == 3:  # valid types, invalid bodies
        return messages.message(bytes([rng.choice(b"QPBEDSCFHXcdfp")]), rng.randbytes(rng.randrange(30)))
    return messages.cancel_request(rng.randrange(2**31), rng.randrange(-(2**31), 2**31))


def _send_quietly(client: RawClient, data: bytes) -> None:
    try:
        client.send(data)
        client.sock.settimeout(0.2)
        client.sock.recv(65536)
    except OSError:
        pass


def test_random_bytes_never_take_the_proxy_down(proxy: ProxyProcess) -> None:
    hammer(proxy)


def test_random_bytes_never_take_a_transaction_pool_down(make_proxy: Any) -> None:
    """The same in transaction mode, where Bind, Describe, Close and Execute are read too."""
    hammer(make_proxy({"pool": {"mode": "transaction", "size": 2}}))


def hammer(proxy: ProxyProcess) -> None:
    """120 connections of random input, half of them after a valid login; then a healthy session."""
    rng = random.Random(20261126)
    for round_number in range(120):
        client = RawClient(proxy.port)
        try:
            if round_number % 2:
                login(client, proxy.token())
            for _ in range(rng.randrange(1, 4)):
                _send_quietly(client, _noise(rng))
        except (OSError, ConnectionError):
            pass
        finally:
            client.sock.close()
        assert proxy.alive()
    healthy = RawClient(proxy.port)
    try:
        login(healthy, proxy.token())
        healthy.send(messages.query("SELECT count(*) FROM leads"))
        rows = [body for kind, body in healthy.read_until(b"Z") if kind == b"D"]
        assert rows and rows[0].endswith(str(ROWS[ACME]).encode())
    finally:
        healthy.close()
    assert "Traceback" not in proxy.log()
