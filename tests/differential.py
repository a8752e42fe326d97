"""A raw-protocol harness for differential tests: send the same frontend messages directly to Postgres
and through the proxy, and compare the two reply streams message by message.

A scenario is a list of writes; each write is a list of steps (one frontend message each, with a label
for the trace) and goes out as one socket write. A write either ends with a Sync and a terminator (a
Sync followed by empty Queries, see `Write.terminated`) or, like asyncpg and pg8000 do, with a Flush
after Parse and Describe of the unnamed statement. The direct run decides where each write's replies
end; the proxy run must give the same messages. Message formats follow the Postgres documentation,
"Frontend/Backend Protocol: Message Formats"; the end of a reply stream follows "Message Flow".
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from proxy.protocol import messages
from proxy.protocol.framing import MessageReader
from proxy.protocol.upstream_auth import UpstreamAuth

Reply = tuple[bytes, bytes]
READ_TIMEOUT = 5.0
# ParameterStatus values that legitimately differ between a direct session and one through the proxy.
VARYING_PARAMETERS = {"server_version", "session_authorization", "is_superuser"}
# ErrorResponse and NoticeResponse fields left out of the comparison: F and L, the file and line in Postgres's
# source where the error was raised, which change with the server's build and which an error the proxy
# composes has none of. R, the routine, is compared: clients act on it (asyncpg and postgres.js prepare again on
# 0A000 from RevalidateCachedQuery, postgres.js also on FetchPreparedStatement), so an error the proxy composes
# to imitate Postgres names Postgres's routine.
SOURCE_FIELDS = (b"F", b"L")
# SQLSTATEs whose R is left out too, each for a reason the proxy cannot match it:
# - 22021, a statement name that is not valid UTF-8, which the proxy refuses itself (the server only ever reads
#   the proxy's name for the statement): Postgres renamed the routine in minor releases (report_invalid_encoding,
#   then report_invalid_encoding_int, as 15.18 names it), so the proxy cannot know which its server would name,
#   and names none.
ROUTINE_VARIES = (b"C22021",)


# ---------------------------------------------------------------------------------------------
# Frontend messages the proxy's own builders do not have.


def describe(kind: str, name: str) -> bytes:
    """Describe ('D') of a prepared statement (kind 'S') or a portal (kind 'P')."""
    return messages.message(b"D", kind.encode() + messages.cstring(name))


def close(kind: str, name: str) -> bytes:
    """Close ('C') of a prepared statement (kind 'S') or a portal (kind 'P')."""
    return messages.message(b"C", kind.encode() + messages.cstring(name))


def flush() -> bytes:
    """Flush ('H')."""
    return messages.message(b"H")


def copy_data(data: bytes) -> bytes:
    """CopyData ('d') from the frontend."""
    return messages.message(b"d", data)


def copy_done() -> bytes:
    """CopyDone ('c')."""
    return messages.message(b"c")


def copy_fail(reason: str) -> bytes:
    """CopyFail ('f') with the reason the server will report."""
    return messages.message(b"f", messages.cstring(reason))


# ---------------------------------------------------------------------------------------------
# Scenarios.


class Step:
    """One frontend message and how the trace shows it."""

    def __init__(self, label: str, data: bytes) -> None:
        self.label = label
        self.data = data

    def __repr__(self) -> str:
        return self.label


def step_query(sql: str) -> Step:
    return Step(f"Query({sql!r})", messages.query(sql))


def step_parse(statement: str, sql: str) -> Step:
    return Step(f"Parse({statement!r}, {sql!r})", messages.parse(statement, sql))


def step_bind(portal: str, statement: str, values: Sequence[str | None]) -> Step:
    return Step(f"Bind({portal!r}, {statement!r}, {list(values)!r})", messages.bind(portal, statement, values))


def step_describe(kind: str, name: str) -> Step:
    return Step(f"Describe({kind}, {name!r})", describe(kind, name))


def step_execute(portal: str, max_rows: int = 0) -> Step:
    return Step(f"Execute({portal!r}, max_rows={max_rows})", messages.execute(portal, max_rows))


def step_close(kind: str, name: str) -> Step:
    return Step(f"Close({kind}, {name!r})", close(kind, name))


SYNC = Step("Sync", messages.sync())
FLUSH = Step("Flush", flush())
COPY_DONE = Step("CopyDone", copy_done())
TERMINATOR_PORTAL = "no such portal"
TERMINATOR_CLOSE = step_close("P", TERMINATOR_PORTAL)


def step_copy_data(data: bytes) -> Step:
    return Step(f"CopyData({data!r})", copy_data(data))


def step_copy_fail(reason: str) -> Step:
    return Step(f"CopyFail({reason!r})", copy_fail(reason))


class Write:
    """Steps sent as one socket write.

    A terminated write ends with a Sync and then n + 1 times Close of a portal that does not exist and
    Sync, where n counts the Close steps of the write. Postgres answers the terminator
    `Z (CloseComplete Z) * (n + 1)` whatever state the steps left it in (no COPY is left open, and
    Close runs even in a failed transaction), it changes no state (a simple Query would drop the
    unnamed statement), and the steps cannot produce n + 1 such pairs in a row, so the first time the
    replies end that way is the end of the write. An unterminated write is Parse and Describe of a
    statement and a Flush: it ends after one ErrorResponse or after three replies.
    """

    def __init__(self, steps: tuple[Step, ...], terminated: bool = True) -> None:
        self.steps = steps
        self.terminated = terminated

    def __repr__(self) -> str:
        return f"Write({', '.join(self.describe())})"

    def terminator(self) -> tuple[Step, ...]:
        if not self.terminated:
            return ()
        pairs = sum(step.data[:1] == b"C" for step in self.steps) + 1
        return (SYNC,) + (TERMINATOR_CLOSE, SYNC) * pairs

    def data(self) -> bytes:
        return b"".join(step.data for step in self.steps + self.terminator())

    def complete(self, replies: Sequence[Reply]) -> bool:
        """Whether `replies` (from the start of this write) hold all that Postgres answers to it."""
        if not self.terminated:
            return bool(replies) and (replies[0][0] == b"E" or len(replies) >= 3)
        pairs = len(self.terminator()) // 2
        types = [type_byte for type_byte, _ in replies[-(2 * pairs + 1) :]]
        return types == [b"Z"] + [b"3", b"Z"] * pairs

    def describe(self) -> list[str]:
        terminator = f"terminator: Sync + {len(self.terminator()) // 2} x (Close(P, {TERMINATOR_PORTAL!r}), Sync)"
        return [step.label for step in self.steps] + ([terminator] if self.terminated else [])


def flush_write(statement: str, sql: str) -> Write:
    """Parse, Describe, Flush: what asyncpg and pg8000 send before they bind."""
    return Write((step_parse(statement, sql), step_describe("S", statement), FLUSH), terminated=False)


# ---------------------------------------------------------------------------------------------
# Connections.


class Wire:
    """A blocking socket speaking raw protocol 3.0; every read has a deadline that fails the test."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.reader = MessageReader(1 << 24)
        self.status = b"I"  # transaction status from the last ReadyForQuery
        self.key: tuple[int, int] | None = None  # BackendKeyData at login: process ID and secret key

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self, deadline: float) -> Reply:
        """The next message; raises TimeoutError at `deadline` (time.monotonic()), ConnectionError on EOF."""
        while True:
            for item in self.reader:
                if item[0] == b"Z":
                    self.status = item[1]
                return item
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise TimeoutError(f"{self.name}: no complete reply before the deadline")
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"{self.name}: connection closed")
            self.reader.feed(data)

    def read_to_end(self, timeout: float) -> tuple[list[Reply], str]:
        """Every message until the connection closes ("closed") or `timeout` seconds pass ("open")."""
        replies: list[Reply] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                replies.append(self.read_message(deadline))
            except TimeoutError:
                return replies, "open"
            except ConnectionError:
                return replies, "closed"

    def read_until(self, complete: Callable[[list[Reply]], bool], timeout: float = READ_TIMEOUT) -> list[Reply]:
        """Messages up to the first point where `complete(messages)` holds."""
        deadline = time.monotonic() + timeout
        replies: list[Reply] = []
        while not complete(replies):
            try:
                replies.append(self.read_message(deadline))
            except (TimeoutError, ConnectionError) as exc:
                raise IncompleteReply(str(exc), replies) from None
        return replies

    def read_ready(self, count: int = 1, timeout: float = READ_TIMEOUT) -> list[Reply]:
        """Messages up to and including the `count`th ReadyForQuery (counted as they come: a count over every
        reply at each message made 10,000 pipelined Queries cost the test minutes of its own CPU)."""
        seen = 0

        def complete(replies: list[Reply]) -> bool:
            nonlocal seen
            if replies and replies[-1][0] == b"Z":
                seen += 1
            return seen >= count

        return self.read_until(complete, timeout)

    def run(self, write: Write) -> list[Reply]:
        """Send one write and read all of its replies."""
        self.send(write.data())
        return self.read_until(write.complete)

    def close(self) -> None:
        try:
            self.sock.sendall(messages.terminate())
        except OSError:
            pass
        self.sock.close()


