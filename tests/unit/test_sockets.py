"""The TCP options set on client and server sockets (proxy/sockets.py), read back from real, unconnected
sockets: no data is sent."""

from __future__ import annotations

import socket

import pytest

from proxy.config import TcpSettings
from proxy.sockets import tune


def options(sock: socket.socket) -> tuple[int, ...]:
    return (
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_keepalive_timings_are_set_as_configured(family: int) -> None:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        tune(sock, TcpSettings(keepidle=17, keepintvl=5, keepcnt=3, user_timeout=12_000))
        assert options(sock) == (1, 1, 17, 5, 3, 12_000)


def test_zero_keeps_the_operating_systems_defaults() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as untouched, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        tune(sock, TcpSettings())
        assert options(sock)[:2] == (1, 1)
        assert options(sock)[2:] == options(untouched)[2:]


def test_keepalive_off_sets_no_timings() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as untouched, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        tune(sock, TcpSettings(keepalive=False, keepidle=17, keepintvl=5, keepcnt=3))
        assert options(sock)[:2] == (1, 0)
        assert options(sock)[2:5] == options(untouched)[2:5]


def test_unix_sockets_and_none_are_left_alone() -> None:
    tune(None, TcpSettings(keepidle=17))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        tune(sock, TcpSettings(keepidle=17))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
