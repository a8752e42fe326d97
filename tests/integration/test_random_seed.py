"""random()'s seed does not pass from one client to the next on a shared server connection. Postgres keeps
the seed for the life of a backend: neither RESET ALL nor DISCARD ALL touches it, so a client that sets
it (`SET seed`, `set_config('seed', ...)`) would decide the sequence the next client draws, of any tenant.
The hardening SQL revokes setseed() for this reason; the setting cannot be revoked. The guard refuses
the spellings it can read, and the proxy seeds anew from a strong source whenever a connection passes to
a client whose session must not see the last one's (another tenant in transaction mode, any next client
in session mode)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from support import ACME, GLOBEX, ProxyProcess, pool_mode_fixtures
from proxy.embedded import EmbeddedPostgres

MODES = {"session": {"pool": {"mode": "session", "size": 1}},
         "transaction": {"pool": {"mode": "transaction", "size": 1}}}
mode, pooled = pool_mode_fixtures(MODES)
# The guard cannot read a name computed at run time; Postgres seeds all the same.
COMPUTED = "SELECT set_config(n, '0.5', false) FROM (VALUES ('se' || 'ed')) AS v(n)"
DRAW = "SELECT random() FROM generate_series(1, 3)"


def seeded_draw(pg: EmbeddedPostgres, tenant_db: Any) -> list[tuple[float]]:
    """What random() gives right after `COMPUTED`, straight from Postgres."""
    with psycopg.connect(host="127.0.0.1", port=pg.port, dbname=tenant_db.database, user=tenant_db.app_role,
                         password=tenant_db.app_password, autocommit=True) as conn:
        conn.execute(COMPUTED)
        return conn.execute(DRAW).fetchall()


@pytest.mark.parametrize("sql", ["SET seed = 0.5", "RESET seed", "SELECT set_config('seed', '0.5', false)"])
def test_writing_the_seed_is_refused(pooled: ProxyProcess, sql: str) -> None:
    with psycopg.connect(pooled.dsn(), password=pooled.token(ACME), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='"seed"'):
            conn.execute(sql)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_next_client_does_not_draw_the_seeded_sequence(pooled: ProxyProcess, mode: str, pg: EmbeddedPostgres,
                                                           tenant_db: Any) -> None:
    """One server connection: a client seeds it through a computed name and leaves (session mode) or is
    followed by another tenant's client (transaction mode); the next client draws its own numbers."""
    seeded = seeded_draw(pg, tenant_db)
    with psycopg.connect(pooled.dsn(), password=pooled.token(ACME), autocommit=True) as seeder:
        seeder.execute(COMPUTED)
        assert seeder.execute(DRAW).fetchall() == seeded  # the seed took, as directly
        seeder.execute(COMPUTED)
        if mode == "transaction":
            with psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX), autocommit=True) as other:
                assert other.execute(DRAW).fetchall() != seeded
    with psycopg.connect(pooled.dsn(), password=pooled.token(GLOBEX), autocommit=True) as other:
        assert other.execute("SELECT pg_backend_pid()").fetchone() is not None
        assert other.execute(DRAW).fetchall() != seeded
