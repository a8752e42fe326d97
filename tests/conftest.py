"""Fixtures for the integration and security suites: a real Postgres (embedded, throwaway) and real
proxy processes in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.demo import TenantDatabase, prepare_database
from proxy.embedded import EmbeddedPostgres
from support import ProxyProcess, unprotected_table


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    cluster = EmbeddedPostgres().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def tenant_db(pg: EmbeddedPostgres) -> TenantDatabase:
    return prepare_database(pg)


@pytest.fixture(scope="session")
def proxy(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp("proxy"), {"pool": {"size": 150}}).start()
    yield process
    process.stop()


@pytest.fixture
def make_proxy(pg: EmbeddedPostgres, tenant_db: TenantDatabase, tmp_path: Path) -> Iterator[Any]:
    """Start a proxy with configuration overrides: make_proxy({"jwt": {"audience": "app"}})."""
    started: list[ProxyProcess] = []

    def factory(overrides: dict[str, dict[str, Any]] | None = None, start: bool = True) -> ProxyProcess:
        process = ProxyProcess(pg, tenant_db, tmp_path, overrides or {})
        started.append(process)
        return process.start() if start else process

    yield factory
    for process in started:
        process.stop()


@pytest.fixture
def prepared_statements_readable(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Iterator[None]:
    """The application role may list its session's prepared statements, which the hardening SQL takes
    away (under transaction pooling they show other tenants' statement texts): for tests that check
    what a server connection holds."""
    grants = "SELECT ON pg_catalog.pg_prepared_statements", "EXECUTE ON FUNCTION pg_catalog.pg_prepared_statement()"
    pg.psql("".join(f"GRANT {grant} TO {tenant_db.app_role};\n" for grant in grants), database=tenant_db.database)
    yield
    pg.psql("".join(f"REVOKE {grant} FROM {tenant_db.app_role};\n" for grant in grants), database=tenant_db.database)


@pytest.fixture(scope="module")
def drivers_scratch(pg: EmbeddedPostgres, tenant_db: TenantDatabase) -> Any:
    """The table without Row-Level Security the driver scripts (tests/driver_scripts.py) write (COPY,
    transactions), each run under its own run number."""
    with unprotected_table(pg, tenant_db, "drivers_scratch", "run int NOT NULL, n int, t text",
                           grants="SELECT, INSERT, UPDATE, DELETE") as name:
        yield name
