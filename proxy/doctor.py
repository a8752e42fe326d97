"""`pg-tenant-proxy doctor`: audit the database the proxy serves for the mistakes that leak tenants.

Most real leaks come from the schema, not the proxy: a table without FORCE ROW LEVEL SECURITY, a
policy that reads the raw setting, an IMMUTABLE helper, a view owned by a privileged role. Each check
returns findings with a status (ok / warn / fail), the objects concerned and the fix as SQL. The
checks run as the proxy's upstream role (what it can do is what a client can do) and, when an admin
DSN is given, the catalog checks run as the admin too.

psycopg comes with the `doctor` extra (`pip install 'pg-tenant-proxy[doctor]'`); the proxy itself never
imports it, and without it `doctor` exits 2 saying which extra to install.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

try:
    import psycopg
except ImportError:  # the `doctor` extra is not installed: run_doctor says so instead of a traceback
    psycopg = None  # type: ignore[assignment]

from proxy.config import Settings
from proxy.hardening import PRIVILEGED_ROLES, REVOCATIONS, Revocation
from proxy.tenant import quote_literal, sign

OK, WARN, FAIL = "ok", "warn", "fail"
EXTRA_MISSING = ("`doctor` and `check --connect` need psycopg, which comes with the doctor extra: "
                 "pip install '.[doctor]' in a clone of the repository (an image: --build-arg EXTRAS='[doctor]')")
SELF_TEST_TENANT = "00000000-0000-4000-8000-00000000d0c7"
PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*")
MAX_FIX_LINES = 10  # per finding in the terminal table; --json has them all
USER_SCHEMAS = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenant_proxy') AND n.nspname !~ '^pg_toast'"


@dataclass
class Finding:
    """One check's result."""

    check: str
    status: str
    objects: list[str] = field(default_factory=list)
    fix: str = ""
    detail: str = ""


@dataclass
class Audit:
    """What the checks need: the two connections and the configuration."""

    upstream: psycopg.Connection[Any]
    admin: psycopg.Connection[Any] | None
    settings: Settings
    tenant_column: str
    allow_plain_policies: bool = False

    @property
    def catalog(self) -> psycopg.Connection[Any]:
        return self.admin or self.upstream

    def rows(self, sql: str, params: tuple[Any, ...] = (), as_admin: bool = True) -> list[tuple[Any, ...]]:
        conn = self.catalog if as_admin else self.upstream
        return list(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]

    def tenant_tables(self) -> list[tuple[str, bool, bool, str]]:
        """(qualified name, rls enabled, rls forced, owner) of ordinary tables with the tenant column."""
        return [
            (row[0], row[1], row[2], row[3])
            for row in self.rows(
                "SELECT c.oid::regclass::text, c.relrowsecurity, c.relforcerowsecurity, pg_get_userbyid(c.relowner)"
                " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped"
                f" WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS} ORDER BY 1",
                (self.tenant_column,),
            )
        ]


def _ident(name: str) -> str:
    """A SQL identifier for the fixes the doctor prints: as it is when plain, else double-quoted."""
    return name if PLAIN_IDENTIFIER.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def _finding(check: str, objects: list[str], status: str, fix: str, detail: str = "") -> Finding:
    return Finding(check, status if objects else OK, objects, fix if objects else "", detail if objects else "")


def check_role_attributes(audit: Audit) -> list[Finding]:
    (superuser, bypass, role), = audit.rows(
        "SELECT rolsuper, rolbypassrls, rolname FROM pg_roles WHERE rolname = current_user", as_admin=False
    )
    flagged = [f"{role} ({'superuser' if superuser else 'BYPASSRLS'})"] if superuser or bypass else []
    return [_finding("upstream role bypasses RLS", flagged, FAIL,
                     f"ALTER ROLE {role} NOSUPERUSER NOBYPASSRLS;",
                     "superusers and BYPASSRLS roles ignore every policy")]


