"""Upstream authentication without sockets: the proxy's side against scramp's SCRAM server, and servers
that skip steps, ask for forbidden methods or refuse channel binding."""

from __future__ import annotations

import datetime
import hashlib
import struct
from typing import Any

import pytest
import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from proxy.protocol import messages
from proxy.protocol.upstream_auth import AuthState, UpstreamAuth, UpstreamAuthError, tls_server_end_point

PASSWORD = "pässwörd\u00ad-Ⅸ"  # SASLprep maps the soft hyphen to nothing and NFKC-normalises Ⅸ to IX
BINDING = hashlib.sha256(b"the server's certificate").digest()


def body_of(message: bytes) -> bytes:
    return message[5:]


def sasl_initial(message: bytes) -> tuple[str, str]:
    body = body_of(message)
    mechanism, rest = body.split(b"\0", 1)
    (length,) = struct.unpack("!i", rest[:4])
    return mechanism.decode(), rest[4 : 4 + length].decode()


class ScramServer:
    """A SCRAM server (scramp's) holding the verifier of a password, as Postgres would."""

    def __init__(self, password: str, mechanism: str = "SCRAM-SHA-256", binding: bytes | None = None) -> None:
        salt, stored, server_key, iterations = scramp.ScramMechanism(mechanism).make_auth_info(password)
        auth = (salt, stored, server_key, iterations)
        cb = ("tls-server-end-point", binding) if binding is not None else None
        self.server = scramp.ScramMechanism(mechanism).make_server(lambda username: auth, channel_binding=cb)

    def run(self, client: UpstreamAuth, offered: bytes = b"SCRAM-SHA-256\0\0") -> str:
        """Drive a whole exchange; return the mechanism the client chose."""
        mechanism, first = sasl_initial(client.respond(messages.AUTH_SASL, offered) or b"")
        self.server.set_client_first(first)
        final = client.respond(messages.AUTH_SASL_CONTINUE, self.server.get_server_first().encode())
        self.server.set_client_final(body_of(final or b"").decode())
        assert client.respond(messages.AUTH_SASL_FINAL, self.server.get_server_final().encode()) is None
        client.finish()
        return mechanism


def test_scram_with_a_non_ascii_password_is_saslprepped() -> None:
    client = UpstreamAuth("app", PASSWORD, None)
    assert ScramServer("pässwörd-IX").run(client) == "SCRAM-SHA-256"
    assert client.state is AuthState.DONE


