"""The process lifecycle's pure parts: which signal asks for which stop, when a client session is at an
idle point where a drain may end it, and what a configuration reload may change without a restart.

- SIGTERM drains (Stop.DRAIN): listeners close, /readyz answers 503, each client ends at its next idle
  point with 57P01, and after `shutdown_timeout` seconds the rest are closed. SIGINT stops at once
  (Stop.IMMEDIATE), also in the middle of a drain.
- SIGHUP reloads: the configuration is read and checked as `run` checks it. Settings that shape the
  listeners, the processes or the pool's kind (`RESTART_ONLY`) keep their running values; the reload
  names them in its audit event.

`proxy.server` (the glue) applies all this; nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy.config import ConfigError, Settings, UpstreamSettings
from proxy.relay.session import State

if TYPE_CHECKING:
    from proxy.relay.relay import Relay

SHUTDOWN_MESSAGE = "terminating connection because the proxy is shutting down"

# Keys whose new value takes effect only at the next start, each with how to read it from Settings.
RESTART_ONLY: tuple[tuple[str, Callable[[Settings], Any]], ...] = (
    ("listen", lambda s: (s.listen_host, s.listen_port)),
    ("listen_unix", lambda s: s.listen_unix),
    ("workers", lambda s: s.workers),
    ("http.listen", lambda s: s.http.listen),
    ("pool.mode", lambda s: s.pool.mode),
    ("tenant.setting", lambda s: s.tenant.setting),
    ("tenant.proof_setting", lambda s: s.tenant.proof_setting),
    ("tenant.claims_setting", lambda s: s.tenant.claims_setting),
    ("tenant.claims_proof_setting", lambda s: s.tenant.claims_proof_setting),
    ("roles", lambda s: s.roles),  # each login role's pool is built at start
    ("admin.listen_unix", lambda s: s.admin.listen_unix),
)

# What makes a server connection: a change retires the open ones (docs/operations.md, reload).
CONNECTION_FIELDS = ("host", "port", "user", "password", "sslmode", "ca_file", "sslcert", "sslkey",
                     "channel_binding", "require_auth")


class Stop(enum.Enum):
    """How the process was asked to stop."""

    DRAIN = "drain"  # SIGTERM: finish at idle points, for at most shutdown_timeout
    IMMEDIATE = "immediate"  # SIGINT: close every client now


class Shutdown:
    """The stop requested by signals. A SIGINT during a drain turns it into an immediate stop; a
    second SIGTERM changes nothing."""

    def __init__(self) -> None:
        self.stop: Stop | None = None
        self.requested = asyncio.Event()
        self.immediate = asyncio.Event()

    def request(self, stop: Stop) -> None:
        if self.stop is not Stop.IMMEDIATE:
            self.stop = stop
        self.requested.set()
        if stop is Stop.IMMEDIATE:
            self.immediate.set()


def restart_needed(running: Settings, loaded: Settings) -> list[str]:
    """The keys (dotted names) whose value in `loaded` differs from the running one but takes effect
    only after a restart."""
    return [name for name, read in RESTART_ONLY if read(running) != read(loaded)]


def keep_restart_only(running: Settings, loaded: Settings) -> Settings:
    """`loaded`, with the running values of the `RESTART_ONLY` keys: what a reload puts in force."""
    return dataclasses.replace(
        loaded,
        listen_host=running.listen_host,
        listen_port=running.listen_port,
        listen_unix=running.listen_unix,
        workers=running.workers,
        http=dataclasses.replace(loaded.http, listen=running.http.listen),
        pool=dataclasses.replace(loaded.pool, mode=running.pool.mode),
        tenant=dataclasses.replace(
            loaded.tenant,
            setting=running.tenant.setting,
            proof_setting=running.tenant.proof_setting,
            claims_setting=running.tenant.claims_setting,
            claims_proof_setting=running.tenant.claims_proof_setting,
        ),
        roles=running.roles,
        admin=dataclasses.replace(loaded.admin, listen_unix=running.admin.listen_unix),
    )


def latest(running: Settings, load_settings: Callable[[], Settings]) -> Settings:
    """For a worker started again: the configuration as it reads now (a reload may have changed it),
    with the running values of the `RESTART_ONLY` keys; the running one when it no longer loads."""
    try:
        return keep_restart_only(running, load_settings())
    except ConfigError:
        return running


def connection_changed(running: UpstreamSettings, loaded: UpstreamSettings) -> bool:
    """Whether server connections opened with `running` differ from ones `loaded` would open (address,
    role, password, TLS); a new database allowlist or timeout does not count."""
    return any(getattr(running, name) != getattr(loaded, name) for name in CONNECTION_FIELDS)


def at_idle_point(state: State, greeted: bool, relay: Relay | None) -> bool:
    """Whether a drain may end this client session now without cutting a transaction or a reply: not
    logged in yet, holding no server connection (IDLE), or waiting for one with its first message held
    (WAITING: that message has not run); or, holding one, when the server owes the client nothing, the
    last ReadyForQuery said 'I' (no transaction block) and the client is not inside a group or a message
    of its own. A CLOSED session is not ended again."""
    if state is State.CLOSED:
        return False
    if not greeted or state in (State.IDLE, State.WAITING):
        return True
    if relay is None or relay.queue is None or relay.preparing or relay.held or relay.mid_group:
        return False
    queue = relay.queue
    return queue.status == b"I" and not queue.groups_owed() and not queue.skipping() and relay.scanner.at_boundary()