class IncompleteReply(AssertionError):
    """A reply stream stopped before it was complete; `replies` holds what did arrive."""

    def __init__(self, reason: str, replies: list[Reply]) -> None:
        super().__init__("\n".join([reason, "  received:"] + [f"    {render(reply)}" for reply in replies]))
        self.reason = reason
        self.replies = replies


def _login(wire: Wire, startup: bytes, answer: Callable[[int, bytes], bytes | None]) -> Wire:
    """Send the startup packet, answer each authentication request with `answer(code, data)`, and read
    up to the first ReadyForQuery, which must be 'I'."""
    wire.send(startup)
    deadline = time.monotonic() + READ_TIMEOUT
    while True:
        type_byte, body = wire.read_message(deadline)
        if type_byte == b"E":
            raise AssertionError(f"{wire.name}: login refused: {render((type_byte, body))}")
        if type_byte == b"R":
            code, data = messages.parse_authentication(body)
            reply = answer(code, data)
            if reply is not None:
                wire.send(reply)
        if type_byte == b"K":
            wire.key = messages.parse_backend_key_data(body)
        if type_byte == b"Z":
            assert body == b"I", body
            return wire


def exchange(wire: Wire, writes: list[bytes]) -> list[list[Reply]]:
    """Send each write and read its replies up to its ReadyForQuery: the replies of each."""
    replies = []
    for data in writes:
        wire.send(data)
        replies.append(wire.read_ready())
    return replies