def test_scram_plus_binds_the_channel_when_tls_is_on() -> None:
    client = UpstreamAuth("app", PASSWORD, BINDING)
    server = ScramServer(PASSWORD, "SCRAM-SHA-256-PLUS", BINDING)
    assert server.run(client, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0") == "SCRAM-SHA-256-PLUS"


def test_a_server_on_another_channel_fails_the_binding() -> None:
    """A man in the middle terminating TLS presents another certificate: the proof does not verify."""
    client = UpstreamAuth("app", PASSWORD, hashlib.sha256(b"the attacker's certificate").digest())
    server = ScramServer(PASSWORD, "SCRAM-SHA-256-PLUS", BINDING)
    with pytest.raises(scramp.ScramException):
        server.run(client, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")


def test_prefer_without_plus_tells_the_server_the_client_could_bind() -> None:
    client = UpstreamAuth("app", PASSWORD, BINDING)
    _, first = sasl_initial(client.respond(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0") or b"")
    assert first.startswith("y,,")  # RFC 5802 section 6: detects a downgrade by a server that supports it


def test_disable_never_binds() -> None:
    client = UpstreamAuth("app", PASSWORD, BINDING, channel_binding="disable")
    mechanism, first = sasl_initial(client.respond(messages.AUTH_SASL, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0") or b"")
    assert (mechanism, first[:3]) == ("SCRAM-SHA-256", "n,,")


@pytest.mark.parametrize(
    "binding, offered, match",
    [
        (None, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0", "channel_binding is 'require'"),
        (BINDING, b"SCRAM-SHA-256\0\0", "channel_binding is 'require'"),
    ],
)
def test_require_refuses_scram_without_binding(binding: bytes | None, offered: bytes, match: str) -> None:
    client = UpstreamAuth("app", PASSWORD, binding, channel_binding="require")
    with pytest.raises(UpstreamAuthError, match=match) as info:
        client.respond(messages.AUTH_SASL, offered)
    assert info.value.sqlstate == "28000"


def test_a_server_that_skips_the_final_message_is_refused() -> None:
    client = UpstreamAuth("app", PASSWORD, None)
    server = ScramServer(PASSWORD)
    server.server.set_client_first(sasl_initial(client.respond(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0") or b"")[1])
    client.respond(messages.AUTH_SASL_CONTINUE, server.server.get_server_first().encode())
    with pytest.raises(UpstreamAuthError, match="before completing SCRAM") as info:
        client.respond(messages.AUTH_OK, b"")
    assert info.value.sqlstate == "28000"


def test_a_wrong_server_signature_is_refused() -> None:
    client = UpstreamAuth("app", PASSWORD, None)
    server = ScramServer("another password")
    server.server.set_client_first(sasl_initial(client.respond(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0") or b"")[1])
    client.respond(messages.AUTH_SASL_CONTINUE, server.server.get_server_first().encode())
    with pytest.raises(UpstreamAuthError, match="did not prove it knows the password"):
        client.respond(messages.AUTH_SASL_FINAL, b"v=" + b"A" * 44)


@pytest.mark.parametrize(
    "require_auth, code, allowed",
    [
        ("scram-sha-256", messages.AUTH_CLEARTEXT_PASSWORD, False),
        ("scram-sha-256", messages.AUTH_MD5_PASSWORD, False),
        ("password,md5", messages.AUTH_MD5_PASSWORD, True),
        ("!password", messages.AUTH_CLEARTEXT_PASSWORD, False),
        ("!password", messages.AUTH_MD5_PASSWORD, True),
        (None, messages.AUTH_CLEARTEXT_PASSWORD, True),
    ],
)
def test_require_auth_decides_before_the_password_is_sent(require_auth: str | None, code: int, allowed: bool) -> None:
    client = UpstreamAuth("app", "secret", None, require_auth)
    if not allowed:
        with pytest.raises(UpstreamAuthError, match="require_auth") as info:
            client.respond(code, b"salt")
        assert info.value.sqlstate == "28000"
        return
    reply = client.respond(code, b"salt")
    expected = "secret" if code == messages.AUTH_CLEARTEXT_PASSWORD else (
        "md5" + hashlib.md5(hashlib.md5(b"secretapp").hexdigest().encode() + b"salt").hexdigest())
    assert reply == messages.password_message(expected)
    client.respond(messages.AUTH_OK, b"")


@pytest.mark.parametrize(
    "require_auth, channel_binding, allowed",
    [(None, "prefer", True), ("none", "prefer", True), ("scram-sha-256", "prefer", False),
     ("!none", "prefer", False), (None, "require", False)],
)
def test_a_server_that_asks_for_nothing(require_auth: str | None, channel_binding: str, allowed: bool) -> None:
    client = UpstreamAuth("app", "secret", BINDING, require_auth, channel_binding)
    if allowed:
        client.respond(messages.AUTH_OK, b"")
        assert client.state is AuthState.DONE
    else:
        with pytest.raises(UpstreamAuthError):
            client.respond(messages.AUTH_OK, b"")


@pytest.mark.parametrize(
    "steps, sqlstate",
    [
        ([(messages.AUTH_SASL_CONTINUE, b"r=x,s=c2FsdA==,i=4096")], "08P01"),
        ([(messages.AUTH_SASL_FINAL, b"v=AAAA")], "08P01"),
        ([(messages.AUTH_MD5_PASSWORD, b"salt"), (messages.AUTH_CLEARTEXT_PASSWORD, b"")], "08P01"),
        ([(messages.AUTH_SASL, b"SCRAM-SHA-1\0\0")], "0A000"),
        ([(7, b"")], "0A000"),
        ([(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0"), (messages.AUTH_SASL_CONTINUE, b"garbage")], "08P01"),
        ([(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0"), (messages.AUTH_SASL_CONTINUE, b"r=notmine,s=c2FsdA==,i=4096")],
         "08P01"),
        ([(messages.AUTH_OK, b""), (messages.AUTH_OK, b"")], "08P01"),
    ],
)
def test_requests_out_of_order_or_unsupported(steps: list[tuple[int, bytes]], sqlstate: str) -> None:
    client = UpstreamAuth("app", "secret", None)
    with pytest.raises(UpstreamAuthError) as info:
        for code, data in steps:
            client.respond(code, data)
    assert info.value.sqlstate == sqlstate


def test_no_password_configured() -> None:
    with pytest.raises(UpstreamAuthError, match="none is configured") as info:
        UpstreamAuth("app", None, None).respond(messages.AUTH_SASL, b"SCRAM-SHA-256\0\0")
    assert info.value.sqlstate == "28P01"


def certificate(key: Any, algorithm: hashes.HashAlgorithm | None) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, algorithm))
    return cert.public_bytes(serialization.Encoding.DER)


def test_tls_server_end_point_hashes_with_the_signature_hash() -> None:
    """RFC 5929 section 4.1: the certificate's signature hash (not always SHA-256)."""
    der = certificate(ec.generate_private_key(ec.SECP256R1()), hashes.SHA384())
    assert tls_server_end_point(der) == hashlib.sha384(der).digest()
    assert tls_server_end_point(certificate(ed25519.Ed25519PrivateKey.generate(), None)) is None
