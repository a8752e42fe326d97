"""Fixtures for the security suites: the proxy under attack in each pool mode, and a session on it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from support import ACME, ProxyProcess
from proxy.embedded import EmbeddedPostgres


@pytest.fixture(scope="module", params=["session", "transaction"])
def proxy(
    request: pytest.FixtureRequest, pg: EmbeddedPostgres, tenant_db: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The proxy under attack, in each pool mode (transaction mode: 3 server connections for everyone)."""
    pool = {"size": 150} if request.param == "session" else {"mode": "transaction", "size": 3}
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp(request.param), {"pool": pool}).start()
    yield process
    process.stop()


@pytest.fixture
def conn(proxy: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit session as tenant ACME."""
    with psycopg.connect(proxy.dsn(), password=proxy.token(ACME), autocommit=True) as connection:
        yield connection
