"""The shared upstream role's hardening: which built-in capabilities reach across tenants, as data.

All tenants log in upstream as one role, so whatever that role may do, every tenant may do to every
other tenant. `REVOCATIONS` lists the built-in functions, views and extension objects that give such a
reach, each with the risk it carries and the predefined role that keeps the legitimate use. The same
list renders the hardening script (`hardening_sql`, printed by `pg-tenant-proxy sql`) and drives the
doctor's privilege checks, so what is revoked and what is checked cannot drift apart. The capabilities
that depend on the database's own objects (TEMP, CREATE, languages, table privileges, memberships) are
in proxy/sql/hardening.sql.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from importlib import resources

from proxy.tenant import quote_literal

# A psql variable stands for the role when no configuration names it: psql -v upstream_role=NAME.
ROLE_VARIABLE = "upstream_role"


class ObjectKind(enum.Enum):
    """What a revocation's name patterns match, and the privilege taken."""

    FUNCTION = "function"  # pg_catalog functions (every overload) whose name is LIKE a pattern: EXECUTE
    RELATION = "relation"  # pg_catalog views and tables whose name is LIKE a pattern: SELECT
    EXTENSION = "extension"  # every function (EXECUTE) and relation (SELECT) of an installed extension


@dataclass(frozen=True)
class Revocation:
    """One capability taken from PUBLIC and the upstream role.

    `patterns` are SQL LIKE patterns over names in pg_catalog (or extension names). `kept_by` is the
    predefined role granted the privilege back, so administrators and monitoring keep it; None when no
    role needs it through this database."""

    capability: str
    kind: ObjectKind
    patterns: tuple[str, ...]
    risk: str
    kept_by: str | None = None


REVOCATIONS: tuple[Revocation, ...] = (
    Revocation("run SQL text the guard never sees", ObjectKind.FUNCTION,
               ("%\\_to\\_xml%", "ts\\_stat", "ts\\_rewrite"),
               "query_to_xml('...'), cursor_to_xml, ts_stat('...') and ts_rewrite(q, '...') execute SQL given as "
               "text, so any statement the guard refuses (ALTER ROLE, set_config) runs anyway",
               "pg_database_owner"),
    Revocation("read other sessions' activity and statistics", ObjectKind.FUNCTION,
               ("pg\\_stat\\_get\\_%",),
               "pg_stat_get_backend_activity(pg_stat_get_backend_idset()) and pg_stat_get_activity() show every "
               "backend of the shared role: other tenants' query text, application_name and timing",
               "pg_read_all_stats"),
    Revocation("read the statistics views", ObjectKind.RELATION,
               ("pg\\_stat\\_%", "pg\\_statio\\_%", "pg\\_stats%"),
               "pg_stat_activity, pg_stat_ssl, pg_stat_progress_* run as their owner and show other tenants' "
               "sessions; pg_stat_*_tables count other tenants' reads and writes",
               "pg_read_all_stats"),
    Revocation("see other sessions' locks", ObjectKind.FUNCTION,
               ("pg\\_lock\\_status", "pg\\_blocking\\_pids", "pg\\_safe\\_snapshot\\_blocking\\_pids",
                "pg\\_isolation\\_test\\_session\\_is\\_blocked"),
               "lists other tenants' backends, the rows and relations they lock and their advisory-lock keys",
               "pg_read_all_stats"),
    Revocation("read the lock and prepared-transaction views", ObjectKind.RELATION,
               ("pg\\_locks", "pg\\_prepared\\_xacts"),
               "pg_locks shows other tenants' locks; pg_prepared_xacts lists their prepared transactions, which "
               "the shared role may then COMMIT or ROLLBACK PREPARED",
               "pg_read_all_stats"),
    Revocation("list prepared transactions", ObjectKind.FUNCTION, ("pg\\_prepared\\_xact",),
               "the function behind pg_prepared_xacts: other tenants' transaction identifiers",
               "pg_read_all_stats"),
    Revocation("list prepared statements", ObjectKind.FUNCTION, ("pg\\_prepared\\_statement",),
               "under transaction pooling a server connection holds the statements the proxy prepared for other "
               "tenants' clients (shared by digest): pg_prepared_statement() shows their SQL text, literals "
               "included; dynamic SQL reaches the function past any guard, so only the privilege stops it",
               "pg_database_owner"),
    Revocation("read the prepared-statement view", ObjectKind.RELATION, ("pg\\_prepared\\_statements",),
               "the view over pg_prepared_statement(): other tenants' statement texts on a shared connection",
               "pg_database_owner"),
    Revocation("signal other backends", ObjectKind.FUNCTION,
               ("pg\\_cancel\\_backend", "pg\\_terminate\\_backend"),
               "a role may signal every backend of its own role: any tenant can cancel another's statement or "
               "end its session, losing its open transaction",
               "pg_signal_backend"),
    Revocation("use large objects", ObjectKind.FUNCTION,
               ("lo\\_%", "loread", "lowrite"),
               "every large object a tenant creates belongs to the shared role, so any tenant can list, read "
               "(lo_get), overwrite (lo_put) or delete (lo_unlink) it; RLS does not apply to large objects",
               "pg_database_owner"),
    Revocation("list large objects", ObjectKind.RELATION, ("pg\\_largeobject\\_metadata",),
               "lists every tenant's large-object OIDs",
               "pg_database_owner"),
    Revocation("send notifications", ObjectKind.FUNCTION, ("pg\\_notify",),
               "pg_notify(channel, payload) forges a notification on any tenant's channel (the NOTIFY statement "
               "needs no privilege at all: the guard refuses or scopes it)"),
    Revocation("write logical-decoding messages", ObjectKind.FUNCTION, ("pg\\_logical\\_emit\\_message",),
               "writes arbitrary messages into the WAL, which change-data-capture consumers read as if the "
               "application had sent them"),
    Revocation("seed the random generator", ObjectKind.FUNCTION, ("setseed",),
               "the seed survives DISCARD ALL: a tenant makes random() predictable for the next tenant on the "
               "same server connection"),
    Revocation("read every tenant's query text (pg_stat_statements)", ObjectKind.EXTENSION,
               ("pg\\_stat\\_statements",),
               "pg_stat_statements shows every query text of the shared role, with counts and timings",
               "pg_read_all_stats"),
    Revocation("open new sessions (dblink)", ObjectKind.EXTENSION, ("dblink",),
               "dblink runs SQL text in another session, past the guard"),
    Revocation("inspect other tenants' rows and pages", ObjectKind.EXTENSION,
               ("pgrowlocks", "pgstattuple", "pg\\_buffercache", "pg\\_visibility", "pg\\_freespacemap",
                "pageinspect"),
               "these extensions read tuples, locks and pages below RLS: counts and lock holders of every tenant",
               "pg_read_all_stats"),
)

