"""Typed settings: a TOML file, overridden by PGTP_* environment variables, checked before serving.

Every key lives in one table below (`SCHEMA`), with its type and default, and every numeric key has a
range in `RANGES`; docs/configuration.md documents the same list. Loading also reads the key material
the proxy would use (PEM key, JWKS file, TLS files), so `run` and `check` refuse the same problems. Every
problem found (an unknown key or PGTP_* variable, a wrong type, a value out of range, an impossible
combination, an unreadable file) is collected and raised together as one ConfigError, one line per
problem, each naming the key.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jwt as pyjwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.auth.claims import ClaimPathError, parse_claim_path
from proxy.auth.keys import FetchError, Keys
from proxy.guard import DEFAULT_MAX_PARSE_BYTES

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
# What the proxy asks of its clients' transport (PgBouncer's client_tls_sslmode, libpq's names).
CLIENT_SSLMODES = ("disable", "allow", "require", "verify-ca")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)+$")


class ConfigError(Exception):
    """One or more configuration problems; each line of the message names its key."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class ListenError(ConfigError):
    """A configured listen address cannot be bound (in use, not permitted, no such address)."""


class TableList(list):  # type: ignore[type-arg]
    """The kind of a key holding a TOML array of tables (`[[jwt.issuers]]`); JSON in the environment."""


# (section, key) -> (type, default). Section "" holds top-level keys. `None` default means unset.
SCHEMA: dict[tuple[str, str], tuple[type, Any]] = {
    ("", "listen"): (str, "127.0.0.1:6432"),
    ("", "log_level"): (str, "info"),
    ("", "log_format"): (str, "text"),
    ("", "workers"): (int, 1),
    ("", "listen_unix"): (str, None),
    ("", "tcp_keepalive"): (bool, True),
    ("", "tcp_keepidle"): (int, 0),
    ("", "tcp_keepintvl"): (int, 0),
    ("", "tcp_keepcnt"): (int, 0),
    ("", "tcp_user_timeout"): (int, 0),
    ("", "shutdown_timeout"): (float, 30.0),
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
    ("tenant", "previous_signing_key"): (str, None),
    ("tenant", "previous_signing_key_file"): (str, None),
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
    ("pool", "max_server_connections_per_tenant"): (int, 0),
    ("pool", "idle_transaction_timeout"): (float, 0.0),
    ("pool", "client_idle_timeout"): (float, 0.0),
    ("tls", "cert_file"): (str, None),
    ("tls", "key_file"): (str, None),
    ("tls", "client_sslmode"): (str, "allow"),
    ("tls", "client_ca_file"): (str, None),
    ("client", "auth_timeout_seconds"): (float, 15.0),
    ("client", "max_startup_packet"): (int, 10_000),
    ("client", "max_auth_message"): (int, 65_536),
    ("client", "max_message"): (int, 64 << 20),
    ("client", "max_prepared_statement_bytes"): (int, 16 << 20),
    ("client", "max_settings_bytes"): (int, 1 << 20),
    ("client", "allowed_parameters"): (list, DEFAULT_ALLOWED_PARAMETERS),
    ("client", "allowed_networks"): (list, []),
    ("client", "max_connections_per_tenant"): (int, 1000),
    ("client", "max_unauthenticated_connections"): (int, 1000),
    ("client", "startup_timeout_seconds"): (float, 5.0),
    ("client", "message_timeout_seconds"): (float, 60.0),
    ("client", "max_total_prepared_statement_bytes"): (int, 256 << 20),
    ("client", "token_file"): (str, None),
    ("client", "token_file_networks"): (list, []),
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
    ("http", "listen"): (str, None),
    ("http", "upstream_check_interval"): (float, 5.0),
    ("http", "tenant_metrics"): (bool, False),
    ("http", "max_tenant_series"): (int, 1000),
    ("roles", "role_claim"): (str, None),
    ("roles", "map"): (dict, {}),
    ("admin", "required_claims"): (dict, {}),
    ("admin", "listen_unix"): (str, None),
    ("admin", "max_tenants"): (int, 10_000),
}

