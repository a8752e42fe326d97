"""The SQL guard: read client SQL with Postgres's own parser (pglast) and decide what happens to it.

Every simple Query and every Parse is checked, and so is every FunctionCall message (`function_call`).
The answer is a `Decision`: a `Refusal` (SQLSTATE, message, hint) for a statement the proxy will not
forward, else what the text does to the session that the relay must track (settings written at session
level, prepared statements dropped, statements that refuse a transaction block).

Refused by default (docs/guard.md lists each with its switch):
- writes of the protected settings, SET ROLE / SET SESSION AUTHORIZATION, ALTER ROLE / DATABASE /
  SYSTEM, LOAD, DO blocks, and writes to pg_settings (42501);
- settings that change how the server lexes SQL, which the guard does not model (0A000, `proxy.lexing`);
- what carries other tenants' data past row-level security or blocks every tenant: EXPLAIN with row
  counts or estimates, LOCK TABLE stronger than ROW EXCLUSIVE, TRUNCATE, LISTEN / NOTIFY /
  pg_notify(), large-object functions, pg_cancel_backend() / pg_terminate_backend() (42501);
- under transaction pooling, session features that would outlive the server connection (0A000).

It fails closed: text it cannot read with certainty is refused, never allowed: a parser error (42601,
Postgres's own message), nesting too deep to walk (54001), text longer than `max_parse_bytes` (54000),
anything unexpected (XX000). The guard is defense in depth, not the boundary: dynamic SQL gets past any
parser, and the signed context is the boundary. Most statements never reach the parser: a pre-scan
(first words and substrings) clears text that cannot hold anything the guard acts on. Of a parsed text,
only the subtrees that hold a node the guard acts on are decoded from pglast's JSON, and decisions are
cached by statement text.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import string
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pglast import parser

from proxy import lexing
from proxy.parameters import ProtectedSettings
from proxy.protocol import errors

if TYPE_CHECKING:
    from proxy.config import GuardSettings

log = logging.getLogger("pg_tenant_proxy")

CACHE_SIZE = 4096
CACHEABLE_LENGTH = 16_384
DEFAULT_MAX_PARSE_BYTES = 16_384
# Nesting levels of pglast's JSON tree the guard reads; json.loads recurses once per level, each level
# takes about 160 bytes of C stack, so this stays far below a thread's 8 MiB stack.
JSON_DEPTH = 12_000
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Refusal:
    """Why a statement or message is not forwarded: the ErrorResponse's SQLSTATE, message and hint."""

    sqlstate: str
    message: str
    hint: str


@dataclass(frozen=True)
class Decision:
    """What the relay does with one Query's or Parse's text (docs/guard.md, "Decision").

    Refused when `refusal` is set; then the other fields are left at their defaults. Otherwise the fields
    say what the text does to the session: settings written at session level (not SET LOCAL, not
    set_config(..., true)), prepared statements dropped by SQL, the number of statements, and whether it
    is one statement that Postgres refuses inside a transaction block. Setting names are lower case;
    prepared-statement names are as Postgres folds identifiers. Text the pre-scan clears gets `ALLOW`."""

    refusal: Refusal | None = None
    resets_all: bool = False
    reset_names: frozenset[str] = frozenset()
    set_names: frozenset[str] = frozenset()
    unknown_settings: bool = False
    deallocates: frozenset[str] = frozenset()
    drops_statements: bool = False
    statement_count: int = 1
    no_transaction_block: bool = False
    statement_after_reset: bool = False  # a statement follows a RESET (ALL) or DISCARD ALL in the same text
    # Every statement begins a transaction or sets its characteristics (BEGIN, START TRANSACTION, SET
    # TRANSACTION, SET transaction_isolation, ...): Postgres refuses an isolation level, DEFERRABLE or a
    # snapshot once the transaction has run a query, so the transaction's context goes after it.
    transaction_setup: bool = False
    # Every statement is one Postgres runs without taking a snapshot and that reads no rows: the
    # transaction setup above, SET [LOCAL] of a value and LOCK TABLE ("Transaction control, LOCK, and SET
    # must *not* set a snapshot", PlannedStmtRequiresSnapshot). The context, a query, would take the
    # transaction's snapshot in front of them: an isolation level set after them fails (25001), and a
    # REPEATABLE READ transaction's snapshot would predate the lock it waited for. So it goes after them.
    takes_no_snapshot: bool = False
    # Transaction mode: refused when the text runs as the first statement of a transaction (the relay
    # knows; the guard does not), because its first statement that does more than begin the transaction
    # reads what the session's earlier transactions left (lastval(), currval()).
    refusal_at_transaction_start: Refusal | None = None


ALLOW = Decision()

# -- the pre-scan ------------------------------------------------------------------------------------

# Substrings that matter wherever they appear: functions the guard refuses or reads, the pg_settings
# view, identifiers and strings with Unicode escapes ("u&"); under transaction pooling also session
# advisory locks and the sequence functions that read the session's earlier transactions. Substring
# tests are the cheapest check, so they run first.
_ANYWHERE = ("set_config", "u&", "pg_notify", "pg_settings", "_backend")
_SESSION_ANYWHERE = (*_ANYWHERE, "advisory", "lastval", "currval")
# Words that matter wherever they appear: the large-object functions, and under transaction pooling
# TEMP / TEMPORARY (SELECT ... INTO TEMP).
_LARGE_OBJECT_WORDS = frozenset({
    "lo_close", "lo_creat", "lo_create", "lo_export", "lo_from_bytea", "lo_get", "lo_import", "lo_lseek",
    "lo_lseek64", "lo_open", "lo_put", "lo_tell", "lo_tell64", "lo_truncate", "lo_truncate64", "lo_unlink",
    "loread", "lowrite",
})
# The first word of every other statement the guard refuses or reports (COMMIT and ROLLBACK only as
# COMMIT PREPARED / ROLLBACK PREPARED, found by the word "prepared").
_FIRST_WORDS = frozenset({
    "set", "reset", "do", "alter", "load", "discard", "deallocate", "explain", "lock", "truncate", "listen",
    "notify", "vacuum", "cluster", "reindex", "create", "drop",
})
# Under transaction pooling also the session features, and the statements that begin a transaction or
# set its characteristics (Decision.transaction_setup).
_SESSION_FIRST_WORDS = _FIRST_WORDS | {"prepare", "execute", "declare", "begin", "start"}
# The words searched for, by (transaction mode, text of several statements or with comments).
_SEARCHED_WORDS = {
    (False, False): _LARGE_OBJECT_WORDS,
    (True, False): _LARGE_OBJECT_WORDS | {"temp", "temporary"},
    (False, True): _LARGE_OBJECT_WORDS | _FIRST_WORDS | {"prepared"},
    (True, True): _LARGE_OBJECT_WORDS | {"temp", "temporary"} | _SESSION_FIRST_WORDS | {"prepared"},
}
# Words as Postgres's lexer splits them: letters, digits, '_', '$' and every character above 0x7F.
_SEPARATORS = str.maketrans({char: " " for char in string.punctuation + string.whitespace if char not in "_$"})
_FIRST_WORD = re.compile(r"[\s(]*([a-z0-9_$]*)")
_TRAILING = ";" + string.whitespace  # empty statements after the last one
# The first words of most statements, tested before the first word is cut out (a regular expression):
# no word in _SESSION_FIRST_WORDS, nor COMMIT or ROLLBACK, begins with any of them.
_COMMON_FIRST = ("select", "insert", "update", "delete", "with", "values")


