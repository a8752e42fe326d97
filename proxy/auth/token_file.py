"""Logins with the token the platform keeps fresh in a file (`[client] token_file`), for local
applications that cannot fetch or refresh a JWT themselves.

A client on the Unix socket (`listen_unix`), or from one of `[client] token_file_networks`, is not
asked for a password (as a pg_hba.conf `trust` line): the proxy reads the file's token and verifies
it as if the client had sent it, with the same verifier, refusals and SQLSTATEs. Kubernetes projected
service-account tokens and vault-agent sinks are rewritten before they expire; the file is read again
when its modification time, size or inode changed (a symlink swap included), looked at no more than
once per `check_interval` seconds except at a session's expiry.

A session that logged in this way goes on with the refreshed token: at each transaction boundary,
and at its token's expiry, `FileLogin` says which identity to go on with. The refreshed token must
name the same tenant; one naming another tenant ends the session (28000) instead of switching it.

Nothing here ever puts the token, or any part of the file, in an exception message or a log line.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import Any, Protocol

from proxy.access import network_allowed
from proxy.tokens import Identity, KeysNeeded, TokenRejected

log = logging.getLogger("pg_tenant_proxy")

MAX_TOKEN_BYTES = 64 * 1024  # a JWT far larger than any identity provider issues


class TokenFileUnreadable(TokenRejected):
    """The token file is missing, unreadable, empty, too large or not text: no token to verify.
    SQLSTATE 08006 (connection_failure): the platform has not (yet) written it; retry later."""

    sqlstate = "08006"


class TenantChanged(TokenRejected):
    """The refreshed token names another tenant than the session's: SQLSTATE 28000, the session ends
    rather than switching tenant mid-session."""

    sqlstate = "28000"


class Transport(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


def uses_token_file(transport: Transport, networks: list[str]) -> bool:
    """True when the client logs in with the token file: it came over a Unix socket (its `peername`
    is not an address tuple), or its address is inside one of `networks` (CIDR; empty: none)."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return True
    if not networks:
        return False
    try:
        return network_allowed(str(peer[0]), networks)
    except ValueError:  # not an IP address: never local
        return False


class TokenFile:
    """The token in one file, read again when the file changed.

    `version` counts the distinct contents read so far (0: none yet), so a session can tell whether
    the token it holds is still the file's."""

    def __init__(self, path: str, check_interval: float = 1.0) -> None:
        self.path = path
        self.check_interval = check_interval
        self.version = 0
        self._token: str | None = None
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")
        self._problem: str | None = None

    def read(self, now: float, fresh: bool = False) -> str:
        """The file's token (surrounding whitespace removed). `now` is the caller's clock in seconds;
        the file is looked at again when `check_interval` has passed, or at once when `fresh`. Raises
        TokenFileUnreadable (08006) when the file cannot give a token now."""
        if fresh or now >= self._checked_at + self.check_interval or now < self._checked_at:
            self._checked_at = now
            self._look()
        if self._token is None:
            raise TokenFileUnreadable(f"the proxy's token file cannot be used: {self._problem}")
        return self._token

    def _look(self) -> None:
        try:
            status = os.stat(self.path)
            signature = (status.st_mtime_ns, status.st_size, status.st_ino)
            if signature == self._signature:
                return
            if not stat.S_ISREG(status.st_mode):
                self._fail("it is not a regular file")  # a named pipe would block the event loop
                return
            descriptor = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # swapped for a pipe since the stat
            with open(descriptor, "rb") as file:
                if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                    self._fail("it is not a regular file")
                    return
                data = file.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            self._fail(f"it cannot be read ({exc.strerror or type(exc).__name__})")
            return
        self._signature = signature
        self._take(data)

    def _take(self, data: bytes) -> None:
        if len(data) > MAX_TOKEN_BYTES:
            self._fail(f"it is larger than {MAX_TOKEN_BYTES} bytes")
            return
        try:
            token = data.decode("ascii").strip()
        except UnicodeDecodeError:
            self._fail("it is not ASCII text")
            return
        if not token:
            self._fail("it is empty")
            return
        if token != self._token:
            self.version += 1
            log.info("the token file %s holds a new token (version %d)", self.path, self.version)
        self._token = token
        self._problem = None

    def _fail(self, problem: str) -> None:
        """No token now: a file that went away or went bad is never replaced by the last one read."""
        if self._problem != problem:
            log.error("the token file %s: %s", self.path, problem)
        self._problem = problem
        self._token = None
        self._signature = None


class Verifier(Protocol):
    def verify_now(self, token: str, now: float, may_fetch: bool = True) -> Identity: ...

    async def verify_async(self, token: str) -> Identity: ...


class FileLogin:
    """One session that logs in with the file's token: which of the file's tokens it holds.

    The session keeps its Identity; this object only knows which version of the file gave it."""

    def __init__(self, source: TokenFile) -> None:
        self.source = source
        self.version = 0  # the file's version the session's identity came from
        self._tried = 0  # the newest version tried at a transaction boundary

    def first_token(self, now: float) -> str:
        """The token to log in with (verify it as if the client had sent it). Raises
        TokenFileUnreadable (08006)."""
        token = self.source.read(now)
        self.version = self._tried = self.source.version
        return token

    def at_boundary(self, verifier: Verifier, held: Identity, now: float) -> Identity | None:
        """A transaction ended: the identity of the file's newer token, when there is one and it
        verifies without I/O now; else None (go on with `held`). A newer token that cannot be used yet
        (unreadable, refused, keys to fetch) is not tried again before `held` expires. Raises
        TenantChanged (28000)."""
        try:
            token = self.source.read(now)
        except TokenFileUnreadable:
            return None
        version = self.source.version
        if version in (self.version, self._tried):
            return None
        self._tried = version
        try:
            identity = verifier.verify_now(token, now, may_fetch=False)
        except (TokenRejected, KeysNeeded):
            return None
        return self._take(held, identity, version)

    async def at_expiry(self, verifier: Verifier, held: Identity, now: float) -> Identity:
        """The session's token expired: the identity of the file's newer token, to go on with. Raises
        TokenRejected("token expired") (28P01) when the file was not refreshed, TokenFileUnreadable
        (08006), the verifier's refusal of the new token, or TenantChanged (28000)."""
        token = self.source.read(now, fresh=True)
        version = self.source.version
        if version == self.version:
            raise TokenRejected("token expired")
        return self._take(held, await verifier.verify_async(token), version)

    def _take(self, held: Identity, identity: Identity, version: int) -> Identity:
        if identity.tenant != held.tenant:
            raise TenantChanged("the token file now names another tenant; a session never changes tenant: reconnect")
        self.version = self._tried = version
        return identity