def exchange_and_compare(wire: Wire, writes: list[bytes], expected: list[list[Reply]]) -> None:
    """`exchange` on `wire` (closed afterwards): the replies to each write must be `expected`'s (the same
    writes run directly, `exchange_directly`)."""
    try:
        got = exchange(wire, writes)
    finally:
        wire.close()
    for index, (direct, proxied) in enumerate(zip(expected, got)):
        assert_same(direct, proxied, f"the replies to write {index + 1}")


def exchange_directly(port: int, user: str, password: str, database: str, writes: list[bytes]) -> list[list[Reply]]:
    """`exchange` on a connection of its own straight to Postgres, closed afterwards."""
    wire = connect_direct(port, user, password, database)
    try:
        return exchange(wire, writes)
    finally:
        wire.close()


def send_cancel(port: int, key: tuple[int, int], timeout: float = READ_TIMEOUT) -> None:
    """Send a CancelRequest for `key` (BackendKeyData: process ID, secret key) to 127.0.0.1:`port` and wait
    until the other end closes that connection, which it does once it has acted on the cancel."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(messages.cancel_request(*key))
        try:
            sock.recv(1)
        except OSError:
            pass


def connect_direct(port: int, user: str, password: str, database: str, name: str = "direct", **parameters: str) -> Wire:
    """Log in to Postgres over TCP with SCRAM-SHA-256 (RFC 7677) or cleartext, as the server asks."""
    wire = Wire(socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT), name)
    authentication = UpstreamAuth(user, password, None)
    startup = messages.startup_message({"user": user, "database": database, **parameters})
    return _login(wire, startup, authentication.respond)


def connect_proxy(port: int, token: str, name: str = "proxy", **parameters: str) -> Wire:
    """Log in to the proxy with a JWT as the cleartext password."""
    wire = Wire(socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT), name)
    startup = messages.startup_message({"user": "alice", "database": "app", **parameters})
    return _login(wire, startup, lambda code, _: messages.password_message(token) if code == messages.AUTH_CLEARTEXT_PASSWORD else None)


# ---------------------------------------------------------------------------------------------
# Comparing and showing reply streams.


def normalise(replies: Sequence[Reply]) -> list[Reply]:
    """The replies with what legitimately differs between a direct session and the proxy blanked:
    BackendKeyData, the values of VARYING_PARAMETERS in ParameterStatus, an error's SOURCE_FIELDS, and its
    routine where ROUTINE_VARIES says so."""
    result: list[Reply] = []
    for type_byte, body in replies:
        if type_byte == b"K":
            body = b""
        elif type_byte in (b"E", b"N"):
            fields = [field for field in body.split(b"\0") if field and field[:1] not in SOURCE_FIELDS]
            if any(field in ROUTINE_VARIES for field in fields):
                fields = [field for field in fields if field[:1] != b"R"]
            body = b"".join(field + b"\0" for field in fields) + b"\0"
        elif type_byte == b"S":
            name, _ = messages.parse_parameter_status(body)
            if name in VARYING_PARAMETERS:
                body = messages.cstring(name) + b"*\0"
        result.append((type_byte, body))
    return result


def _row_description(body: bytes) -> list[str]:
    (count,) = struct.unpack_from("!h", body)
    names, offset = [], 2
    for _ in range(count):
        name, offset = messages.split_name(body, offset)
        names.append(name.decode())
        offset += 18
    return names


def _shorten(value: bytes | None) -> bytes | str | None:
    """A column value for the trace; long ones (a leaked proof, say) are cut, not printed whole."""
    return value if value is None or len(value) <= 40 else f"{value[:12]!r}... ({len(value)} bytes)"


def render(reply: Reply) -> str:
    """One backend message as a line of a trace: its name and the parts a person reads."""
    type_byte, body = reply
    simple = {b"1": "ParseComplete", b"2": "BindComplete", b"3": "CloseComplete", b"n": "NoData",
              b"s": "PortalSuspended", b"I": "EmptyQueryResponse", b"c": "CopyDone"}
    if type_byte in simple:
        return simple[type_byte] + ("" if not body else f" {body!r}")
    if type_byte == b"Z":
        return f"ReadyForQuery({body.decode()})"
    if type_byte == b"C":
        return f"CommandComplete({body[:-1].decode()!r})"
    if type_byte == b"D":
        return f"DataRow({[_shorten(value) for value in messages.parse_data_row(body)]!r})"
    if type_byte == b"T":
        return f"RowDescription({_row_description(body)!r})"
    if type_byte == b"t":
        (count,) = struct.unpack_from("!h", body)
        return f"ParameterDescription({list(struct.unpack_from(f'!{count}I', body, 2))!r})"
    if type_byte in (b"E", b"N"):
        fields = messages.parse_error_fields(body)
        kind = "ErrorResponse" if type_byte == b"E" else "NoticeResponse"
        routine = f" in {fields['R']}" if "R" in fields else ""
        return f"{kind}({fields.get('S', '')} {fields.get('C', '')} {fields.get('M', '')!r}{routine})"
    if type_byte == b"S":
        return f"ParameterStatus{messages.parse_parameter_status(body)!r}"
    if type_byte in (b"G", b"H"):
        return ("CopyInResponse" if type_byte == b"G" else "CopyOutResponse") + f" {body!r}"
    if type_byte == b"d":
        return f"CopyData({body!r})"
    return f"{type_byte.decode(errors='replace')} {body!r}"


@dataclass
class Transcript:
    """What was sent and what came back, write by write, for the failure message."""

    mode: str
    entries: list[tuple[Write, list[Reply], list[Reply]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, write: Write, direct: list[Reply], proxied: list[Reply]) -> None:
        self.entries.append((write, direct, proxied))

    def text(self) -> str:
        lines = [f"pool mode {self.mode}"]
        for number, (write, direct, proxied) in enumerate(self.entries, 1):
            lines.append(f"--- write {number}: " + ", ".join(write.describe()))
            lines += _side_by_side(normalise(direct), normalise(proxied))
        lines += self.notes
        return "\n".join(lines)


def _side_by_side(direct: list[Reply], proxied: list[Reply]) -> list[str]:
    lines = []
    for index in range(max(len(direct), len(proxied))):
        left = render(direct[index]) if index < len(direct) else "(nothing)"
        right = render(proxied[index]) if index < len(proxied) else "(nothing)"
        mark = "  " if left == right and direct[index] == proxied[index] else "!="
        lines.append(f"  {mark} direct: {left:<60}  proxy: {right}")
    return lines


def first_difference(direct: Sequence[Reply], proxied: Sequence[Reply]) -> str | None:
    """None when the normalised streams are equal, else the first differing message, rendered."""
    direct, proxied = normalise(direct), normalise(proxied)
    for index in range(max(len(direct), len(proxied))):
        left = direct[index] if index < len(direct) else None
        right = proxied[index] if index < len(proxied) else None
        if left != right:
            return (
                f"message {index + 1}: direct {render(left) if left else '(nothing)'}, "
                f"proxy {render(right) if right else '(nothing)'}"
            )
    return None


def assert_same(direct: Sequence[Reply], proxied: Sequence[Reply], what: str) -> None:
    """Fail, with both streams side by side, unless the normalised streams are equal."""
    difference = first_difference(direct, proxied)
    if difference:
        lines = _side_by_side(normalise(direct), normalise(proxied))
        raise AssertionError("\n".join([f"{what} differ from a direct session at {difference}"] + lines))


def run_direct(wire: Wire, scenario: Sequence[Write]) -> list[list[Reply]]:
    """Each write's replies from Postgres directly."""
    return [wire.run(write) for write in scenario]


