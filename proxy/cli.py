"""The command line: `pg-tenant-proxy run | check | token | sql | doctor | demo`, each with --help."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from proxy import __version__, config, logs
from proxy.auth.claims import ClaimPathError, parse_claim_path
from proxy.hardening import hardening_sql
from proxy.tokens import mint
from proxy.verifier import verifier_sql


def install_uvloop() -> bool:
    """Use uvloop's event loop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def _load(path: str | None, listen: str | None = None) -> config.Settings:
    environ = None
    if listen is not None:
        import os

        environ = {**os.environ, "PGTP_LISTEN": listen}
    return config.load(path, environ)


def cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args.config, args.listen)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # SIGHUP reloads once serving; it never kills the process
    logs.setup(settings.log_level, settings.log_format)
    from proxy.lifecycle import latest
    from proxy.listeners import bind_listeners
    from proxy.server import serve

    def load_settings() -> config.Settings:
        return _load(args.config, args.listen)

    listeners = bind_listeners(settings)  # before forking: every worker inherits these sockets
    uvloop = install_uvloop()
    logging.getLogger("pg_tenant_proxy").info(
        "pg-tenant-proxy %s starting (config %s, event loop %s)", __version__, settings.source, "uvloop" if uvloop else "asyncio"
    )
    try:
        if settings.workers == 1:
            asyncio.run(serve(settings, None, listeners, load_settings))
            return 0
        from proxy.workers import supervise

        return supervise(settings.workers, lambda worker: asyncio.run(
            serve(latest(settings, load_settings), worker, listeners, load_settings)))
    finally:
        listeners.close()


def cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    if args.connect:
        from proxy import doctor
        from proxy.preflight import connect_problems

        if doctor.psycopg is None:
            print(doctor.EXTRA_MISSING, file=sys.stderr)
            return 2
        problems = connect_problems(settings, args.database)
        for problem in problems:
            print(f"pg-tenant-proxy: {problem}", file=sys.stderr)
        if problems:
            return 2
    print(f"configuration {settings.source} is valid" + (" and the upstream and verifier answer" if args.connect else ""))
    return 0


def _claim_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _set_path(claims: dict[str, Any], path: str, value: Any) -> None:
    """Put `value` at a claim path (see proxy/auth/claims.py); a literal claim name is used as is."""
    try:
        steps = [step for step in parse_claim_path(path) if isinstance(step, str)]
    except ClaimPathError:
        steps = [path]
    if "/" in path:
        steps = [path]  # a namespaced claim (Auth0 style: a URL) is one top-level name
    target = claims
    for part in steps[:-1]:
        target = target.setdefault(part, {})
    target[steps[-1]] = value


def _issuer_for_token(settings: config.Settings, name: str | None) -> config.IssuerSettings:
    """The issuer a development token is minted for: `name`, or the first that accepts HS* tokens."""
    for issuer in settings.jwt.issuers:
        if (name is None or issuer.issuer == name) and set(issuer.algorithms) & config.HS_ALGORITHMS:
            return issuer
    raise config.ConfigError(f"jwt: no issuer{' ' + name if name else ''} accepts HS* tokens, so none can be minted")


def _token_claims(args: argparse.Namespace, issuer: config.IssuerSettings | None) -> dict[str, Any]:
    """The claims of a development token: what `issuer` requires, then the command line's."""
    now = int(time.time())
    claims: dict[str, Any] = {"iat": now, "exp": now + args.ttl}
    if issuer is not None:
        if issuer.issuer:
            claims["iss"] = issuer.issuer
        if issuer.audience:
            claims["aud"] = issuer.audience[0]
        for path, accepted in issuer.required_claims.items():
            _set_path(claims, path, accepted[0])
    if args.sub:
        claims["sub"] = args.sub
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--claim expects name=value, got {item!r}")
        _set_path(claims, name, _claim_value(value))
    tenant_claim = args.tenant_claim or (issuer.tenant_claim if issuer else "tenant_id")
    _set_path(claims, tenant_claim, args.tenant)
    return claims


def cmd_token(args: argparse.Namespace) -> int:
    secret, algorithm, issuer = args.secret, args.algorithm, None
    if args.config:
        settings = config.load(args.config)
        issuer = _issuer_for_token(settings, args.issuer)
        secret = secret or settings.jwt.secret
        allowed = [name for name in issuer.algorithms if name in config.HS_ALGORITHMS]
        algorithm = algorithm or allowed[0]
    if not secret:
        print("error: give --secret, or --config with jwt.secret set", file=sys.stderr)
        return 2
    if len(secret.encode()) < 32:  # what `run` requires of jwt.secret: a shorter one mints what no proxy accepts
        print("error: --secret must be at least 32 bytes (as jwt.secret)", file=sys.stderr)
        return 2
    try:
        claims = _token_claims(args, issuer)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(mint(secret, claims, algorithm or "HS256"))
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    if args.config:
        settings = config.load(args.config)
        tenant = settings.tenant
        sys.stdout.write(verifier_sql(tenant.setting, tenant.proof_setting, tenant.signing_key, tenant.claims_setting,
                                      tenant.claims_proof_setting, tenant.previous_signing_key))
        for role in dict.fromkeys([settings.upstream.user, *(login.user for login in settings.roles.logins.values())]):
            sys.stdout.write("\n" + hardening_sql(role))  # [roles]: each mapped login role is hardened too
    else:
        defaults = config.SCHEMA
        sys.stdout.write(verifier_sql(defaults[("tenant", "setting")][1], defaults[("tenant", "proof_setting")][1], None))
        sys.stdout.write("\n" + hardening_sql(None))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from proxy.doctor import run_doctor

    settings = config.load(args.config)
    return run_doctor(settings, args.database, args.admin_dsn, args.json, args.tenant_column, args.allow_plain_policies)


