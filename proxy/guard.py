"""The SQL guard: classify client SQL with the real Postgres parser (pglast) and decide what happens.

Every simple Query and every Parse is checked. A statement that writes a protected setting, changes
the session's role or identity, alters roles, databases or the system, loads a library, or (unless
allowed) runs a DO block is refused with SQLSTATE 42501. RESET ALL and DISCARD ALL are allowed and
make the proxy re-assert the tenant context afterwards.

The guard is defense in depth, not the boundary: dynamic SQL gets past any parser, and SQL that
pglast cannot parse is passed on so the server reports the error. The signed context is the boundary.
Most statements never reach the parser: a pre-scan (two regular expressions) lets through text that
cannot hold a refused statement, and parsed decisions are cached by statement text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pglast import parser

from proxy.parameters import ProtectedSettings

CACHE_SIZE = 4096
CACHEABLE_LENGTH = 16_384

_REFUSED_STATEMENTS = {
    "AlterRoleStmt": "ALTER ROLE",
    "AlterRoleSetStmt": "ALTER ROLE ... SET",
    "AlterDatabaseStmt": "ALTER DATABASE",
    "AlterDatabaseSetStmt": "ALTER DATABASE ... SET",
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE",
    "AlterSystemStmt": "ALTER SYSTEM",
    "LoadStmt": "LOAD",
}
_IDENTITY_SETTINGS = {"role": "SET ROLE / RESET ROLE", "session_authorization": "SET SESSION AUTHORIZATION"}

# Words that can only appear in text the guard must parse. Besides these, SET matters only where it can
# start a statement (at the start, or after ';' or a comment); elsewhere it is UPDATE ... SET, ALTER ...
# SET or CREATE FUNCTION ... SET, which the words above already send to the parser. "u&" catches
# identifiers spelled with Unicode escapes. Substring tests run first: they are much cheaper than regexes.
_WORDS = {word: re.compile(rf"\b{word}\b") for word in ("reset", "alter", "load", "do", "discard", "function", "procedure")}
_SET_WORD = re.compile(r"\bset\b")
_STARTS_WITH_SET = re.compile(r"\s*set\b")


def needs_parse(sql: str) -> bool:
    """False when the text cannot contain a statement the guard refuses or re-asserts after."""
    text = sql.lower()
    if "set_config" in text or "u&" in text:
        return True
    for word, pattern in _WORDS.items():
        if word in text and pattern.search(text):
            return True
    if "set" not in text or _SET_WORD.search(text) is None:
        return False
    return bool(_STARTS_WITH_SET.match(text)) or ";" in text or "/*" in text or "--" in text


@dataclass(frozen=True)
class Decision:
    """What to do with one Query or Parse: refuse it (with a reason), and/or re-assert the context."""

    refusal: str | None = None
    reassert: bool = False


ALLOW = Decision()


def _nodes(tree: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (node type, node) pair in a pglast JSON parse tree, depth first."""
    stack = [tree]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if isinstance(value, dict) and key[:1].isupper():
                    yield key, value
                if isinstance(value, (dict, list)):
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _string_constant(node: Any) -> str | None:
    """The text of a string literal argument, looking through casts ('app.x'::text)."""
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        return _string_constant(node["TypeCast"].get("arg"))
    constant = node.get("A_Const")
    if isinstance(constant, dict) and isinstance(constant.get("sval"), dict):
        value = constant["sval"].get("sval")
        return value if isinstance(value, str) else None
    return None


class Guard:
    """Decides on client SQL; one instance per proxy process, with a bounded decision cache."""

    def __init__(self, protected: ProtectedSettings, allow_do: bool) -> None:
        self.protected = protected
        self.allow_do = allow_do
        self._cache: dict[str, Decision] = {}

    def check(self, sql: str) -> Decision:
        """The decision for a Query's or Parse's SQL text (cached)."""
        if not needs_parse(sql):
            return ALLOW
        decision = self._cache.get(sql)
        if decision is None:
            decision = self._decide(sql)
            if len(sql) <= CACHEABLE_LENGTH:
                if len(self._cache) >= CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]
                self._cache[sql] = decision
        return decision

    def _decide(self, sql: str) -> Decision:
        try:
            tree = json.loads(parser.parse_sql_json(sql))
        except Exception:  # pglast raises ParseError, and other errors on text it cannot handle
            return ALLOW
        reassert = False
        for kind, node in _nodes(tree):
            refusal: str | None = None
            if kind == "VariableSetStmt":
                refusal = self._variable_set(node)
                reassert = reassert or node.get("kind") == "VAR_RESET_ALL"
            elif kind == "DiscardStmt":
                reassert = reassert or node.get("target") == "DISCARD_ALL"
            elif kind == "FuncCall":
                refusal = self._func_call(node)
            elif kind in _REFUSED_STATEMENTS:
                refusal = f"{_REFUSED_STATEMENTS[kind]} is not allowed through pg-tenant-proxy"
            elif kind == "DoStmt" and not self.allow_do:
                refusal = "DO blocks are not allowed through pg-tenant-proxy (the proxy's [guard] allow_do is off)"
            if refusal is not None:
                return Decision(refusal=refusal)
        return Decision(reassert=True) if reassert else ALLOW

    def _variable_set(self, node: dict[str, Any]) -> str | None:
        name = node.get("name")
        if not isinstance(name, str):
            return None
        if name.lower() in _IDENTITY_SETTINGS:
            return f"{_IDENTITY_SETTINGS[name.lower()]} is not allowed through pg-tenant-proxy: the session's role is fixed"
        if name in self.protected:
            return f'setting "{name}" is protected: the proxy sets it from your token'
        return None

    def _func_call(self, node: dict[str, Any]) -> str | None:
        names = [part.get("String", {}).get("sval") for part in node.get("funcname", []) if isinstance(part, dict)]
        if not names or names[-1] != "set_config" or names[:-1] not in ([], ["pg_catalog"]):
            return None
        arguments = node.get("args") or []
        setting = _string_constant(arguments[0]) if arguments else None
        if setting is not None and (setting in self.protected or setting.lower() in _IDENTITY_SETTINGS):
            return f'set_config() of "{setting}" is refused: the setting is protected, the proxy sets it from your token'
        return None
