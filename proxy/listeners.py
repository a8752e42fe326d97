"""Binding the proxy's sockets before it serves, so an address that cannot be used is a one-line
ListenError (exit status 2) naming the key, never a traceback.

`bind_listeners` runs once in the process that `run` starts, before any worker is forked: the Unix
socket (`listen_unix`) and the HTTP socket (`[http] listen`) are bound there and inherited by every
worker, which all accept on them; the client port itself is only probed there, since each worker binds
its own with SO_REUSEPORT so the kernel spreads connections between them.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass

from proxy.config import ListenError, Settings

UNIX_SOCKET_MODE = 0o770  # owner and group (a sidecar shares the group); other users cannot connect


@dataclass
class Listeners:
    """Sockets bound for serving; `unix_path` is removed by `close`."""

    unix: socket.socket | None = None
    unix_path: str | None = None
    http: socket.socket | None = None
    admin: socket.socket | None = None  # [admin] listen_unix
    admin_path: str | None = None

    def close(self) -> None:
        for sock in (self.unix, self.http, self.admin):
            if sock is not None:
                sock.close()
        for path in (self.unix_path, self.admin_path):
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass


def listen_error(key: str, address: str, exc: OSError) -> ListenError:
    """The one-line error for an address that cannot be bound."""
    if exc.errno == errno.EADDRINUSE:
        why = "address already in use (another server listens there: stop it or change the key)"
    elif exc.errno == errno.EACCES:
        why = "permission denied"
    else:
        why = exc.strerror or str(exc)
    return ListenError(f"{key}: cannot listen on {address}: {why}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bound_tcp(host: str, port: int, key: str, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to host:port (SO_REUSEADDR, and SO_REUSEPORT when asked); raises ListenError."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise listen_error(key, f"{host}:{port}", exc) from None
    return sock


def bind_tcp(host: str, port: int, key: str) -> socket.socket:
    """A listening, non-blocking TCP socket; raises ListenError."""
    sock = _bound_tcp(host, port, key, False)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def probe_tcp(host: str, port: int, key: str, reuse_port: bool) -> None:
    """Raise ListenError when host:port cannot be bound now (the workers bind it themselves)."""
    _bound_tcp(host, port, key, reuse_port).close()


def _clear_stale(path: str, key: str) -> None:
    """Remove a socket file left by a proxy that died; refuse one that a live server answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ListenError(f"{key}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise ListenError(f"{key}: cannot listen on {path}: another server listens there")


def bind_unix(path: str, key: str = "listen_unix") -> socket.socket:
    """A listening Unix socket at `path` (mode 0770); raises ListenError naming `key`."""
    _clear_stale(path, key)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, UNIX_SOCKET_MODE)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        raise listen_error(key, path, exc) from None
    sock.setblocking(False)
    return sock


def bind_listeners(settings: Settings) -> Listeners:
    """Probe the client port and bind the Unix sockets (clients, admin) and the HTTP socket; raises ListenError (closing what it bound)."""
    listeners = Listeners()
    try:
        probe_tcp(settings.listen_host, settings.listen_port, "listen", settings.workers > 1)
        path = settings.unix_socket_path
        if path is not None:
            listeners.unix = bind_unix(path)
            listeners.unix_path = path
        admin_path = settings.admin_socket_path
        if admin_path is not None:
            listeners.admin = bind_unix(admin_path, "admin.listen_unix")
            listeners.admin_path = admin_path
        address = settings.http_address
        if address is not None:
            listeners.http = bind_tcp(*address, "http.listen")
    except ListenError:
        listeners.close()
        raise
    return listeners
