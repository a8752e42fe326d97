"""SCRAM-SHA-256 client (RFC 5802 / RFC 7677) for authenticating to the upstream server.

Channel binding is not used (GS2 header "n,,"). The nonce is passed in, so the exchange is
deterministic under test.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac

from proxy.protocol.errors import ProtocolViolation

MECHANISM = "SCRAM-SHA-256"


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


@functools.lru_cache(maxsize=16)
def salted_password(password: bytes, salt: bytes, iterations: int) -> bytes:
    """Hi() of RFC 5802: PBKDF2-HMAC-SHA256. Remembered, because the server sends the same salt and
    iteration count for a role every time and each computation costs milliseconds."""
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def _attributes(message: str) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ProtocolViolation("malformed SCRAM message")
        attributes[part[0]] = part[2:]
    return attributes


class ScramClient:
    """One SCRAM-SHA-256 exchange: client-first, then client-final, then verify server-final."""

    def __init__(self, password: str, nonce: str, username: str = "") -> None:
        self._password = password.encode()
        self._nonce = nonce
        username = username.replace("=", "=3D").replace(",", "=2C")
        self._client_first_bare = f"n={username},r={nonce}"
        self._server_signature = b""

    def client_first(self) -> bytes:
        """The client-first message."""
        return ("n,," + self._client_first_bare).encode()

    def client_final(self, server_first: bytes) -> bytes:
        """The client-final message (with proof) answering the server-first message."""
        text = server_first.decode()
        attributes = _attributes(text)
        try:
            nonce, salt, iterations = attributes["r"], base64.b64decode(attributes["s"]), int(attributes["i"])
        except (KeyError, ValueError) as exc:
            raise ProtocolViolation("malformed SCRAM server-first message") from exc
        if not nonce.startswith(self._nonce) or iterations < 1:
            raise ProtocolViolation("SCRAM server nonce or iteration count is invalid")
        salted = salted_password(self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._client_first_bare},{text},{without_proof}".encode()
        client_signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, client_signature))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server's signature; raises ProtocolViolation if the server is not genuine."""
        attributes = _attributes(server_final.decode())
        if "e" in attributes:
            raise ProtocolViolation(f"SCRAM error from server: {attributes['e']}")
        signature = base64.b64decode(attributes.get("v", ""))
        if not self._server_signature or not hmac.compare_digest(signature, self._server_signature):
            raise ProtocolViolation("SCRAM server signature does not match")