def check_ownership(audit: Audit) -> list[Finding]:
    role = audit.settings.upstream.user
    owned = [name for name, _, _, owner in audit.tenant_tables() if owner == role]
    (database_owner,), = audit.rows("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()")
    return [
        _finding("upstream role owns tenant tables", owned, FAIL,
                 "\n".join(f"ALTER TABLE {name} OWNER TO <admin role>;" for name in owned),
                 "an owner can ALTER TABLE ... DISABLE ROW LEVEL SECURITY or DROP POLICY"),
        _finding("upstream role owns the database", [role] if database_owner == role else [], WARN,
                 "ALTER DATABASE current_database() OWNER TO <admin role>;".replace(
                     "current_database()", audit.upstream.info.dbname),
                 "a database owner can create schemas, and so functions and views"),
    ]


def check_create_and_temp(audit: Audit) -> list[Finding]:
    schemas = [row[0] for row in audit.rows(
        "SELECT n.nspname FROM pg_namespace n WHERE has_schema_privilege(current_user, n.oid, 'CREATE')"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'"
        " ORDER BY 1", as_admin=False)]
    (temp, create), = audit.rows("SELECT has_database_privilege(current_database(), 'TEMP'),"
                                 " has_database_privilege(current_database(), 'CREATE')", as_admin=False)
    role = _ident(audit.settings.upstream.user)
    database = _ident(audit.upstream.info.dbname)
    granted = [privilege for privilege, held in (("TEMPORARY", temp), ("CREATE", create)) if held]
    return [
        _finding("upstream role can CREATE in a schema", schemas, FAIL,
                 "\n".join(f"REVOKE CREATE ON SCHEMA {_ident(s)} FROM PUBLIC, {role};" for s in schemas),
                 "a function created by a tenant hides any SQL from the guard (ALTER ROLE, set_config); "
                 "objects on search_path change what other queries mean"),
        _finding("upstream role can create TEMP objects or schemas", granted, FAIL,
                 f"REVOKE {', '.join(granted)} ON DATABASE {database} FROM PUBLIC, {role};",
                 "a plpgsql function in pg_temp runs dynamic SQL past the guard; CREATE on the database makes "
                 "schemas, publications and trusted extensions"),
    ]


def check_languages(audit: Audit) -> list[Finding]:
    usable = [row[0] for row in audit.rows(
        "SELECT lanname FROM pg_language WHERE lanpltrusted AND lanname <> 'sql'"
        " AND has_language_privilege(oid, 'USAGE') ORDER BY 1", as_admin=False)]
    role = _ident(audit.settings.upstream.user)
    return [_finding("upstream role can use a procedural language", usable, FAIL,
                     "\n".join(f"REVOKE USAGE ON LANGUAGE {_ident(name)} FROM PUBLIC, {role};" for name in usable),
                     "a DO block runs dynamic SQL: EXECUTE 'ALTER ROLE CURRENT_USER PASSWORD ...' gets past the "
                     "guard and locks every tenant out")]


def check_table_privileges(audit: Audit) -> list[Finding]:
    held = audit.rows(
        "SELECT c.oid::regclass::text, string_agg(p.privilege, ', ' ORDER BY p.privilege)"
        " FROM pg_class c CROSS JOIN (VALUES ('TRUNCATE'), ('TRIGGER'), ('REFERENCES')) AS p (privilege)"
        " WHERE c.relrowsecurity AND c.relkind IN ('r', 'p') AND has_table_privilege(c.oid, p.privilege)"
        " GROUP BY 1 ORDER BY 1", as_admin=False)
    role = _ident(audit.settings.upstream.user)
    return [_finding("upstream role holds privileges that bypass RLS", [f"{name} ({privileges})" for name, privileges in held],
                     FAIL, "\n".join(f"REVOKE {privileges} ON TABLE {name} FROM PUBLIC, {role};" for name, privileges in held),
                     "TRUNCATE empties every tenant's rows; TRIGGER runs code on every tenant's writes; REFERENCES "
                     "tests other tenants' keys through a foreign key")]


def check_memberships(audit: Audit) -> list[Finding]:
    roles = [row[0] for row in audit.rows(
        "SELECT r FROM unnest(%s::text[]) AS r WHERE pg_has_role(current_user, r, 'MEMBER') ORDER BY 1",
        (list(PRIVILEGED_ROLES),), as_admin=False)]
    role = _ident(audit.settings.upstream.user)
    return [_finding("upstream role is a member of a privileged predefined role", roles, FAIL,
                     "\n".join(f"REVOKE {name} FROM {role}; -- or from the role it inherits {name} through"
                                for name in roles),
                     "these roles read all data or all sessions, signal any backend, or reach server files")]


