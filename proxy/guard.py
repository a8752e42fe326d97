"""The SQL guard: classify client SQL with the real Postgres parser (pglast) and decide what happens.

Every simple Query and every Parse is checked. A statement that writes a protected setting, changes
the session's role or identity, alters roles, databases or the system, loads a library, or (unless
allowed) runs a DO block is refused with SQLSTATE 42501. RESET ALL and DISCARD ALL are allowed and
make the proxy re-assert the tenant context afterwards.

Under transaction pooling a server connection passes between clients after every transaction, so the
session features that would outlive it are refused too (LISTEN, cursors WITH HOLD, SQL-level
PREPARE / EXECUTE / DEALLOCATE, session advisory locks, temporary objects that outlive the
transaction), and statements that change session settings are flagged so the proxy can carry the
client's settings to its next server connection.

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
_WORDS = tuple((word, re.compile(rf"\b{word}\b")) for word in ("reset", "alter", "load", "do", "discard", "function", "procedure"))
_SET_WORD = re.compile(r"\bset\b")
_STARTS_WITH_SET = re.compile(r"\s*set\b")
# Words that can only appear in text holding a session feature refused under transaction pooling.
_SESSION_WORDS = tuple(
    (word, re.compile(rf"\b{word}\b"))
    for word in ("listen", "hold", "prepare", "execute", "deallocate", "temp", "temporary")
)
# Words of statements that refuse to run inside a transaction block, or drop prepared statements.
_BLOCK_WORDS = tuple(
    (word, re.compile(rf"\b{word}\b"))
    for word in ("vacuum", "concurrently", "database", "tablespace", "cluster", "prepared", "subscription", "system")
)
_SESSION_ADVISORY_LOCKS = {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
_CURSOR_OPT_HOLD = 0x0020
_SESSION_MODE_HINT = "; use a pool in session mode ([pool] mode = \"session\") for session features"


def needs_parse(sql: str, transaction_mode: bool = False) -> bool:
    """False when the text cannot contain a statement the guard refuses, re-asserts after, or (under
    transaction pooling) a session feature or a change of session settings."""
    text = sql.lower()
    if "set_config" in text or "u&" in text:
        return True
    for word, pattern in _WORDS:
        if word in text and pattern.search(text):
            return True
    if transaction_mode:
        for word, pattern in _BLOCK_WORDS:
            if word in text and pattern.search(text):
                return True
        if "advisory" in text:
            return True
        for word, pattern in _SESSION_WORDS:
            if word in text and pattern.search(text):
                return True
    if "set" not in text or _SET_WORD.search(text) is None:
        return False
    return bool(_STARTS_WITH_SET.match(text)) or ";" in text or "/*" in text or "--" in text


@dataclass(frozen=True)
class Refusal:
    """Why a statement is refused: the SQLSTATE, the message and a hint saying what to do."""

    sqlstate: str
    message: str
    hint: str


REFUSAL_HINT = "pg-tenant-proxy's SQL guard refuses statements that could change the tenant context or the session's identity"


@dataclass(frozen=True)
class Decision:
    """What to do with one Query or Parse: refuse it, or what it may do to session state (settings
    written at session level, SQL-level prepared statements dropped, whether it can run inside a
    transaction block)."""

    refusal: Refusal | None = None
    resets_all: bool = False
    reset_names: frozenset[str] = frozenset()
    set_names: frozenset[str] = frozenset()
    unknown_settings: bool = False
    deallocates: frozenset[str] = frozenset()
    drops_statements: bool = False
    statement_count: int = 1
    no_transaction_block: bool = False


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

    def __init__(self, protected: ProtectedSettings, allow_do: bool, transaction_mode: bool = False) -> None:
        self.protected = protected
        self.allow_do = allow_do
        self.transaction_mode = transaction_mode
        self._cache: dict[str, Decision] = {}

    def check(self, sql: str) -> Decision:
        """The decision for a Query's or Parse's SQL text (cached)."""
        if not needs_parse(sql, self.transaction_mode):
            return ALLOW
        decision = self._cache.get(sql)
        if decision is None:
            decision = self._decide(sql)
            if len(sql) <= CACHEABLE_LENGTH:
                if len(self._cache) >= CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]
                self._cache[sql] = decision
        return decision

    def function_call(self, oid: int) -> Refusal | None:
        """A FunctionCall message ('F') of the function with this OID: refused."""
        return Refusal("42501", "the FunctionCall protocol message is not allowed through pg-tenant-proxy",
                       "call the function from SQL (SELECT f(...)) instead")

    def _decide(self, sql: str) -> Decision:
        try:
            tree = json.loads(parser.parse_sql_json(sql))
        except Exception:  # pglast raises ParseError, and other errors on text it cannot handle
            return ALLOW
        resets_all = unknown = drops_statements = False
        set_names: set[str] = set()
        reset_names: set[str] = set()
        deallocates: set[str] = set()
        statements = tree.get("stmts", [])
        for kind, node in _nodes(tree):
            refusal: str | None = None
            if kind == "VariableSetStmt":
                refusal = self._variable_set(node)
                name = str(node.get("name", "")).lower()
                if node.get("kind") == "VAR_RESET_ALL":
                    resets_all = True
                elif not node.get("is_local"):
                    (reset_names if node.get("kind") in ("VAR_RESET", "VAR_SET_DEFAULT") else set_names).add(name)
            elif kind == "DiscardStmt":
                if node.get("target") == "DISCARD_ALL":
                    resets_all = drops_statements = True
            elif kind == "DeallocateStmt":
                if node.get("name"):
                    deallocates.add(node["name"])
                else:
                    drops_statements = True
            elif kind == "FuncCall":
                refusal = self._func_call(node)
                if _function_name(node) == "set_config":
                    arguments = node.get("args") or []
                    setting = _string_constant(arguments[0]) if arguments else None
                    if len(arguments) == 3 and _is_true(arguments[2]):
                        pass  # set_config(..., true): for the transaction only
                    elif setting is None:
                        unknown = True
                    else:
                        set_names.add(setting.lower())
            elif kind in _REFUSED_STATEMENTS:
                refusal = f"{_REFUSED_STATEMENTS[kind]} is not allowed through pg-tenant-proxy"
            elif kind == "DoStmt" and not self.allow_do:
                refusal = "DO blocks are not allowed through pg-tenant-proxy (the proxy's [guard] allow_do is off)"
            if refusal is None and self.transaction_mode:
                refusal = _session_feature(kind, node)
            if refusal is not None:
                return Decision(refusal=Refusal("42501", refusal, REFUSAL_HINT))
        no_block = len(statements) == 1 and _no_transaction_block(statements[0].get("stmt", {}))
        if resets_all or unknown or set_names or reset_names or deallocates or drops_statements or no_block:
            return Decision(
                resets_all=resets_all, reset_names=frozenset(reset_names), set_names=frozenset(set_names),
                unknown_settings=unknown, deallocates=frozenset(deallocates), drops_statements=drops_statements,
                statement_count=len(statements), no_transaction_block=no_block,
            )
        return ALLOW

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
        if _function_name(node) != "set_config":
            return None
        arguments = node.get("args") or []
        setting = _string_constant(arguments[0]) if arguments else None
        if setting is not None and (setting in self.protected or setting.lower() in _IDENTITY_SETTINGS):
            return f'set_config() of "{setting}" is refused: the setting is protected, the proxy sets it from your token'
        return None


def _is_true(node: Any) -> bool:
    """A literal true (true, 't', 'true', 'on', ...) as set_config's is_local argument."""
    if isinstance(node, dict) and "TypeCast" in node:
        return _is_true(node["TypeCast"].get("arg"))
    constant = node.get("A_Const") if isinstance(node, dict) else None
    if isinstance(constant, dict) and isinstance(constant.get("boolval"), dict):
        return bool(constant["boolval"].get("boolval"))
    text = _string_constant(node)
    return text is not None and text.strip().lower() in ("t", "tr", "tru", "true", "y", "ye", "yes", "on", "1")