DAY = 86_400.0
# (section, key) -> (lowest, highest) accepted, both inclusive; every int and float key has a row.
RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("", "workers"): (1, 256),
    ("", "tcp_keepidle"): (0, 32_767),  # Linux's limits for TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT (tcp(7))
    ("", "tcp_keepintvl"): (0, 32_767),
    ("", "tcp_keepcnt"): (0, 127),
    ("", "tcp_user_timeout"): (0, DAY * 1000),
    ("", "shutdown_timeout"): (0, DAY),
    ("upstream", "port"): (1, 65_535),
    ("upstream", "connect_timeout_seconds"): (0.1, 3_600),
    ("jwt", "leeway_seconds"): (0, 3_600),
    ("jwt", "jwks_refresh_seconds"): (1, 30 * DAY),
    ("jwt", "jwks_min_refresh_seconds"): (1, 30 * DAY),
    ("jwt", "jwks_max_refresh_seconds"): (1, 30 * DAY),
    ("jwt", "jwks_refetch_interval_seconds"): (1, DAY),
    ("jwt", "jwks_max_stale_seconds"): (1, 30 * DAY),
    ("jwt", "jwks_timeout_seconds"): (0.1, 300),
    ("jwt", "max_expiry_seconds"): (60, 10 * 366 * DAY),
    ("tenant", "max_claims_bytes"): (2, 1 << 20),
    ("pool", "size"): (1, 10_000),
    ("pool", "min_size"): (0, 10_000),
    ("pool", "max_client_connections"): (1, 1_000_000),
    ("pool", "max_prepared_statements"): (1, 100_000),
    ("pool", "checkout_timeout"): (0.01, DAY),
    ("pool", "server_idle_timeout"): (0.01, 30 * DAY),
    ("pool", "server_lifetime"): (0.000001, 30 * DAY),  # a microsecond: never reused
    ("client", "auth_timeout_seconds"): (0.01, 3_600),
    ("client", "max_startup_packet"): (64, 1 << 20),
    ("client", "max_auth_message"): (64, 1 << 24),
    ("client", "max_message"): (64, (1 << 31) - 1),
    ("client", "max_prepared_statement_bytes"): (64, (1 << 31) - 1),
    ("client", "max_settings_bytes"): (1024, (1 << 31) - 1),
    ("guard", "max_parse_bytes"): (1024, (1 << 31) - 1),
    ("http", "upstream_check_interval"): (0.05, 3_600),
    ("http", "max_tenant_series"): (1, 100_000),
    ("pool", "max_server_connections_per_tenant"): (0, 10_000),
    ("pool", "idle_transaction_timeout"): (0, DAY),
    ("pool", "client_idle_timeout"): (0, DAY),
    ("client", "max_connections_per_tenant"): (1, 1_000_000),
    ("client", "max_unauthenticated_connections"): (1, 1_000_000),
    ("client", "startup_timeout_seconds"): (0.01, 3_600),
    ("client", "message_timeout_seconds"): (0.01, DAY),
    ("client", "max_total_prepared_statement_bytes"): (64, (1 << 40)),
    ("admin", "max_tenants"): (1, 1_000_000),
}


@dataclass(frozen=True)
class TcpSettings:
    """TCP options for the proxy's client and server sockets (not Unix sockets), with PgBouncer's names
    and units: keepalive on or off; seconds idle before the first probe (`keepidle`), seconds between
    probes (`keepintvl`), probes before the connection is dropped (`keepcnt`); milliseconds data may stay
    unacknowledged before the connection is dropped (`user_timeout`). 0 leaves the operating system's
    default. Source: tcp(7), socket(7)."""

    keepalive: bool = True
    keepidle: int = 0
    keepintvl: int = 0
    keepcnt: int = 0
    user_timeout: int = 0


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
    tcp: TcpSettings = field(default_factory=TcpSettings)

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
    previous_signing_key: str | None = field(default=None, repr=False)  # still accepted by the verifier SQL


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
    max_server_connections_per_tenant: int  # 0: no cap below size
    idle_transaction_timeout: float  # seconds; 0: off
    client_idle_timeout: float  # seconds; 0: off

    # Server connections one tenant may hold at once in one database's pool, read at every checkout:
    # computed once, into a field (a cached_property's write into the instance's __dict__ costs the
    # interpreter's specialised attribute access on it, bench/PROFILE.md).
    tenant_limit: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_limit", self.max_server_connections_per_tenant or self.size)


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str | None
    key_file: str | None
    client_sslmode: str
    client_ca_file: str | None


@dataclass(frozen=True)
class ClientSettings:
    auth_timeout_seconds: float
    max_startup_packet: int
    max_auth_message: int
    max_message: int
    max_prepared_statement_bytes: int
    max_settings_bytes: int
    allowed_parameters: list[str]
    allowed_networks: list[str]
    max_connections_per_tenant: int
    max_unauthenticated_connections: int
    startup_timeout_seconds: float
    message_timeout_seconds: float
    max_total_prepared_statement_bytes: int
    token_file: str | None  # local clients log in with this file's token (proxy.auth.token_file)
    token_file_networks: list[str]  # TCP networks whose clients count as local for it


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
class HttpSettings:
    """The health, readiness and metrics endpoint; off unless `listen` is set."""

    listen: str | None
    upstream_check_interval: float
    tenant_metrics: bool
    max_tenant_series: int


@dataclass(frozen=True)
class RolesSettings:
    """[roles]: the claim path whose value chooses the upstream login role, and per value (a
    `[roles.map.<value>]` table) the settings to log in with: [upstream]'s host, port, TLS and
    databases, with the role's own user and credentials. No entries: every client logs in as
    [upstream] user."""

    role_claim: str | None
    logins: dict[str, UpstreamSettings]