def _revocable_objects(audit: Audit, revocation: Revocation) -> list[tuple[str, str, str]]:
    """(object type, privilege, qualified name) of the revocation's objects the upstream role still holds."""
    member = ("SELECT d.objid FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid"
              " WHERE d.classid = %s::regclass AND d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'"
              " AND e.extname LIKE ANY (%s)")
    kind = revocation.kind.value
    patterns = list(revocation.patterns)
    return [(row[0], row[1], row[2]) for row in audit.rows(
        "SELECT 'FUNCTION', 'EXECUTE', quote_ident(n.nspname) || '.' || quote_ident(p.proname)"
        "  || '(' || oidvectortypes(p.proargtypes) || ')'"
        " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE has_function_privilege(p.oid, 'EXECUTE') AND ((%s = 'function' AND n.nspname = 'pg_catalog'"
        f"  AND p.proname LIKE ANY (%s)) OR (%s = 'extension' AND p.oid IN ({member})))"
        " UNION ALL"
        " SELECT 'TABLE', 'SELECT', quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'v', 'm') AND has_table_privilege(c.oid, 'SELECT') AND ((%s = 'relation'"
        f"  AND n.nspname = 'pg_catalog' AND c.relname LIKE ANY (%s)) OR (%s = 'extension' AND c.oid IN ({member})))"
        " ORDER BY 3",
        (kind, patterns, kind, "pg_proc", patterns, kind, patterns, kind, "pg_class", patterns), as_admin=False)]


def check_revocations(audit: Audit) -> list[Finding]:
    """One finding per capability of proxy.hardening.REVOCATIONS the upstream role still holds."""
    role = _ident(audit.settings.upstream.user)
    findings: list[Finding] = []
    for revocation in REVOCATIONS:
        held = _revocable_objects(audit, revocation)
        fix = [f"REVOKE {privilege} ON {kind} {name} FROM PUBLIC, {role};" for kind, privilege, name in held]
        if revocation.kept_by:
            fix += [f"GRANT {privilege} ON {kind} {name} TO {revocation.kept_by};" for kind, privilege, name in held]
        findings.append(_finding(f"upstream role can {revocation.capability}", [name for _, _, name in held], FAIL,
                                 "\n".join(fix), revocation.risk))
    return findings


def check_server_settings(audit: Audit) -> list[Finding]:
    (lo_compat, prepared), = audit.rows(
        "SELECT current_setting('lo_compat_privileges'), current_setting('max_prepared_transactions')::int",
        as_admin=False)
    return [
        _finding("large objects skip privilege checks", ["lo_compat_privileges = on"] if lo_compat == "on" else [],
                 FAIL, "ALTER SYSTEM SET lo_compat_privileges = off; -- superuser, or the provider's parameter group",
                 "with lo_compat_privileges on, any role reads and writes every large object"),
        _finding("prepared transactions are enabled", [f"max_prepared_transactions = {prepared}"] if prepared else [],
                 FAIL, "ALTER SYSTEM SET max_prepared_transactions = 0; -- then restart (or the parameter group)",
                 "a transaction one tenant PREPAREs can be committed or rolled back by any other: COMMIT PREPARED "
                 "only requires the same role"),
    ]


def check_password_login(audit: Audit) -> list[Finding]:
    used = bool(audit.upstream.pgconn.used_password)
    role = audit.settings.upstream.user
    return [_finding("upstream role logs in with a password it can change", [role] if used else [], WARN,
                     "-- in pg_hba.conf: hostssl <database> <role> <proxy address> cert\n"
                     "-- in the proxy's configuration: [upstream] sslcert = FILE and sslkey = FILE",
                     "any role may run ALTER ROLE CURRENT_USER PASSWORD; if SQL ever got past the guard, a tenant "
                     "could lock every other tenant out and log in directly. A client certificate cannot be changed "
                     "from SQL")]