def needs_parse(sql: str, transaction_mode: bool = False, lowered: str | None = None) -> bool:
    """False when the text cannot contain anything the guard refuses or reports in a Decision (in
    transaction mode, also a session feature); True means the guard must parse it. `lowered` is
    `sql.lower()` when the caller has it already.

    Text without ';' (but at its end, as pgbench and many drivers send) and comments is one statement:
    its first word says what kind it is, so a long INSERT ... ON CONFLICT DO UPDATE SET is cleared by its
    first word. Other text needs parsing when any of those words appears in it as a word. Costs about
    10 ms per MB at worst (splitting into words)."""
    text = (sql.lower() if lowered is None else lowered).rstrip(_TRAILING)
    for substring in _SESSION_ANYWHERE if transaction_mode else _ANYWHERE:  # a loop: no generator per statement
        if substring in text:
            return True
    several = ";" in text or "/*" in text or "--" in text
    if several or "lo" in text or (transaction_mode and "temp" in text):
        if transaction_mode and "pg_temp" in text:  # maybe a relation created in the temporary schema by name
            return True
        if not _SEARCHED_WORDS[transaction_mode, several].isdisjoint(text.translate(_SEPARATORS).split()):
            return True
        if several:
            return False
    if text.startswith(_COMMON_FIRST):  # no first word the guard looks at begins like these
        return False
    first = _FIRST_WORD.match(text)
    word = first.group(1) if first else ""
    if word in ("commit", "rollback"):
        return "prepared" in text
    return word in (_SESSION_FIRST_WORDS if transaction_mode else _FIRST_WORDS) or (not word and bool(text.strip()))


# -- reading pglast's JSON tree ----------------------------------------------------------------------

def parse_json(sql: str) -> str:
    """pglast's parse tree of `sql` as JSON text: {"version": N, "stmts": [{"stmt": {NodeType: {...}}, ...}]}.
    Raises pglast.parser.ParseError for text Postgres's grammar rejects (also "stack depth limit exceeded")."""
    return parser.parse_sql_json(sql)


def decode_node(text: str, start: int) -> tuple[dict[str, Any], int]:
    """The JSON object that begins at `start` in `text`, and the offset just past it. Raises
    RecursionError for an object nested more than JSON_DEPTH levels."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, JSON_DEPTH))
    try:
        node, end = _DECODER.raw_decode(text, start)
    finally:
        sys.setrecursionlimit(limit)
    if not isinstance(node, dict):
        raise ValueError("a parse tree node is not a JSON object")
    return node, end


def _nodes(tree: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (node type, node) pair in a pglast JSON parse tree, depth first, without recursion."""
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


def _only_node(wrapper: Any) -> tuple[str, dict[str, Any]]:
    """The (type, node) of a one-key node wrapper such as {"VariableSetStmt": {...}}, or ("", {})."""
    if isinstance(wrapper, dict) and len(wrapper) == 1:
        kind, node = next(iter(wrapper.items()))
        if isinstance(node, dict):
            return kind, node
    return "", {}


# Function-style casts: a call of a type's name with one argument is a cast to that type when no function
# takes the argument (text('app.current_tenant') is 'app.current_tenant'::text).
_CAST_FUNCTIONS = frozenset({"text", "varchar", "bpchar", "name", "char"})
_CALL_KEYS = frozenset({"funcname", "args", "funcformat", "location"})  # a plain call: no DISTINCT, ORDER BY, OVER ...


def _wrapped(kind: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, Any] | None:
    """For a node around one value that keeps a constant a constant, (the type it casts to or None, the
    value's node): a cast (which `_cast` computes), a function-style cast, and a COLLATE clause, which
    leaves the value as it is ('app.current_tenant' COLLATE "C" names that setting). None for any other."""
    if kind == "TypeCast":
        return body.get("typeName") or {}, body.get("arg")
    if kind == "CollateClause":
        return None, body.get("arg")
    if kind == "FuncCall" and body.keys() <= _CALL_KEYS and len(body.get("args") or ()) == 1:
        names = body.get("funcname") or []
        if _only_node(names[-1])[1].get("sval") in _CAST_FUNCTIONS:
            return {"names": names}, body["args"][0]
    return None


def _literal(node: Any) -> str | None:
    """The text of a constant (string, number, boolean) as the server computes it through its casts, for
    the casts `_cast` models ('x'::text is not one: see there); None for anything computed, NULL, or cast to
    another type. pglast leaves out zero and false values: {"ival": {}} is 0."""
    casts: list[dict[str, Any]] = []
    kind, body = _only_node(node)
    while (wrapped := _wrapped(kind, body)) is not None:
        if wrapped[0] is not None:
            casts.append(wrapped[0])
        kind, body = _only_node(wrapped[1])
    value = _constant(kind, body)
    for type_name in reversed(casts):
        value = _cast(value, type_name)
    return value


def _written(node: Any) -> str | None:
    """The constant a value is written as, under any casts and COLLATE clauses ('x'::text and text('x') are
    'x'); None when it is computed."""
    kind, body = _only_node(node)
    while (wrapped := _wrapped(kind, body)) is not None:
        kind, body = _only_node(wrapped[1])
    return _constant(kind, body)


def _constant(kind: str, body: dict[str, Any]) -> str | None:
    if kind == "A_Const":
        kind, body = next(((key, value) for key, value in body.items() if isinstance(value, dict)), ("", {}))
        kind = {"sval": "String", "ival": "Integer", "fval": "Float", "boolval": "Boolean", "bsval": "BitString"}.get(kind, "")
    value = {"String": "sval", "Integer": "ival", "Float": "fval", "Boolean": "boolval", "BitString": "bsval"}.get(kind)
    if value is None:
        return None
    default = {"ival": 0, "boolval": False}.get(value, "")
    constant = body.get(value, default)
    return str(constant).lower() if isinstance(constant, bool) else str(constant)


def _cast(value: str | None, type_name: dict[str, Any]) -> str | None:
    """The text a constant becomes through one cast, as Postgres 15 computes it, for the string and boolean
    types of pg_catalog: varchar(n) and char(n) cut it to n characters, char(n) drops trailing spaces on its
    way to text, name cuts it to 63 bytes ('role '::char(5) is the setting role). None for every other type,
    and for a type named without its schema (`text`, `name`, `"char"`): the session's temporary schema is
    searched for types before pg_catalog, so `'rolex'::text` is 'role' after CREATE DOMAIN pg_temp.text AS
    varchar(4)."""
    names = [_only_node(part)[1].get("sval") for part in type_name.get("names", [])]
    if value is None or len(names) != 2 or names[0] != "pg_catalog" or type_name.get("arrayBounds"):
        return None
    modifiers = [_literal(modifier) for modifier in type_name.get("typmods", [])]
    length = int(modifiers[0]) if len(modifiers) == 1 and modifiers[0] is not None and modifiers[0].isdigit() else None
    if modifiers and length is None:
        return None
    if names[1] == "text":
        return value
    if names[1] == "varchar":
        return value[:length] if length is not None else value
    if names[1] == "bpchar":
        return (value[:length] if length is not None else value).rstrip(" ")
    if names[1] == "name":
        return value.encode(errors="surrogatepass")[:63].decode(errors="ignore")
    if names[1] == "bool":
        meaning = lexing.parse_bool(value)
        return None if meaning is None else str(meaning).lower()
    return None