def _function_name(node: dict[str, Any]) -> str | None:
    """The name of a called function when it is unqualified or in pg_catalog, else None."""
    names = [part.get("String", {}).get("sval") for part in node.get("funcname", []) if isinstance(part, dict)]
    if not names or names[:-1] not in ([], ["pg_catalog"]):
        return None
    return names[-1]


def _no_transaction_block(stmt: dict[str, Any]) -> bool:
    """A statement Postgres refuses inside a transaction block (PreventInTransactionBlock)."""
    if not stmt:
        return False
    kind, node = next(iter(stmt.items()))
    if kind in ("VacuumStmt", "CreatedbStmt", "DropdbStmt", "CreateTableSpaceStmt", "DropTableSpaceStmt",
                "AlterSystemStmt", "CreateSubscriptionStmt", "DropSubscriptionStmt"):
        return True
    if kind == "IndexStmt" or kind == "ReindexStmt":
        return bool(node.get("concurrent")) or any(
            isinstance(p, dict) and p.get("DefElem", {}).get("defname") == "concurrently" for p in node.get("params", [])
        )
    if kind == "DropStmt":
        return bool(node.get("concurrent"))
    if kind == "DiscardStmt":
        return node.get("target") == "DISCARD_ALL"
    if kind == "ClusterStmt":
        return not node.get("relation")
    if kind == "TransactionStmt":
        return node.get("kind") in ("TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED")
    return False


def _is_temporary(relation: Any) -> bool:
    return isinstance(relation, dict) and relation.get("relpersistence") == "t"


def _session_feature(kind: str, node: dict[str, Any]) -> str | None:
    """Why a statement cannot work under transaction pooling, or None."""
    feature: str | None = None
    if kind == "ListenStmt":
        feature = "LISTEN"
    elif kind == "DeclareCursorStmt" and int(node.get("options", 0)) & _CURSOR_OPT_HOLD:
        feature = "DECLARE ... WITH HOLD"
    elif kind in ("PrepareStmt", "ExecuteStmt"):
        feature = "SQL-level " + {"PrepareStmt": "PREPARE", "ExecuteStmt": "EXECUTE"}[kind]
    elif kind == "FuncCall" and _function_name(node) in _SESSION_ADVISORY_LOCKS:
        feature = f"{_function_name(node)}() (a session advisory lock; pg_advisory_xact_lock() works)"
    elif kind == "CreateStmt" and _is_temporary(node.get("relation")) and node.get("oncommit") != "ONCOMMIT_DROP":
        feature = "CREATE TEMP TABLE without ON COMMIT DROP"
    elif kind == "CreateTableAsStmt" and _is_temporary(node.get("into", {}).get("rel")) and node["into"].get("onCommit") != "ONCOMMIT_DROP":
        feature = "CREATE TEMP TABLE ... AS without ON COMMIT DROP"
    elif kind == "SelectStmt" and _is_temporary((node.get("intoClause") or {}).get("rel")):
        feature = "SELECT ... INTO TEMP"
    elif kind == "ViewStmt" and _is_temporary(node.get("view")):
        feature = "CREATE TEMP VIEW"
    elif kind == "CreateSeqStmt" and _is_temporary(node.get("sequence")):
        feature = "CREATE TEMP SEQUENCE"
    if feature is None:
        return None
    return f"{feature} is not available with transaction pooling: the server connection is shared after each transaction" + _SESSION_MODE_HINT