def check_rls(audit: Audit) -> list[Finding]:
    tables = audit.tenant_tables()
    disabled = [name for name, enabled, _, _ in tables if not enabled]
    unforced = [name for name, enabled, forced, _ in tables if enabled and not forced]
    return [
        _finding(f"tenant tables ({audit.tenant_column}) without RLS", disabled, FAIL,
                 "\n".join(f"ALTER TABLE {n} ENABLE ROW LEVEL SECURITY; ALTER TABLE {n} FORCE ROW LEVEL SECURITY;"
                           for n in disabled)),
        _finding(f"tenant tables ({audit.tenant_column}) without FORCE RLS", unforced, FAIL,
                 "\n".join(f"ALTER TABLE {n} FORCE ROW LEVEL SECURITY;" for n in unforced),
                 "without FORCE the table owner, and anything running as it, ignores the policies"),
    ]


def _policies(audit: Audit) -> list[tuple[str, str, str, str | None, str | None]]:
    """(policy on table, table, command, USING, WITH CHECK) of user tables."""
    return [
        (f"{row[0]} on {row[1]}", row[1], row[2], row[3], row[4])
        for row in audit.rows(
            "SELECT pol.polname, c.oid::regclass::text, pol.polcmd,"
            " pg_get_expr(pol.polqual, pol.polrelid), pg_get_expr(pol.polwithcheck, pol.polrelid)"
            " FROM pg_policy pol JOIN pg_class c ON c.oid = pol.polrelid"
            f" JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {USER_SCHEMAS} ORDER BY 2, 1"
        )
    ]


def check_policies(audit: Audit) -> list[Finding]:
    setting = audit.settings.tenant.setting
    policies = _policies(audit)
    raw = [name for name, _, _, using, check in policies
           if setting in f"{using} {check}" and "tenant_proxy.current_tenant()" not in f"{using} {check}"]
    no_check = [name for name, _, command, using, check in policies
                if command in ("*", "a", "w") and check is None and using not in (None, "true")]
    immutable = [f"{row[0]} on {row[1]} calls {row[2]}" for row in audit.rows(
        "SELECT DISTINCT pol.polname, pol.polrelid::regclass::text, p.oid::regprocedure::text"
        " FROM pg_depend d JOIN pg_policy pol ON d.classid = 'pg_policy'::regclass AND d.objid = pol.oid"
        " JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND d.refobjid = p.oid"
        " WHERE p.provolatile = 'i' AND p.pronamespace <> 'pg_catalog'::regnamespace ORDER BY 1, 2")]
    strict = "(SELECT tenant_proxy.current_tenant())"
    return [
        _finding("policies read the raw tenant setting", raw, WARN if audit.allow_plain_policies else FAIL,
                 f"-- replace current_setting('{setting}') by {strict} in USING and WITH CHECK",
                 "any client can set a custom setting (set_config hidden from the guard), so such a policy "
                 "shows whichever tenant it names; only the verifier checks the proxy's proof"
                 + (" (allowed by --allow-plain-policies)" if audit.allow_plain_policies else "")),
        _finding("policies call an IMMUTABLE function", immutable, FAIL,
                 "-- mark each function STABLE: ALTER FUNCTION <name> STABLE;",
                 "a cached plan freezes an IMMUTABLE function's value across tenants"),
        _finding("policies without WITH CHECK", no_check, WARN,
                 "-- add WITH CHECK (...) equal to USING, so the rule for writes is stated",
                 "Postgres reuses USING for ALL and UPDATE policies; stating it avoids surprises when it changes"),
    ]


def _dependents(audit: Audit, relkind: str) -> list[tuple[str, str]]:
    """(view, options) of views or materialized views that read a tenant table."""
    return [
        (row[0], row[1] or "")
        for row in audit.rows(
            "SELECT DISTINCT v.oid::regclass::text, array_to_string(v.reloptions, ',')"
            " FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class"
            " JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid"
            "  AND d.refclassid = 'pg_class'::regclass"
            " JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attname = %s AND NOT a.attisdropped"
            " JOIN pg_class t ON t.oid = d.refobjid AND t.relkind IN ('r', 'p')"
            " JOIN pg_namespace n ON n.oid = v.relnamespace"
            f" WHERE v.relkind = %s AND v.oid <> d.refobjid AND {USER_SCHEMAS} ORDER BY 1",
            (audit.tenant_column, relkind),
        )
    ]