def _function_name(node: dict[str, Any]) -> str | None:
    """The name of a called function when it is unqualified or in pg_catalog, else None. Postgres takes
    a third part in front, the database, when it names the current one (`app.pg_catalog.lastval()`);
    any name there counts, the server refusing the others."""
    names = [part.get("String", {}).get("sval") for part in node.get("funcname", []) if isinstance(part, dict)]
    if not names or names[-2:-1] not in ([], ["pg_catalog"]) or len(names) > 3:
        return None
    return names[-1]


def _option_on(options: Any, name: str, default: bool) -> bool:
    """Whether a DefElem option (EXPLAIN, REINDEX) is on; an option without a value is on, a value that
    is not a clear boolean counts as on; of an option given more than once, the last counts."""
    on = default
    for option in options or []:  # the last of repeated options counts, as in Postgres (EXPLAIN (ANALYZE false, ANALYZE))
        _, element = _only_node(option)
        if element.get("defname", "").lower() == name:
            value = _literal(element["arg"]) if element.get("arg") is not None else "true"
            on = lexing.parse_bool(value) is not False if value is not None else True
    return on


# -- refusals ----------------------------------------------------------------------------------------

_BY_PROXY = "through pg-tenant-proxy"
_ADMIN_HINT = "make this change over a direct administrator connection to Postgres, not through the proxy"
_PROTECTED_HINT = "the proxy sets this setting from your token; keep your own values under another name"
_ROLE_HINT = "the session's role is the proxy's upstream role; ask the database owner to grant it what you need"
_SESSION_MODE_HINT = 'use a pool in session mode ([pool] mode = "session") for session features'
_PARSE_HINT = (
    "pg-tenant-proxy's SQL guard reads every statement with Postgres's own parser before forwarding it, and "
    "refuses what it cannot parse: correct the statement"
)
TOO_COMPLEX = Refusal(
    errors.STATEMENT_TOO_COMPLEX,
    "statement is nested too deeply for pg-tenant-proxy's SQL guard to read",
    "split the expression or the statement; the guard reads a few thousand levels of nesting",
)

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
# `seed` seeds random() for the whole backend (`RESET seed` seeds it with 0), and neither RESET ALL nor
# DISCARD ALL touches it: the next client of the server connection, of any tenant, would draw the
# sequence the writer chose. The hardening SQL revokes setseed() for the same reason; the setting
# cannot be revoked.
_SEED_SETTING = "seed"
_LEXING_SETTINGS = ("standard_conforming_strings", "client_encoding")
_LOCK_MODES = {
    1: "ACCESS SHARE", 2: "ROW SHARE", 3: "ROW EXCLUSIVE", 4: "SHARE UPDATE EXCLUSIVE",
    5: "SHARE", 6: "SHARE ROW EXCLUSIVE", 7: "EXCLUSIVE", 8: "ACCESS EXCLUSIVE",
}
_ROW_EXCLUSIVE = 3
# UNLISTEN only drops the session's own registrations (asyncpg's pool reset sends UNLISTEN *): allowed.
_NOTIFICATION_STATEMENTS = {"ListenStmt": "LISTEN", "NotifyStmt": "NOTIFY"}
LARGE_OBJECT_FUNCTIONS = _LARGE_OBJECT_WORDS
SIGNAL_FUNCTIONS = frozenset({"pg_cancel_backend", "pg_terminate_backend"})
# The node types `Guard._node` acts on. The guard finds them in pglast's JSON text and decodes only those
# subtrees: FuncCall only for the functions it reads, INSERT / UPDATE / DELETE / MERGE only when the text
# names pg_settings, the temporary-object statements only when it holds a temporary relation.
_WALKED_KINDS = frozenset({
    "VariableSetStmt", "FuncCall", "DoStmt", *_REFUSED_STATEMENTS, *_NOTIFICATION_STATEMENTS,
    "UpdateStmt", "InsertStmt", "DeleteStmt", "MergeStmt", "ExplainStmt", "LockStmt", "TruncateStmt",
    "DefineStmt", "RenameStmt", "AlterOwnerStmt", "ViewStmt",
})
# Statements that create a named object other than a relation, with the field holding its qualified name
# (a list of String nodes): created in pg_temp by name, the object lives in the session's temporary schema.
_TEMPORARY_NAMED = {
    "CreateFunctionStmt": "funcname", "DefineStmt": "defnames", "CreateDomainStmt": "domainname",
    "CreateEnumStmt": "typeName", "CreateRangeStmt": "typeName", "CreateConversionStmt": "conversion_name",
    "CreateStatsStmt": "defnames", "CreateOpClassStmt": "opclassname", "CreateOpFamilyStmt": "opfamilyname",
}
_SESSION_WALKED_KINDS = _WALKED_KINDS | {
    "CreateStmt", "ViewStmt", "CreateSeqStmt", "CreateTableAsStmt", "SelectStmt", "DeclareCursorStmt",
    "PrepareStmt", "ExecuteStmt", "CompositeTypeStmt", *_TEMPORARY_NAMED,
}
_WRITES = ("UpdateStmt", "InsertStmt", "DeleteStmt", "MergeStmt")
# Walked only for a text that names a temporary relation or pg_temp (DefineStmt is walked for every text).
_TEMPORARY = frozenset({"CreateStmt", "ViewStmt", "CreateSeqStmt", "CreateTableAsStmt", "SelectStmt", "CompositeTypeStmt",
                        *_TEMPORARY_NAMED}) - {"DefineStmt"}
_READ_FUNCTIONS = r"set_config|pg_notify|lo_\w*|loread|lowrite|pg_cancel_backend|pg_terminate_backend"
_SESSION_FUNCTIONS = r"|pg_advisory\w*|pg_try_advisory\w*|lastval|currval"
# A top-level statement: the only JSON key "stmt" is RawStmt's.
_STATEMENT = re.compile(r'\{"stmt":\{"(\w+)":(?=\{)')
# A string constant shaped like a custom (placeholder) setting name, "prefix.name", in pglast's JSON.
_DOTTED_CONSTANT = re.compile(r'"sval":"([A-Za-z_][\w$]*(?:\.[A-Za-z_][\w$]*)+)"')


@lru_cache(maxsize=8)
def _occurrences(transaction_mode: bool, writes: bool, temporary: bool) -> re.Pattern[str]:
    """A regex over pglast's JSON text whose matches end where a node the guard acts on begins."""
    kinds = set((_SESSION_WALKED_KINDS if transaction_mode else _WALKED_KINDS) - {"FuncCall"})
    kinds -= set(() if writes else _WRITES) | set(() if temporary and transaction_mode else _TEMPORARY)
    if writes:  # a view of pg_settings: updating it runs pg_settings's rules
        kinds.add("ViewStmt")
    functions = _READ_FUNCTIONS + (_SESSION_FUNCTIONS if transaction_mode else "")
    catalog = r'(?:(?:\{"String":\{"sval":"(?:[^"\\]|\\.)*"\}\},)?\{"String":\{"sval":"pg_catalog"\}\},)?'  # [database.]pg_catalog.
    calls = rf'"FuncCall":(?=\{{"funcname":\[{catalog}\{{"String":\{{"sval":"(?:{functions})"\}}\}}\])'
    return re.compile(rf'"(?:{"|".join(sorted(kinds))})":(?=\{{)|{calls}')