@dataclass(frozen=True)
class AdminSettings:
    """The admin console (the virtual database `pgtenantproxy`): on when either way in is configured.

    `required_claims` maps a claim path to its accepted values (a token must verify and carry one of
    them at every path); `listen_unix` is a Unix socket (libpq naming, as the top-level `listen_unix`)
    whose clients reach the console without a token; `max_tenants` bounds the tenants SHOW TENANTS
    keeps totals for."""

    required_claims: dict[str, list[Any]]
    listen_unix: str | None
    max_tenants: int = 10_000

    @property
    def enabled(self) -> bool:
        return bool(self.required_claims) or self.listen_unix is not None


@dataclass(frozen=True)
class Settings:
    listen_host: str
    listen_port: int
    log_level: str
    log_format: str
    workers: int
    listen_unix: str | None
    upstream: UpstreamSettings
    jwt: JwtSettings
    tenant: TenantSettings
    pool: PoolSettings
    tls: TlsSettings
    client: ClientSettings
    guard: GuardSettings
    http: HttpSettings
    shutdown_timeout: float = 30.0  # seconds a SIGTERM drain waits for clients to reach an idle point
    tcp: TcpSettings = field(default_factory=TcpSettings)  # for client sockets; upstream.tcp is the same
    source: str = field(default="<defaults>")
    roles: RolesSettings = field(default_factory=lambda: RolesSettings(None, {}))
    admin: AdminSettings = field(default_factory=lambda: AdminSettings({}, None))
    values: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def http_address(self) -> tuple[str, int] | None:
        """The [http] listen address as (host, port), or None when the endpoint is off."""
        return parse_address(self.http.listen, "http.listen") if self.http.listen else None

    @property
    def unix_socket_path(self) -> str | None:
        """The Unix socket file for `listen_unix`, named as libpq names it: a directory means
        `<dir>/.s.PGSQL.<listen port>`; a path is taken as it is."""
        path = self.listen_unix
        if not path:
            return None
        if os.path.isdir(path):
            return os.path.join(path, f".s.PGSQL.{self.listen_port}")
        return path

    @property
    def admin_socket_path(self) -> str | None:
        """The Unix socket file for `[admin] listen_unix`, named as `unix_socket_path` names its own."""
        path = self.admin.listen_unix
        if not path:
            return None
        if os.path.isdir(path):
            return os.path.join(path, f".s.PGSQL.{self.listen_port}")
        return path


SectionSettings = TypeVar("SectionSettings")


def _section(values: dict[tuple[str, str], Any], section: str, kind: type[SectionSettings]) -> SectionSettings:
    """A section's settings as they were read, for sections whose keys are exactly `kind`'s fields."""
    return kind(**{item.name: values[(section, item.name)] for item in fields(kind) if item.init})  # type: ignore[arg-type]


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



Problems = list[str]


def _read_secret(values: dict[tuple[str, str], Any], section: str, key: str, problems: Problems) -> str | None:
    """A secret given inline or as `<key>_file`; giving both is a problem."""
    inline, path = values[(section, key)], values[(section, f"{key}_file")]
    if inline is not None and path is not None:
        problems.append(f"{section}.{key} and {section}.{key}_file are both set; choose one")
        return None
    if path is None:
        return inline
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{section}.{key}_file: cannot read {path}: {getattr(exc, 'strerror', None) or exc}")
        return None


def _require_file(values: dict[tuple[str, str], Any], section: str, key: str, problems: Problems) -> bool:
    """True when the key names a file that exists (or is unset); records a problem otherwise."""
    path = values[(section, key)]
    if path is not None and not Path(path).is_file():
        problems.append(f"{section}.{key}: file {path} does not exist")
        return False
    return True


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from exc


def _set(values: dict[tuple[str, str], Any], section: str, key: str, value: Any, from_env: bool, problems: Problems) -> None:
    try:
        values[(section, key)] = _coerce(section, key, SCHEMA[(section, key)][0], value, from_env)
    except ConfigError as exc:
        problems += exc.problems


def _apply_file(raw: dict[str, Any], values: dict[tuple[str, str], Any], problems: Problems) -> None:
    sections = {section for section, _ in SCHEMA if section}
    for name, value in raw.items():
        if not isinstance(value, dict):
            if ("", name) in SCHEMA:
                _set(values, "", name, value, False, problems)
            else:
                problems.append(f"unknown key {name}")
        elif name not in sections:
            problems.append(f"unknown section [{name}]")
        else:
            for key, item in value.items():
                if (name, key) in SCHEMA:
                    _set(values, name, key, item, False, problems)
                else:
                    problems.append(f"unknown key {name}.{key}")


def _apply_environment(environ: dict[str, str], values: dict[tuple[str, str], Any], problems: Problems) -> None:
    """PGTP_* variables override the file; one that names no key is a problem (a typo would go unseen)."""
    known = {env_name(section, key): (section, key) for section, key in SCHEMA}
    for variable in sorted(environ):
        if not variable.startswith("PGTP_"):
            continue
        if variable not in known:
            problems.append(f"{variable}: this environment variable names no configuration key")
            continue
        _set(values, *known[variable], environ[variable], True, problems)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _check_ranges(values: dict[tuple[str, str], Any], problems: Problems) -> None:
    for (section, key), (lowest, highest) in RANGES.items():
        value = values[(section, key)]
        if not lowest <= value <= highest:  # also refuses NaN
            problems.append(
                f"{_dotted(section, key)}: must be between {_number(lowest)} and {_number(highest)}, got {_number(value)}"
            )