def run_and_compare(
    wire: Wire, scenario: Sequence[Write], expected: Sequence[list[Reply]], transcript: Transcript,
    between_writes: Callable[[Wire], None] | None = None,
) -> None:
    """Send the scenario on `wire` (through the proxy) and fail at the first write whose replies differ
    from `expected` (the direct run), with the whole transcript so far in the message. `between_writes`
    runs after each terminated write that left the client idle (to let another client in)."""
    for write, direct in zip(scenario, expected):
        wire.send(write.data())
        try:
            if write.terminated:
                proxied = wire.read_ready(_ready_count(direct))
            else:
                proxied = wire.read_until(lambda replies: len(replies) >= len(direct))
        except IncompleteReply as exc:
            transcript.add(write, direct, exc.replies)
            raise AssertionError(f"{exc.reason}\n{transcript.text()}") from None
        transcript.add(write, direct, proxied)
        difference = first_difference(direct, proxied)
        if difference:
            raise AssertionError(f"replies differ at write {len(transcript.entries)}, {difference}\n{transcript.text()}")
        if between_writes is not None and write.terminated and wire.status == b"I":
            try:
                between_writes(wire)
            except AssertionError as exc:
                transcript.notes.append(f"--- after write {len(transcript.entries)}: {exc}")
                raise AssertionError(transcript.text()) from None


def _ready_count(replies: Sequence[Reply]) -> int:
    return sum(type_byte == b"Z" for type_byte, _ in replies)
