"""Typed settings: a TOML file, overridden by PGTP_* environment variables, checked before serving.

Every key lives in one table below (`SCHEMA`), with its type and default; the README documents the
same list. An unknown key, a wrong type or an impossible combination raises ConfigError naming the key.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from proxy.guard import DEFAULT_MAX_PARSE_BYTES
from proxy.auth.claims import ClaimPathError, parse_claim_path

POOL_MODES = ("session", "transaction")
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"

DEFAULT_ALLOWED_PARAMETERS = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "IntervalStyle",
    "extra_float_digits",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "bytea_output",
    "client_min_messages",
    "standard_conforming_strings",
    "timezone_abbreviations",
    "jit",
]

HS_ALGORITHMS = {"HS256", "HS384", "HS512"}
KEY_ALGORITHMS = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
SSLMODES = {"disable", "prefer", "require", "verify-ca", "verify-full"}
CHANNEL_BINDINGS = ("disable", "prefer", "require")
AUTH_METHODS = {"password", "md5", "gss", "sspi", "scram-sha-256", "none"}
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)+$")


class ConfigError(Exception):
    """A configuration problem; the message names the key."""


class TableList(list):  # type: ignore[type-arg]
    """The kind of a key holding a TOML array of tables (`[[jwt.issuers]]`); JSON in the environment."""


# (section, key) -> (type, default). Section "" holds top-level keys. `None` default means unset.
SCHEMA: dict[tuple[str, str], tuple[type, Any]] = {
    ("", "listen"): (str, "127.0.0.1:6432"),
    ("", "log_level"): (str, "info"),
    ("", "workers"): (int, 1),
    ("upstream", "host"): (str, "127.0.0.1"),
    ("upstream", "port"): (int, 5432),
    ("upstream", "user"): (str, None),
    ("upstream", "password"): (str, None),
    ("upstream", "password_file"): (str, None),
    ("upstream", "database"): (str, None),
    ("upstream", "databases"): (list, None),
    ("upstream", "sslmode"): (str, "prefer"),
    ("upstream", "ca_file"): (str, None),
    ("upstream", "sslcert"): (str, None),
    ("upstream", "sslkey"): (str, None),
    ("upstream", "connect_timeout_seconds"): (float, 10.0),
    ("upstream", "channel_binding"): (str, "prefer"),
    ("upstream", "require_auth"): (str, None),
    ("jwt", "algorithms"): (list, ["HS256"]),
    ("jwt", "secret"): (str, None),
    ("jwt", "secret_file"): (str, None),
    ("jwt", "public_key_file"): (str, None),
    ("jwt", "jwks_file"): (str, None),
    ("jwt", "jwks_url"): (str, None),
    ("jwt", "audience"): (list, None),
    ("jwt", "issuer"): (str, None),
    ("jwt", "discovery"): (bool, False),
    ("jwt", "issuers"): (TableList, []),
    ("jwt", "required_claims"): (dict, {}),
    ("jwt", "leeway_seconds"): (int, 0),
    ("jwt", "tenant_claim"): (str, "tenant_id"),
    ("jwt", "tenant_pattern"): (str, UUID_PATTERN),
    ("jwt", "jwks_refresh_seconds"): (float, 300.0),
    ("jwt", "jwks_min_refresh_seconds"): (float, 60.0),
    ("jwt", "jwks_max_refresh_seconds"): (float, 3600.0),
    ("jwt", "jwks_refetch_interval_seconds"): (float, 10.0),
    ("jwt", "jwks_max_stale_seconds"): (float, 3600.0),
    ("jwt", "jwks_timeout_seconds"): (float, 5.0),
    ("jwt", "denylist_file"): (str, None),
    ("jwt", "max_expiry_seconds"): (int, 366 * 86_400),
    ("tenant", "setting"): (str, "app.current_tenant"),
    ("tenant", "proof_setting"): (str, "tenant_proxy.proof"),
    ("tenant", "signing_key"): (str, None),
    ("tenant", "signing_key_file"): (str, None),
    ("tenant", "claims"): (list, ["sub", "role"]),
    ("tenant", "max_claims_bytes"): (int, 4096),
    ("tenant", "claims_setting"): (str, "request.jwt.claims"),
    ("tenant", "claims_proof_setting"): (str, "tenant_proxy.claims_proof"),
    ("pool", "mode"): (str, "session"),
    ("pool", "size"): (int, 20),
    ("pool", "min_size"): (int, 0),
    ("pool", "max_client_connections"): (int, 10_000),
    ("pool", "max_prepared_statements"): (int, 200),
    ("pool", "checkout_timeout"): (float, 30.0),
    ("pool", "server_idle_timeout"): (float, 600.0),
    ("pool", "server_lifetime"): (float, 3600.0),
    ("tls", "cert_file"): (str, None),
    ("tls", "key_file"): (str, None),
    ("client", "auth_timeout_seconds"): (float, 15.0),
    ("client", "max_startup_packet"): (int, 10_000),
    ("client", "max_auth_message"): (int, 65_536),
    ("client", "max_message"): (int, 1 << 30),
    ("client", "max_prepared_statement_bytes"): (int, 16 << 20),
    ("client", "allowed_parameters"): (list, DEFAULT_ALLOWED_PARAMETERS),
    ("guard", "enabled"): (bool, True),
    ("guard", "allow_do"): (bool, False),
    ("guard", "protected_prefixes"): (list, ["app.", "request.jwt."]),
    ("guard", "max_parse_bytes"): (int, DEFAULT_MAX_PARSE_BYTES),
    ("guard", "allow_explain"): (bool, False),
    ("guard", "allow_strong_locks"): (bool, False),
    ("guard", "allow_notifications"): (bool, False),
    ("guard", "allow_large_objects"): (bool, False),
    ("guard", "allow_backend_signals"): (bool, False),
    ("guard", "allow_function_call"): (bool, False),
}


@dataclass(frozen=True)
class UpstreamSettings:
    host: str
    port: int
    user: str
    password: str | None
    database: str | None
    databases: list[str] | None
    sslmode: str
    ca_file: str | None
    sslcert: str | None
    sslkey: str | None
    connect_timeout_seconds: float
    channel_binding: str = "prefer"
    require_auth: str | None = None

    def allowed(self, database: str) -> bool:
        """Whether a client may reach `database`, the name in its startup packet (the user name when it
        names none). The allowlist is `databases` when set, else only `database`; `load` refuses a
        configuration with neither. A client refused here gets 3D000 with a message that does not say
        whether the database exists."""
        return database in (self.databases if self.databases is not None else [self.database])


@dataclass(frozen=True)
class IssuerSettings:
    """One identity provider: how its tokens are selected (`issuer`), keyed and checked."""

    issuer: str | None
    discovery: bool
    algorithms: list[str]
    secret: str | None = field(repr=False)
    public_key_file: str | None
    jwks_file: str | None
    jwks_url: str | None
    audience: list[str] | None
    required_claims: dict[str, list[Any]]
    tenant_claim: str
    tenant_pattern: str


@dataclass(frozen=True)
class JwtSettings:
    """`issuers` is the single-issuer form's one entry, or the `[[jwt.issuers]]` tables; `sql_claims`
    and `max_claims_bytes` come from `[tenant] claims` and `[tenant] max_claims_bytes`."""

    issuers: list[IssuerSettings]
    leeway_seconds: int = 0
    jwks_refresh_seconds: float = 300.0
    jwks_min_refresh_seconds: float = 60.0
    jwks_max_refresh_seconds: float = 3600.0
    jwks_refetch_interval_seconds: float = 10.0
    jwks_max_stale_seconds: float = 3600.0
    jwks_timeout_seconds: float = 5.0
    denylist_file: str | None = None
    max_expiry_seconds: int = 366 * 86_400
    sql_claims: list[str] = field(default_factory=lambda: ["sub", "role"])
    max_claims_bytes: int = 4096

    @property
    def secret(self) -> str | None:
        """The HS secret (shared by all issuers)."""
        return self.issuers[0].secret


@dataclass(frozen=True)
class TenantSettings:
    setting: str
    proof_setting: str
    signing_key: str
    claims_setting: str = "request.jwt.claims"
    claims_proof_setting: str = "tenant_proxy.claims_proof"


@dataclass(frozen=True)
class PoolSettings:
    mode: str
    size: int
    min_size: int
    max_client_connections: int
    max_prepared_statements: int
    checkout_timeout: float
    server_idle_timeout: float
    server_lifetime: float


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str | None
    key_file: str | None


@dataclass(frozen=True)
class ClientSettings:
    auth_timeout_seconds: float
    max_startup_packet: int
    max_auth_message: int
    max_message: int
    max_prepared_statement_bytes: int
    allowed_parameters: list[str]


@dataclass(frozen=True)
class GuardSettings:
    enabled: bool
    allow_do: bool
    protected_prefixes: list[str]
    max_parse_bytes: int
    allow_explain: bool
    allow_strong_locks: bool
    allow_notifications: bool
    allow_large_objects: bool
    allow_backend_signals: bool
    allow_function_call: bool


@dataclass(frozen=True)
class Settings:
    listen_host: str
    listen_port: int
    log_level: str
    workers: int
    upstream: UpstreamSettings
    jwt: JwtSettings
    tenant: TenantSettings
    pool: PoolSettings
    tls: TlsSettings
    client: ClientSettings
    guard: GuardSettings
    source: str = field(default="<defaults>")


SectionSettings = TypeVar("SectionSettings")


def _section(values: dict[tuple[str, str], Any], section: str, kind: type[SectionSettings]) -> SectionSettings:
    """A section's settings as they were read, for sections whose keys are exactly `kind`'s fields."""
    return kind(**{item.name: values[(section, item.name)] for item in fields(kind)})  # type: ignore[arg-type]


def env_name(section: str, key: str) -> str:
    """The environment variable that overrides a key: PGTP_<SECTION>_<KEY> or PGTP_<KEY>."""
    return ("PGTP_" + (f"{section}_" if section else "") + key).upper()


def _dotted(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _coerce(section: str, key: str, kind: type, value: Any, from_env: bool) -> Any:
    name = _dotted(section, key)
    if kind in (dict, TableList):
        return _coerce_structure(name, kind, value, from_env)
    if from_env:
        text = str(value).strip()
        if kind is list and text.startswith("["):
            return _coerce(section, key, kind, _json(name, text), False)
        if kind is list:
            return [item.strip() for item in text.split(",") if item.strip()]
        if kind is bool:
            if text.lower() in {"1", "true", "yes", "on"}:
                return True
            if text.lower() in {"0", "false", "no", "off"}:
                return False
            raise ConfigError(f"{name}: expected a boolean, got {text!r}")
        try:
            return kind(text)
        except ValueError as exc:
            raise ConfigError(f"{name}: expected {kind.__name__}, got {text!r}") from exc
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{name}: expected a list of strings")
        return value
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: not valid JSON: {exc}") from exc


def _coerce_structure(name: str, kind: type, value: Any, from_env: bool) -> Any:
    """A table (a JSON object in the environment) or an array of tables (a JSON array of objects)."""
    if from_env:
        value = _json(name, str(value))
    if kind is dict and not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a table")
    if kind is TableList and not (isinstance(value, list) and all(isinstance(item, dict) for item in value)):
        raise ConfigError(f"{name}: expected an array of tables ([[{name}]])")
    return value


def _read_secret(values: dict[tuple[str, str], Any], section: str, key: str) -> str | None:
    """A secret given inline or as `<key>_file`; giving both is an error."""
    inline, path = values[(section, key)], values[(section, f"{key}_file")]
    if inline is not None and path is not None:
        raise ConfigError(f"{section}.{key} and {section}.{key}_file are both set; choose one")
    if path is None:
        return inline
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{section}.{key}_file: cannot read {path}: {exc.strerror}") from exc


def _require_file(values: dict[tuple[str, str], Any], section: str, key: str) -> None:
    path = values[(section, key)]
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{section}.{key}: file {path} does not exist")


def load(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read settings from a TOML file (optional) and the environment; raise ConfigError on any problem."""
    environ = dict(os.environ) if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc

    values: dict[tuple[str, str], Any] = {k: v[1] for k, v in SCHEMA.items()}
    sections = {section for section, _ in SCHEMA if section}
    for name, value in raw.items():
        if isinstance(value, dict):
            if name not in sections:
                raise ConfigError(f"unknown section [{name}]")
            for key, item in value.items():
                if (name, key) not in SCHEMA:
                    raise ConfigError(f"unknown key {name}.{key}")
                values[(name, key)] = _coerce(name, key, SCHEMA[(name, key)][0], item, False)
        else:
            if ("", name) not in SCHEMA:
                raise ConfigError(f"unknown key {name}")
            values[("", name)] = _coerce("", name, SCHEMA[("", name)][0], value, False)
    for (section, key), (kind, _) in SCHEMA.items():
        variable = env_name(section, key)
        if variable in environ:
            values[(section, key)] = _coerce(section, key, kind, environ[variable], True)
    return _build(values, str(path) if path is not None else "<environment>")