def load(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read settings from a TOML file (optional) and the environment, and the files they name; raise
    ConfigError listing every problem found."""
    environ = dict(os.environ) if environ is None else environ
    raw = _read_toml(path) if path is not None else {}
    values: dict[tuple[str, str], Any] = {k: v[1] for k, v in SCHEMA.items()}
    problems: Problems = []
    _apply_file(raw, values, problems)
    _apply_environment(environ, values, problems)
    _check_ranges(values, problems)
    settings = _build(values, str(path) if path is not None else "<environment>", problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # several issuers may share one problem
    return settings


def parse_address(text: str, key: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 in brackets) as (host, port); an empty host means every IPv4 address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _address(text: str, key: str, problems: Problems) -> tuple[str, int]:
    try:
        return parse_address(text, key)
    except ConfigError as exc:
        problems += exc.problems
        return "", 0


def _choice(values: dict[tuple[str, str], Any], section: str, key: str, choices: tuple[str, ...] | set[str],
            problems: Problems) -> None:
    value = values[(section, key)]
    if value not in choices:
        problems.append(f"{_dotted(section, key)}: expected one of {', '.join(sorted(choices))}, got {value!r}")


def _build(values: dict[tuple[str, str], Any], source: str, problems: Problems) -> Settings:
    listen_host, listen_port = _address(values[("", "listen")], "listen", problems)
    values[("", "log_level")] = values[("", "log_level")].lower()
    _choice(values, "", "log_level", LOG_LEVELS, problems)
    _choice(values, "", "log_format", LOG_FORMATS, problems)
    if values[("", "listen_unix")] is not None:
        _check_unix_path(values[("", "listen_unix")], problems)
    upstream = _upstream(values, problems)
    return Settings(
        listen_host=listen_host,
        listen_port=listen_port,
        log_level=values[("", "log_level")],
        log_format=values[("", "log_format")],
        workers=values[("", "workers")],
        listen_unix=values[("", "listen_unix")],
        upstream=upstream,
        jwt=_jwt(values, problems),
        tenant=_tenant(values, problems),
        pool=_pool(values, problems),
        tls=_tls(values, problems),
        client=_client(values, problems),
        guard=_section(values, "guard", GuardSettings),
        http=_http(values, problems),
        shutdown_timeout=values[("", "shutdown_timeout")],
        tcp=upstream.tcp,
        source=source,
        roles=_roles(values, upstream, problems),
        admin=_admin(values, problems),
        values=dict(values),
    )


def _check_unix_path(path: str, problems: Problems, key: str = "listen_unix") -> None:
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        problems.append(f"{key}: directory {directory} does not exist")
    elif len(os.path.join(path, ".s.PGSQL.65535") if os.path.isdir(path) else path) > 100:
        problems.append(f"{key}: the socket path is longer than the 100 bytes a Unix socket name may have")


def _check_ca_file(values: dict[tuple[str, str], Any], section: str, key: str, problems: Problems) -> None:
    path = values[(section, key)]
    if path is None or not _require_file(values, section, key, problems):
        return
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        problems.append(f"{section}.{key}: {path} holds no usable PEM certificate: {exc}")


def _upstream(values: dict[tuple[str, str], Any], problems: Problems) -> UpstreamSettings:
    if not values[("upstream", "user")]:
        problems.append("upstream.user: required (the role the proxy logs in as)")
    _choice(values, "upstream", "sslmode", SSLMODES, problems)
    if values[("upstream", "sslmode")] in {"verify-ca", "verify-full"} and not values[("upstream", "ca_file")]:
        problems.append(f"upstream.ca_file: required with sslmode={values[('upstream', 'sslmode')]}")
    _check_ca_file(values, "upstream", "ca_file", problems)
    upstream = UpstreamSettings(
        host=values[("upstream", "host")],
        port=values[("upstream", "port")],
        user=values[("upstream", "user")],
        password=_read_secret(values, "upstream", "password", problems),
        database=values[("upstream", "database")],
        databases=_allowed_databases(values, problems),
        sslmode=values[("upstream", "sslmode")],
        ca_file=values[("upstream", "ca_file")],
        sslcert=values[("upstream", "sslcert")],
        sslkey=values[("upstream", "sslkey")],
        connect_timeout_seconds=values[("upstream", "connect_timeout_seconds")],
        channel_binding=values[("upstream", "channel_binding")],
        require_auth=_require_auth(values, problems),
        tcp=TcpSettings(
            keepalive=values[("", "tcp_keepalive")], keepidle=values[("", "tcp_keepidle")],
            keepintvl=values[("", "tcp_keepintvl")], keepcnt=values[("", "tcp_keepcnt")],
            user_timeout=values[("", "tcp_user_timeout")],
        ),
    )
    _check_client_certificate(upstream, problems)
    return upstream


def _allowed_databases(values: dict[tuple[str, str], Any], problems: Problems) -> list[str] | None:
    """`[upstream] databases`, checked against `database`: one of them is required."""
    database, databases = values[("upstream", "database")], values[("upstream", "databases")]
    if database is None and not databases:
        problems.append("upstream.database or upstream.databases: set one; without either a client could "
                        "reach every database of the server, postgres and template1 included")
    if database is not None and databases is not None:
        problems.append("upstream.database and upstream.databases are exclusive: database sends every client "
                        "to one database, databases lets clients choose among several")
    return databases


def _check_client_certificate(upstream: UpstreamSettings, problems: Problems, name: str = "upstream") -> None:
    """sslcert and sslkey: both or neither, readable files, and TLS on; `name` is the table they are in."""
    if bool(upstream.sslcert) != bool(upstream.sslkey):
        problems.append(f"{name}.sslcert and {name}.sslkey: set both or neither")
        return
    if upstream.sslcert and upstream.sslmode == "disable":
        problems.append(f"{name}.sslcert: a client certificate needs TLS; upstream.sslmode = disable turns it off")
    unreadable = [key for key, path in (("sslcert", upstream.sslcert), ("sslkey", upstream.sslkey))
                  if path is not None and not (Path(path).is_file() and os.access(path, os.R_OK))]
    for key in unreadable:
        problems.append(f"{name}.{key}: cannot read {getattr(upstream, key)}")
    if upstream.sslcert and upstream.sslkey and not unreadable:
        try:
            ssl.create_default_context().load_cert_chain(upstream.sslcert, upstream.sslkey, password="")
        except ssl.SSLError as exc:
            problems.append(f"{name}.sslcert and {name}.sslkey: not a certificate and its unencrypted "
                            f"private key in PEM ({exc.reason or exc})")


def _require_auth(values: dict[tuple[str, str], Any], problems: Problems) -> str | None:
    """[upstream] require_auth and channel_binding, checked with libpq's rules."""
    _choice(values, "upstream", "channel_binding", CHANNEL_BINDINGS, problems)
    if values[("upstream", "channel_binding")] == "require" and values[("upstream", "sslmode")] == "disable":
        problems.append("upstream.channel_binding: 'require' needs TLS, but upstream.sslmode is 'disable'")
    text = values[("upstream", "require_auth")]
    if text is None:
        return None
    methods = [item.strip() for item in text.split(",")]
    negated = [method.startswith("!") for method in methods]
    if any(negated) and not all(negated):
        problems.append("upstream.require_auth: negative and positive methods cannot be mixed")
    for method in methods:
        if method.lstrip("!") not in AUTH_METHODS:
            problems.append(f"upstream.require_auth: {method!r} is not one of {', '.join(sorted(AUTH_METHODS))}")
    return ",".join(methods)


LOGIN_ROLE_KEYS = ("user", "password", "password_file", "sslcert", "sslkey")
BARE_TOML_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _roles(values: dict[tuple[str, str], Any], upstream: UpstreamSettings, problems: Problems) -> RolesSettings:
    """[roles]: `role_claim` (a claim path) and `[roles.map.<claim value>]` tables, each a login role."""
    claim, table = values[("roles", "role_claim")], values[("roles", "map")]
    if claim is not None:
        try:
            parse_claim_path(claim)
        except ClaimPathError as exc:
            problems.append(f"roles.role_claim: {exc}")
    if table and claim is None:
        problems.append("roles.role_claim: required with [roles.map] (the claim path whose value chooses the login role)")
    if claim is not None and not table:
        problems.append("roles.map: map at least one value of roles.role_claim to a login role "
                        "([roles.map.<value>] user = ...), or remove roles.role_claim")
    logins: dict[str, UpstreamSettings] = {}
    for value, own in table.items():
        name = "roles.map." + (value if BARE_TOML_KEY.match(value) else json.dumps(value))
        logins[value] = _login_role(name, own, upstream, problems)
    return RolesSettings(claim, logins)


def _login_role(name: str, own: Any, upstream: UpstreamSettings, problems: Problems) -> UpstreamSettings:
    """One `[roles.map.<value>]` table: [upstream]'s connection settings with this role's user and its
    own credentials (none are inherited from [upstream]), checked as [upstream]'s are."""
    if not isinstance(own, dict):
        problems.append(f"{name}: expected a table ([{name}] user = ...)")
        own = {}
    for key, value in own.items():
        if key not in LOGIN_ROLE_KEYS:
            problems.append(f"{name}.{key}: unknown key (a login role takes {', '.join(LOGIN_ROLE_KEYS)})")
        elif not isinstance(value, str):
            problems.append(f"{name}.{key}: expected str, got {type(value).__name__}")
    given = {key: own.get(key) if isinstance(own.get(key), str) else None for key in LOGIN_ROLE_KEYS}
    if not given["user"]:
        problems.append(f"{name}.user: required (the role this claim value logs in as)")
    password = _read_secret({(name, key): given[key] for key in ("password", "password_file")}, name, "password",
                            problems)
    login = replace(upstream, user=given["user"] or "", password=password, sslcert=given["sslcert"],
                    sslkey=given["sslkey"])
    _check_client_certificate(login, problems, name)
    return login


ISSUER_KEYS = (
    "issuer", "discovery", "jwks_url", "jwks_file", "public_key_file",
    "algorithms", "audience", "required_claims", "tenant_claim", "tenant_pattern",
)
KEY_SOURCES = ("public_key_file", "jwks_file", "jwks_url", "discovery")
JWKS_TIMING = ("jwks_refresh_seconds", "jwks_min_refresh_seconds", "jwks_max_refresh_seconds",
               "jwks_refetch_interval_seconds", "jwks_max_stale_seconds", "jwks_timeout_seconds")


def _jwt(values: dict[tuple[str, str], Any], problems: Problems) -> JwtSettings:
    """[jwt]: the single-issuer form, or `[[jwt.issuers]]` whose tables default to the [jwt] keys."""
    secret = _read_secret(values, "jwt", "secret", problems)
    if secret is not None and len(secret.encode()) < 32:
        problems.append("jwt.secret: must be at least 32 bytes")
    top = {key: values[("jwt", key)] for key in ISSUER_KEYS}
    tables = values[("jwt", "issuers")]
    if tables:
        for key in ("issuer", *KEY_SOURCES):
            if top[key]:
                problems.append(f"jwt.{key}: set it in each [[jwt.issuers]] table, not in [jwt]")
        issuers = [_issuer(f"jwt.issuers[{n}]", {**top}, table, secret, problems) for n, table in enumerate(tables)]
        names = [issuer.issuer for issuer in issuers]
        if len(set(names)) != len(names):
            problems.append("jwt.issuers: two tables name the same issuer")
    else:
        issuers = [_issuer("jwt", top, {}, secret, problems)]
    if values[("jwt", "jwks_min_refresh_seconds")] > values[("jwt", "jwks_max_refresh_seconds")]:
        problems.append("jwt.jwks_min_refresh_seconds: must not exceed jwt.jwks_max_refresh_seconds")
    _require_file(values, "jwt", "denylist_file", problems)
    claims = values[("tenant", "claims")]
    if "*" in claims and claims != ["*"] or not all(claims):
        problems.append('tenant.claims: a list of claim names, or "*" alone for all claims')
    return JwtSettings(
        issuers=issuers,
        leeway_seconds=values[("jwt", "leeway_seconds")],
        **{key: values[("jwt", key)] for key in JWKS_TIMING},
        denylist_file=values[("jwt", "denylist_file")],
        max_expiry_seconds=values[("jwt", "max_expiry_seconds")],
        sql_claims=claims,
        max_claims_bytes=values[("tenant", "max_claims_bytes")],
    )


def _issuer(name: str, merged: dict[str, Any], own: dict[str, Any], secret: str | None,
            problems: Problems) -> IssuerSettings:
    """One issuer's settings from `merged` (the [jwt] keys) overridden by `own` (its table, if any)."""
    for key, value in own.items():
        if key not in ISSUER_KEYS:
            problems.append(f"{name}.{key}: unknown key (an issuer table takes {', '.join(ISSUER_KEYS)})")
            continue
        try:
            merged[key] = _coerce("jwt", key, SCHEMA[("jwt", key)][0], value, False)
        except ConfigError as exc:
            problems += [f"{name}.{key}: {problem.partition(': ')[2]}" for problem in exc.problems]
    if name != "jwt" and not merged["issuer"]:
        problems.append(f"{name}.issuer: required in each [[jwt.issuers]] table")
    algorithms = merged["algorithms"]
    if not algorithms:
        problems.append(f"{name}.algorithms: at least one algorithm is required")
    for algorithm in algorithms:
        if algorithm not in HS_ALGORITHMS | KEY_ALGORITHMS:
            problems.append(f"{name}.algorithms: {algorithm!r} is not allowed (never 'none')")
    if merged["discovery"] and not merged["issuer"]:
        problems.append(f"{name}.discovery: needs {name}.issuer (discovery reads <issuer>/.well-known/openid-configuration)")
    sources = [key for key in KEY_SOURCES if merged[key]]
    if len(sources) > 1:
        problems.append(f"{name}: {' and '.join(name + '.' + k for k in sources)} are exclusive; choose one")
    if set(algorithms) & HS_ALGORITHMS and not secret:
        problems.append("jwt.secret: required for HS* algorithms (or set jwt.secret_file)")
    if set(algorithms) & KEY_ALGORITHMS and not sources:
        problems.append(f"{name}.public_key_file: required for asymmetric algorithms (or jwks_file / jwks_url / discovery)")
    _check_issuer_keys(name, merged, problems)
    _check_claim_rules(name, merged, problems)
    return IssuerSettings(
        issuer=merged["issuer"],
        discovery=merged["discovery"],
        algorithms=algorithms,
        secret=secret,
        public_key_file=merged["public_key_file"],
        jwks_file=merged["jwks_file"],
        jwks_url=merged["jwks_url"],
        audience=merged["audience"],
        required_claims={path: value if isinstance(value, list) else [value]
                         for path, value in merged["required_claims"].items()},
        tenant_claim=merged["tenant_claim"],
        tenant_pattern=merged["tenant_pattern"],
    )


def _check_claim_rules(name: str, merged: dict[str, Any], problems: Problems) -> None:
    """The tenant pattern compiles, the tenant claim and the required claims are claim paths."""
    try:
        re.compile(merged["tenant_pattern"])
    except re.error as exc:
        problems.append(f"{name}.tenant_pattern: not a valid regular expression: {exc}")
    if not merged["tenant_claim"]:
        problems.append(f"{name}.tenant_claim: must not be empty")
    for path in (merged["tenant_claim"], *merged["required_claims"]):
        try:
            parse_claim_path(path)
        except ClaimPathError as exc:
            problems.append(f"{name}: {exc}")


def _check_issuer_keys(name: str, merged: dict[str, Any], problems: Problems) -> None:
    """Read the public key or key set the verifier will use, as it will read it; check the JWKS URL."""
    public_key, jwks, url = merged["public_key_file"], merged["jwks_file"], merged["jwks_url"]
    for key, path in (("public_key_file", public_key), ("jwks_file", jwks)):
        if path is not None and not Path(path).is_file():
            problems.append(f"{name}.{key}: file {path} does not exist")
    if public_key is not None and Path(public_key).is_file():
        try:
            load_pem_public_key(Path(public_key).read_bytes())
        except (OSError, ValueError, TypeError, pyjwt.exceptions.PyJWTError) as exc:
            problems.append(f"{name}.public_key_file: {public_key} is not a PEM public key ({type(exc).__name__})")
    if jwks is not None and Path(jwks).is_file():
        try:
            if not Keys(json.loads(Path(jwks).read_text())).by_kid:
                raise FetchError("no usable signing key")
        except (OSError, ValueError, FetchError) as exc:
            problems.append(f"{name}.jwks_file: {jwks} is not a usable JSON Web Key Set ({type(exc).__name__})")
    if url is not None:
        parts = urlsplit(url)
        plain_loopback = parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS
        if not parts.hostname or not (parts.scheme == "https" or plain_loopback):
            problems.append(f"{name}.jwks_url: expected an https:// URL (http:// only to localhost), got {url!r}")


def _tenant(values: dict[tuple[str, str], Any], problems: Problems) -> TenantSettings:
    signing_key = _read_secret(values, "tenant", "signing_key", problems)
    if not signing_key:
        problems.append("tenant.signing_key: required (or set tenant.signing_key_file)")
    elif len(signing_key.encode()) < 32:
        problems.append("tenant.signing_key: must be at least 32 bytes")
    for key in ("setting", "proof_setting"):
        if not SETTING_NAME.match(values[("tenant", key)]):
            problems.append(f"tenant.{key}: expected a custom setting name like 'app.current_tenant'")
    if values[("tenant", "setting")].lower() == values[("tenant", "proof_setting")].lower():
        problems.append("tenant.proof_setting: must differ from tenant.setting")
    _check_claims_settings(values, problems)
    return TenantSettings(
        values[("tenant", "setting")],
        values[("tenant", "proof_setting")],
        signing_key or "",
        values[("tenant", "claims_setting")],
        values[("tenant", "claims_proof_setting")],
        _previous_signing_key(values, signing_key, problems),
    )


def _previous_signing_key(values: dict[tuple[str, str], Any], current: str | None, problems: Problems) -> str | None:
    """[tenant] previous_signing_key: the key being rotated away from, which `pg-tenant-proxy sql` installs
    beside the current one so sessions signed with it still verify (docs/operations.md, key rotation)."""
    previous = _read_secret(values, "tenant", "previous_signing_key", problems)
    if previous is None:
        return None
    if len(previous.encode()) < 32:
        problems.append("tenant.previous_signing_key: must be at least 32 bytes")
    elif previous == current:
        problems.append("tenant.previous_signing_key: must differ from tenant.signing_key")
    return previous


def _check_claims_settings(values: dict[tuple[str, str], Any], problems: Problems) -> None:
    names = [values[("tenant", key)] for key in ("setting", "proof_setting", "claims_setting", "claims_proof_setting")]
    for key in ("claims_setting", "claims_proof_setting"):
        if not SETTING_NAME.match(values[("tenant", key)]):
            problems.append(f"tenant.{key}: expected a custom setting name like 'request.jwt.claims'")
    if len({name.lower() for name in names}) != len(names):
        problems.append("tenant.claims_setting and tenant.claims_proof_setting: must differ from each other and "
                        "from tenant.setting and tenant.proof_setting")


def _pool(values: dict[tuple[str, str], Any], problems: Problems) -> PoolSettings:
    _choice(values, "pool", "mode", POOL_MODES, problems)
    if values[("pool", "min_size")] > values[("pool", "size")]:
        problems.append("pool.min_size: must be between 0 and pool.size")
    if values[("pool", "max_server_connections_per_tenant")] > values[("pool", "size")]:
        problems.append("pool.max_server_connections_per_tenant: must be between 0 (no cap below pool.size) and pool.size")
    return _section(values, "pool", PoolSettings)


def _tls(values: dict[tuple[str, str], Any], problems: Problems) -> TlsSettings:
    cert, key, mode = values[("tls", "cert_file")], values[("tls", "key_file")], values[("tls", "client_sslmode")]
    _choice(values, "tls", "client_sslmode", CLIENT_SSLMODES, problems)
    if bool(cert) != bool(key):
        problems.append("tls.cert_file and tls.key_file: set both or neither")
    elif cert and _require_file(values, "tls", "cert_file", problems) & _require_file(values, "tls", "key_file", problems):
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError, ValueError) as exc:
            problems.append(f"tls.cert_file / tls.key_file: cannot load the certificate and its key: {exc}")
    if mode in {"require", "verify-ca"} and not cert:
        problems.append(f"tls.client_sslmode: {mode} needs tls.cert_file and tls.key_file")
    if mode == "verify-ca" and not values[("tls", "client_ca_file")]:
        problems.append("tls.client_ca_file: required with client_sslmode = verify-ca")
    if values[("tls", "client_ca_file")] and (mode == "disable" or not cert):
        problems.append("tls.client_ca_file: has no effect without TLS (set cert_file, key_file and client_sslmode)")
    _check_ca_file(values, "tls", "client_ca_file", problems)
    return _section(values, "tls", TlsSettings)


