"""The functions `check --connect` and `doctor` require of an installed verifier are exactly those the
shipped verifier SQL creates, and include the one the relay calls at a tenant switch."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.doctor import VERIFIER_FUNCTIONS
from proxy.relay.relay import RESET_SQL

VERIFIER = Path(__file__).resolve().parents[2] / "proxy" / "sql" / "verifier.sql"


def shipped_functions() -> set[str]:
    """`tenant_proxy.name(type, ...)` for each function verifier.sql creates (argument names dropped)."""
    found = re.findall(r"CREATE OR REPLACE FUNCTION (tenant_proxy\.\w+)\(([^)]*)\)", VERIFIER.read_text())
    signatures = set()
    for name, arguments in found:
        types = [argument.split()[-1].removeprefix("pg_catalog.") for argument in arguments.split(",") if argument.strip()]
        signatures.add(f"{name}({', '.join(types)})")
    return signatures


def test_the_required_functions_are_the_shipped_ones() -> None:
    assert set(VERIFIER_FUNCTIONS) == shipped_functions()


def test_the_function_the_relay_calls_is_required() -> None:
    called = re.search(r"(tenant_proxy\.\w+)\(\)", RESET_SQL)
    assert called is not None and f"{called.group(1)}()" in VERIFIER_FUNCTIONS
