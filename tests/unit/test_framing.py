"""Framing: startup packets, whole-message reading, and header-only scanning with length checks."""

import random
import struct

import pytest

from proxy.protocol import messages
from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.framing import Message, MessageReader, MessageScanner, read_startup_packet


def test_startup_message_round_trip() -> None:
    buffer = bytearray(messages.startup_message({"user": "alice", "database": "app"}) + b"extra")
    packet = read_startup_packet(buffer)
    assert packet == messages.StartupMessage(3, 0, {"user": "alice", "database": "app"})
    assert buffer == b"extra"


def test_startup_packet_incomplete_returns_none() -> None:
    data = messages.startup_message({"user": "alice"})
    for cut in range(len(data)):
        assert read_startup_packet(bytearray(data[:cut])) is None


@pytest.mark.parametrize(
    "packet, expected",
    [
        (messages.ssl_request(), messages.SSLRequest()),
        (struct.pack("!ii", 8, messages.GSSENC_REQUEST_CODE), messages.GSSENCRequest()),
        (messages.cancel_request(1234, -5), messages.CancelRequest(1234, -5)),
    ],
)
def test_special_startup_packets(packet: bytes, expected: object) -> None:
    assert read_startup_packet(bytearray(packet)) == expected


@pytest.mark.parametrize("length", [0, 3, 7, -1])
def test_startup_length_too_small(length: int) -> None:
    with pytest.raises(ProtocolViolation):
        read_startup_packet(bytearray(struct.pack("!ii", length, messages.PROTOCOL_3_0)))


def test_startup_length_above_limit() -> None:
    with pytest.raises(ProtocolViolation, match="exceeds"):
        read_startup_packet(bytearray(struct.pack("!ii", 10_001, messages.PROTOCOL_3_0)), maximum=10_000)


@pytest.mark.parametrize(
    "body, reason",
    [
        (struct.pack("!i", 2 << 16) + b"\0", "unsupported frontend protocol"),
        (struct.pack("!i", messages.PROTOCOL_3_0) + b"user\0alice\0", "not terminated"),
        (struct.pack("!i", messages.PROTOCOL_3_0) + b"user\0\0", "without a value"),
        (struct.pack("!i", messages.PROTOCOL_3_0) + b"user\0a\0user\0b\0\0", "repeats"),
        (struct.pack("!i", messages.PROTOCOL_3_0) + b"user\0\xff\0\0", "UTF-8"),
        (struct.pack("!ii", messages.CANCEL_REQUEST_CODE, 1), "CancelRequest"),
    ],
)
def test_malformed_startup_packets(body: bytes, reason: str) -> None:
    with pytest.raises(ProtocolViolation, match=reason):
        read_startup_packet(bytearray(struct.pack("!i", len(body) + 4) + body))


def test_message_reader_yields_whole_messages_across_chunks() -> None:
    stream = messages.password_message("secret") + messages.query("SELECT 1") + messages.sync()
    reader = MessageReader(maximum=1000)
    seen = []
    for byte in stream:
        reader.feed(bytes([byte]))
        seen.extend(reader)
    assert seen == [(b"p", b"secret\0"), (b"Q", b"SELECT 1\0"), (b"S", b"")]
    assert reader.take_rest() == b""


@pytest.mark.parametrize("length", [3, 70_000])
def test_message_reader_length_checks(length: int) -> None:
    reader = MessageReader(maximum=65_536)
    reader.feed(b"p" + struct.pack("!i", length))
    with pytest.raises(ProtocolViolation):
        list(reader)


def _stream() -> bytes:
    return (
        messages.message(b"T", b"x" * 30)
        + messages.message(b"D", b"y" * 100)
        + messages.ready_for_query(b"T")
        + messages.message(b"C", b"SELECT 1\0")
        + messages.message(b"E", b"")
        + messages.ready_for_query(b"I")
    )


def _rebuild(segments: list[object]) -> bytes:
    return b"".join(s.raw if isinstance(s, Message) else bytes(s) for s in segments)  # type: ignore[arg-type]


def test_scanner_returns_watched_messages_whole_in_order() -> None:
    stream = _stream()
    for chunk_size in (1, 2, 3, 5, 7, 64, len(stream)):
        scanner = MessageScanner(b"ZE")
        segments: list[object] = []
        for start in range(0, len(stream), chunk_size):
            segments += scanner.scan(stream[start : start + chunk_size])
        assert _rebuild(segments) == stream
        watched = [s for s in segments if isinstance(s, Message)]
        assert [(m.type, m.body) for m in watched] == [(b"Z", b"T"), (b"E", b""), (b"Z", b"I")]
        assert scanner.at_boundary()


def test_scanner_passes_unwatched_reads_without_copying() -> None:
    data = messages.message(b"D", b"y" * 100)
    assert MessageScanner(b"Z").scan(data)[0] is data


def test_scanner_random_chunking_reproduces_the_stream() -> None:
    rng = random.Random(7)
    for _ in range(200):
        parts = [messages.message(rng.choice([b"Q", b"P", b"S", b"D", b"B"]), bytes(rng.randrange(40))) for _ in range(8)]
        stream = b"".join(parts)
        scanner = MessageScanner(b"QS")
        segments: list[object] = []
        position = 0
        while position < len(stream):
            step = rng.randrange(1, 20)
            segments += scanner.scan(stream[position : position + step])
            position += step
        assert _rebuild(segments) == stream
        expected = [p for p in parts if p[:1] in (b"Q", b"S")]
        assert [s.raw for s in segments if isinstance(s, Message)] == expected


