"""With `workers = N` each worker listens on a private Unix socket so a CancelRequest that landed on
another worker can be passed on. That socket is for CancelRequests only: a login there would be a Unix
socket login, which skips `[client] allowed_networks` and `[tls] client_sslmode`, and with
`[client] token_file` needs no token at all. Nor does the token file, which is the application's
identity, ever open the admin console."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from support import ACME, RawClient, startup, wait_until
from proxy.protocol import errors, messages
from proxy.protocol.framing import MessageReader


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def worker_sockets(pid: int) -> list[str]:
    """The paths of the Unix sockets the proxy's worker processes listen on, besides listen_unix."""
    inodes = set()
    for child in _children(pid):
        for fd in os.listdir(f"/proc/{child}/fd"):
            try:
                target = os.readlink(f"/proc/{child}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    paths = []
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and os.path.basename(fields[7]).startswith("worker-"):
            paths.append(fields[7])
    return sorted(set(paths))


class UnixClient(RawClient):
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.reader = MessageReader(1 << 24)


def test_the_worker_socket_serves_no_login(make_proxy: Any, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    proxy = make_proxy({"": {"workers": 2}, "client": {"token_file": str(token_file),
                                                       "allowed_networks": ["10.99.0.0/16"],
                                                       "token_file_networks": ["10.99.0.0/16"]}})
    token_file.write_text(proxy.token(ACME))
    assert proxy.process is not None
    paths = wait_until(lambda: len(worker_sockets(proxy.process.pid)) == 2 and worker_sockets(proxy.process.pid))
    for path in paths:
        client = UnixClient(path)
        client.send(startup())
        error = client.error()
        assert error["C"] == errors.PROTOCOL_VIOLATION and "cancel" in error["M"], error
        assert client.closed()
        client.close()
    direct = RawClient(proxy.port)  # TCP from 127.0.0.1, outside allowed_networks: refused as before
    direct.send(startup())
    assert direct.error()["C"] == errors.INVALID_AUTHORIZATION
    direct.close()


def test_the_token_file_never_opens_the_admin_console(make_proxy: Any, tmp_path: Path) -> None:
    """A local client logs in with the token file without a password; even when that token carries the
    console's required claims, the console wants a token the client sent itself."""
    socket_dir = Path(tempfile.mkdtemp(prefix="pgtp-adm-"))
    try:
        token_file = socket_dir / "token"
        proxy = make_proxy({"": {"listen_unix": str(socket_dir)}, "client": {"token_file": str(token_file)},
                            "admin.required_claims": {"role": "proxy-admin"}})
        token_file.write_text(proxy.token(ACME, role="proxy-admin"))
        client = UnixClient(str(socket_dir / f".s.PGSQL.{proxy.port}"))
        client.send(messages.startup_message({"user": "ops", "database": "pgtenantproxy"}))
        error = client.error()
        assert error["C"] == errors.INVALID_AUTHORIZATION and "token file" in error["M"], error
        client.close()
        tenant = UnixClient(str(socket_dir / f".s.PGSQL.{proxy.port}"))  # a tenant session still logs in with it
        tenant.send(startup())
        assert tenant.read_until(b"Z")[-1] == (b"Z", b"I")
        tenant.close()
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
