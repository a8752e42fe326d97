"""The denylist: `jti` and `sub` values, one a line, whose tokens are refused ("token revoked").

The file is looked at no more than once per `check_interval` seconds of the caller's clock, and read
again only when its modification time, size or inode changed. Blank lines and lines starting with
`#` are ignored. If the file cannot be read, the entries read last stay in force (a read failure
never lifts a revocation) and the failure is logged.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("pg_tenant_proxy")


class Denylist:
    """Revoked token ids and subjects from one file."""

    def __init__(self, path: str, check_interval: float = 1.0) -> None:
        self.path = path
        self.check_interval = check_interval
        self._entries: frozenset[str] = frozenset()
        self._signature: tuple[int, int, int] | None = None
        self._checked_at = float("-inf")

    def names(self, token_id: str | None, subject: str | None, now: float) -> bool:
        """True when `token_id` or `subject` is listed (after re-reading the file if it changed)."""
        if now >= self._checked_at + self.check_interval or now < self._checked_at:
            self._checked_at = now
            self._reload()
        entries = self._entries
        return (token_id is not None and token_id in entries) or (subject is not None and subject in entries)

    def _reload(self) -> None:
        try:
            status = os.stat(self.path)
            signature = (status.st_mtime_ns, status.st_size, status.st_ino)
            if signature == self._signature:
                return
            with open(self.path, encoding="utf-8") as file:
                text = file.read()
        except (OSError, UnicodeDecodeError) as exc:
            log.error("the denylist %s cannot be read (%s); keeping the %d entries read before",
                      self.path, exc, len(self._entries))
            return
        lines = (line.strip() for line in text.splitlines())
        self._entries = frozenset(line for line in lines if line and not line.startswith("#"))
        self._signature = signature
        log.info("the denylist %s holds %d entries", self.path, len(self._entries))
