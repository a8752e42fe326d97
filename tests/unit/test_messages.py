"""Message builders and parsers."""

import struct

import pytest

from proxy.protocol import messages
from proxy.protocol.errors import ProtocolViolation


def test_error_response_fields() -> None:
    data = messages.error_response("FATAL", "28P01", "token expired", hint="reconnect")
    assert data[:1] == b"E"
    assert struct.unpack("!i", data[1:5])[0] == len(data) - 1
    fields = messages.parse_error_fields(data[5:])
    assert fields == {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "token expired", "H": "reconnect"}


def test_error_response_names_the_routine_of_the_error_it_imitates() -> None:
    data = messages.error_response("ERROR", "0A000", "cached plan must not change result type",
                                   routine="RevalidateCachedQuery")
    assert messages.parse_error_fields(data[5:])["R"] == "RevalidateCachedQuery"
    assert data.endswith(b"RRevalidateCachedQuery\0\0")
    assert "R" not in messages.parse_error_fields(messages.error_response("ERROR", "42501", "refused")[5:])


def test_cstring_refuses_nul() -> None:
    with pytest.raises(ValueError):
        messages.cstring("a\0b")


def test_bind_encodes_text_parameters_and_null() -> None:
    data = messages.bind("", "stmt", ["abc", None])
    body = data[5:]
    assert body.startswith(b"\0stmt\0\0\0\0\x02")
    assert b"\0\0\0\x03abc" in body
    assert b"\xff\xff\xff\xff" in body
    assert body.endswith(b"\0\0")


def test_parse_message_with_parameter_types() -> None:
    data = messages.parse("s", "SELECT $1", [25])
    assert data[5:] == b"s\0SELECT $1\0\0\x01\0\0\0\x19"


def test_backend_key_data_round_trip() -> None:
    data = messages.backend_key_data(42, -7)
    assert messages.parse_backend_key_data(data[5:]) == (42, -7)
    with pytest.raises(ProtocolViolation):
        messages.parse_backend_key_data(b"\0" * 7)


def test_parameter_status_round_trip() -> None:
    data = messages.parameter_status("TimeZone", "UTC")
    assert messages.parse_parameter_status(data[5:]) == ("TimeZone", "UTC")


def test_parse_cstring_rejects_trailing_data() -> None:
    with pytest.raises(ProtocolViolation):
        messages.parse_cstring(b"a\0b\0")
    with pytest.raises(ProtocolViolation):
        messages.parse_cstring(b"abc")


def test_authentication_parse() -> None:
    data = messages.authentication(messages.AUTH_MD5_PASSWORD, b"salt")
    assert messages.parse_authentication(data[5:]) == (5, b"salt")


def test_negotiate_protocol_version() -> None:
    data = messages.negotiate_protocol_version(0, ["_pq_.foo"])
    assert data == b"v" + struct.pack("!iii", 4 + 8 + 9, 0, 1) + b"_pq_.foo\0"
