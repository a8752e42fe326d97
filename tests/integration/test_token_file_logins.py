"""`[client] token_file` (issue 11, item 6): local clients log in without a token and get the file's
tenant; a session goes on past its first token's expiry when the file was rotated, in both pool modes;
clients from other networks still need a token; a bad or missing file gives a proper refusal."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from proxy.protocol import messages
from proxy.protocol.framing import MessageReader
from support import ACME, GLOBEX, ROWS, ProxyProcess, RawClient, startup, wait_until

MODES = [{"pool": {"size": 4}}, {"pool": {"mode": "transaction", "size": 1}}]
SHORT = 3  # seconds a first token lives in the rotation tests


class UnixClient(RawClient):
    """RawClient over the proxy's Unix socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.reader = MessageReader(1 << 24)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="pgtp-sock-"))  # short: a socket path has at most 107 bytes
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def rotate(path: Path, token: str) -> None:
    """Replace the token as kubelet and vault-agent do: a new file renamed over the old one."""
    new = path.with_name(path.name + ".new")
    new.write_text(token)
    os.replace(new, path)


def file_proxy(make_proxy: Any, socket_dir: Path, networks: list[str], **overrides: Any) -> tuple[ProxyProcess, Path]:
    """A proxy on TCP and on a Unix socket in `socket_dir`, whose token file (not written yet) is
    `socket_dir/token`, used by Unix-socket clients and those from `networks`."""
    token_file = socket_dir / "token"
    client = {"token_file": str(token_file), "token_file_networks": networks}
    return make_proxy({"": {"listen_unix": str(socket_dir)}, "client": client, **overrides}), token_file


def local_psql(proxy: ProxyProcess, socket_dir: Path, sql: str) -> subprocess.CompletedProcess[str]:
    """psql over the Unix socket with no password at all (-w: never prompt)."""
    environment = {name: value for name, value in os.environ.items() if name != "PGPASSWORD"}
    return subprocess.run(
        ["psql", "-X", "-A", "-t", "-w", f"host={socket_dir} port={proxy.port} user=alice dbname=app", "-c", sql],
        capture_output=True, text=True, env=environment, timeout=30, check=False,
    )


def local_connect(proxy: ProxyProcess, socket_dir: Path) -> psycopg.Connection[Any]:
    return psycopg.connect(f"host={socket_dir} port={proxy.port} user=alice dbname=app", autocommit=True)


def first_reply(client: RawClient) -> tuple[bytes, bytes]:
    client.send(startup())
    return client.read_message()


def refusal(client: RawClient) -> dict[str, str]:
    """The ErrorResponse that answers a StartupMessage (no password asked first)."""
    try:
        client.send(startup())
        type_byte, body = client.read_message()
        assert type_byte == b"E", (type_byte, body)
        return messages.parse_error_fields(body)
    finally:
        client.close()


def test_psql_over_the_unix_socket_needs_no_token(make_proxy: Any, socket_dir: Path) -> None:
    proxy, token_file = file_proxy(make_proxy, socket_dir, ["10.0.0.0/8"])
    rotate(token_file, proxy.token(ACME))
    result = local_psql(proxy, socket_dir, "SELECT count(*), tenant_proxy.current_tenant() FROM leads")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{ROWS[ACME]}|{ACME}"


def test_a_tcp_client_from_a_network_not_listed_still_needs_a_token(make_proxy: Any, socket_dir: Path) -> None:
    proxy, token_file = file_proxy(make_proxy, socket_dir, ["10.0.0.0/8"])
    rotate(token_file, proxy.token(ACME))
    client = RawClient(proxy.port)
    try:
        client.send(startup())
        assert client.read_message() == (b"R", messages.AUTH_CLEARTEXT_PASSWORD.to_bytes(4, "big"))
    finally:
        client.close()
    without = proxy.psql("", "SELECT 1", PGPASSWORD="")
    assert without.returncode != 0 and "no password supplied" in without.stderr
    globex = proxy.psql(proxy.token(GLOBEX), "SELECT count(*), tenant_proxy.current_tenant() FROM leads")
    assert globex.stdout.strip() == f"{ROWS[GLOBEX]}|{GLOBEX}", globex.stderr  # its own token, not the file's


def test_a_listed_network_uses_the_file_and_a_bad_file_is_refused(make_proxy: Any, socket_dir: Path) -> None:
    """A listed TCP network is asked for no password; a forged token in the file gets the refusal such
    a token gets as a password; a missing file gets 08006; a mended file lets clients in again. The
    tokens never reach the log."""
    proxy, token_file = file_proxy(make_proxy, socket_dir, ["127.0.0.1/32"])
    forged, good = proxy.token(ACME, secret="f" * 40), proxy.token(ACME)
    rotate(token_file, forged)
    socket_file = socket_dir / f".s.PGSQL.{proxy.port}"
    for client in (RawClient(proxy.port), UnixClient(socket_file)):
        fields = refusal(client)
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28P01", "token signature does not verify")
    token_file.unlink()
    missing = wait_until(lambda: (fields := refusal(RawClient(proxy.port)))["C"] == "08006" and fields)
    assert missing["M"] == "the proxy's token file cannot be used: it cannot be read (No such file or directory)"
    rotate(token_file, good)
    count = wait_until(lambda: local_count(proxy.dsn(), good))
    assert count == ROWS[ACME]
    log = proxy.log()
    assert forged not in log and good not in log and forged.split(".")[2] not in log


