"""The token file (`[client] token_file`): which clients use it, reading it again when it changes, and a
session going on with the refreshed token (or ending), on a fake clock with real files and the real
verifier; and a session's renewal ending with its connection (`proxy.login.Login`, on a fake connection)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jwt
import pytest

from proxy.auth.token_file import MAX_TOKEN_BYTES, FileLogin, TenantChanged, TokenFile, TokenFileUnreadable, uses_token_file
from proxy import config
from proxy.config import UUID_PATTERN, IssuerSettings, JwtSettings
from proxy.login import Door, Login
from proxy.parameters import StartupRequest
from proxy.relay.session import Event, SessionState
from proxy.tokens import Identity, TokenRejected, TokenVerifier

SECRET = "s" * 40
ACME = "11111111-1111-4111-8111-111111111111"
GLOBEX = "22222222-2222-4222-8222-222222222222"
NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class FakeTransport:
    def __init__(self, peer: Any) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


def verifier(clock: Clock) -> TokenVerifier:
    issuer = IssuerSettings(issuer=None, discovery=False, algorithms=["HS256"], secret=SECRET, public_key_file=None,
                            jwks_file=None, jwks_url=None, audience=None, required_claims={}, tenant_claim="tenant_id",
                            tenant_pattern=UUID_PATTERN)
    return TokenVerifier(JwtSettings(issuers=[issuer], leeway_seconds=0), clock=clock)


def token(tenant: str = ACME, expires: float = NOW + 60, secret: str = SECRET, sub: str = "app") -> str:
    return jwt.encode({"tenant_id": tenant, "sub": sub, "exp": int(expires)}, secret, algorithm="HS256")


def write(path: Path, text: str | bytes) -> None:
    """Replace the file as the platforms do: a new file renamed over the old one (a new inode)."""
    new = path.with_suffix(".new")
    new.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.replace(new, path)


def logged_in(path: Path, clock: Clock, check: TokenVerifier) -> tuple[FileLogin, Identity]:
    login = FileLogin(TokenFile(str(path)))
    identity = asyncio.run(check.verify_async(login.first_token(clock.now)))
    return login, identity


@pytest.mark.parametrize("peer, networks, expected", [
    ("", [], True),  # a Unix socket has no address
    ("/run/pgtp/.s.PGSQL.6432", [], True),
    (("127.0.0.1", 5000), [], False),  # no network is local unless listed
    (("127.0.0.1", 5000), ["127.0.0.1/32"], True),
    (("::ffff:127.0.0.1", 5000, 0, 0), ["127.0.0.0/8"], True),
    (("10.1.2.3", 5000), ["127.0.0.1/32", "::1/128"], False),
    (("::1", 5000, 0, 0), ["::1/128"], True),
])
def test_which_clients_use_the_token_file(peer: Any, networks: list[str], expected: bool) -> None:
    assert uses_token_file(FakeTransport(peer), networks) is expected


def test_the_file_is_read_again_only_when_it_changed_and_the_interval_passed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    write(path, token() + "\n")
    source = TokenFile(str(path), check_interval=1.0)
    assert source.read(NOW) == token() and source.version == 1
    write(path, token(expires=NOW + 120))
    assert source.read(NOW + 0.5) == token()  # within the interval: not looked at
    assert source.read(NOW + 0.5, fresh=True) == token(expires=NOW + 120) and source.version == 2
    os.utime(path)  # touched, same content: read again, still the same version
    assert source.read(NOW + 2) == token(expires=NOW + 120) and source.version == 2


@pytest.mark.parametrize("content, problem", [
    (None, "it cannot be read (No such file or directory)"),
    ("", "it is empty"),
    (" \n", "it is empty"),
    (b"\xff\xfe" + b"x" * 10, "it is not ASCII text"),
    ("x" * (MAX_TOKEN_BYTES + 1), f"it is larger than {MAX_TOKEN_BYTES} bytes"),
])
def test_a_file_without_a_usable_token_is_refused_with_08006_and_no_content(
        tmp_path: Path, content: str | bytes | None, problem: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "token"
    if content is not None:
        write(path, content)
    source = TokenFile(str(path))
    with pytest.raises(TokenFileUnreadable) as refused:
        source.read(NOW)
    assert refused.value.sqlstate == "08006"
    assert str(refused.value) == f"the proxy's token file cannot be used: {problem}"
    assert caplog.messages == [f"the token file {path}: {problem}"]


def test_a_file_that_goes_bad_is_not_replaced_by_the_last_token_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "token"
    write(path, token())
    source = TokenFile(str(path))
    source.read(NOW)
    path.unlink()
    with pytest.raises(TokenFileUnreadable):
        source.read(NOW + 5)
    write(path, token())
    assert source.read(NOW + 10) == token()
    assert all(token() not in message for message in caplog.messages)


def test_the_session_goes_on_with_the_refreshed_token_at_a_boundary(tmp_path: Path) -> None:
    path, clock = tmp_path / "token", Clock()
    check = verifier(clock)
    write(path, token())
    login, held = logged_in(path, clock, check)
    assert login.at_boundary(check, held, NOW + 1) is None  # unchanged
    write(path, token(expires=NOW + 600, sub="renewed"))
    clock.now = NOW + 2
    renewed = login.at_boundary(check, held, clock.now)
    assert renewed is not None and (renewed.tenant, renewed.subject, renewed.expires_at) == (ACME, "renewed", NOW + 600)
    assert login.at_boundary(check, renewed, NOW + 3) is None  # the same version is not taken twice


def test_a_refreshed_token_that_is_refused_leaves_the_session_on_its_own_until_the_expiry(tmp_path: Path) -> None:
    path, clock = tmp_path / "token", Clock()
    check = verifier(clock)
    write(path, token())
    login, held = logged_in(path, clock, check)
    write(path, token(secret="x" * 40))
    assert login.at_boundary(check, held, NOW + 2) is None
    clock.now = NOW + 61
    with pytest.raises(TokenRejected, match="^token signature does not verify$"):
        asyncio.run(login.at_expiry(check, held, clock.now))


def test_the_session_ends_at_the_expiry_when_the_file_was_not_refreshed(tmp_path: Path) -> None:
    path, clock = tmp_path / "token", Clock()
    check = verifier(clock)
    write(path, token())
    login, held = logged_in(path, clock, check)
    clock.now = NOW + 61
    with pytest.raises(TokenRejected) as ended:
        asyncio.run(login.at_expiry(check, held, clock.now))
    assert (ended.value.sqlstate, str(ended.value)) == ("28P01", "token expired")


def test_a_file_refreshed_just_before_the_expiry_is_read_at_once(tmp_path: Path) -> None:
    path, clock = tmp_path / "token", Clock()
    check = verifier(clock)
    write(path, token())
    login, held = logged_in(path, clock, check)
    write(path, token(expires=NOW + 600))
    clock.now = NOW + 60.5  # within the check interval of the last look at the boundary
    login.source.read(NOW + 60)
    renewed = asyncio.run(login.at_expiry(check, held, clock.now))
    assert renewed.expires_at == NOW + 600


def test_a_refreshed_token_of_another_tenant_ends_the_session_with_28000(tmp_path: Path) -> None:
    path, clock = tmp_path / "token", Clock()
    check = verifier(clock)
    write(path, token())
    login, held = logged_in(path, clock, check)
    write(path, token(tenant=GLOBEX, expires=NOW + 600))
    with pytest.raises(TenantChanged) as ended:
        login.at_boundary(check, held, NOW + 2)
    assert ended.value.sqlstate == "28000" and "another tenant" in str(ended.value)
    with pytest.raises(TenantChanged):
        asyncio.run(FileLogin(login.source).at_expiry(check, held, NOW + 61))


def test_an_unreadable_file_at_the_expiry_ends_the_session_with_08006(tmp_path: Path) -> None:
    path, clock = tmp_path / "token", Clock()
    check = verifier(clock)
    write(path, token())
    login, held = logged_in(path, clock, check)
    path.unlink()
    assert login.at_boundary(check, held, NOW + 2) is None
    with pytest.raises(TokenFileUnreadable) as ended:
        asyncio.run(login.at_expiry(check, held, NOW + 61))
    assert ended.value.sqlstate == "08006"


class StalledVerifier:
    """Verifies nothing: `verify_async` waits until released (as on a slow key fetch), then refuses."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def verify_async(self, token: str) -> Identity:
        self.asked.set()
        await self.release.wait()
        raise TokenRejected("token signature does not verify")


