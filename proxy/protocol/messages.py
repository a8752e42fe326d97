"""Builders and parsers for the protocol 3.0 messages the proxy creates or must understand.

Names follow the "Message Formats" chapter of the Postgres documentation. Builders return complete
messages (type byte, length, body); parsers take a message body without its header.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from proxy.protocol.errors import ProtocolViolation

PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Authentication request codes (the int32 at the start of an 'R' message).
AUTH_OK = 0
AUTH_CLEARTEXT_PASSWORD = 3
AUTH_MD5_PASSWORD = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")


def message(type_byte: bytes, body: bytes = b"") -> bytes:
    """One typed message: type byte, int32 length (counting itself), body."""
    return _HEADER.pack(type_byte, len(body) + 4) + body


def cstring(text: str) -> bytes:
    """A NUL-terminated UTF-8 string; a NUL inside the text would break framing, so it is refused."""
    encoded = text.encode()
    if encoded.find(b"\0") >= 0:  # not `in`: on Python 3.11 `bytes in bytes` raises and clears a TypeError first
        raise ValueError("string contains a NUL byte")
    return encoded + b"\0"


# ---------------------------------------------------------------------------------------------
# Untyped packets sent by a frontend before the typed message flow.


def startup_message(parameters: dict[str, str]) -> bytes:
    """StartupMessage for protocol 3.0 with the given parameters."""
    body = _INT32.pack(PROTOCOL_3_0) + b"".join(cstring(k) + cstring(v) for k, v in parameters.items()) + b"\0"
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    """SSLRequest packet."""
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST_CODE)


def cancel_request(process_id: int, secret_key: int) -> bytes:
    """CancelRequest packet for a backend's process id and secret key."""
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, process_id, secret_key)


# ---------------------------------------------------------------------------------------------
# Frontend (client to server) typed messages.


