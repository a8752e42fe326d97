"""The proxy's client side at the byte level: startup packets, order, limits and timeouts."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from support import ACME, ProxyProcess, RawClient, login, startup
from proxy.protocol import messages


@pytest.fixture
def raw(proxy: ProxyProcess) -> Any:
    clients: list[RawClient] = []

    def factory() -> RawClient:
        clients.append(RawClient(proxy.port))
        return clients[-1]

    yield factory
    for client in clients:
        client.close()


def test_ssl_request_answered_n_then_session_works(proxy: ProxyProcess, raw: Any) -> None:
    client = raw()
    client.send(messages.ssl_request())
    assert client.read_byte() == b"N"
    login(client, proxy.token())
    client.send(messages.query("SELECT tenant_proxy.current_tenant()"))
    rows = [body for type_byte, body in client.read_until(b"Z") if type_byte == b"D"]
    assert ACME.encode() in rows[0]


def test_gssenc_request_answered_n(proxy: ProxyProcess, raw: Any) -> None:
    client = raw()
    client.send(struct.pack("!ii", 8, messages.GSSENC_REQUEST_CODE))
    assert client.read_byte() == b"N"
    login(client, proxy.token())


def test_bytes_after_ssl_request_are_refused(raw: Any) -> None:
    """CVE-2021-23214 class: data sent in the clear before the handshake must not be processed."""
    client = raw()
    client.send(messages.ssl_request() + startup())
    assert client.read_byte() == b"E"
    client.reader.feed(b"E")
    fields = client.error()
    assert fields["C"] == "08P01" and "unencrypted data" in fields["M"]
    assert client.closed()


def test_message_out_of_order_during_authentication(raw: Any) -> None:
    client = raw()
    client.send(startup())
    client.send(messages.query("SELECT 1"))
    fields = client.error()
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert "expected a password message" in fields["M"]
    assert client.closed()


def test_second_startup_message_is_refused(raw: Any) -> None:
    client = raw()
    client.send(startup())
    client.send(startup())
    assert client.error()["C"] == "08P01"
    assert client.closed()


@pytest.mark.parametrize(
    "packet, sqlstate",
    [
        (struct.pack("!ii", 20_000, messages.PROTOCOL_3_0), "08P01"),
        (struct.pack("!ii", 2, messages.PROTOCOL_3_0), "08P01"),
        (struct.pack("!ii", 8, 2 << 16), "08P01"),
    ],
)
def test_bad_startup_packets(raw: Any, packet: bytes, sqlstate: str) -> None:
    client = raw()
    client.send(packet)
    assert client.error()["C"] == sqlstate
    assert client.closed()


def test_oversized_password_message_is_refused(raw: Any) -> None:
    client = raw()
    client.send(startup())
    client.send(b"p" + struct.pack("!i", 70_000) + b"x" * 100)
    fields = client.error()
    assert fields["C"] == "08P01" and "exceeds" in fields["M"]


def test_replication_is_refused(raw: Any) -> None:
    client = raw()
    client.send(startup(replication="database"))
    fields = client.error()
    assert fields["C"] == "42501" and "replication" in fields["M"]


def test_bad_framing_after_login_ends_only_that_session(proxy: ProxyProcess, raw: Any) -> None:
    client = raw()
    login(client, proxy.token())
    client.send(b"Q" + struct.pack("!i", 2))
    fields = client.error()
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert client.closed()
    other = raw()
    login(other, proxy.token())
    assert proxy.alive()


def test_messages_pipelined_before_ready_run_with_the_context(proxy: ProxyProcess, raw: Any) -> None:
    """Startup, password and a query in one write: the query still runs after the context is set."""
    client = raw()
    client.send(startup() + messages.password_message(proxy.token()) + messages.query("SELECT count(*) FROM leads"))
    items = client.read_until(b"Z")
    assert items[-1] == (b"Z", b"I")
    items = client.read_until(b"Z")
    rows = [body for type_byte, body in items if type_byte == b"D"]
    assert rows and rows[0].endswith(b"2")


def test_protocol_extensions_are_negotiated(proxy: ProxyProcess, raw: Any) -> None:
    client = raw()
    body = struct.pack("!i", (3 << 16) | 2) + b"user\0alice\0database\0app\0_pq_.x\0y\0\0"
    client.send(struct.pack("!i", len(body) + 4) + body)
    type_byte, payload = client.read_message()
    assert type_byte == b"v"
    assert payload == struct.pack("!ii", 0, 1) + b"_pq_.x\0"
    assert client.read_message()[0] == b"R"
    client.send(messages.password_message(proxy.token()))
    assert client.read_until(b"Z")[-1] == (b"Z", b"I")


def test_terminate_during_authentication_closes_quietly(raw: Any) -> None:
    client = raw()
    client.send(startup())
    assert client.read_message()[0] == b"R"
    client.send(messages.terminate())
    assert client.closed()


def test_authentication_timeout(make_proxy: Any) -> None:
    slow = make_proxy({"client": {"auth_timeout_seconds": 0.5}})
    client = RawClient(slow.port)
    try:
        client.send(startup())
        fields = client.error()
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "57P03", "authentication timed out")
        assert client.closed()
    finally:
        client.close()