class FakeConnection:
    """What `Login` uses of its client connection (`proxy.login.Client`); it records what it is told."""

    def __init__(self, identity: Identity) -> None:
        self.address = "unix"
        self.session = SessionState()
        for event in (Event.STARTUP_ACCEPTED, Event.PASSWORD_RECEIVED, Event.LOGGED_IN):
            self.session.move(event)
        self.transport = SimpleNamespace(write=lambda data: None)
        self.request = StartupRequest(user="alice", database="app")
        self.identity = identity
        self.pool = SimpleNamespace(upstream=SimpleNamespace(user="tenant_app"))
        self.relay = SimpleNamespace(greeted=lambda parameters: None)
        self.console = None
        self.database = "app"
        self.terminated_with: list[str] = []

    def terminate(self, sqlstate: str, text: str, detail: str | None = None, hint: str | None = None) -> None:
        self.terminated_with.append(sqlstate)

    def greeted(self) -> tuple[int, int]:
        return 1, 2

    def _guarded(self, step: Any, argument: Any) -> None:
        step(argument)


def test_a_token_file_session_whose_connection_is_lost_leaves_no_task_behind(tmp_path: Path) -> None:
    """A session logged in with the token file reaches its token's expiry and renews from the file, whose
    newer token is still being verified when the connection is lost: the renewal ends with the session
    (`Login.ended`, which the connection calls), no task of it is left, and it acts on nothing after."""
    path = tmp_path / "token"
    write(path, token())

    async def scenario() -> tuple[set[asyncio.Task[Any]], list[str], tuple[int, dict[str, int]]]:
        check = StalledVerifier()
        server = SimpleNamespace(settings=SimpleNamespace(pool=SimpleNamespace(mode="transaction")), logged_in=0,
                                 logging_in=0, tenant_clients={}, verifier=check)
        connection = FakeConnection(Identity(ACME, "app", int(time.time()) - 1, {}))  # expired: renewed at once
        login = Login(connection, server, Door.CLIENTS)  # type: ignore[arg-type]
        login.file_login = FileLogin(TokenFile(str(path)))
        login.file_login.first_token(time.time())
        write(path, token(sub="renewed"))
        login.greet({})
        await asyncio.wait_for(check.asked.wait(), 10)  # the renewal is verifying the file's newer token
        connection.session.move(Event.CLOSED)  # as ClientConnection.connection_lost does
        login.ended()
        session_tasks = asyncio.all_tasks() - {asyncio.current_task()}
        _, left = await asyncio.wait(session_tasks, timeout=5) if session_tasks else (set(), set())
        check.release.set()  # let a task that outlived its session finish, so the loop closes cleanly
        if left:
            await asyncio.wait(left, timeout=5)
        return left, connection.terminated_with, (server.logged_in, server.tenant_clients)

    left, terminated_with, counts = asyncio.run(scenario())
    assert not left, f"tasks outlived their session: {left}"
    assert terminated_with == [] and counts == (0, {})


