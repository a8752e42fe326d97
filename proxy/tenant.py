"""Tenant context: an Identity and a backend pid become the proof and the messages that set them.

The proof is `<expiry>:<hex HMAC-SHA256(key, "<pid>:<expiry>:<tenant>")>`. The verifier SQL
(`proxy/verifier.py`) recomputes the same HMAC inside the database for `pg_backend_pid()`, so a
proof is worthless on any other backend, after its expiry, or for any other tenant.
"""

from __future__ import annotations

import hashlib
import hmac

from proxy.auth.claims import sign_claims
from proxy.protocol import messages
from proxy.relay.replies import Request

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
    """Builds the protocol messages that put a tenant's signed context on a backend.

    The values travel as Bind parameters of the proxy's own named statement and portal (never the
    unnamed ones, which belong to the client), so they never appear in pg_stat_activity.query.
    """

    statement_name = b"pg_tenant_proxy_context"
    _session_name = "pg_tenant_proxy_session_context"
    _portal = "pg_tenant_proxy_context"

    def __init__(self, setting: str, proof_setting: str, signing_key: str,
                 claims_setting: str = "request.jwt.claims", claims_proof_setting: str = "tenant_proxy.claims_proof") -> None:
        self.setting = setting
        self.proof_setting = proof_setting
        self.claims_setting = claims_setting
        self.claims_proof_setting = claims_proof_setting
        self._key = signing_key.encode()
        self.statement = self._sql(is_local=True)
        self._session_statement = self._sql(is_local=False)
        self._values: dict[tuple[str, int, int, str], list[str | None]] = {}
        self._transaction_messages: dict[tuple[str, int, int, str], bytes] = {}
        self._close_portal = messages.message(b"C", b"P" + self._portal.encode() + b"\0")

    def rotate(self, signing_key: str) -> None:
        """Sign with `signing_key` from now on (a reload): every context built after this call carries a
        proof under the new key; the remembered values and messages of the old key are dropped."""
        self._key = signing_key.encode()
        self._values.clear()
        self._transaction_messages.clear()

    def _sql(self, is_local: bool) -> str:
        """The values travel as binary bytea (UTF-8) and are converted on the server: a text parameter would be
        read in the session's client_encoding, which the client may have changed (SET client_encoding =
        'LATIN1'), and a tenant or claims text that is not ASCII would then no longer match its proof."""
        local = "true" if is_local else "false"
        settings = (self.setting, self.proof_setting, self.claims_setting, self.claims_proof_setting)
        return "SELECT " + ", ".join(
            f"pg_catalog.set_config({quote_literal(name)}, pg_catalog.convert_from(${index}::pg_catalog.bytea, 'UTF8'), {local})"
            for index, name in enumerate(settings, 1)
        )

    def proof(self, tenant: str, backend_pid: int, expires_at: int) -> str:
        return sign(self._key, tenant, backend_pid, expires_at)

    def values(self, tenant: str, backend_pid: int, expires_at: int, claims_json: str) -> list[str | None]:
        """The four Bind parameters: tenant, its proof, the claims (PostgREST's request.jwt.claims) and
        their proof. Remembered per (tenant, backend, expiry, claims): a pooled connection serves the
        same tenant many times."""
        key = (tenant, backend_pid, expires_at, claims_json)
        values = self._values.get(key)
        if values is None:
            if len(self._values) >= 65536:
                self._values.clear()
            values = self._values[key] = [
                tenant,
                sign(self._key, tenant, backend_pid, expires_at),
                claims_json,
                sign_claims(self._key, tenant, backend_pid, expires_at, claims_json),
            ]
        return values

    def transaction_messages(self, tenant: str, backend_pid: int, expires_at: int, claims_json: str = "{}") -> bytes:
        """Bind, Execute and Close (of the portal, so the client never sees it in pg_cursors) of the
        prepared context statement (`statement_name`, `statement`), as one piece of bytes: sets the
        context for the current transaction only. Sent with no Sync after it, directly before the
        client's first statement of a transaction. Remembered per (tenant, backend, expiry, claims)."""
        key = (tenant, backend_pid, expires_at, claims_json)
        data = self._transaction_messages.get(key)
        if data is None:
            if len(self._transaction_messages) >= 65536:
                self._transaction_messages.clear()
            data = self._transaction_messages[key] = b"".join((
                messages.bind(self._portal, self.statement_name.decode(), self.values(tenant, backend_pid, expires_at, claims_json),
                              binary=True),
                messages.execute(self._portal),
                self._close_portal,
            ))
        return data

    def session_statement_close(self) -> bytes:
        """Close of the statement `session_messages` prepares: sent ahead of them again after a group of
        them failed past its Parse (the statement is then still there)."""
        return messages.message(b"C", b"S" + self._session_name.encode() + b"\0")

    def session_messages(self, tenant: str, backend_pid: int, expires_at: int, claims_json: str = "{}") -> list[tuple[bytes, Request]]:
        """A Sync group of the proxy's own that sets the context for the whole session: Parse, Bind,
        Execute of its own statement, then Close of the portal and the statement (a client never finds
        them in pg_cursors or pg_prepared_statements) and Sync; each with the reply the server owes."""
        name = self._session_name
        return [
            (messages.parse(name, self._session_statement), Request.PARSE),
            (messages.bind(self._portal, name, self.values(tenant, backend_pid, expires_at, claims_json), binary=True),
             Request.BIND),
            (messages.execute(self._portal), Request.EXECUTE),
            (self._close_portal, Request.CLOSE),
            (self.session_statement_close(), Request.CLOSE),
            (messages.sync(), Request.SYNC),
        ]