def password_message(password: str) -> bytes:
    """PasswordMessage ('p') carrying a cleartext or md5-hashed password."""
    return message(b"p", cstring(password))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """SASLInitialResponse ('p') naming the mechanism and carrying the client-first message."""
    return message(b"p", cstring(mechanism) + _INT32.pack(len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    """SASLResponse ('p') carrying a SASL client message."""
    return message(b"p", data)


def parse(statement: str, query: str, parameter_types: Sequence[int] = ()) -> bytes:
    """Parse ('P'): prepare `query` as `statement` ('' is the unnamed statement)."""
    types = struct.pack(f"!h{len(parameter_types)}I", len(parameter_types), *parameter_types)
    return message(b"P", cstring(statement) + cstring(query) + types)


def _values(values: Sequence[str | None]) -> bytes:
    """An int16 count, then each value as an int32 length and its UTF-8 bytes (length -1: NULL), as
    Bind carries its parameters and DataRow its columns."""
    parts = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            parts.append(_INT32.pack(-1))
        else:
            encoded = value.encode()
            parts.append(_INT32.pack(len(encoded)) + encoded)
    return b"".join(parts)


def bind(portal: str, statement: str, parameters: Sequence[str | None], binary: bool = False) -> bytes:
    """Bind ('B') with text-format parameters (binary: binary-format, for bytea parameters, whose bytes the
    server takes as they are whatever the session's client_encoding) and text-format results."""
    formats = b"\0\x01\0\x01" if binary else b"\0\0"
    return message(b"B", cstring(portal) + cstring(statement) + formats + _values(parameters) + b"\0\0")


def close_statement(statement: bytes) -> bytes:
    """Close ('C') of a prepared statement, named as raw bytes."""
    return message(b"C", b"S" + statement + b"\0")


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    """Execute ('E') a portal."""
    return message(b"E", cstring(portal) + _INT32.pack(max_rows))


def sync() -> bytes:
    """Sync ('S')."""
    return message(b"S")


def query(sql: str) -> bytes:
    """Query ('Q'): a simple-protocol query."""
    return message(b"Q", cstring(sql))


def terminate() -> bytes:
    """Terminate ('X')."""
    return message(b"X")


# ---------------------------------------------------------------------------------------------
# Backend (server to client) typed messages.


def authentication(code: int, extra: bytes = b"") -> bytes:
    """An Authentication* ('R') message with the given request code."""
    return message(b"R", _INT32.pack(code) + extra)


def parameter_status(name: str, value: str) -> bytes:
    """ParameterStatus ('S')."""
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(process_id: int, secret_key: int) -> bytes:
    """BackendKeyData ('K')."""
    return message(b"K", struct.pack("!ii", process_id, secret_key))


def ready_for_query(status: bytes) -> bytes:
    """ReadyForQuery ('Z') with transaction status b'I', b'T' or b'E'."""
    return message(b"Z", status)


def row_description(columns: Sequence[tuple[str, int, int]]) -> bytes:
    """RowDescription ('T') for text-format columns given as (name, type OID, type size; -1 when variable)."""
    fields = [cstring(name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0) for name, oid, size in columns]
    return message(b"T", struct.pack("!h", len(fields)) + b"".join(fields))


def data_row(values: Sequence[str | None]) -> bytes:
    """DataRow ('D') with text-format values (None is NULL)."""
    return message(b"D", _values(values))


def command_complete(tag: str) -> bytes:
    """CommandComplete ('C') with a command tag such as "SHOW" or "SELECT 3"."""
    return message(b"C", cstring(tag))


def empty_query_response() -> bytes:
    """EmptyQueryResponse ('I'): the answer to a Query holding no statement."""
    return message(b"I")


def negotiate_protocol_version(newest_minor: int, unrecognized: Iterable[str]) -> bytes:
    """NegotiateProtocolVersion ('v'): the newest minor version supported and refused options."""
    names = list(unrecognized)
    return message(b"v", struct.pack("!ii", newest_minor, len(names)) + b"".join(cstring(n) for n in names))


def _response(type_byte: bytes, severity: str, sqlstate: str, text: str, detail: str | None, hint: str | None,
              routine: str | None = None) -> bytes:
    fields = [b"S" + cstring(severity), b"V" + cstring(severity), b"C" + cstring(sqlstate), b"M" + cstring(text)]
    if detail:
        fields.append(b"D" + cstring(detail))
    if hint:
        fields.append(b"H" + cstring(hint))
    if routine:
        fields.append(b"R" + cstring(routine))
    return message(type_byte, b"".join(fields) + b"\0")


def error_response(
    severity: str, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None,
    routine: str | None = None,
) -> bytes:
    """ErrorResponse ('E'); severity is ERROR or FATAL. `routine` (field R) names the Postgres function that
    raises the error the proxy imitates, for clients that act on it (asyncpg and postgres.js, on 0A000
    from RevalidateCachedQuery); errors of the proxy's own name none."""
    return _response(b"E", severity, sqlstate, text, detail, hint, routine)


def notice_response(sqlstate: str, text: str, detail: str | None = None, hint: str | None = None) -> bytes:
    """NoticeResponse ('N') with severity NOTICE."""
    return _response(b"N", "NOTICE", sqlstate, text, detail, hint)


# ---------------------------------------------------------------------------------------------
# Parsers (bodies without the 5-byte header).


def _split_cstrings(body: bytes) -> list[str]:
    if not body.endswith(b"\0"):
        raise ProtocolViolation("string is not NUL-terminated")
    try:
        return body[:-1].decode().split("\0")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("string is not valid UTF-8") from exc


def parse_cstring(body: bytes) -> str:
    """The single NUL-terminated string that makes up a body (Query, PasswordMessage)."""
    parts = _split_cstrings(body)
    if len(parts) != 1:
        raise ProtocolViolation("unexpected data after string")
    return parts[0]


def parse_error_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse body, keyed by their one-letter code."""
    fields: dict[str, str] = {}
    for item in body.split(b"\0"):
        if item:
            fields[chr(item[0])] = item[1:].decode(errors="replace")
    return fields


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    """Name and value of a ParameterStatus body."""
    parts = _split_cstrings(body)
    if len(parts) != 2:
        raise ProtocolViolation("malformed ParameterStatus")
    return parts[0], parts[1]


def parse_data_row(body: bytes) -> list[bytes | None]:
    """The column values of a DataRow body (None for NULL)."""
    try:
        (count,) = struct.unpack_from("!h", body)
        values: list[bytes | None] = []
        offset = 2
        for _ in range(count):
            (length,) = _INT32.unpack_from(body, offset)
            offset += 4
            if length < 0:
                values.append(None)
                continue
            if offset + length > len(body):
                raise ProtocolViolation("malformed DataRow")
            values.append(body[offset : offset + length])
            offset += length
    except struct.error as exc:
        raise ProtocolViolation("malformed DataRow") from exc
    return values


def split_name(body: bytes, start: int = 0) -> tuple[bytes, int]:
    """The NUL-terminated name at `start` in a message body, and the offset just after it."""
    end = body.find(b"\0", start)
    if end < 0:
        raise ProtocolViolation("name is not NUL-terminated")
    return body[start:end], end + 1


def parse_backend_key_data(body: bytes) -> tuple[int, int]:
    """Process id and secret key of a BackendKeyData body."""
    if len(body) != 8:
        raise ProtocolViolation("malformed BackendKeyData")
    pid, key = struct.unpack("!ii", body)
    return pid, key


def parse_authentication(body: bytes) -> tuple[int, bytes]:
    """Request code and remaining data of an Authentication* body."""
    if len(body) < 4:
        raise ProtocolViolation("malformed authentication request")
    return _INT32.unpack_from(body)[0], bytes(body[4:])


@dataclass(frozen=True)
class SSLRequest:
    """The frontend asks to switch to TLS."""


@dataclass(frozen=True)
class GSSENCRequest:
    """The frontend asks to switch to GSSAPI encryption."""


@dataclass(frozen=True)
class CancelRequest:
    """The frontend asks to cancel the query running on another connection."""

    process_id: int
    secret_key: int


@dataclass(frozen=True)
class StartupMessage:
    """The frontend opens a session with a protocol version and parameters."""

    major: int
    minor: int
    parameters: dict[str, str]


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_packet(body: bytes) -> StartupPacket:
    """Decode an untyped startup packet body (everything after its int32 length)."""
    if len(body) < 4:
        raise ProtocolViolation("startup packet too short")
    code = _INT32.unpack_from(body)[0]
    if code == SSL_REQUEST_CODE and len(body) == 4:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(body) == 4:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(body) != 12:
            raise ProtocolViolation("malformed CancelRequest")
        pid, key = struct.unpack_from("!ii", body, 4)
        return CancelRequest(pid, key)
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        raise ProtocolViolation(f"unsupported frontend protocol {major}.{minor}: server supports 3.0")
    items = _split_cstrings(bytes(body[4:]))
    if items[-1] != "":
        raise ProtocolViolation("startup packet is not terminated by an empty string")
    items.pop()
    if len(items) % 2:
        raise ProtocolViolation("startup packet has a parameter name without a value")
    parameters: dict[str, str] = {}
    for name, value in zip(items[::2], items[1::2]):
        if not name:
            raise ProtocolViolation("startup packet has an empty parameter name")
        if name in parameters:
            raise ProtocolViolation(f'startup packet repeats parameter "{name}"')
        parameters[name] = value
    return StartupMessage(major, minor, parameters)