# Functions whose value is what earlier transactions of the session did: under transaction pooling those
# ran on whichever server connection they got, and another client of the tenant may have used this one since.
SEQUENCE_STATE_FUNCTIONS = frozenset({"lastval", "currval"})
SEQUENCE_STATE = Refusal(
    errors.FEATURE_NOT_SUPPORTED,
    "lastval() and currval() at the start of a transaction are not available with transaction pooling: they "
    "read what the session's earlier transactions did, which ran on server connections other clients share",
    "read the value in the transaction that calls nextval(): INSERT ... RETURNING id, or call lastval() after "
    "the INSERT in the same transaction block; or use a pool in session mode",
)
_SEQUENCE_STATE_CALL = Decision(refusal_at_transaction_start=SEQUENCE_STATE)
_SESSION_ADVISORY_LOCKS = {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_try_advisory_lock_shared"}
_CURSOR_OPT_HOLD = 0x0020

# Builtin functions by OID (pg_proc on Postgres 15), for FunctionCall messages, which name no function.
SET_CONFIG_OID = 2078
PG_NOTIFY_OID = 3036
SIGNAL_OIDS = {2171: "pg_cancel_backend", 2096: "pg_terminate_backend"}
LARGE_OBJECT_OIDS = {
    953: "lo_close", 957: "lo_creat", 715: "lo_create", 765: "lo_export", 3457: "lo_from_bytea", 3458: "lo_get",
    3459: "lo_get", 764: "lo_import", 767: "lo_import", 956: "lo_lseek", 3170: "lo_lseek64", 952: "lo_open",
    3460: "lo_put", 958: "lo_tell", 3171: "lo_tell64", 1004: "lo_truncate", 3172: "lo_truncate64",
    964: "lo_unlink", 954: "loread", 955: "lowrite",
}
SEQUENCE_STATE_OIDS = {2559: "lastval", 1575: "currval"}
_SWITCHED_OIDS = {PG_NOTIFY_OID: "pg_notify", **LARGE_OBJECT_OIDS, **SIGNAL_OIDS}  # what `Guard._switched_off` reads
SESSION_ADVISORY_LOCK_OIDS = {
    2880: "pg_advisory_lock", 2881: "pg_advisory_lock_shared", 2882: "pg_try_advisory_lock",
    2883: "pg_try_advisory_lock_shared", 2886: "pg_advisory_lock", 2887: "pg_advisory_lock_shared",
    2888: "pg_try_advisory_lock", 2889: "pg_try_advisory_lock_shared",
}


def _refused(what: str, why: str, hint: str, sqlstate: str = errors.INSUFFICIENT_PRIVILEGE) -> Refusal:
    return Refusal(sqlstate, f"{what} is not allowed {_BY_PROXY}: {why}", hint)


_SEED_REFUSAL = _refused(
    'writing the setting "seed"',
    "it seeds random() for the server connection, and the seed outlives the session's reset: the next client, "
    "of any tenant, would draw the sequence it sets",
    "random() needs no seed; for a repeatable sequence, compute it in your application",
)


def _notifications(what: str) -> Refusal:
    return _refused(what, "notification channels are shared by every tenant",
                    "[guard] allow_notifications = true allows notifications (every tenant can then use every channel)")


def _large_objects(what: str) -> Refusal:
    return _refused(what, "large objects are shared by every tenant, row-level security does not apply to them",
                    "keep the data in a bytea column of a table with a tenant policy; "
                    "[guard] allow_large_objects = true allows large objects")


def _signals(what: str) -> Refusal:
    return _refused(what, "every tenant's server connections log in as the same role, so it reaches other tenants",
                    "cancel your own query with a cancel request (psql: Ctrl-C); "
                    "[guard] allow_backend_signals = true allows it")


def _lexing(name: str, value: str | None) -> Refusal | None:
    """The refusal for writing a setting that changes how SQL is lexed, or None."""
    if value is None:
        return Refusal(lexing.SQLSTATE, f"{name} set to a computed value is not allowed {_BY_PROXY}",
                       "set it with a constant value, which the proxy's SQL guard can check")
    problem = lexing.lexing_problem(name, value)
    return Refusal(lexing.SQLSTATE, *problem) if problem is not None else None


def _temporary(relation: Any) -> bool:
    """A RangeVar (pglast's JSON) names a temporary relation: TEMP / TEMPORARY, or created in the session's
    temporary schema by name (`pg_temp.t`, or its real name `pg_temp_N.t`), which Postgres makes temporary
    too ("CREATE TABLE", Postgres documentation)."""
    return isinstance(relation, dict) and (
        relation.get("relpersistence") == "t" or str(relation.get("schemaname", "")).startswith("pg_temp"))


def _in_temporary_schema(names: Any) -> bool:
    """A qualified name (pglast's JSON list of String nodes) names the session's temporary schema,
    `pg_temp` or its real name `pg_temp_N` (the schema is the next to last name: Postgres takes the current
    database's name in front of it)."""
    return isinstance(names, list) and len(names) > 1 and str(_literal(names[-2]) or "").startswith("pg_temp")


def _session_feature(kind: str, node: dict[str, Any]) -> str | None:
    """Which session feature a node is that cannot work under transaction pooling, or None. An object
    created in the temporary schema by name (a function, type, domain, aggregate, operator ...) stays on
    the server connection for the next client, and a type there shadows pg_catalog's for it ("Schemas:
    The Schema Search Path", Postgres documentation)."""
    named = _TEMPORARY_NAMED.get(kind)
    if (named is not None and _in_temporary_schema(node.get(named))) or (
            kind == "CompositeTypeStmt" and _temporary(node.get("typevar"))):
        return "creating an object in the temporary schema (pg_temp)"
    relation = {"CreateStmt": "relation", "ViewStmt": "view", "CreateSeqStmt": "sequence"}.get(kind)
    if relation and _temporary(node.get(relation)):
        if kind != "CreateStmt" or node.get("oncommit") != "ONCOMMIT_DROP":
            return {"CreateStmt": "CREATE TEMP TABLE without ON COMMIT DROP", "ViewStmt": "CREATE TEMP VIEW",
                    "CreateSeqStmt": "CREATE TEMP SEQUENCE"}[kind]
    if kind == "CreateTableAsStmt":
        into = node.get("into") or {}
        if _temporary(into.get("rel")) and into.get("onCommit") != "ONCOMMIT_DROP":
            return "CREATE TEMP TABLE ... AS without ON COMMIT DROP"
    if kind == "SelectStmt" and _temporary((node.get("intoClause") or {}).get("rel")):
        return "SELECT ... INTO TEMP"
    if kind == "DeclareCursorStmt" and int(node.get("options", 0)) & _CURSOR_OPT_HOLD:
        return "DECLARE ... WITH HOLD"
    if kind in ("PrepareStmt", "ExecuteStmt", "ListenStmt"):
        return {"PrepareStmt": "SQL-level PREPARE", "ExecuteStmt": "SQL-level EXECUTE", "ListenStmt": "LISTEN"}[kind]
    if kind == "FuncCall" and _function_name(node) in _SESSION_ADVISORY_LOCKS:
        return f"{_function_name(node)}() (a session advisory lock; pg_advisory_xact_lock() works)"
    return None


def _no_transaction_block(kind: str, node: dict[str, Any]) -> bool:
    """Whether Postgres 15 refuses this statement inside a transaction block (PreventInTransactionBlock).
    Where that depends on the catalog (CLUSTER or REINDEX of a partitioned table, subscriptions with
    or without a slot), the answer is the one that needs no transaction block."""
    if kind in ("CreatedbStmt", "DropdbStmt", "CreateTableSpaceStmt", "DropTableSpaceStmt", "AlterSystemStmt",
                "CreateSubscriptionStmt", "DropSubscriptionStmt"):
        return True
    if kind == "VacuumStmt":
        return bool(node.get("is_vacuumcmd"))
    if kind in ("IndexStmt", "DropStmt"):
        return bool(node.get("concurrent"))
    if kind == "ReindexStmt":
        multiple = node.get("kind") in ("REINDEX_OBJECT_SCHEMA", "REINDEX_OBJECT_SYSTEM", "REINDEX_OBJECT_DATABASE")
        return multiple or _option_on(node.get("params"), "concurrently", False)
    if kind == "ClusterStmt":
        return node.get("relation") is None
    if kind == "DiscardStmt":
        return node.get("target") == "DISCARD_ALL"
    if kind == "TransactionStmt":
        return node.get("kind") in ("TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED")
    if kind == "AlterSubscriptionStmt":
        return node.get("kind") in ("ALTER_SUBSCRIPTION_REFRESH", "ALTER_SUBSCRIPTION_SET_PUBLICATION",
                                    "ALTER_SUBSCRIPTION_ADD_PUBLICATION", "ALTER_SUBSCRIPTION_DROP_PUBLICATION")
    if kind == "AlterTableStmt":
        return any(_only_node(cmd)[1].get("subtype") == "AT_DetachPartition"
                   and _only_node(_only_node(cmd)[1].get("def"))[1].get("concurrent") for cmd in node.get("cmds", []))
    return False


_NO_BLOCK_KINDS = frozenset({
    "CreatedbStmt", "DropdbStmt", "CreateTableSpaceStmt", "DropTableSpaceStmt", "AlterSystemStmt", "CreateSubscriptionStmt",
    "DropSubscriptionStmt", "VacuumStmt", "IndexStmt", "DropStmt", "ReindexStmt", "ClusterStmt", "DiscardStmt",
    "TransactionStmt", "AlterSubscriptionStmt", "AlterTableStmt",
})


def _alone(text: str, statement: re.Match[str]) -> bool:
    """Whether the one statement of a text, found at `statement` in its JSON, refuses a transaction block."""
    kind = statement.group(1)
    if kind not in _NO_BLOCK_KINDS or (kind == "AlterTableStmt" and '"AT_DetachPartition"' not in text):
        return False
    return _no_transaction_block(kind, decode_node(text, statement.end())[0])


# SET names that set the current transaction's characteristics (SET TRANSACTION is named "TRANSACTION").
_TRANSACTION_SETTINGS = frozenset({
    "transaction", "transaction snapshot", "transaction_isolation", "transaction_deferrable", "transaction_read_only",
})


def _takes_no_snapshot(kind: str, node: dict[str, Any]) -> bool:
    """Whether one top-level statement runs without a snapshot and reads no rows, so the context may
    follow it: LOCK TABLE, and SET [LOCAL] of a value (not RESET, whose startup values the relay applies
    behind it with a query of its own)."""
    if kind == "LockStmt":
        return True
    return kind == "VariableSetStmt" and node.get("kind") in ("VAR_SET_VALUE", "VAR_SET_CURRENT", "VAR_SET_MULTI")


def _transaction_setup(kind: str, node: dict[str, Any]) -> bool:
    """Whether one top-level statement only begins a transaction or sets its characteristics (run before
    any query: "SET TRANSACTION", Postgres documentation)."""
    if kind == "TransactionStmt":
        return node.get("kind") in ("TRANS_STMT_BEGIN", "TRANS_STMT_START")
    return kind == "VariableSetStmt" and str(node.get("name", "")).lower() in _TRANSACTION_SETTINGS


@dataclass
class _Effects:
    """What the statements read so far do to the session; becomes a Decision."""

    KINDS = frozenset({"VariableSetStmt", "DiscardStmt", "DeallocateStmt", "TransactionStmt"})  # the statements `statement` reads

    resets_all: bool = False
    reset_names: set[str] = field(default_factory=set)
    set_names: set[str] = field(default_factory=set)
    unknown_settings: bool = False
    deallocates: set[str] = field(default_factory=set)
    drops_statements: bool = False
    statement_after_reset: bool = False
    transaction_setup: bool = True  # until a statement that is not
    takes_no_snapshot: bool = True  # until a statement that takes one
    statements: int = 0  # top-level statements read so far
    first_run: int | None = None  # the index of the first statement that does more than begin the transaction
    at_statement: int = 0  # the index of the statement whose nodes are being read
    sequence_reads: set[int] = field(default_factory=set)  # indexes of statements calling lastval() or currval()

    def statement(self, kind: str, node: dict[str, Any]) -> None:
        """Note what one top-level statement does to session settings and prepared statements (every
        statement in order; `node` may be empty for kinds outside KINDS)."""
        self.statement_after_reset = self.statement_after_reset or self.resets_all or bool(self.reset_names)
        setup = _transaction_setup(kind, node)
        self.transaction_setup = self.transaction_setup and setup
        self.takes_no_snapshot = self.takes_no_snapshot and (setup or _takes_no_snapshot(kind, node))
        if self.first_run is None and not setup:
            self.first_run = self.statements
        self.statements += 1
        if kind == "VariableSetStmt" and not node.get("is_local"):
            self._variable_set(node)
        elif kind == "DiscardStmt" and node.get("target") == "DISCARD_ALL":
            self.resets_all = self.drops_statements = True
        elif kind == "DeallocateStmt":
            if node.get("isall") or node.get("name") is None:
                self.drops_statements = True
            else:
                self.deallocates.add(node["name"])

    def _variable_set(self, node: dict[str, Any]) -> None:
        name, variant = str(node.get("name", "")), node.get("kind")
        if variant in ("VAR_SET_VALUE", "VAR_SET_CURRENT"):
            self.set_names.add(name.lower())
        elif variant in ("VAR_SET_DEFAULT", "VAR_RESET"):
            self.reset_names.add(name.lower())
        elif variant == "VAR_RESET_ALL":
            self.resets_all = True
        elif variant == "VAR_SET_MULTI" and name == "SESSION CHARACTERISTICS":
            for option in node.get("args", []):
                self.set_names.add("default_" + str(_only_node(option)[1].get("defname", "")).lower())

    def set_config(self, name: str | None, is_local: str | None) -> None:
        """Note a set_config(name, value, is_local) call; None for an argument that is not a constant."""
        if is_local is not None and lexing.parse_bool(is_local) is True:
            return
        if name is None:
            self.unknown_settings = True
        else:
            self.set_names.add(name.lower())

    def computed_names(self, tree: str) -> None:
        """After set_config() of a computed name: every string constant shaped like a custom setting's name
        ("prefix.name") in `tree`, pglast's JSON of the statements, counts as set, so the relay reads it
        back by name (pg_settings does not list placeholders). Names built otherwise stay unknown."""
        if self.unknown_settings:
            self.set_names.update(name.lower() for name in _DOTTED_CONSTANT.findall(tree))

    def decision(self, statement_count: int, no_transaction_block: bool) -> Decision:
        decision = Decision(
            resets_all=self.resets_all, reset_names=frozenset(self.reset_names), set_names=frozenset(self.set_names),
            unknown_settings=self.unknown_settings, deallocates=frozenset(self.deallocates),
            drops_statements=self.drops_statements, statement_count=statement_count,
            no_transaction_block=no_transaction_block, statement_after_reset=self.statement_after_reset,
            transaction_setup=self.transaction_setup and statement_count > 0,
            takes_no_snapshot=self.takes_no_snapshot and statement_count > 0,
            refusal_at_transaction_start=SEQUENCE_STATE if self.first_run in self.sequence_reads else None,
        )
        return ALLOW if decision == ALLOW else decision


class Guard:
    """Decides on client SQL and FunctionCall messages; one instance per proxy process, with a bounded
    decision cache. The allow_* switches are the `[guard]` keys of the same names (docs/guard.md)."""

    def __init__(
        self,
        protected: ProtectedSettings,
        allow_do: bool,
        transaction_mode: bool = False,
        *,
        max_parse_bytes: int = DEFAULT_MAX_PARSE_BYTES,
        allow_explain: bool = False,
        allow_strong_locks: bool = False,
        allow_notifications: bool = False,
        allow_large_objects: bool = False,
        allow_backend_signals: bool = False,
        allow_function_call: bool = False,
    ) -> None:
        self.protected = protected
        self.allow_do = allow_do
        self.transaction_mode = transaction_mode
        self.max_parse_bytes = max_parse_bytes
        self.allow_explain = allow_explain
        self.allow_strong_locks = allow_strong_locks
        self.allow_notifications = allow_notifications
        self.allow_large_objects = allow_large_objects
        self.allow_backend_signals = allow_backend_signals
        self.allow_function_call = allow_function_call
        self._cache: dict[str, Decision] = {}

    @classmethod
    def from_settings(cls, settings: GuardSettings, protected: ProtectedSettings, transaction_mode: bool) -> Guard:
        """The guard a `[guard]` section configures."""
        return cls(
            protected, settings.allow_do, transaction_mode, max_parse_bytes=settings.max_parse_bytes,
            allow_explain=settings.allow_explain, allow_strong_locks=settings.allow_strong_locks,
            allow_notifications=settings.allow_notifications, allow_large_objects=settings.allow_large_objects,
            allow_backend_signals=settings.allow_backend_signals, allow_function_call=settings.allow_function_call,
        )

    def check(self, sql: str, lowered: str | None = None) -> Decision:
        """The decision for a Query's or Parse's SQL text: `ALLOW` itself when the pre-scan clears it,
        else read with the parser (cached). `lowered` is `sql.lower()` when the caller has it already.
        Never raises: what it cannot read is refused."""
        if not needs_parse(sql, self.transaction_mode, lowered):
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
        """The refusal for a FunctionCall message ('F', "Message Formats") calling the function `oid`, or
        None to forward it. Refused (0A000) unless [guard] allow_function_call; set_config() is always
        refused (42501), and the functions refused in SQL by default keep their own switches."""
        if not self.allow_function_call:
            return Refusal(errors.FEATURE_NOT_SUPPORTED,
                           f"the FunctionCall protocol message is not supported {_BY_PROXY}",
                           "call the function in SQL (SELECT f(...)); [guard] allow_function_call = true "
                           "allows FunctionCall messages")
        if oid == SET_CONFIG_OID:
            return _refused("FunctionCall of set_config()", "it writes settings the SQL guard cannot see",
                            "use SET or SELECT set_config(...), where the guard reads the setting's name")
        function = _SWITCHED_OIDS.get(oid)
        refusal = self._switched_off(function, f"FunctionCall of {function}()") if function is not None else None
        if refusal is not None:
            return refusal
        if oid in SESSION_ADVISORY_LOCK_OIDS and self.transaction_mode:
            return Refusal(errors.FEATURE_NOT_SUPPORTED,
                           f"FunctionCall of {SESSION_ADVISORY_LOCK_OIDS[oid]}() (a session advisory lock; "
                           "pg_advisory_xact_lock() works) is not available with transaction pooling: the server "
                           "connection is shared after each transaction", _SESSION_MODE_HINT)
        return None

    def function_call_decision(self, oid: int) -> Decision:
        """What a FunctionCall the guard forwards does, as `check` says of a text: under transaction
        pooling, lastval() and currval() read what earlier transactions left on the server connection
        (`refusal_at_transaction_start`)."""
        if oid in SEQUENCE_STATE_OIDS and self.transaction_mode:
            return _SEQUENCE_STATE_CALL
        return ALLOW

    def _decide(self, sql: str) -> Decision:
        """Read a text the pre-scan did not clear; every failure is a refusal, never an allow."""
        try:
            unreadable = self._unreadable(sql)
            return Decision(refusal=unreadable) if unreadable else self._read(parse_json(sql))
        except parser.ParseError as exc:
            message = str(exc.args[0]) if exc.args else "syntax error"
            if message.startswith(("stack depth limit exceeded", "memory exhausted")):
                return Decision(refusal=TOO_COMPLEX)
            return Decision(refusal=Refusal(errors.SYNTAX_ERROR, message, _PARSE_HINT))
        except RecursionError:
            return Decision(refusal=TOO_COMPLEX)
        except Exception as exc:  # never an allow: whatever went wrong, the statement is not forwarded
            log.warning("SQL guard could not read a statement error=%s", type(exc).__name__)
            return Decision(refusal=Refusal(
                errors.INTERNAL_ERROR,
                f"pg-tenant-proxy's SQL guard could not read this statement ({type(exc).__name__})",
                "the statement was not run; report this to the proxy's operators",
            ))

    def _unreadable(self, sql: str) -> Refusal | None:
        """The refusal for a text the guard will not hand to the parser: a zero byte (08P01; the parser and
        the server would stop reading there), or more than max_parse_bytes in UTF-8 (54000)."""
        if "\x00" in sql:
            return Refusal(errors.PROTOCOL_VIOLATION, "the statement text contains a zero byte",
                           "SQL text ends at its terminating zero byte; remove the zero byte from the text")
        size = len(sql.encode(errors="surrogatepass"))
        if size <= self.max_parse_bytes:
            return None
        return Refusal(
            errors.PROGRAM_LIMIT_EXCEEDED,
            f"statement of {size} bytes is longer than pg-tenant-proxy's SQL guard reads "
            f"([guard] max_parse_bytes = {self.max_parse_bytes})",
            "send large values as Bind parameters or with COPY, or split the text into smaller statements; "
            "the operator can raise [guard] max_parse_bytes",
        )

    def _read(self, text: str) -> Decision:
        """The decision for pglast's JSON text of a statement list. Only the subtrees that hold a node the
        guard acts on are decoded, each byte at most once: a match inside a decoded subtree is read by
        walking that subtree, which is walked only when it holds one."""
        effects = _Effects()
        statements = list(_STATEMENT.finditer(text))
        starts = [statement.start() for statement in statements]
        for statement in statements:
            kind = statement.group(1)
            node = decode_node(text, statement.end())[0] if kind in _Effects.KINDS else {}
            effects.statement(kind, node)
            refusal = self._statement(kind, node)
            if refusal is not None:
                return Decision(refusal=refusal)
        walked = _SESSION_WALKED_KINDS if self.transaction_mode else _WALKED_KINDS
        pattern = _occurrences(self.transaction_mode, '"relname":"pg_settings"' in text,
                               '"relpersistence":"t"' in text or '"schemaname":"pg_temp' in text or '"sval":"pg_temp' in text)
        decoded_to = 0
        for match in pattern.finditer(text):
            if match.start() < decoded_to:
                continue
            node, decoded_to = decode_node(text, match.end())
            effects.at_statement = bisect.bisect_right(starts, match.start()) - 1
            kind = match.group()[1 : match.group().index('"', 1)]
            nested = pattern.search(text, match.end(), decoded_to) is not None
            for inner_kind, inner in ((kind, node), *(_nodes(node) if nested else ())):
                refusal = self._node(inner_kind, inner, effects) if inner_kind in walked else None
                if refusal is not None:
                    return Decision(refusal=refusal)
        effects.computed_names(text)
        return effects.decision(len(statements), len(statements) == 1 and _alone(text, statements[0]))

    def _statement(self, kind: str, node: dict[str, Any]) -> Refusal | None:
        """The refusal for a top-level statement (`node` decoded for _Effects.KINDS only) beyond its nodes':
        under transaction pooling, a search_path that makes unqualified CREATE TABLE temporary (a function's
        own SET clause is not checked: it holds only while the function runs)."""
        if self.transaction_mode and kind == "VariableSetStmt" and str(node.get("name")).lower() == "search_path":
            if _temporary_first([str(_literal(argument)) for argument in node.get("args") or []]):
                return _TEMPORARY_SEARCH_PATH
        return None

    def _node(self, kind: str, node: dict[str, Any], effects: _Effects) -> Refusal | None:
        """The refusal for one node of the tree, at any depth, or None."""
        if self.transaction_mode:
            feature = _session_feature(kind, node)
            if feature is not None:
                return Refusal(errors.FEATURE_NOT_SUPPORTED, f"{feature} is not available with transaction pooling: "
                               "the server connection is shared after each transaction", _SESSION_MODE_HINT)
        if kind == "VariableSetStmt":
            return self._variable_set(node)
        if kind == "FuncCall":
            return self._func_call(node, effects)
        if kind in _REFUSED_STATEMENTS:
            return _refused(_REFUSED_STATEMENTS[kind], "it changes roles, databases or the server for every tenant",
                            _ADMIN_HINT)
        if kind == "DoStmt" and not self.allow_do:
            return _refused("DO", "DO blocks run SQL the guard cannot read",
                            "create a function instead, or set [guard] allow_do = true (the signed context still holds)")
        if kind in _NOTIFICATION_STATEMENTS and not self.allow_notifications:
            return _notifications(_NOTIFICATION_STATEMENTS[kind])
        if kind in ("UpdateStmt", "InsertStmt", "DeleteStmt", "MergeStmt"):
            return _settings_write(node)
        if kind == "ViewStmt":
            return _settings_view(node)
        if kind == "DefineStmt":
            return self._definition(node)
        if kind in ("RenameStmt", "AlterOwnerStmt"):
            target = node.get("renameType") or node.get("objectType")
            if target in ("OBJECT_DATABASE", "OBJECT_ROLE"):
                what = "ALTER DATABASE" if target == "OBJECT_DATABASE" else "ALTER ROLE"
                return _refused(f"{what} ... {'RENAME' if kind == 'RenameStmt' else 'OWNER TO'}",
                                "it changes roles, databases or the server for every tenant", _ADMIN_HINT)
            return None
        return self._shared_table(kind, node)

    def _definition(self, node: dict[str, Any]) -> Refusal | None:
        """CREATE AGGREGATE / CREATE OPERATOR (and the other DefineStmts) naming a function the guard refuses
        in its definition (SFUNC = set_config, FUNCTION = pg_notify): the aggregate or operator calls it
        under a name the guard does not know."""
        for option in node.get("definition") or []:
            _, element = _only_node(option)
            kind, argument = _only_node(element.get("arg"))
            function = _function_name({"funcname": argument.get("names", [])}) if kind == "TypeName" else None
            if function is None:
                continue
            what = f"CREATE {str(node.get('kind', '')).removeprefix('OBJECT_')} with {element.get('defname', '').upper()} = {function}"
            if function == "set_config":
                return _refused(what, "it writes settings the SQL guard cannot see",
                                "call set_config() in SQL, where the guard reads the setting's name")
            refusal = self._switched_off(function, what)
            if refusal is not None:
                return refusal
            if self.transaction_mode and function in _SESSION_ADVISORY_LOCKS | SEQUENCE_STATE_FUNCTIONS:
                return Refusal(errors.FEATURE_NOT_SUPPORTED, f"{what} is not available with transaction pooling: "
                               "the server connection is shared after each transaction", _SESSION_MODE_HINT)
        return None

    def _shared_table(self, kind: str, node: dict[str, Any]) -> Refusal | None:
        """Refusals for statements that reach every tenant's rows or block every tenant: EXPLAIN with
        row counts or estimates, strong LOCK TABLE, TRUNCATE."""
        if kind == "ExplainStmt" and not self.allow_explain:
            if _option_on(node.get("options"), "analyze", False):
                return _refused("EXPLAIN ANALYZE", "its row counts include rows of other tenants that the policies filter",
                                "use EXPLAIN (COSTS OFF) to see the plan; [guard] allow_explain = true allows it")
            if _option_on(node.get("options"), "costs", True):
                return _refused("EXPLAIN with costs", "its row estimates come from statistics over every tenant's rows",
                                "use EXPLAIN (COSTS OFF) to see the plan; [guard] allow_explain = true allows it")
        if not self.allow_strong_locks:
            if kind == "LockStmt" and int(node.get("mode", 8)) > _ROW_EXCLUSIVE:
                mode = _LOCK_MODES.get(int(node.get("mode", 8)), "this")
                return _refused(f"LOCK TABLE in {mode} MODE", "it blocks every tenant's use of the table",
                                "lock rows with SELECT ... FOR UPDATE, or tables in ROW EXCLUSIVE MODE or weaker; "
                                "[guard] allow_strong_locks = true allows it")
            if kind == "TruncateStmt":
                return _refused("TRUNCATE", "it removes every tenant's rows (row-level security does not apply to it) "
                                "and locks the table against every tenant",
                                "DELETE removes your own tenant's rows; [guard] allow_strong_locks = true allows TRUNCATE")
        return None

    def _variable_set(self, node: dict[str, Any]) -> Refusal | None:
        name = node.get("name")
        if not isinstance(name, str):
            return None
        if name.lower() in _IDENTITY_SETTINGS:
            return _refused(_IDENTITY_SETTINGS[name.lower()], "the session's role is fixed", _ROLE_HINT)
        if name.lower() == _SEED_SETTING:
            return _SEED_REFUSAL
        if name in self.protected:
            return Refusal(errors.INSUFFICIENT_PRIVILEGE, f'setting "{name}" is protected: the proxy sets it from your token',
                           _PROTECTED_HINT)
        if name.lower() in _LEXING_SETTINGS and node.get("kind") == "VAR_SET_VALUE":
            arguments = node.get("args") or [None]
            return _lexing(name.lower(), _literal(arguments[0]) if len(arguments) == 1 else None)
        return None

    def _func_call(self, node: dict[str, Any], effects: _Effects) -> Refusal | None:
        function = _function_name(node)
        if function == "set_config":
            arguments = [*node.get("args", []), None, None, None]
            named = any(_only_node(argument)[0] == "NamedArgExpr" for argument in arguments if argument)
            setting = None if named else _literal(arguments[0])
            effects.set_config(setting, None if named else _literal(arguments[2]))
            # The name the server computes and the name as written (a cast the guard does not model): either counts.
            for name in dict.fromkeys(() if named else (setting, _written(arguments[0]))):
                if name is not None and (name in self.protected or name.lower() in _IDENTITY_SETTINGS):
                    return Refusal(errors.INSUFFICIENT_PRIVILEGE, f'set_config() of "{name}" is refused: the setting is '
                                   "protected, the proxy sets it from your token",
                                   _PROTECTED_HINT if name in self.protected else _ROLE_HINT)
                if name is not None and name.lower() == _SEED_SETTING:
                    return _SEED_REFUSAL
                lexing_refusal = _lexing(name.lower(), _literal(arguments[1])) if name and name.lower() in _LEXING_SETTINGS else None
                if lexing_refusal is not None:
                    return lexing_refusal
                if name is not None and name.lower() == "search_path" and self.transaction_mode:
                    value = _literal(arguments[1])
                    if value is not None and _temporary_first(_path_elements(value)):
                        return _TEMPORARY_SEARCH_PATH
        elif function in SEQUENCE_STATE_FUNCTIONS and self.transaction_mode:
            effects.sequence_reads.add(effects.at_statement)
        elif function is not None:
            return self._switched_off(function, f"{function}()")
        return None

    def _switched_off(self, function: str, what: str) -> Refusal | None:
        """The refusal for calling `function` (in `what`: the SQL or message that calls it) while its
        [guard] switch is off: pg_notify() (allow_notifications), the large-object functions
        (allow_large_objects), pg_cancel_backend() and pg_terminate_backend() (allow_backend_signals)."""
        if function == "pg_notify" and not self.allow_notifications:
            return _notifications(what)
        if function in LARGE_OBJECT_FUNCTIONS and not self.allow_large_objects:
            return _large_objects(what)
        if function in SIGNAL_FUNCTIONS and not self.allow_backend_signals:
            return _signals(what)
        return None


class Classifier(Guard):
    """The guard's reading of a text without its refusals, for the relay when `[guard] enabled = false`:
    what the text does to the session (settings written, prepared statements dropped, one statement that
    Postgres refuses inside a transaction block), which the relay needs to keep its own promises whether
    or not client SQL is checked (a context pipelined in front of DISCARD ALL fails it with 25001).
    Text it cannot read (a syntax error, too large or too deep) is `ALLOW`: it goes upstream as it
    would with no guard, and Postgres answers it."""

    def __init__(self, transaction_mode: bool) -> None:
        super().__init__(ProtectedSettings((), ()), allow_do=True, transaction_mode=transaction_mode)

    def check(self, sql: str, lowered: str | None = None) -> Decision:
        decision = super().check(sql, lowered)
        if decision.refusal_at_transaction_start is not None:
            decision = replace(decision, refusal_at_transaction_start=None)
        return ALLOW if decision.refusal is not None or decision == ALLOW else decision

    def _node(self, kind: str, node: dict[str, Any], effects: _Effects) -> Refusal | None:
        super()._node(kind, node, effects)  # records what the node does (set_config); its refusal is dropped
        return None

    def _statement(self, kind: str, node: dict[str, Any]) -> Refusal | None:
        return None


@lru_cache(maxsize=2)
def classifier(transaction_mode: bool) -> Classifier:
    """The process's one Classifier for a pool mode (its decision cache is shared by every session)."""
    return Classifier(transaction_mode)


def _settings_view(node: dict[str, Any]) -> Refusal | None:
    """The refusal for CREATE VIEW reading pg_settings: a view of it is updatable, and an UPDATE of the view
    runs pg_settings's rules (set_config()) under the view's name."""
    for kind, inner in _nodes(node.get("query")):
        if kind == "RangeVar" and inner.get("relname") == "pg_settings" and inner.get("schemaname") in (None, "pg_catalog"):
            return _refused("a view of pg_settings", "updating it writes settings the SQL guard cannot name",
                            "read pg_settings directly, or use current_setting()")
    return None


def _path_elements(value: str) -> list[str]:
    """The schema names of a search_path value as Postgres splits it (SplitIdentifierString): comma separated,
    blanks around them ignored, "quoted" names kept, others in lower case."""
    elements = []
    for match in _PATH_ELEMENT.finditer(value):
        quoted, plain = match.group(1), match.group(2)
        elements.append(quoted.replace('""', '"') if quoted is not None else plain.strip().lower())
    return elements


_PATH_ELEMENT = re.compile(r'\s*(?:"((?:[^"]|"")*)"|([^",]+))\s*')


def _temporary_first(elements: list[str]) -> bool:
    """Whether a search_path may make the session's temporary schema the one unqualified CREATE TABLE,
    VIEW and SEQUENCE create in (then temporary): pg_temp (or pg_temp_N) with neither pg_catalog nor public
    before it. A schema listed before it that does not exist is skipped, and only pg_catalog is sure to
    exist; public is taken to, so that the common `public, pg_temp` (pg_temp searched last) passes."""
    for element in elements:
        if element in ("pg_catalog", "public"):
            return False
        if element.startswith("pg_temp"):
            return True
    return False


_TEMPORARY_SEARCH_PATH = Refusal(
    errors.FEATURE_NOT_SUPPORTED,
    "a search_path with pg_temp first is not available with transaction pooling: tables, views and sequences "
    "created by unqualified name would be temporary, and outlive the transaction on a shared server connection",
    "leave pg_temp out of search_path (it is searched first anyway), or list public or pg_catalog before it; or use a pool "
    'in session mode ([pool] mode = "session")',
)


def _settings_write(node: dict[str, Any]) -> Refusal | None:
    """The refusal for INSERT, UPDATE, DELETE or MERGE on pg_settings (whose rules call set_config())."""
    relation = node.get("relation") or {}
    if relation.get("relname") == "pg_settings" and relation.get("schemaname") in (None, "pg_catalog"):
        return _refused("writing pg_settings", "it sets settings the SQL guard cannot name",
                        "use SET name = value, which the guard can read")
    return None