# Predefined roles whose membership gives the upstream role what the revocations take away.
PRIVILEGED_ROLES: tuple[str, ...] = (
    "pg_read_all_data", "pg_write_all_data", "pg_read_all_stats", "pg_monitor", "pg_signal_backend",
    "pg_stat_scan_tables", "pg_read_server_files", "pg_write_server_files", "pg_execute_server_program",
)


def _sql_array(items: tuple[str, ...]) -> str:
    return "ARRAY[" + ", ".join(quote_literal(item) for item in items) + "]"


def revocation_sql(revocation: Revocation) -> str:
    """The script's lines for one revocation: the reason as a comment, then the helper's call."""
    kept_by = quote_literal(revocation.kept_by) if revocation.kept_by else "NULL"
    return (
        f"-- {revocation.capability}: {revocation.risk}.\n"
        f"CALL pg_temp.pgtp_revoke({quote_literal(revocation.kind.value)}, {_sql_array(revocation.patterns)}, "
        f"{kept_by});\n"
    )


def hardening_sql(upstream_role: str | None) -> str:
    """The idempotent hardening script for one database, to run as its owner or a superuser.

    With `upstream_role` None, the script reads the role from the psql variable `upstream_role`
    (psql -v upstream_role=NAME) and fails on its first statement when that is not set."""
    script = resources.files("proxy.sql").joinpath("hardening.sql").read_text()
    if upstream_role is None:
        role = f":'{ROLE_VARIABLE}'"
        guard = (
            f"\\if :{{?{ROLE_VARIABLE}}}\n\\else\n"
            f"\\warn 'pg-tenant-proxy: name the upstream role: psql -v {ROLE_VARIABLE}=NAME "
            "(or run pg-tenant-proxy sql --config FILE); the next statement fails without it'\n\\endif\n"
        )
    else:
        role, guard = quote_literal(upstream_role), ""
    script = script.replace("@ROLE_GUARD@\n", guard).replace("@UPSTREAM_ROLE@", role)
    script = script.replace("@PRIVILEGED_ROLES@", _sql_array(PRIVILEGED_ROLES))
    return script.replace("@REVOCATIONS@\n", "".join(revocation_sql(r) for r in REVOCATIONS))
