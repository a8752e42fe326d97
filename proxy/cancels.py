"""Cancel keys that outlive their session: a client that ends its session while its statement still runs
upstream, and sends a CancelRequest for it, gets it cancelled.

Postgres delivers a CancelRequest to the backend its key names whatever became of the client's
connection, so a driver may send the cancel and close the connection in either order: lib/pq, on a
cancelled context, sends Terminate and closes while its cancel is on the way. The proxy closes the
server connection of a session that ended mid-statement, but Postgres notices a closed connection only
when it next writes: a statement that sleeps or waits on a lock, with its replies still in Postgres's
send buffer, runs on for as long as it takes, holding its locks and its snapshot (CREATE INDEX
CONCURRENTLY and VACUUM wait for it). So the proxy remembers, for `GRACE_SECONDS`, which server backend
such a session's key stood for, and a CancelRequest with that key goes to it.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass

GRACE_SECONDS = 30.0  # how long after its session ended a key still cancels (seconds)
MAX_KEYS = 10_000  # keys remembered at most; the oldest goes first


@dataclass(frozen=True)
class Abandoned:
    """A server backend's key (BackendKeyData, 55.7 Message Formats) and until when (loop time, seconds) the
    client's key stands for it."""

    process_id: int
    secret_key: int
    until: float


class AbandonedStatements:
    """Client keys (the BackendKeyData the proxy minted) of sessions that ended mid-statement, each with the
    server backend that ran the statement."""

    def __init__(self) -> None:
        self._by_client: OrderedDict[int, tuple[int, Abandoned]] = OrderedDict()

    def remember(self, client_process_id: int, client_secret_key: int, process_id: int, secret_key: int,
                 now: float) -> None:
        """The session with this client key ended while backend (`process_id`, `secret_key`) ran its statement."""
        self._drop_expired(now)
        self._by_client[client_process_id] = (client_secret_key, Abandoned(process_id, secret_key, now + GRACE_SECONDS))
        self._by_client.move_to_end(client_process_id)
        while len(self._by_client) > MAX_KEYS:
            self._by_client.popitem(last=False)

    def find(self, client_process_id: int, client_secret_key: int, now: float) -> Abandoned | None:
        """The backend a CancelRequest with this client key should reach, or None when the key names no such
        session, its secret does not match, or its grace period is over."""
        self._drop_expired(now)
        found = self._by_client.get(client_process_id)
        if found is None or not hmac.compare_digest(found[0].to_bytes(4, "big", signed=True),
                                                     client_secret_key.to_bytes(4, "big", signed=True)):
            return None
        return found[1]

    def _drop_expired(self, now: float) -> None:
        while self._by_client:
            _, (_, oldest) = next(iter(self._by_client.items()))
            if oldest.until > now:
                return
            self._by_client.popitem(last=False)