def test_scanner_boundary_tracking() -> None:
    scanner = MessageScanner(b"")
    data = messages.query("SELECT 1")
    scanner.scan(data[:3])
    assert not scanner.at_boundary()
    scanner.scan(data[3:])
    assert scanner.at_boundary()


@pytest.mark.parametrize("length", [0, 3, (1 << 30) + 1])
def test_scanner_rejects_bad_lengths(length: int) -> None:
    scanner = MessageScanner(b"")
    with pytest.raises(ProtocolViolation):
        scanner.scan(b"Q" + struct.pack("!i", length))


def test_scanner_rejects_bad_length_split_across_reads() -> None:
    scanner = MessageScanner(b"Z", maximum=100)
    scanner.scan(b"Q\x00\x00")
    with pytest.raises(ProtocolViolation, match="exceeds"):
        scanner.scan(b"\x10\x00")


def test_scanner_mixing_forwarded_reads_and_cut_reads_reproduces_the_stream() -> None:
    """The upstream side forwards a read as it came when nothing is held (without what the read leaves
    held), and cuts it into segments otherwise; either way each byte goes out once, in order."""
    rng = random.Random(11)
    for _ in range(300):
        parts = [messages.message(rng.choice([b"Z", b"E", b"D", b"T"]), bytes(rng.randrange(12))) for _ in range(10)]
        stream = b"".join(parts)
        scanner = MessageScanner(b"ZE")
        out: list[bytes] = []
        found: list[bytes] = []
        position = 0
        while position < len(stream):
            read = stream[position : position + rng.randrange(1, 16)]
            position += len(read)
            if not scanner.holding() and rng.random() < 0.7:
                found += [m.raw for m in scanner.watched_messages(read)]
                out.append(read[: len(read) - scanner.holding()])
            else:
                segments = scanner.scan(read)
                found += [s.raw for s in segments if isinstance(s, Message)]
                out.append(_rebuild(segments))
        assert b"".join(out) == stream
        assert found == [p for p in parts if p[:1] in (b"Z", b"E")]
        assert scanner.at_boundary() and not scanner.holding()


def test_scanner_lone_message() -> None:
    query = messages.query("SELECT 1")
    assert MessageScanner(b"Q").lone(query) == ord("Q")
    assert MessageScanner(b"Q").lone(query + messages.sync()) == -1
    assert MessageScanner(b"Q").lone(query[:-1]) == -1
    assert MessageScanner(b"Q", maximum=8).lone(query) == -1  # too long: the cutting path reports it
    scanner = MessageScanner(b"Q")
    scanner.scan(query[:3])
    assert scanner.lone(query) == -1  # not at a boundary


def test_scanner_sync_group() -> None:
    """Where each message starts when a read is exactly one extended-query group ending in its Sync;
    None for any other read, which the cutting path takes."""
    parse, bind = messages.parse("s", "SELECT $1"), messages.bind("", "s", ["1"])
    describe, execute, sync = messages.message(b"D", b"P\0"), messages.execute(""), messages.sync()
    group = parse + bind + describe + execute + sync
    starts = [0, len(parse), len(parse + bind), len(parse + bind + describe), len(group) - len(sync)]
    assert MessageScanner(b"Q").sync_group(group) == starts
    assert MessageScanner(b"Q").sync_group(bind + execute + sync) == [0, len(bind), len(bind + execute)]
    assert MessageScanner(b"Q").sync_group(sync) is None  # a Sync alone: nothing to gain
    assert MessageScanner(b"Q").sync_group(bind + execute) is None  # no Sync
    assert MessageScanner(b"Q").sync_group(bind + sync + execute + sync) is None  # two groups
    assert MessageScanner(b"Q").sync_group(messages.query("SELECT 1") + sync) is None  # a Query among them
    assert MessageScanner(b"Q").sync_group(messages.message(b"H") + execute + sync) is None  # a Flush among them
    assert MessageScanner(b"Q").sync_group(bind[:-1] + execute + sync) is None  # lengths that do not add up
    assert MessageScanner(b"Q").sync_group(bind[1:] + sync) is None
    assert MessageScanner(b"Q", maximum=8).sync_group(group) is None  # too long: the cutting path reports it
    scanner = MessageScanner(b"Q")
    scanner.scan(group[:3])
    assert scanner.sync_group(group) is None  # not at a boundary


def test_scanner_with_passed_types_refuses_any_other_unwatched_type() -> None:
    """The client side passes CopyData on unwatched; a type no frontend sends after login is refused as
    Postgres refuses it, not passed on as if the server answered it with nothing (it ends the session)."""
    scanner = MessageScanner(b"QS", passed=b"d")
    copy_data = messages.message(b"d", b"1\n")
    assert scanner.scan(copy_data + messages.sync())[0] == copy_data
    with pytest.raises(ProtocolViolation, match="invalid frontend message type 1") as raised:
        scanner.scan(copy_data + b"\x01\x00\x00\x00\x04")
    assert raised.value.routine == "SocketBackend"
    split = MessageScanner(b"QS", passed=b"d")
    split.scan(b"p\x00")
    with pytest.raises(ProtocolViolation, match="invalid frontend message type 112"):
        split.scan(b"\x00\x00\x05x")
    assert MessageScanner(b"QS").scan(b"\x01\x00\x00\x00\x04") == [b"\x01\x00\x00\x00\x04"]  # no `passed`: any type
