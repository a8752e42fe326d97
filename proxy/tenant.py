"""Tenant context: an Identity and a backend pid become the proof and the messages that set them.

The proof is `<expiry>:<hex HMAC-SHA256(key, "<pid>:<expiry>:<tenant>")>`. The verifier SQL
(`proxy/verifier.py`) recomputes the same HMAC inside the database for `pg_backend_pid()`, so a
proof is worthless on any other backend, after its expiry, or for any other tenant.
"""

from __future__ import annotations

import hashlib
import hmac

from proxy.protocol import messages

# The hash block size of SHA-256; keys longer than this are hashed first (RFC 2104).
BLOCK_SIZE = 64


def sign(key: bytes, tenant: str, backend_pid: int, expires_at: int) -> str:
    """The proof that `tenant` may act on backend `backend_pid` until `expires_at`."""
    signed = f"{backend_pid}:{expires_at}:{tenant}".encode()
    return f"{expires_at}:{hmac.new(key, signed, hashlib.sha256).hexdigest()}"


def hmac_pads(key: bytes) -> tuple[bytes, bytes]:
    """The inner and outer padded keys of HMAC-SHA256, so SQL can compute it with sha256() alone."""
    if len(key) > BLOCK_SIZE:
        key = hashlib.sha256(key).digest()
    key = key.ljust(BLOCK_SIZE, b"\0")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def quote_literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings on)."""
    return "'" + text.replace("'", "''") + "'"


class ContextBuilder:
    """Builds the protocol messages that put a tenant's signed context on a backend."""

    def __init__(self, setting: str, proof_setting: str, signing_key: str) -> None:
        self.setting = setting
        self.proof_setting = proof_setting
        self._key = signing_key.encode()
        self.statement = (
            f"SELECT pg_catalog.set_config({quote_literal(setting)}, $1, false),"
            f" pg_catalog.set_config({quote_literal(proof_setting)}, $2, false)"
        )

    def proof(self, tenant: str, backend_pid: int, expires_at: int) -> str:
        return sign(self._key, tenant, backend_pid, expires_at)

    def context_messages(self, tenant: str, backend_pid: int, expires_at: int) -> bytes:
        """Parse, Bind and Execute (of the unnamed statement) that set the context for the session.

        The values travel as Bind parameters, so they never appear in pg_stat_activity.query.
        """
        return b"".join(
            (
                messages.parse("", self.statement),
                messages.bind("", "", [tenant, self.proof(tenant, backend_pid, expires_at)]),
                messages.execute(),
            )
        )

    def session_messages(self, tenant: str, backend_pid: int, expires_at: int) -> bytes:
        """The context messages and a Sync: one group of replies of the proxy's own."""
        return self.context_messages(tenant, backend_pid, expires_at) + messages.sync()
