"""The TCP options the proxy sets on each client and server socket: no Nagle delay (each message goes out
when written), and keepalive as `tcp_keepalive`, `tcp_keepidle`, `tcp_keepintvl`, `tcp_keepcnt` and
`tcp_user_timeout` configure it (PgBouncer's settings of the same names)."""

from __future__ import annotations

import socket
from typing import Any

from proxy.config import TcpSettings

_KEEPALIVE_OPTIONS = (("TCP_KEEPIDLE", "keepidle"), ("TCP_KEEPINTVL", "keepintvl"), ("TCP_KEEPCNT", "keepcnt"))


def tune(sock: Any, tcp: TcpSettings) -> None:
    """Set TCP_NODELAY, SO_KEEPALIVE and the keepalive timings of `tcp` on `sock` (a transport's socket,
    or None). Unix sockets are left as they are; a timing of 0 keeps the operating system's default, and an
    option the platform lacks is skipped. Source: tcp(7), socket(7)."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(tcp.keepalive))
    if tcp.keepalive:
        for option, name in _KEEPALIVE_OPTIONS:
            value = getattr(tcp, name)
            if value and hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if tcp.user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, tcp.user_timeout)