def cmd_demo(args: argparse.Namespace) -> int:
    from proxy.demo import run_demo

    return run_demo(port=args.port, serve=not args.no_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pg-tenant-proxy",
        description="A Postgres wire-protocol proxy that turns a JWT into tenant isolation.",
    )
    parser.add_argument("--version", action="version", version=f"pg-tenant-proxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="serve clients",
        description="Serve clients until SIGTERM (drain: each client ends at its next idle point, for at most "
        "shutdown_timeout seconds) or SIGINT (stop at once). SIGHUP reloads the configuration and the files it names.",
    )
    run.add_argument("--config", metavar="FILE", help="TOML configuration (PGTP_* variables override it)")
    run.add_argument("--listen", metavar="HOST:PORT", help="override the listen key")
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check",
        help="validate the configuration as run would",
        description="Validate the configuration as `run` would use it: TOML, PGTP_* variables, ranges, "
        "key material (PEM key, JWKS file, JWKS URL), TLS files. With --connect also log in upstream and "
        "check the verifier and the signing key. Exits 0, or 2 with one line per problem naming the key.",
    )
    check.add_argument("--config", metavar="FILE", help="TOML configuration (PGTP_* variables override it)")
    check.add_argument("--connect", action="store_true", help="also log in upstream, check the verifier, fetch the JWKS URL")
    check.add_argument("--database", help="database for --connect (default: [upstream] database, else the user's)")
    check.set_defaults(func=cmd_check)

    token = commands.add_parser(
        "token",
        help="mint a development token",
        description="Mint an HS-signed development token. With --config the token is one that configuration "
        "accepts: its secret and algorithm, issuer, first audience, required claims and tenant claim.",
    )
    token.add_argument("--secret", help="the HS secret (default: jwt.secret of --config)")
    token.add_argument("--config", metavar="FILE", help="mint a token this configuration accepts")
    token.add_argument("--issuer", help="with --config and [[jwt.issuers]]: the issuer to mint for (default: the first accepting HS*)")
    token.add_argument("--tenant", required=True, help="the tenant id to put in the tenant claim")
    token.add_argument("--tenant-claim", help="claim path for the tenant (default: the configuration's, or tenant_id)")
    token.add_argument("--sub", help="the subject claim")
    token.add_argument("--ttl", type=int, default=3600,
                       help="seconds until the token expires (default 3600; a negative value mints a token that "
                            "expired that long ago, to try refusals)")
    token.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE", help="an extra claim (JSON value or text)")
    token.add_argument("--algorithm", choices=sorted(config.HS_ALGORITHMS),
                       help="default: the configuration's first HS* algorithm, or HS256")
    token.set_defaults(func=cmd_token)

    sql = commands.add_parser(
        "sql",
        help="print the SQL that installs the verifier and hardens the upstream role",
        description="Print the idempotent SQL that installs tenant_proxy.current_tenant(), then the SQL that "
        "takes from the upstream role every capability that reaches across tenants (see docs/security.md). "
        "Run it as the database owner or a superuser, in each database the proxy serves. With --config it "
        "includes that configuration's signing key (re-run to rotate) and upstream role; without, pass the "
        "role to psql: psql -v upstream_role=NAME.",
    )
    sql.add_argument("--config", metavar="FILE",
                     help="include this configuration's setting names, signing key and upstream role")
    sql.set_defaults(func=cmd_sql)

    doctor = commands.add_parser(
        "doctor",
        help="audit the database for setups that leak tenants",
        description="Check the upstream role (every capability the hardening SQL removes, checked with "
        "Postgres's privilege functions), RLS, policies, views, indexes and the verifier; print each finding "
        "with its fix. Exits 1 when any check fails.",
    )
    doctor.add_argument("--config", metavar="FILE", required=True, help="the proxy's configuration")
    doctor.add_argument("--admin-dsn", metavar="DSN", help="also read the catalog as this (admin) connection")
    doctor.add_argument("--database", help="the database to audit (default: [upstream] database)")
    doctor.add_argument("--tenant-column", default="tenant_id", help="the column that marks tenant tables")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--allow-plain-policies", action="store_true",
                        help="only warn (not fail) on policies that read the plain tenant setting, which any "
                        "client can forge; for teams that accept that risk")
    doctor.set_defaults(func=cmd_doctor)

    demo = commands.add_parser(
        "demo", help="run the embedded demo", description="Start a throwaway Postgres and the proxy, and show isolation."
    )
    demo.add_argument("--port", type=int, default=6432, help="port for the proxy (default 6432)")
    demo.add_argument("--no-serve", action="store_true", help="exit after the demonstration instead of serving")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except config.ListenError as exc:
        print(f"pg-tenant-proxy: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `pg-tenant-proxy sql | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(f"pg-tenant-proxy: configuration error: {problem}", file=sys.stderr)
        return 2
