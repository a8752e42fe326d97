"""The token's claims in SQL through the proxy, signed like the tenant (issue 11, item 4), and a revoked
token's live session ending at its next transaction boundary (item 5), in both pool modes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.protocol import messages
from support import ACME, GLOBEX, RawClient, login, wait_until

MODES = [{"pool": {"size": 4}}, {"pool": {"mode": "transaction", "size": 1}}]


@pytest.mark.parametrize("overrides", MODES, ids=["session", "transaction"])
async def test_claims_reach_sql_signed(make_proxy: Any, overrides: dict[str, Any]) -> None:
    """`[tenant] claims` (sub and role by default) arrive as tenant_proxy.claims() and claim(), from
    asyncpg and psql; a client that forges request.jwt.claims gets NULL from claims()."""
    proxy = make_proxy(overrides)
    token = proxy.token(ACME, sub="user-7", role="editor", email="not-selected@example.com")
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app", database="app", password=token, ssl=False)
    other = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="app", database="app",
                                  password=proxy.token(GLOBEX, sub="user-9", role="viewer"), ssl=False)
    try:
        assert json.loads(await conn.fetchval("SELECT tenant_proxy.claims()::text")) == {"sub": "user-7", "role": "editor"}
        assert await conn.fetchval("SELECT tenant_proxy.claim('sub')") == "user-7"
        assert await other.fetchval("SELECT tenant_proxy.claim('sub')") == "user-9"
        async with conn.transaction():
            assert await conn.fetchval("SELECT tenant_proxy.claim('role')") == "editor"
            await conn.execute("SELECT set_config('request.jwt.' || 'claims', '{\"sub\": \"user-9\"}', true)")
            assert await conn.fetchval("SELECT tenant_proxy.claims()") is None
        assert await conn.fetchval("SELECT tenant_proxy.claim('sub')") == "user-7"
    finally:
        await conn.close()
        await other.close()
    result = proxy.psql(token, "SELECT tenant_proxy.claim('sub'), tenant_proxy.claim('email')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "user-7|"


@pytest.mark.parametrize("overrides", MODES, ids=["session", "transaction"])
def test_a_revoked_token_ends_its_live_session(make_proxy: Any, tmp_path: Path, overrides: dict[str, Any]) -> None:
    """A token listed in `[jwt] denylist_file` while its session is open: the transaction running then
    completes, and the session ends at that transaction's end with FATAL 28P01 "token revoked"."""
    denylist = tmp_path / "denylist"
    denylist.write_text("# revoked tokens\n")
    proxy = make_proxy({**overrides, "jwt": {"denylist_file": str(denylist)}})
    client = RawClient(proxy.port)
    try:
        login(client, proxy.token(ACME, jti="leaked-1"))
        client.send(messages.query("SELECT 1"))
        assert client.read_until(b"Z")[-1] == (b"Z", b"I")
        denylist.write_text("# revoked tokens\nleaked-1\n")

        def refused() -> dict[str, str] | None:
            client.send(messages.query("SELECT 1"))
            for kind, body in client.read_until(b"Z"):
                if kind == b"E":
                    return messages.parse_error_fields(body)
            return None

        fields = wait_until(refused, deadline=10.0)
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "28P01", "token revoked")
        assert client.closed()
    finally:
        client.close()