def _allowed_databases(values: dict[tuple[str, str], Any]) -> list[str] | None:
    """`[upstream] databases`, checked against `database`: one of them is required."""
    database, databases = values[("upstream", "database")], values[("upstream", "databases")]
    if database is None and not databases:
        raise ConfigError("upstream.database or upstream.databases: set one; without either a client could "
                          "reach every database of the server, postgres and template1 included")
    if database is not None and databases is not None:
        raise ConfigError("upstream.database and upstream.databases are exclusive: database sends every client "
                          "to one database, databases lets clients choose among several")
    return databases


def _check_client_certificate(upstream: UpstreamSettings) -> None:
    """sslcert and sslkey: both or neither, readable files, and TLS on."""
    if bool(upstream.sslcert) != bool(upstream.sslkey):
        raise ConfigError("upstream.sslcert and upstream.sslkey: set both or neither")
    if upstream.sslcert and upstream.sslmode == "disable":
        raise ConfigError("upstream.sslcert: a client certificate needs TLS; sslmode = disable turns it off")
    for key, path in (("sslcert", upstream.sslcert), ("sslkey", upstream.sslkey)):
        if path is not None and not (Path(path).is_file() and os.access(path, os.R_OK)):
            raise ConfigError(f"upstream.{key}: cannot read {path}")
    if upstream.sslcert and upstream.sslkey:
        try:
            ssl.create_default_context().load_cert_chain(upstream.sslcert, upstream.sslkey, password="")
        except ssl.SSLError as exc:
            raise ConfigError("upstream.sslcert and upstream.sslkey: not a certificate and its unencrypted "
                              f"private key in PEM ({exc.reason or exc})") from exc


