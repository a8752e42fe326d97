"""Session settings under transaction pooling: a client's settings follow it between server connections.

A client's settings are its startup parameters, then whatever its statements leave in force at session
level. The SQL guard names the settings a statement may write; after a group that may have changed
some, the proxy reads them back from the server (pipelined behind the group, its replies swallowed),
so a SET rolled back with its transaction is not kept, and custom placeholder settings
(`myapp.user_id`), which pg_settings does not list, are read by name. A read counts only when it ran
outside a transaction block; inside one, the next group end reads again.

`RESET x`, `RESET ALL`, `SET x TO DEFAULT` and `DISCARD ALL` return to the client's startup values, as
they do in a direct session: the proxy applies those values again right behind the statement, in the
same transaction, so a rollback undoes both; only where a setting is still at the server's reset value,
so a SET later in the same Query stands; and again behind a ROLLBACK (TO) that may undo them while
keeping the reset.

When a client gets a server connection holding other settings, the proxy resets the names the client
does not have and applies the values that differ, in a group of its own sent ahead of the client's
messages, without waiting for it.
"""

from __future__ import annotations

from proxy.protocol import messages

READ_STATEMENT = b"pg_tenant_proxy_read_settings"
# What the session holds: the settings pg_settings shows at source 'session', and the custom placeholder
# names (dotted, which pg_settings does not list) among those asked for. A built-in setting at any other
# source is the server's value, not the client's: recorded, the proxy would reset or set it again on the
# next server connection, and for one the role may not set (a client's refused `SET max_stack_depth`,
# 42501) that fails, ending that client's session. A built-in setting the role may not examine
# (config_file, hba_file: pg_read_all_settings) fails current_setting() even with missing_ok: pg_settings
# does not show it. The transaction_* settings show source 'session' after a `SET transaction_deferrable`
# outside a block, but last one transaction (set again in another, they fail with 25001).
# What the proxy keeps of a client's settings is bounded ($2, `[client] max_settings_bytes`): beyond it the
# read answers one row, (NULL, the size in bytes), and none of the values, which never leave the server.
READ_SQL = (
    "WITH p AS MATERIALIZED (SELECT pg_catalog.lower(name) AS name, source FROM pg_catalog.pg_settings),"
    " s AS MATERIALIZED (SELECT s.name, pg_catalog.current_setting(s.name, true) AS value FROM ("
    "SELECT name FROM p WHERE source = 'session'"
    " AND name NOT IN ('transaction_isolation', 'transaction_read_only', 'transaction_deferrable')"
    " UNION SELECT pg_catalog.lower(n) FROM pg_catalog.unnest($1::pg_catalog.text[]) AS n"
    " WHERE pg_catalog.strpos(n, '.') > 0 AND pg_catalog.lower(n) NOT IN (SELECT name FROM p)) AS s(name)),"
    " t AS (SELECT pg_catalog.sum(pg_catalog.octet_length(name) OPERATOR(pg_catalog.+)"
    " COALESCE(pg_catalog.octet_length(value), 0)) AS total FROM s)"
    " SELECT s.name, s.value FROM s, t WHERE t.total IS NULL OR t.total OPERATOR(pg_catalog.<=) $2::pg_catalog.int8"
    " UNION ALL SELECT NULL, t.total::pg_catalog.text FROM t WHERE t.total OPERATOR(pg_catalog.>) $2::pg_catalog.int8"
)
# random()'s seed, drawn anew from a strong source (48 random bits of a version-4 UUID) when a server
# connection passes to another client whose session must not see the last one's: neither RESET ALL nor
# DISCARD ALL touches the seed, and a client's `set_config(name, '0.5', false)` with a computed name (which
# the guard cannot read) would otherwise decide the next client's random() sequence.
RESEED = (
    "pg_catalog.set_config('seed', (('x' OPERATOR(pg_catalog.||) pg_catalog.right("
    "pg_catalog.gen_random_uuid()::pg_catalog.text, 12))::pg_catalog.bit(48)::pg_catalog.int8::pg_catalog.float8"
    " OPERATOR(pg_catalog./) 281474976710656)::pg_catalog.text, false)"
)
APPLY_STATEMENT = b"pg_tenant_proxy_apply_settings"
APPLY_SQL = (
    "SELECT pg_catalog.set_config(n, v, false)"
    " FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[])) AS t(n, v)"
)
# The client's startup values again after a reset, only where the setting is at the server's reset value
# (its source is not 'session'): a SET the client made after the reset, or one a ROLLBACK TO kept, stands.
REAPPLY_STATEMENT = b"pg_tenant_proxy_reapply_settings"
REAPPLY_SQL = (
    "SELECT pg_catalog.set_config(t.n, t.v, false)"
    " FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.text[]), pg_catalog.unnest($2::pg_catalog.text[])) AS t(n, v)"
    " JOIN pg_catalog.pg_settings AS s ON pg_catalog.lower(s.name) = t.n WHERE s.source <> 'session'"
)


def text_array(values: list[str]) -> str:
    """A text[] literal ("Arrays", 8.15.6 Array Input and Output Syntax): every element quoted."""
    quoted = ('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values)
    return "{" + ",".join(quoted) + "}"


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def reset_query(names: list[str]) -> bytes:
    """A Query resetting each named setting to the server connection's default."""
    return messages.query("; ".join(f"RESET {quote_identifier(name)}" for name in sorted(names)))


def apply_bind(values: dict[str, str], statement: bytes = APPLY_STATEMENT) -> bytes:
    """Bind of the apply (or reapply) statement (to the proxy's own portal of that name) for these settings."""
    names = sorted(values)
    return messages.bind(statement.decode(), statement.decode(), [text_array(names), text_array([values[n] for n in names])])


def close_portal(name: bytes) -> bytes:
    """Close ('C', 55.7 Message Formats) of one of the proxy's own portals, sent right behind its
    Execute: inside a client's transaction block a portal lives until the block ends, and the next Bind
    of the same name there would fail (42P03) and abort the client's transaction."""
    return messages.message(b"C", b"P" + name + b"\0")


def read_bind(names: set[str], max_bytes: int) -> bytes:
    return messages.bind(READ_STATEMENT.decode(), READ_STATEMENT.decode(), [text_array(sorted(names)), str(max_bytes)])


class ClientSettings:
    """What one client's session settings are, and whether the server may have changed them."""

    def __init__(self, startup: dict[str, str], protected: object, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # names and values the proxy keeps at most ([client] max_settings_bytes)
        self.startup = {name.lower(): value for name, value in startup.items()}
        self.current = dict(self.startup)
        # ParameterStatus values the client was greeted with, by lower-case name: the startup values as the
        # server reports them, which a reset of one reports in a direct session
        self.reported: dict[str, str] = {}
        self.protected = protected
        self.to_read: set[str] = set()  # names to read back at the next group end
        self.stale = False

    def changed(self, set_names: frozenset[str], reset_names: frozenset[str], resets_all: bool, unknown: bool) -> dict[str, str]:
        """A statement that may change settings went upstream; the startup values to apply right behind it."""
        self.stale = True
        self.to_read |= set_names | reset_names
        if resets_all:
            return dict(self.startup)
        return {name: self.startup[name] for name in reset_names if name in self.startup}

    def names_to_read(self) -> set[str]:
        return self.to_read | set(self.current) | set(self.startup)

    def read(self, rows: list[tuple[str, str]]) -> None:
        """The settings read back outside a transaction block: they are the client's now."""
        self.current = {name: value for name, value in rows if name not in self.protected}  # type: ignore[operator]
        self.to_read.clear()
        self.stale = False
