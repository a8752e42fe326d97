"""Every token failure is a FATAL 28P01 that names the reason, seen from real clients."""

from __future__ import annotations

import time
from typing import Any

import asyncpg
import psycopg
import pytest

from support import ACME, ProxyProcess


async def connect(proxy: ProxyProcess, password: str) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1", port=proxy.port, user="alice", database="app", password=password, ssl=False, timeout=10
    )


@pytest.mark.parametrize(
    "claims, reason",
    [
        ({"exp": int(time.time()) - 120}, "token expired"),
        ({"nbf": int(time.time()) + 3600}, "token not yet valid"),
        ({"tenant_id": None}, "tenant claim 'tenant_id' missing"),
        ({"tenant_id": "acme"}, "tenant claim 'tenant_id' does not match the tenant pattern"),
    ],
)
async def test_claim_refusals(proxy: ProxyProcess, claims: dict[str, Any], reason: str) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await connect(proxy, proxy.token(**claims))
    assert info.value.sqlstate == "28P01"
    assert str(info.value) == reason


async def test_bad_signature(proxy: ProxyProcess) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError, match="^token signature does not verify$"):
        await connect(proxy, proxy.token(secret="another secret of at least 32 bytes!!"))


@pytest.mark.parametrize("password", ["hunter2", "a.b.c", "x" * 5000])
async def test_malformed(proxy: ProxyProcess, password: str) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError, match="^malformed token$"):
        await connect(proxy, password)


async def test_audience_and_issuer(make_proxy: Any) -> None:
    strict = make_proxy({"jwt": {"audience": "tenant-app", "issuer": "https://issuer.test"}})
    with pytest.raises(asyncpg.InvalidPasswordError, match="^token audience does not match$"):
        await connect(strict, strict.token(aud="other", iss="https://issuer.test"))
    with pytest.raises(asyncpg.InvalidPasswordError, match="^token issuer does not match$"):
        await connect(strict, strict.token(aud="tenant-app", iss="https://evil.test"))
    conn = await connect(strict, strict.token(aud="tenant-app", iss="https://issuer.test"))
    assert await conn.fetchval("SELECT tenant_proxy.current_tenant()") == ACME
    await conn.close()


async def test_large_token_is_accepted(proxy: ProxyProcess) -> None:
    token = proxy.token(padding="p" * 16_384)
    assert len(token) > 16_384
    conn = await connect(proxy, token)
    assert await conn.fetchval("SELECT count(*) FROM leads") > 0
    await conn.close()


def test_psql_shows_the_reason(proxy: ProxyProcess) -> None:
    result = proxy.psql(proxy.token(exp=int(time.time()) - 60), "SELECT 1")
    assert result.returncode != 0
    assert "FATAL:  token expired" in result.stderr


def test_session_ends_when_the_token_expires(proxy: ProxyProcess) -> None:
    """The proof expires with the token in the database; the proxy also ends the session with 28P01."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ttl=2), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM leads").fetchone()[0] > 0
        deadline = time.monotonic() + 15
        with pytest.raises(psycopg.OperationalError, match="token expired"):
            while time.monotonic() < deadline:
                conn.execute("SELECT count(*) FROM leads")
                time.sleep(0.1)