def _client(values: dict[tuple[str, str], Any], problems: Problems) -> ClientSettings:
    for key in ("allowed_networks", "token_file_networks"):
        for network in values[("client", key)]:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                problems.append(f"client.{key}: {network!r} is not an address or CIDR network")
    _check_token_file(values, problems)
    return _section(values, "client", ClientSettings)


ADMIN_DATABASE = "pgtenantproxy"  # the admin console's virtual database (PgBouncer's "pgbouncer")


def _admin(values: dict[tuple[str, str], Any], problems: Problems) -> AdminSettings:
    """[admin]: claim paths that parse, a socket path apart from `listen_unix`, a name no database uses."""
    required = values[("admin", "required_claims")]
    for path, accepted in required.items():
        try:
            parse_claim_path(path)
        except ClaimPathError as exc:
            problems.append(f"admin.required_claims: {exc}")
        if isinstance(accepted, list) and not accepted:
            problems.append(f"admin.required_claims: {path!r} lists no accepted value")
    if required and len(values[("jwt", "issuers")]) > 1 and "iss" not in required:
        problems.append("admin.required_claims: with several [[jwt.issuers]], name the issuers whose tokens may open"
                        " the admin console (iss = ...): every issuer can mint the other required claims")
    path = values[("admin", "listen_unix")]
    if path is not None:
        _check_unix_path(path, problems, "admin.listen_unix")
        if _same_socket_file(path, values[("", "listen_unix")], values[("", "listen")]):
            problems.append("admin.listen_unix: must differ from listen_unix (the admin socket needs no token)")
    admin = AdminSettings({key: value if isinstance(value, list) else [value] for key, value in required.items()},
                          path, values[("admin", "max_tenants")])
    databases = [values[("upstream", "database")], *(values[("upstream", "databases")] or [])]
    if admin.enabled and ADMIN_DATABASE in databases:
        problems.append(f"upstream.databases: {ADMIN_DATABASE!r} is the admin console's name; rename the database"
                        " or leave [admin] unset")
    return admin