def local_count(dsn: str, ignored_password: str) -> int | None:
    """Rows of leads over `dsn`, the password being whatever the application has (the proxy asks none)."""
    try:
        with psycopg.connect(dsn, password="anything-" + ignored_password[:3]) as conn:
            row = conn.execute("SELECT count(*) FROM leads").fetchone()
    except psycopg.OperationalError:
        return None
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("overrides", MODES, ids=["session", "transaction"])
@pytest.mark.parametrize("busy", [True, False], ids=["busy", "idle"])
def test_a_session_goes_on_past_its_first_tokens_expiry_when_the_file_was_rotated(
        make_proxy: Any, socket_dir: Path, overrides: dict[str, Any], busy: bool) -> None:
    """The file is rotated (same tenant, later expiry, another `sub`) under a live session. A busy
    session takes the new token at a transaction boundary, an idle one at its first token's expiry;
    either goes on past that expiry with its tenant's rows and the new token's claims."""
    proxy, token_file = file_proxy(make_proxy, socket_dir, [], **overrides)
    first_expiry = int(time.time()) + SHORT
    rotate(token_file, proxy.token(ACME, ttl=SHORT, sub="first"))
    with local_connect(proxy, socket_dir) as conn:
        assert conn.execute("SELECT tenant_proxy.claim('sub')").fetchone() == ("first",)
        rotate(token_file, proxy.token(ACME, ttl=3600, sub="second"))
        if busy:
            wait_until(lambda: conn.execute("SELECT tenant_proxy.claim('sub')").fetchone() == ("second",))
        wait_until(lambda: time.time() > first_expiry + 1, deadline=SHORT + 5)
        wait_until(lambda: "token renewed from the token file" in proxy.log())
        row = conn.execute("SELECT count(*), tenant_proxy.current_tenant(), tenant_proxy.claim('sub') FROM leads").fetchone()
        assert row == (ROWS[ACME], ACME, "second")


@pytest.mark.parametrize("overrides", MODES, ids=["session", "transaction"])
def test_a_session_ends_at_the_expiry_when_the_file_was_not_rotated(
        make_proxy: Any, socket_dir: Path, overrides: dict[str, Any]) -> None:
    proxy, token_file = file_proxy(make_proxy, socket_dir, [], **overrides)
    rotate(token_file, proxy.token(ACME, ttl=SHORT))
    with local_connect(proxy, socket_dir) as conn:
        assert conn.execute("SELECT count(*) FROM leads").fetchone() == (ROWS[ACME],)
        wait_until(lambda: "token expired client=" in proxy.log(), deadline=SHORT + 5)
        with pytest.raises(psycopg.OperationalError, match="token expired"):
            conn.execute("SELECT 1")


@pytest.mark.parametrize("overrides", MODES, ids=["session", "transaction"])
def test_a_rotated_token_of_another_tenant_ends_the_session_with_28000(
        make_proxy: Any, socket_dir: Path, overrides: dict[str, Any]) -> None:
    proxy, token_file = file_proxy(make_proxy, socket_dir, [], **overrides)
    rotate(token_file, proxy.token(ACME))
    client = UnixClient(socket_dir / f".s.PGSQL.{proxy.port}")
    try:
        client.send(startup())
        assert client.read_until(b"Z")[-1] == (b"Z", b"I")
        rotate(token_file, proxy.token(GLOBEX))

        def ended() -> dict[str, str] | None:
            try:
                client.send(messages.query("SELECT count(*) FROM leads"))
            except BrokenPipeError:  # closed after its FATAL: read that
                return messages.parse_error_fields(client.read_message()[1])
            replies = client.read_until(b"Z")
            if replies[-1][0] == b"E":
                return messages.parse_error_fields(replies[-1][1])
            assert (b"D", b"\x00\x01\x00\x00\x00\x01" + str(ROWS[ACME]).encode()) in replies, replies
            return None

        fields = wait_until(ended)
        assert (fields["S"], fields["C"]) == ("FATAL", "28000") and "another tenant" in fields["M"]
        assert client.closed()
    finally:
        client.close()
    with local_connect(proxy, socket_dir) as conn:  # a new session gets the new tenant
        assert conn.execute("SELECT count(*), tenant_proxy.current_tenant() FROM leads").fetchone() == (ROWS[GLOBEX], GLOBEX)
