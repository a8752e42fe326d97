"""A lexing mode the guard does not model, set where the guard cannot see it (inside a function), ends
the session: the proxy watches the ParameterStatus the server reports."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.demo import TenantDatabase
from proxy.embedded import EmbeddedPostgres
from proxy.protocol import messages
from support import ProxyProcess, RawClient, login


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_encoding_changed_inside_a_function_ends_the_session(
    make_proxy: Any, pg: EmbeddedPostgres, tenant_db: TenantDatabase, mode: str
) -> None:
    """Attacker: a function (here one the database owner wrote) switches client_encoding to SJIS, whose
    multi-byte characters can hide a quote from the guard. Stopped by: the relay reading the server's
    ParameterStatus (0A000, the session ends before another statement is read in that encoding)."""
    pg.psql("CREATE OR REPLACE FUNCTION public.to_sjis() RETURNS text LANGUAGE sql"
            " AS $$ SELECT set_config('client_encoding', 'SJIS', false) $$;"
            f" GRANT EXECUTE ON FUNCTION public.to_sjis() TO {tenant_db.app_role}", tenant_db.database)
    proxy: ProxyProcess = make_proxy({"pool": {"mode": mode}})
    client = RawClient(proxy.port)
    try:
        login(client, proxy.token())
        client.send(messages.query("SELECT public.to_sjis()"))
        fields = client.error()
        assert (fields["C"], fields["S"]) == ("0A000", "FATAL")
        assert "client_encoding" in fields["M"]
        assert client.closed()
    finally:
        client.close()
