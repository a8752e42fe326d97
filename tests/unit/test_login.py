"""The login's pure part: `StartupExchange` reads the bytes a client sends before its greeting."""

import struct

import pytest

from proxy.login import Door, NotAToken, StartupExchange
from proxy.protocol import messages
from proxy.protocol.errors import ProtocolViolation

MAX = 10_000
STARTUP = messages.startup_message({"user": "alice", "database": "app"})


def accepted(door: Door = Door.CLIENTS) -> StartupExchange:
    """An exchange whose StartupMessage was read and accepted, its password asked for."""
    exchange = StartupExchange(door)
    assert isinstance(exchange.startup_packet(STARTUP, MAX), messages.StartupMessage)
    exchange.expect_password(MAX)
    return exchange


def test_a_startup_message_in_pieces_then_what_follows_it_is_pending() -> None:
    exchange = StartupExchange(Door.CLIENTS)
    for byte in STARTUP[:-1]:
        assert exchange.startup_packet(bytes([byte]), MAX) is None
    packet = exchange.startup_packet(STARTUP[-1:] + b"early", MAX)
    assert packet == messages.StartupMessage(3, 0, {"user": "alice", "database": "app"})
    assert exchange.take_pending() == b"early"
    assert exchange.take_pending() == b""


def test_one_packet_is_taken_per_read() -> None:
    exchange = StartupExchange(Door.CLIENTS)
    assert exchange.startup_packet(messages.cancel_request(7, 8) + STARTUP, MAX) == messages.CancelRequest(7, 8)
    assert exchange.take_pending() == STARTUP


@pytest.mark.parametrize("request_", [messages.ssl_request(), struct.pack("!ii", 8, messages.GSSENC_REQUEST_CODE)])
def test_an_encryption_request_must_be_the_last_bytes_before_its_answer(request_: bytes) -> None:
    assert StartupExchange(Door.CLIENTS).startup_packet(request_, MAX) is not None
    with pytest.raises(ProtocolViolation, match="unencrypted data after an encryption request"):
        StartupExchange(Door.CLIENTS).startup_packet(request_ + STARTUP[:3], MAX)


def test_the_workers_door_takes_only_cancel_requests() -> None:
    exchange = StartupExchange(Door.PEERS)
    assert exchange.startup_packet(messages.cancel_request(7, 8), MAX) == messages.CancelRequest(7, 8)
    for packet in (STARTUP, messages.ssl_request()):
        with pytest.raises(ProtocolViolation, match="only cancel requests"):
            StartupExchange(Door.PEERS).startup_packet(packet, MAX)


def test_a_startup_packet_over_the_maximum_is_refused() -> None:
    with pytest.raises(ProtocolViolation, match="exceeds"):
        StartupExchange(Door.CLIENTS).startup_packet(STARTUP, len(STARTUP) - 1)


def test_the_password_message_in_pieces_gives_the_token_and_keeps_what_follows() -> None:
    exchange = accepted()
    stream = messages.password_message("header.payload.signature")
    for byte in stream[:-1]:
        assert exchange.password(bytes([byte])) is None
    assert exchange.password(stream[-1:] + messages.query("SELECT 1")) == "header.payload.signature"
    assert exchange.take_pending() == messages.query("SELECT 1")


def test_the_password_message_may_come_in_the_startup_messages_read() -> None:
    exchange = StartupExchange(Door.CLIENTS)
    exchange.startup_packet(STARTUP + messages.password_message("token"), MAX)
    exchange.expect_password(MAX)
    assert exchange.password(exchange.take_pending()) == "token"


def test_terminate_instead_of_a_password() -> None:
    assert accepted().password(messages.terminate()) is NotAToken.TERMINATE


@pytest.mark.parametrize("body", [b"token", b"token\0extra\0"])
def test_a_password_message_that_is_not_one_string_is_malformed(body: bytes) -> None:
    message = b"p" + struct.pack("!i", len(body) + 4) + body
    assert accepted().password(message) is NotAToken.MALFORMED


def test_any_other_message_instead_of_a_password_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="expected a password message, got message type b'Q'"):
        accepted().password(messages.query("SELECT 1"))


def test_a_password_message_over_the_maximum_is_refused() -> None:
    exchange = StartupExchange(Door.CLIENTS)
    exchange.startup_packet(STARTUP, MAX)
    exchange.expect_password(64)
    with pytest.raises(ProtocolViolation):
        exchange.password(messages.password_message("x" * 100))


def test_bytes_before_the_greeting_are_held_up_to_the_maximum() -> None:
    exchange = accepted()
    exchange.hold(b"a" * 6, 10)
    exchange.hold(b"b" * 4, 10)
    with pytest.raises(ProtocolViolation, match="too much data sent before authentication completed"):
        exchange.hold(b"c", 10)


def test_held_bytes_are_taken_once() -> None:
    exchange = accepted()
    exchange.password(messages.password_message("token") + b"Q")
    exchange.hold(b"rest", MAX)
    assert exchange.take_pending() == b"Qrest"
    assert exchange.take_pending() == b""
