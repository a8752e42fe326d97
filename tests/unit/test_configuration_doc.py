"""docs/configuration.md stays true to proxy.config.SCHEMA: every key has a row, every row names a real
key, and the default a row states is the default the code uses."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from proxy.config import DEFAULT_ALLOWED_PARAMETERS, SCHEMA, UUID_PATTERN

DOC = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
# Rows whose default is prose, not a value; the key -> the words the row must use.
DESCRIBED_DEFAULTS = {
    ("jwt", "tenant_pattern"): "a UUID regex",
    ("client", "allowed_parameters"): "see the example config",
}
UNSET_WORDS = ("unset", "required")
ROW = re.compile(r"^\| (`[^|]+`) \| ([^|]+) \|", re.M)
KEY = re.compile(r"^(?:\[(?P<section>[a-z_.<>]+)\] )?(?P<key>[a-z_]+)$")


def section_and_key(cell: str, section: str) -> tuple[str, str]:
    """`[pool] size` -> ("pool", "size"); a bare `size` keeps the section of the row's first key;
    `[[jwt.issuers]]` -> ("jwt", "issuers")."""
    if cell.startswith("[[") and cell.endswith("]]"):
        outer, _, inner = cell[2:-2].partition(".")
        return outer, inner
    match = KEY.match(cell)
    assert match, f"docs/configuration.md: cannot read the key cell `{cell}`"
    return (match["section"] or section), match["key"]


def parse_default(cell: str) -> Any:
    """The first value of a default cell: a backticked TOML value, or unset (None), or none ([])."""
    value = re.match(r"`([^`]*)`", cell.strip())
    if value:
        return tomllib.loads(f"v = {value[1]}")["v"]
    if cell.strip().startswith(UNSET_WORDS):
        return None
    if cell.strip() == "none":
        return []
    return cell.strip()


def documented_rows() -> dict[tuple[str, str], str]:
    """(section, key) -> the default cell (split per key where a row holds `a` / `b`)."""
    rows: dict[tuple[str, str], str] = {}
    for keys_cell, default_cell in ROW.findall(DOC):
        keys = [k.strip().strip("`") for k in keys_cell.split(" / ")]
        defaults = [d.strip() for d in default_cell.split(" / ")]
        if len(defaults) != len(keys):
            defaults = [default_cell] * len(keys)
        section = ""
        for key, default in zip(keys, defaults):
            section, name = section_and_key(key, section)
            if section.startswith("roles.map."):  # the keys of one `[roles] map` entry, not of SCHEMA
                continue
            assert (section, name) not in rows, f"docs/configuration.md documents {section}.{name} twice"
            rows[(section, name)] = default
    return rows


def test_every_schema_key_has_a_row_and_every_row_a_key() -> None:
    documented = set(documented_rows())
    missing = set(SCHEMA) - documented
    unknown = documented - set(SCHEMA)
    assert not missing, f"keys without a row in docs/configuration.md: {sorted(missing)}"
    assert not unknown, f"rows in docs/configuration.md naming no key: {sorted(unknown)}"


def test_every_documented_default_is_the_code_default() -> None:
    wrong = []
    for key, cell in documented_rows().items():
        kind, default = SCHEMA[key]
        if key in DESCRIBED_DEFAULTS:
            assert DESCRIBED_DEFAULTS[key] in cell, f"{key}: the row should say {DESCRIBED_DEFAULTS[key]!r}"
            continue
        stated = parse_default(cell)
        if kind is float and isinstance(stated, int):
            stated = float(stated)
        if stated != default:
            wrong.append(f"{key}: documented {stated!r}, code {default!r}")
    assert not wrong, "\n".join(wrong)


def test_the_described_defaults_are_the_code_defaults() -> None:
    example = tomllib.loads((Path(__file__).resolve().parents[2] / "config" / "pg-tenant-proxy.toml").read_text())
    assert example["client"]["allowed_parameters"] == DEFAULT_ALLOWED_PARAMETERS
    assert SCHEMA[("jwt", "tenant_pattern")][1] == UUID_PATTERN
