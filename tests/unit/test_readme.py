"""The README stays true to the code: every command and flag it names exists, every docs/ page is linked
from it, and its links lead somewhere."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from proxy.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
# Pages the README points to that other branches wrote; all of them are merged now.
WRITTEN_ELSEWHERE: set[str] = set()
# Commands the README documents that another branch added; all of them are merged now.
COMMANDS_ELSEWHERE: set[str] = set()


def subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def commands_table() -> dict[str, str]:
    """The README's Commands table: command name -> its usage cell."""
    section = README[README.index("## Commands"):README.index("## Running it in production")]
    rows = re.findall(r"^\| `(\w+)([^`]*)` \|", section, re.M)
    return {name: usage for name, usage in rows}


def test_commands_table_names_every_command_and_exactly_its_flags() -> None:
    table = commands_table()
    parsers = subcommands()
    assert set(parsers) <= set(table) <= set(parsers) | COMMANDS_ELSEWHERE
    for name, usage in table.items():
        if name not in parsers:
            continue
        flags = set(re.findall(r"--[a-z-]+", usage))
        known = {option for action in parsers[name]._actions for option in action.option_strings}
        assert flags <= known, f"{name}: {flags - known} not accepted by `pg-tenant-proxy {name}`"
        long_options = {option for option in known if option.startswith("--")} - {"--help"}
        assert long_options <= flags, f"{name}: {long_options - flags} missing from the README's Commands table"


def test_every_docs_page_is_linked_and_every_link_resolves() -> None:
    links = set(re.findall(r"\]\(([^)#]+)\)", README))
    pages = {str(path.relative_to(REPO)) for path in (REPO / "docs").glob("*.md")}
    assert pages <= links, f"not linked from the README: {pages - links}"
    for link in links - WRITTEN_ELSEWHERE:
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"


def test_readme_is_short() -> None:
    assert len(README.splitlines()) < 250
