"""Client transport policy: which clients may log in at all, judged from the connection alone (before
the token is read): `[tls] client_sslmode`, the client certificate, and `[client] allowed_networks`.

Clients on the Unix socket (`listen_unix`) are local: file permissions guard them, libpq never asks for
TLS over a Unix socket, and they have no address, so neither the TLS rule nor the network list applies
to them (as Postgres's `local` lines in pg_hba.conf).
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, NamedTuple, Protocol

from proxy.config import Settings
from proxy.protocol import errors

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Refusal(NamedTuple):
    """An ErrorResponse to end the login with: SQLSTATE, message, detail, hint."""

    sqlstate: str
    message: str
    detail: str | None
    hint: str | None


class Transport(Protocol):
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


@functools.lru_cache(maxsize=8)
def _networks(allowed: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(network, strict=False) for network in allowed)


def network_allowed(address: str, allowed: list[str]) -> bool:
    """True when `address` (an IP address as text) is inside one of the `allowed` CIDR networks, or the
    list is empty. An IPv4-mapped IPv6 address counts as its IPv4 address."""
    if not allowed:
        return True
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == network.version and ip in network for network in _networks(tuple(allowed)))


def check_transport(transport: Transport, settings: Settings) -> Refusal | None:
    """Whether a client may go on to log in, from its transport's `peername` (a tuple for TCP, else a
    Unix socket) and `ssl_object` (set once TLS is established). Call it on the StartupMessage, after
    any TLS handshake, before asking for the password. Refusals carry SQLSTATE 28000
    (invalid_authorization_specification), as Postgres does for a pg_hba.conf rejection."""
    peer = transport.get_extra_info("peername")
    if not isinstance(peer, tuple):
        return None
    tls = transport.get_extra_info("ssl_object")
    mode = settings.tls.client_sslmode
    if tls is None and mode in ("require", "verify-ca"):
        return Refusal(
            errors.INVALID_AUTHORIZATION, "this proxy accepts only TLS connections",
            "[tls] client_sslmode is \"" + mode + "\" and this connection is not encrypted",
            "connect with sslmode=require (or verify-full) so the token never travels in cleartext",
        )
    if tls is not None and mode == "verify-ca" and not tls.getpeercert():
        return Refusal(
            errors.INVALID_AUTHORIZATION, "this proxy requires a client certificate",
            "[tls] client_sslmode is \"verify-ca\" and the client sent no certificate",
            "give the client a certificate signed by the proxy's client CA (libpq: sslcert and sslkey)",
        )
    if not network_allowed(str(peer[0]), settings.client.allowed_networks):
        return Refusal(
            errors.INVALID_AUTHORIZATION, f"connections from {peer[0]} are not allowed",
            "the address is outside [client] allowed_networks", None,
        )
    return None