def _same_socket_file(path: str, other: str | None, listen: str) -> bool:
    """Whether two `listen_unix` values name one socket file, however each is written: a directory
    names `<dir>/.s.PGSQL.<port of listen>` (libpq's naming), and paths are compared resolved."""
    if other is None:
        return False
    port = listen.rpartition(":")[2]

    def socket_file(value: str) -> str:
        return os.path.realpath(os.path.join(value, f".s.PGSQL.{port}") if os.path.isdir(value) else value)

    return socket_file(path) == socket_file(other)


def _check_token_file(values: dict[tuple[str, str], Any], problems: Problems) -> None:
    """`[client] token_file` needs a directory that exists (the platform may write the file later) and
    a way for clients to use it; `token_file_networks` means nothing without it."""
    path = values[("client", "token_file")]
    if path is None:
        if values[("client", "token_file_networks")]:
            problems.append("client.token_file_networks: has no effect without client.token_file")
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        problems.append(f"client.token_file: directory {directory} does not exist")
    if values[("", "listen_unix")] is None and not values[("client", "token_file_networks")]:
        problems.append("client.token_file: no client can use it; set listen_unix or client.token_file_networks")


def _http(values: dict[tuple[str, str], Any], problems: Problems) -> HttpSettings:
    if values[("http", "listen")] is not None:
        _, port = _address(values[("http", "listen")], "http.listen", problems)
        _, listen_port = _address(values[("", "listen")], "listen", [])  # its own problem is reported once
        if port and port == listen_port:
            problems.append(f"http.listen: must use another port than listen ({port})")
    return _section(values, "http", HttpSettings)