def _parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen: expected HOST:PORT, got {listen!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


ISSUER_KEYS = (
    "issuer", "discovery", "jwks_url", "jwks_file", "public_key_file",
    "algorithms", "audience", "required_claims", "tenant_claim", "tenant_pattern",
)
KEY_SOURCES = ("public_key_file", "jwks_file", "jwks_url", "discovery")


def _build_jwt(values: dict[tuple[str, str], Any]) -> JwtSettings:
    """[jwt]: the single-issuer form, or `[[jwt.issuers]]` whose tables default to the [jwt] keys."""
    secret = _read_secret(values, "jwt", "secret")
    if secret is not None and len(secret.encode()) < 32:
        raise ConfigError("jwt.secret: must be at least 32 bytes")
    top = {key: values[("jwt", key)] for key in ISSUER_KEYS}
    tables = values[("jwt", "issuers")]
    if tables:
        for key in ("issuer", *KEY_SOURCES):
            if top[key]:
                raise ConfigError(f"jwt.{key}: set it in each [[jwt.issuers]] table, not in [jwt]")
        issuers = [_issuer(f"jwt.issuers[{n}]", {**top, **table}, table, secret) for n, table in enumerate(tables)]
        names = [issuer.issuer for issuer in issuers]
        if len(set(names)) != len(names):
            raise ConfigError("jwt.issuers: two tables name the same issuer")
    else:
        issuers = [_issuer("jwt", top, top, secret)]
    for key in ("jwks_refresh_seconds", "jwks_min_refresh_seconds", "jwks_max_refresh_seconds",
                "jwks_refetch_interval_seconds", "jwks_max_stale_seconds", "jwks_timeout_seconds"):
        if values[("jwt", key)] <= 0:
            raise ConfigError(f"jwt.{key}: must be a positive number of seconds")
    if values[("jwt", "jwks_min_refresh_seconds")] > values[("jwt", "jwks_max_refresh_seconds")]:
        raise ConfigError("jwt.jwks_min_refresh_seconds: must not exceed jwt.jwks_max_refresh_seconds")
    if values[("jwt", "jwks_refetch_interval_seconds")] < 1:
        raise ConfigError("jwt.jwks_refetch_interval_seconds: must be at least 1 second")
    _require_file(values, "jwt", "denylist_file")
    claims = values[("tenant", "claims")]
    if "*" in claims and claims != ["*"] or not all(claims):
        raise ConfigError('tenant.claims: a list of claim names, or "*" alone for all claims')
    if values[("tenant", "max_claims_bytes")] < 2:
        raise ConfigError("tenant.max_claims_bytes: must be at least 2 bytes")
    return JwtSettings(
        issuers=issuers,
        leeway_seconds=values[("jwt", "leeway_seconds")],
        jwks_refresh_seconds=values[("jwt", "jwks_refresh_seconds")],
        jwks_min_refresh_seconds=values[("jwt", "jwks_min_refresh_seconds")],
        jwks_max_refresh_seconds=values[("jwt", "jwks_max_refresh_seconds")],
        jwks_refetch_interval_seconds=values[("jwt", "jwks_refetch_interval_seconds")],
        jwks_max_stale_seconds=values[("jwt", "jwks_max_stale_seconds")],
        jwks_timeout_seconds=values[("jwt", "jwks_timeout_seconds")],
        denylist_file=values[("jwt", "denylist_file")],
        max_expiry_seconds=values[("jwt", "max_expiry_seconds")],
        sql_claims=claims,
        max_claims_bytes=values[("tenant", "max_claims_bytes")],
    )


def _issuer(name: str, merged: dict[str, Any], own: dict[str, Any], secret: str | None) -> IssuerSettings:
    """One issuer's settings from `merged` (its table over the [jwt] keys); `own` is its table alone."""
    for key in own:
        if key not in ISSUER_KEYS:
            raise ConfigError(f"{name}.{key}: unknown key (an issuer table takes {', '.join(ISSUER_KEYS)})")
    for key in ISSUER_KEYS:
        if key in own and own is not merged:
            kind = SCHEMA[("jwt", key)][0]
            merged[key] = _coerce("jwt", key, kind, own[key], False)
    if name != "jwt" and not merged["issuer"]:
        raise ConfigError(f"{name}.issuer: required in each [[jwt.issuers]] table")
    algorithms = merged["algorithms"]
    if not algorithms:
        raise ConfigError(f"{name}.algorithms: at least one algorithm is required")
    for algorithm in algorithms:
        if algorithm not in HS_ALGORITHMS | KEY_ALGORITHMS:
            raise ConfigError(f"{name}.algorithms: {algorithm!r} is not allowed (never 'none')")
    for key in ("public_key_file", "jwks_file"):
        if merged[key] is not None and not Path(merged[key]).is_file():
            raise ConfigError(f"{name}.{key}: file {merged[key]} does not exist")
    if merged["jwks_url"] is not None and not merged["jwks_url"].lower().startswith(("https://", "http://")):
        raise ConfigError(f"{name}.jwks_url: must be an http(s) URL")
    if merged["discovery"] and not merged["issuer"]:
        raise ConfigError(f"{name}.discovery: needs {name}.issuer (discovery reads <issuer>/.well-known/openid-configuration)")
    sources = [key for key in KEY_SOURCES if merged[key]]
    if len(sources) > 1:
        raise ConfigError(f"{name}: {' and '.join(name + '.' + k for k in sources)} are exclusive; choose one")
    if set(algorithms) & HS_ALGORITHMS and not secret:
        raise ConfigError("jwt.secret: required for HS* algorithms (or set jwt.secret_file)")
    if set(algorithms) & KEY_ALGORITHMS and not sources:
        raise ConfigError(f"{name}.public_key_file: required for asymmetric algorithms (or jwks_file / jwks_url / discovery)")
    try:
        re.compile(merged["tenant_pattern"])
    except re.error as exc:
        raise ConfigError(f"{name}.tenant_pattern: not a valid regular expression: {exc}") from exc
    if not merged["tenant_claim"]:
        raise ConfigError(f"{name}.tenant_claim: must not be empty")
    for path in (merged["tenant_claim"], *merged["required_claims"]):
        try:
            parse_claim_path(path)
        except ClaimPathError as exc:
            raise ConfigError(f"{name}: {exc}") from exc
    required = {path: value if isinstance(value, list) else [value] for path, value in merged["required_claims"].items()}
    return IssuerSettings(
        issuer=merged["issuer"],
        discovery=merged["discovery"],
        algorithms=algorithms,
        secret=secret,
        public_key_file=merged["public_key_file"],
        jwks_file=merged["jwks_file"],
        jwks_url=merged["jwks_url"],
        audience=merged["audience"],
        required_claims=required,
        tenant_claim=merged["tenant_claim"],
        tenant_pattern=merged["tenant_pattern"],
    )


def _check_claims_settings(values: dict[tuple[str, str], Any]) -> None:
    names = [values[("tenant", key)] for key in ("setting", "proof_setting", "claims_setting", "claims_proof_setting")]
    for key in ("claims_setting", "claims_proof_setting"):
        if not SETTING_NAME.match(values[("tenant", key)]):
            raise ConfigError(f"tenant.{key}: expected a custom setting name like 'request.jwt.claims'")
    if len({name.lower() for name in names}) != len(names):
        raise ConfigError("tenant.claims_setting and tenant.claims_proof_setting: must differ from each other and "
                          "from tenant.setting and tenant.proof_setting")


def _require_auth(values: dict[tuple[str, str], Any]) -> str | None:
    """[upstream] require_auth and channel_binding, checked with libpq's rules."""
    if values[("upstream", "channel_binding")] not in CHANNEL_BINDINGS:
        raise ConfigError(f"upstream.channel_binding: expected one of {', '.join(CHANNEL_BINDINGS)}")
    if values[("upstream", "channel_binding")] == "require" and values[("upstream", "sslmode")] == "disable":
        raise ConfigError("upstream.channel_binding: 'require' needs TLS, but upstream.sslmode is 'disable'")
    text = values[("upstream", "require_auth")]
    if text is None:
        return None
    methods = [item.strip() for item in text.split(",")]
    negated = [method.startswith("!") for method in methods]
    if any(negated) and not all(negated):
        raise ConfigError("upstream.require_auth: negative and positive methods cannot be mixed")
    for method in methods:
        if method.lstrip("!") not in AUTH_METHODS:
            raise ConfigError(f"upstream.require_auth: {method!r} is not one of {', '.join(sorted(AUTH_METHODS))}")
    return ",".join(methods)


def _build(values: dict[tuple[str, str], Any], source: str) -> Settings:
    listen_host, listen_port = _parse_listen(values[("", "listen")])
    if values[("", "workers")] < 1:
        raise ConfigError("workers: must be at least 1")
    if values[("", "log_level")].lower() not in {"debug", "info", "warning", "error"}:
        raise ConfigError("log_level: expected debug, info, warning or error")

    if not values[("upstream", "user")]:
        raise ConfigError("upstream.user: required (the role the proxy logs in as)")
    if values[("upstream", "sslmode")] not in SSLMODES:
        raise ConfigError(f"upstream.sslmode: expected one of {', '.join(sorted(SSLMODES))}")
    if values[("upstream", "sslmode")] in {"verify-ca", "verify-full"} and not values[("upstream", "ca_file")]:
        raise ConfigError(f"upstream.ca_file: required with sslmode={values[('upstream', 'sslmode')]}")
    _require_file(values, "upstream", "ca_file")
    upstream = UpstreamSettings(
        host=values[("upstream", "host")],
        port=values[("upstream", "port")],
        user=values[("upstream", "user")],
        password=_read_secret(values, "upstream", "password"),
        database=values[("upstream", "database")],
        databases=_allowed_databases(values),
        sslmode=values[("upstream", "sslmode")],
        ca_file=values[("upstream", "ca_file")],
        sslcert=values[("upstream", "sslcert")],
        sslkey=values[("upstream", "sslkey")],
        connect_timeout_seconds=values[("upstream", "connect_timeout_seconds")],
        channel_binding=values[("upstream", "channel_binding")],
        require_auth=_require_auth(values),
    )
    _check_client_certificate(upstream)

    jwt = _build_jwt(values)

    signing_key = _read_secret(values, "tenant", "signing_key")
    if not signing_key:
        raise ConfigError("tenant.signing_key: required (or set tenant.signing_key_file)")
    if len(signing_key.encode()) < 32:
        raise ConfigError("tenant.signing_key: must be at least 32 bytes")
    for key in ("setting", "proof_setting"):
        if not SETTING_NAME.match(values[("tenant", key)]):
            raise ConfigError(f"tenant.{key}: expected a custom setting name like 'app.current_tenant'")
    if values[("tenant", "setting")].lower() == values[("tenant", "proof_setting")].lower():
        raise ConfigError("tenant.proof_setting: must differ from tenant.setting")
    _check_claims_settings(values)
    tenant = TenantSettings(
        values[("tenant", "setting")],
        values[("tenant", "proof_setting")],
        signing_key,
        values[("tenant", "claims_setting")],
        values[("tenant", "claims_proof_setting")],
    )

    if values[("pool", "mode")] not in POOL_MODES:
        raise ConfigError(f"pool.mode: expected one of {', '.join(POOL_MODES)}, got {values[('pool', 'mode')]!r}")
    for key in ("size", "max_client_connections", "max_prepared_statements"):
        if values[("pool", key)] < 1:
            raise ConfigError(f"pool.{key}: must be at least 1")
    if not 0 <= values[("pool", "min_size")] <= values[("pool", "size")]:
        raise ConfigError("pool.min_size: must be between 0 and pool.size")
    for key in ("checkout_timeout", "server_idle_timeout", "server_lifetime"):
        if values[("pool", key)] <= 0:
            raise ConfigError(f"pool.{key}: must be a positive number of seconds")
    pool = _section(values, "pool", PoolSettings)

    if bool(values[("tls", "cert_file")]) != bool(values[("tls", "key_file")]):
        raise ConfigError("tls.cert_file and tls.key_file: set both or neither")
    _require_file(values, "tls", "cert_file")
    _require_file(values, "tls", "key_file")
    tls = _section(values, "tls", TlsSettings)

    for key in ("max_startup_packet", "max_auth_message", "max_message", "max_prepared_statement_bytes"):
        if values[("client", key)] < 64:
            raise ConfigError(f"client.{key}: must be at least 64 bytes")
    client = _section(values, "client", ClientSettings)
    if values[("guard", "max_parse_bytes")] < 1024:
        raise ConfigError("guard.max_parse_bytes: must be at least 1024 bytes")
    guard = _section(values, "guard", GuardSettings)
    return Settings(
        listen_host=listen_host,
        listen_port=listen_port,
        log_level=values[("", "log_level")].lower(),
        workers=values[("", "workers")],
        upstream=upstream,
        jwt=jwt,
        tenant=tenant,
        pool=pool,
        tls=tls,
        client=client,
        guard=guard,
        source=source,
    )