CONFIG = f"""
[upstream]
user = "app"
database = "app"
[jwt]
secret = "{"j" * 32}"
[tenant]
signing_key = "{"k" * 32}"
"""


@pytest.mark.parametrize("environ, problem", [
    ({"PGTP_CLIENT_TOKEN_FILE_NETWORKS": "127.0.0.1/32"},
     "client.token_file_networks: has no effect without client.token_file"),
    ({"PGTP_CLIENT_TOKEN_FILE": "/nonexistent/dir/token", "PGTP_CLIENT_TOKEN_FILE_NETWORKS": "127.0.0.1/32"},
     "client.token_file: directory /nonexistent/dir does not exist"),
    ({"PGTP_CLIENT_TOKEN_FILE": "{dir}/token"},
     "client.token_file: no client can use it; set listen_unix or client.token_file_networks"),
    ({"PGTP_CLIENT_TOKEN_FILE": "{dir}/token", "PGTP_CLIENT_TOKEN_FILE_NETWORKS": "127.0.0.1/32, local"},
     "client.token_file_networks: 'local' is not an address or CIDR network"),
])
def test_the_configuration_names_token_file_problems(tmp_path: Path, environ: dict[str, str], problem: str) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG)
    environ = {name: value.replace("{dir}", str(tmp_path)) for name, value in environ.items()}
    with pytest.raises(config.ConfigError) as raised:
        config.load(path, environ=environ)
    assert raised.value.problems == [problem]


def test_the_token_file_keys_are_read(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(CONFIG + f'[client]\ntoken_file = "{tmp_path}/token"\ntoken_file_networks = ["127.0.0.1/32"]\n')
    settings = config.load(path, environ={})
    assert (settings.client.token_file, settings.client.token_file_networks) == (f"{tmp_path}/token", ["127.0.0.1/32"])
    path.write_text(CONFIG)
    defaults = config.load(path, environ={})
    assert (defaults.client.token_file, defaults.client.token_file_networks) == (None, [])


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink to a fifo"])
def test_a_path_that_is_not_a_regular_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    """A named pipe (some secret agents write one) would block open() and with it the proxy's event loop,
    every tenant's sessions included: only a regular file (or a symlink to one) is read."""
    target = tmp_path / "target"
    if kind == "directory":
        target.mkdir()
    else:
        os.mkfifo(target)
    path = target if kind != "symlink to a fifo" else tmp_path / "token"
    if path != target:
        path.symlink_to(target)
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: outcome.append(_refusal(TokenFile(str(path)))), daemon=True)
    reader.start()
    reader.join(10)  # a deadline for the failure only: the read returns at once when it does not block
    assert not reader.is_alive(), "reading the token file blocked"
    assert isinstance(outcome[0], TokenFileUnreadable) and "not a regular file" in str(outcome[0])


def _refusal(source: TokenFile) -> BaseException:
    with pytest.raises(TokenFileUnreadable) as refused:
        source.read(0.0)
    return refused.value