def check_views(audit: Audit) -> list[Finding]:
    definer = [name for name, options in _dependents(audit, "v") if "security_invoker=true" not in options.lower()]
    materialized = [name for name, _ in _dependents(audit, "m")]
    return [
        _finding("views over tenant tables without security_invoker", definer, WARN,
                 "\n".join(f"ALTER VIEW {n} SET (security_invoker = true);" for n in definer),
                 "a view runs with its owner's rights; an owner that bypasses RLS shows every tenant"),
        _finding("materialized views over tenant tables", materialized, WARN,
                 "\n".join(f"REVOKE ALL ON {n} FROM PUBLIC; -- or replace it by a view" for n in materialized),
                 "a materialized view stores rows without RLS"),
    ]


def check_indexes(audit: Audit) -> list[Finding]:
    column = audit.tenant_column
    missing = [row[0] for row in audit.rows(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = %s AND NOT a.attisdropped"
        f" WHERE c.relkind IN ('r', 'p') AND {USER_SCHEMAS} AND NOT EXISTS ("
        "  SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indkey[0] = a.attnum) ORDER BY 1",
        (column,))]
    return [_finding(f"tenant tables without an index leading with {column}", missing, WARN,
                     "\n".join(f"CREATE INDEX ON {n} ({column});" for n in missing),
                     "every query carries the tenant filter; without an index it scans every tenant's rows")]


def check_verifier(audit: Audit) -> list[Finding]:
    installed = audit.rows(
        "SELECT p.provolatile, p.prosecdef, pg_get_userbyid(p.proowner) FROM pg_proc p"
        " WHERE p.oid = to_regprocedure('tenant_proxy.current_tenant()')"
    )
    install = "pg-tenant-proxy sql --config FILE | psql -f - ADMIN_DSN"
    if not installed:
        return [Finding("verifier installed and key matches", FAIL, ["tenant_proxy.current_tenant()"], install,
                        "the verifier is not installed")]
    volatile, definer, owner = installed[0]
    problems: list[str] = []
    if volatile != "s" or not definer:
        problems.append("tenant_proxy.current_tenant() is not STABLE SECURITY DEFINER")
    if owner == audit.settings.upstream.user:
        problems.append(f"tenant_proxy.current_tenant() is owned by the upstream role {owner}")
    (readable,), = audit.rows("SELECT has_table_privilege('tenant_proxy.signing_key', 'SELECT')", as_admin=False)
    if readable:
        problems.append("the upstream role can read tenant_proxy.signing_key")
    try:
        verified, forged = _self_test(audit)
    except psycopg.Error as exc:
        problems.append(f"self-test failed: {exc.diag.message_primary or exc}")
        verified, forged = SELF_TEST_TENANT, None
    if verified != SELF_TEST_TENANT:
        problems.append("self-test: a proof signed with the configured key is not accepted (key mismatch?)")
    if forged is not None:
        problems.append("self-test: a forged proof is accepted")
    return [_finding("verifier installed and key matches", problems, FAIL,
                     f"-- re-install with the proxy's key: {install}")]


# The verifier's functions (proxy/sql/verifier.sql) that the proxy calls (reset_session, at a tenant
# switch in transaction mode) and that policies call (current_tenant, claims, claim). A verifier
# installed by an older release lacks some: the proxy's calls then fail (a tenant switch reads
# "could not prepare a server connection").
VERIFIER_FUNCTIONS = ("tenant_proxy.current_tenant()", "tenant_proxy.claims()", "tenant_proxy.claim(text)",
                      "tenant_proxy.reset_session()")


def missing_verifier_functions(conn: psycopg.Connection[Any]) -> list[str]:
    """The VERIFIER_FUNCTIONS that `conn`'s role cannot call: not installed, or no EXECUTE privilege."""
    rows = conn.execute(
        "SELECT f FROM pg_catalog.unnest(%s::text[]) WITH ORDINALITY AS u(f, n)"
        " WHERE NOT coalesce(pg_catalog.has_function_privilege(pg_catalog.to_regprocedure(f), 'EXECUTE'), false)"
        " ORDER BY n",
        (list(VERIFIER_FUNCTIONS),),
    ).fetchall()
    return [row[0] for row in rows]


