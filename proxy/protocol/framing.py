"""Message framing: cutting a byte stream into startup packets and typed messages, with length checks.

Three readers, one per phase of a connection:
- `read_startup_packet` takes one untyped packet (StartupMessage, SSLRequest, ...) off a buffer;
- `MessageReader` yields whole typed messages, for the authentication phases;
- `MessageScanner` walks only the 5-byte headers of a forwarded stream and keeps whole bodies only of
  the message types it watches, so the hot path never copies what it forwards.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import NamedTuple, Union, cast

from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.messages import StartupPacket, parse_startup_packet

DEFAULT_MAX_STARTUP_PACKET = 10_000
DEFAULT_MAX_AUTH_MESSAGE = 65_536
DEFAULT_MAX_MESSAGE = 1 << 30
_HEADER = struct.Struct("!Bi")
_TYPE_BYTES = [bytes((code,)) for code in range(256)]
_SYNC = b"S\0\0\0\4"
GROUP_MESSAGES = frozenset(b"PBDE")  # Parse, Bind, Describe, Execute: what `MessageScanner.sync_group` takes before the Sync


def _check_length(length: int, maximum: int, what: str) -> None:
    if length < 4:
        raise ProtocolViolation(f"invalid {what} length {length}")
    if length > maximum:
        raise ProtocolViolation(f"{what} length {length} exceeds the limit of {maximum} bytes")


def _invalid_type(type_code: int) -> None:
    """A message of a type the peer may not send (Postgres's words and routine for a frontend's)."""
    raise ProtocolViolation(f"invalid frontend message type {type_code}", routine="SocketBackend")


def read_startup_packet(buffer: bytearray, maximum: int = DEFAULT_MAX_STARTUP_PACKET) -> StartupPacket | None:
    """Remove and return one startup packet from the front of `buffer`, or None if it is incomplete."""
    if len(buffer) < 4:
        return None
    length = int.from_bytes(buffer[:4], "big", signed=True)
    if length < 8:
        raise ProtocolViolation(f"invalid startup packet length {length}")
    _check_length(length, maximum, "startup packet")
    if len(buffer) < length:
        return None
    body = bytes(buffer[4:length])
    del buffer[:length]
    return parse_startup_packet(body)


class MessageReader:
    """Accumulates bytes and yields complete typed messages as (type byte, body)."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def peek_type(self) -> bytes | None:
        """The type byte of the next message, as soon as it has arrived."""
        return bytes(self._buffer[:1]) or None

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        buffer = self._buffer
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[1:5], "big", signed=True)
            _check_length(length, self.maximum, "message")
            if len(buffer) < length + 1:
                return
            type_byte = bytes(buffer[0:1])
            body = bytes(buffer[5 : length + 1])
            del buffer[: length + 1]
            yield type_byte, body

    def take_rest(self) -> bytes:
        """Everything buffered and not yet yielded, leaving the reader empty."""
        rest = bytes(self._buffer)
        self._buffer.clear()
        return rest


class Message(NamedTuple):
    """A whole watched message: its type byte and its raw bytes (header included)."""

    type: bytes
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[5:]


Segment = Union[bytes, memoryview, Message]


