"""Fixtures for the adversarial suites: the proxy under attack, in each pool mode."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from proxy.embedded import EmbeddedPostgres
from support import ProxyProcess


@pytest.fixture(scope="module", params=["session", "transaction"])
def proxy(
    request: pytest.FixtureRequest, pg: EmbeddedPostgres, tenant_db: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The proxy under attack, in each pool mode (transaction mode: 3 server connections for everyone)."""
    pool = {"size": 150} if request.param == "session" else {"mode": "transaction", "size": 3}
    process = ProxyProcess(pg, tenant_db, tmp_path_factory.mktemp(request.param), {"pool": pool}).start()
    yield process
    process.stop()