def install_command(settings: Settings) -> str:
    """The command that installs the current verifier, naming the configuration file when there is one."""
    config = settings.source if settings.source not in ("<defaults>", "<environment>") else "FILE"
    return f"pg-tenant-proxy sql --config {config} | psql -f - ADMIN_DSN"


def check_verifier_functions(audit: Audit) -> list[Finding]:
    missing = missing_verifier_functions(audit.upstream)
    return [_finding("verifier has every function the proxy calls", missing, FAIL,
                     f"-- install the current verifier: {install_command(audit.settings)}",
                     "the verifier is older than the proxy: its calls fail, and tenant switches read"
                     " \"could not prepare a server connection\"")]


def _self_test(audit: Audit) -> tuple[str | None, str | None]:
    """Set a context the way the proxy does, then with a forged proof; what the verifier says to each."""
    tenant = audit.settings.tenant
    conn = audit.upstream
    proof = sign(tenant.signing_key.encode(), SELF_TEST_TENANT, conn.info.backend_pid, int(time.time()) + 60)
    forged = proof[:-1] + ("1" if proof.endswith("0") else "0")
    answers: list[str | None] = []
    with conn.transaction(force_rollback=True):
        for candidate in (proof, forged):
            conn.execute(
                f"SELECT pg_catalog.set_config({quote_literal(tenant.setting)}, %s, true),"
                f" pg_catalog.set_config({quote_literal(tenant.proof_setting)}, %s, true)",
                (SELF_TEST_TENANT, candidate),
            )
            answers.append(conn.execute("SELECT tenant_proxy.current_tenant()").fetchone()[0])  # type: ignore[index]
    return answers[0], answers[1]


# The checks of what the role the proxy logs in as may do; run for each [roles.map] login role too.
ROLE_CHECKS: list[Callable[[Audit], list[Finding]]] = [
    check_role_attributes,
    check_ownership,
    check_create_and_temp,
    check_languages,
    check_table_privileges,
    check_memberships,
    check_revocations,
    check_password_login,
]

CHECKS: list[Callable[[Audit], list[Finding]]] = [
    *ROLE_CHECKS,
    check_server_settings,
    check_rls,
    check_policies,
    check_views,
    check_indexes,
    check_verifier,
    check_verifier_functions,
]


def check_role_separation(audit: Audit) -> list[Finding]:
    """[roles]: no mapped login role is a member of another (directly or through other roles)."""
    users = sorted({login.user for login in audit.settings.roles.logins.values()})
    pairs = audit.rows(
        "SELECT m, r FROM unnest(%s::text[]) AS m, unnest(%s::text[]) AS r"
        " WHERE m <> r AND to_regrole(quote_ident(m)) IS NOT NULL AND to_regrole(quote_ident(r)) IS NOT NULL"
        " AND pg_has_role(m, r, 'MEMBER') ORDER BY 1, 2", (users, users))
    return [_finding("mapped roles are members of one another", [f"{m} is a member of {r}" for m, r in pairs], FAIL,
                     "\n".join(f"REVOKE {_ident(r)} FROM {_ident(m)}; -- or from the role it inherits {r} through"
                               for m, r in pairs),
                     "a session may SET ROLE to any role its login role is a member of, so one value of the role "
                     "claim would get another's privileges")]


def check_mapped_roles(audit: Audit) -> list[Finding]:
    """Each [roles.map] login role, logged in as itself, through the same checks as the upstream role
    (ROLE_CHECKS), each finding named after the role and its claim value."""
    findings: list[Finding] = []
    for value, login in audit.settings.roles.logins.items():
        label = f"mapped role {login.user} (role claim {value!r})"
        settings = replace(audit.settings, upstream=login)
        try:
            conn = connect_upstream(settings, audit.upstream.info.dbname)
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            findings.append(Finding(f"{label}: logs in", FAIL, [login.user], f"-- check [roles.map] {value}", reason))
            continue
        with conn:
            role_audit = replace(audit, upstream=conn, settings=settings)
            for check in ROLE_CHECKS:
                findings += [replace(finding, check=f"{label}: {finding.check}") for finding in check(role_audit)]
    return findings