class MessageScanner:
    """Walks message headers in a stream that is forwarded as it arrives.

    `scan(data)` checks every header's length and returns the stream cut into segments, in order:
    runs of unwatched bytes (passed on without being copied when a read holds no watched message) and
    whole watched messages. A watched message split across reads is held until it is complete.
    With `passed`, an unwatched message must be of one of those types: any other type is a
    ProtocolViolation, as Postgres answers it ("invalid frontend message type", in SocketBackend), so it
    is never passed on as if it were one the peer reads without a reply.
    """

    __slots__ = ("maximum", "watched", "passed", "_header", "_skip", "_body", "_body_type", "_need")

    def __init__(self, watched: bytes, maximum: int = DEFAULT_MAX_MESSAGE, passed: bytes | None = None) -> None:
        self.maximum = maximum
        self.watched = frozenset(watched)
        self.passed = frozenset(passed) if passed is not None else None
        self._header = b""  # a header split across reads, not yet passed on
        self._skip = 0  # bytes of an unwatched body still to pass
        self._body: bytearray | None = None  # a watched message being collected
        self._body_type = b""
        self._need = 0

    def at_boundary(self) -> bool:
        """True when the bytes scanned so far end exactly at a message boundary."""
        return not self._header and not self._skip and self._body is None

    def passing(self) -> int:
        """Bytes still to come of an unwatched message that a read ended inside: its first part was
        passed on as it came, and the next read opens with the rest."""
        return self._skip

    def lone(self, data: bytes) -> int:
        """The type code when `data` is exactly one whole message starting at a boundary (the common
        read on the hot path, which then needs no cutting), else -1."""
        if self._header or self._skip or self._body is not None or len(data) < 5:
            return -1
        type_code, length = _HEADER.unpack_from(data)
        if length + 1 != len(data) or length < 4 or length > self.maximum:
            return -1
        return type_code

    def sync_group(self, data: bytes) -> list[int] | None:
        """Where each message starts, the Sync last, when `data` is exactly one extended-query group starting
        at a boundary: whole Parse, Bind, Describe and Execute messages (one or more), then one Sync that
        ends the read ("Extended Query", 55.2.3). That is the common read of a driver running a prepared
        statement, which then needs no cutting. None for any other read (the cutting path checks it)."""
        if self._header or self._skip or self._body is not None or data[-5:] != _SYNC:
            return None
        unpack = _HEADER.unpack_from
        maximum = self.maximum
        last = len(data) - 5
        starts: list[int] = []
        pos = 0
        while pos < last:
            if last - pos < 5:
                return None
            type_code, length = unpack(data, pos)
            if type_code not in GROUP_MESSAGES or length < 4 or length > maximum:
                return None
            starts.append(pos)
            pos += 1 + length
        if pos != last or not starts:
            return None
        starts.append(last)
        return starts

    def holding(self) -> int:
        """How many bytes of a split header or watched message are held back, in no segment yet."""
        if self._header:
            return len(self._header)
        return len(self._body) if self._body is not None else 0

    def scan(self, data: bytes) -> list[Segment]:
        """Cut `data` into segments: what to pass on, in order."""
        return self._cut(data, unwatched=True)

    def watched_messages(self, data: bytes) -> list[Message]:
        """Only the whole watched messages in `data`, for a caller that passes the bytes on as they
        came: it may do so only when nothing was held before (`holding()` is 0), and then without the
        last `holding()` bytes, which a later read completes."""
        return cast("list[Message]", self._cut(data, unwatched=False))

    def _cut(self, data: bytes, unwatched: bool) -> list[Segment]:
        segments: list[Segment] = []
        end = len(data)
        pos = start = 0  # start: where the pending run of unwatched bytes begins
        if self._skip or self._body is not None or self._header:
            pos = start = self._resume(data, segments, unwatched)
            if pos < 0:
                return segments
        watched = self.watched
        while pos < end:
            if end - pos < 5:
                if unwatched and pos > start:
                    segments.append(data[start:pos])
                self._header = data[pos:end]
                return segments
            type_code, length = _HEADER.unpack_from(data, pos)
            if length < 4 or length > self.maximum:
                _check_length(length, self.maximum, "message")
            stop = pos + 1 + length
            if type_code in watched:
                if unwatched and pos > start:
                    segments.append(data[start:pos])
                if stop > end:
                    self._body = bytearray(data[pos:end])
                    self._body_type = _TYPE_BYTES[type_code]
                    self._need = stop - end
                    return segments
                segments.append(Message(_TYPE_BYTES[type_code], data[pos:stop]))
                start = stop
            elif self.passed is not None and type_code not in self.passed:
                _invalid_type(type_code)
            elif stop > end:
                self._skip = stop - end
                stop = end
            pos = stop
        if unwatched and start < end:
            segments.append(data if start == 0 else data[start:end])
        return segments

    def _resume(self, data: bytes, segments: list[Segment], unwatched: bool) -> int:
        """Finish the message a previous read left open; the offset where whole messages start, or -1
        when this read is used up (its bytes already appended, or held)."""
        end = len(data)
        if self._skip:
            step = min(self._skip, end)
            self._skip -= step
            if self._skip:
                if unwatched:
                    segments.append(data)
                return -1
            if step and unwatched:
                segments.append(data[:step])
            return step
        pos = 0
        if self._body is None:
            take = min(5 - len(self._header), end)
            header = self._header + data[:take]
            pos = take
            if len(header) < 5:
                self._header = header
                return -1
            self._header = b""
            type_code, length = _HEADER.unpack_from(header)
            _check_length(length, self.maximum, "message")
            if type_code not in self.watched:
                if self.passed is not None and type_code not in self.passed:
                    _invalid_type(type_code)
                self._skip = length - 4
                step = min(self._skip, end - pos)
                self._skip -= step
                if unwatched:
                    segments.append(header)
                    if step:
                        segments.append(data[pos : pos + step])
                return -1 if self._skip else pos + step
            self._body = bytearray(header)
            self._body_type = _TYPE_BYTES[type_code]
            self._need = length - 4
        step = min(self._need, end - pos)
        self._body += data[pos : pos + step]
        self._need -= step
        if self._need:
            return -1
        segments.append(Message(self._body_type, bytes(self._body)))
        self._body = None
        return pos + step
