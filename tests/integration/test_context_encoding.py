"""The signed context does not depend on the session's client_encoding. The proxy's Bind of the context
carried the tenant and the claims as text parameters, which Postgres reads in the client_encoding the
client chose: with `SET client_encoding = 'LATIN1'` a claim that is not ASCII ("José") arrived as other
characters and no longer matched its proof (tenant_proxy.claims() NULL), and with EUC_JP every statement
failed with 22021. A client's encoding is its own business; its token's context is the same in every one."""

from __future__ import annotations

import psycopg
import pytest

from support import ACME, ProxyProcess, pool_mode_fixtures

MODES = {"session": {"pool": {"mode": "session", "size": 2}},
         "transaction": {"pool": {"mode": "transaction", "size": 1}}}
mode, pooled = pool_mode_fixtures(MODES)
SUB = "Jos\u00e9 \u00c5ngstr\u00f6m"  # in LATIN1 and WIN1252, not ASCII


@pytest.mark.parametrize("encoding", ["LATIN1", "WIN1252", "EUC_JP"])
def test_the_context_holds_in_any_client_encoding(pooled: ProxyProcess, encoding: str) -> None:
    token = pooled.token(ACME, sub=SUB)
    with psycopg.connect(pooled.dsn(), password=token, autocommit=True) as conn:
        expected = conn.execute("SELECT tenant_proxy.current_tenant(), count(*) FROM leads").fetchone()
        assert expected is not None and expected[0] == ACME
        conn.execute(f"SET client_encoding = '{encoding}'")
        assert conn.execute("SELECT tenant_proxy.current_tenant(), count(*) FROM leads").fetchone() == expected
        # Compared on the server: EUC_JP cannot carry the claim to the client.
        same = f"SELECT tenant_proxy.claim('sub') = convert_from(decode('{SUB.encode().hex()}', 'hex'), 'UTF8')"
        assert conn.execute(same).fetchone() == (True,)
        assert conn.execute("SELECT tenant_proxy.claims() IS NOT NULL").fetchone() == (True,)