def run_checks(audit: Audit) -> list[Finding]:
    findings: list[Finding] = []
    for check in CHECKS:
        findings += check(audit)
    if audit.settings.roles.logins:
        findings += check_role_separation(audit) + check_mapped_roles(audit)
    return findings


def connect_upstream(settings: Settings, database: str) -> psycopg.Connection[Any]:
    upstream = settings.upstream
    options: dict[str, Any] = {"sslmode": upstream.sslmode}
    for option, value in (("sslrootcert", upstream.ca_file), ("sslcert", upstream.sslcert), ("sslkey", upstream.sslkey)):
        if value:
            options[option] = value
    return psycopg.connect(
        host=upstream.host, port=upstream.port, user=upstream.user, password=upstream.password or "",
        dbname=database, autocommit=True, connect_timeout=int(upstream.connect_timeout_seconds), **options,
    )


_COLOURS = {OK: "\033[32m", WARN: "\033[33m", FAIL: "\033[31m"}


def render_table(findings: list[Finding], colour: bool) -> str:
    """A terminal table: one line per check, then the fix under each problem."""
    width = max(len(f.check) for f in findings)
    lines: list[str] = [f"{'':4}  {'problem looked for'.ljust(width)}  objects found"]
    for finding in findings:
        status = finding.status.upper().ljust(4)
        if colour:
            status = f"{_COLOURS[finding.status]}{status}\033[0m"
        shown = finding.objects[:5] + ([f"and {len(finding.objects) - 5} more"] if len(finding.objects) > 5 else [])
        lines.append(f"{status}  {finding.check.ljust(width)}  {', '.join(shown)}")
        if finding.detail:
            lines.append(f"      {' ' * width}  why: {finding.detail}")
        fix_lines = finding.fix.splitlines()
        for fix_line in fix_lines[:MAX_FIX_LINES]:
            lines.append(f"      {' ' * width}  fix: {fix_line}")
        if len(fix_lines) > MAX_FIX_LINES:
            lines.append(f"      {' ' * width}  fix: ... {len(fix_lines) - MAX_FIX_LINES} more lines (--json shows all;"
                         " pg-tenant-proxy sql --config FILE fixes all)")
    counts = {status: sum(f.status == status for f in findings) for status in (OK, WARN, FAIL)}
    lines.append(f"\n{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
    return "\n".join(lines)


def run_doctor(settings: Settings, database: str | None, admin_dsn: str | None, as_json: bool,
               tenant_column: str, allow_plain_policies: bool = False) -> int:
    """Run every check and print the report; exit status 1 when any check fails, 2 when it cannot run."""
    if psycopg is None:
        print(f"error: {EXTRA_MISSING}", file=sys.stderr)
        return 2
    allowed = settings.upstream.databases or []
    database = database or settings.upstream.database or (allowed[0] if len(allowed) == 1 else None)
    if not database:
        print(f"error: give --database, one of [upstream] databases ({', '.join(allowed)}); audit each", file=sys.stderr)
        return 2
    try:
        upstream = connect_upstream(settings, database)
        admin = psycopg.connect(admin_dsn, dbname=database, autocommit=True) if admin_dsn else None
    except psycopg.OperationalError as exc:
        print(f"error: cannot connect: {str(exc).strip()}", file=sys.stderr)
        return 2
    try:
        findings = run_checks(Audit(upstream, admin, settings, tenant_column, allow_plain_policies))
    finally:
        upstream.close()
        if admin is not None:
            admin.close()
    if as_json:
        print(json.dumps({"database": database, "findings": [asdict(f) for f in findings]}, indent=2))
    else:
        print(f"pg-tenant-proxy doctor: database {database}, upstream role {settings.upstream.user}"
              f"{', with admin' if admin_dsn else ''}\n")
        print(render_table(findings, colour=sys.stdout.isatty()))
    return 1 if any(f.status == FAIL for f in findings) else 0
