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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import jwt as pyjwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

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


# (section, key) -> (type, default). Section "" holds top-level keys. `None` default means unset.
SCHEMA: dict[tuple[str, str], tuple[type, Any]] = {
    ("", "listen"): (str, "127.0.0.1:6432"),
    ("", "log_level"): (str, "info"),
    ("", "log_format"): (str, "text"),
    ("", "workers"): (int, 1),
    ("", "listen_unix"): (str, None),
    ("upstream", "host"): (str, "127.0.0.1"),
    ("upstream", "port"): (int, 5432),
    ("upstream", "user"): (str, None),
    ("upstream", "password"): (str, None),
    ("upstream", "password_file"): (str, None),
    ("upstream", "database"): (str, None),
    ("upstream", "sslmode"): (str, "prefer"),
    ("upstream", "ca_file"): (str, None),
    ("upstream", "connect_timeout_seconds"): (float, 10.0),
    ("jwt", "algorithms"): (list, ["HS256"]),
    ("jwt", "secret"): (str, None),
    ("jwt", "secret_file"): (str, None),
    ("jwt", "public_key_file"): (str, None),
    ("jwt", "jwks_file"): (str, None),
    ("jwt", "jwks_url"): (str, None),
    ("jwt", "audience"): (str, None),
    ("jwt", "issuer"): (str, None),
    ("jwt", "leeway_seconds"): (int, 0),
    ("jwt", "tenant_claim"): (str, "tenant_id"),
    ("jwt", "tenant_pattern"): (str, UUID_PATTERN),
    ("tenant", "setting"): (str, "app.current_tenant"),
    ("tenant", "proof_setting"): (str, "tenant_proxy.proof"),
    ("tenant", "signing_key"): (str, None),
    ("tenant", "signing_key_file"): (str, None),
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
    ("tls", "client_sslmode"): (str, "allow"),
    ("tls", "client_ca_file"): (str, None),
    ("client", "auth_timeout_seconds"): (float, 15.0),
    ("client", "max_startup_packet"): (int, 10_000),
    ("client", "max_auth_message"): (int, 65_536),
    ("client", "max_message"): (int, 1 << 30),
    ("client", "max_prepared_statement_bytes"): (int, 16 << 20),
    ("client", "allowed_parameters"): (list, DEFAULT_ALLOWED_PARAMETERS),
    ("client", "allowed_networks"): (list, []),
    ("guard", "enabled"): (bool, True),
    ("guard", "allow_do"): (bool, False),
    ("guard", "protected_prefixes"): (list, ["app.", "request.jwt."]),
    ("http", "listen"): (str, None),
    ("http", "upstream_check_interval"): (float, 5.0),
    ("http", "tenant_metrics"): (bool, False),
    ("http", "max_tenant_series"): (int, 1000),
}

DAY = 86_400.0
# (section, key) -> (lowest, highest) accepted, both inclusive; every int and float key has a row.
RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("", "workers"): (1, 256),
    ("upstream", "port"): (1, 65_535),
    ("upstream", "connect_timeout_seconds"): (0.1, 3_600),
    ("jwt", "leeway_seconds"): (0, 3_600),
    ("pool", "size"): (1, 10_000),
    ("pool", "min_size"): (0, 10_000),
    ("pool", "max_client_connections"): (1, 1_000_000),
    ("pool", "max_prepared_statements"): (1, 100_000),
    ("pool", "checkout_timeout"): (0.01, DAY),
    ("pool", "server_idle_timeout"): (0.01, 30 * DAY),
    ("pool", "server_lifetime"): (0.01, 30 * DAY),
    ("client", "auth_timeout_seconds"): (0.01, 3_600),
    ("client", "max_startup_packet"): (64, 1 << 20),
    ("client", "max_auth_message"): (64, 1 << 24),
    ("client", "max_message"): (64, (1 << 31) - 1),
    ("client", "max_prepared_statement_bytes"): (64, (1 << 31) - 1),
    ("http", "upstream_check_interval"): (0.05, 3_600),
    ("http", "max_tenant_series"): (1, 100_000),
}


@dataclass(frozen=True)
class UpstreamSettings:
    host: str
    port: int
    user: str
    password: str | None
    database: str | None
    sslmode: str
    ca_file: str | None
    connect_timeout_seconds: float


@dataclass(frozen=True)
class JwtSettings:
    algorithms: list[str]
    secret: str | None
    public_key_file: str | None
    jwks_file: str | None
    jwks_url: str | None
    audience: str | None
    issuer: str | None
    leeway_seconds: int
    tenant_claim: str
    tenant_pattern: str


@dataclass(frozen=True)
class TenantSettings:
    setting: str
    proof_setting: str
    signing_key: str


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
    client_sslmode: str
    client_ca_file: str | None


@dataclass(frozen=True)
class ClientSettings:
    auth_timeout_seconds: float
    max_startup_packet: int
    max_auth_message: int
    max_message: int
    max_prepared_statement_bytes: int
    allowed_parameters: list[str]
    allowed_networks: list[str]


@dataclass(frozen=True)
class GuardSettings:
    enabled: bool
    allow_do: bool
    protected_prefixes: list[str]


@dataclass(frozen=True)
class HttpSettings:
    """The health, readiness and metrics endpoint; off unless `listen` is set."""

    listen: str | None
    upstream_check_interval: float
    tenant_metrics: bool
    max_tenant_series: int


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
    source: str = field(default="<defaults>")

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
    if from_env:
        text = str(value).strip()
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
        raise ConfigError(problems)
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
    return Settings(
        listen_host=listen_host,
        listen_port=listen_port,
        log_level=values[("", "log_level")],
        log_format=values[("", "log_format")],
        workers=values[("", "workers")],
        listen_unix=values[("", "listen_unix")],
        upstream=_upstream(values, problems),
        jwt=_jwt(values, problems),
        tenant=_tenant(values, problems),
        pool=_pool(values, problems),
        tls=_tls(values, problems),
        client=_client(values, problems),
        guard=_section(values, "guard", GuardSettings),
        http=_http(values, problems),
        source=source,
    )


def _check_unix_path(path: str, problems: Problems) -> None:
    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        problems.append(f"listen_unix: directory {directory} does not exist")
    elif len(os.path.join(path, ".s.PGSQL.65535") if os.path.isdir(path) else path) > 100:
        problems.append("listen_unix: the socket path is longer than the 100 bytes a Unix socket name may have")


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
    return UpstreamSettings(
        host=values[("upstream", "host")],
        port=values[("upstream", "port")],
        user=values[("upstream", "user")],
        password=_read_secret(values, "upstream", "password", problems),
        database=values[("upstream", "database")],
        sslmode=values[("upstream", "sslmode")],
        ca_file=values[("upstream", "ca_file")],
        connect_timeout_seconds=values[("upstream", "connect_timeout_seconds")],
    )


def _jwt(values: dict[tuple[str, str], Any], problems: Problems) -> JwtSettings:
    algorithms = values[("jwt", "algorithms")]
    if not algorithms:
        problems.append("jwt.algorithms: at least one algorithm is required")
    for algorithm in algorithms:
        if algorithm not in HS_ALGORITHMS | KEY_ALGORITHMS:
            problems.append(f"jwt.algorithms: {algorithm!r} is not allowed (never 'none')")
    secret = _read_secret(values, "jwt", "secret", problems)
    key_sources = [k for k in ("public_key_file", "jwks_file", "jwks_url") if values[("jwt", k)]]
    if len(key_sources) > 1:
        problems.append(f"jwt: {' and '.join('jwt.' + k for k in key_sources)} are exclusive; choose one")
    if set(algorithms) & HS_ALGORITHMS and not secret:
        problems.append("jwt.secret: required for HS* algorithms (or set jwt.secret_file)")
    if set(algorithms) & KEY_ALGORITHMS and not key_sources:
        problems.append("jwt.public_key_file: required for asymmetric algorithms (or jwks_file / jwks_url)")
    if secret is not None and len(secret.encode()) < 32:
        problems.append("jwt.secret: must be at least 32 bytes")
    try:
        re.compile(values[("jwt", "tenant_pattern")])
    except re.error as exc:
        problems.append(f"jwt.tenant_pattern: not a valid regular expression: {exc}")
    if not values[("jwt", "tenant_claim")]:
        problems.append("jwt.tenant_claim: must not be empty")
    _check_jwt_keys(values, problems)
    return JwtSettings(
        algorithms=algorithms,
        secret=secret,
        public_key_file=values[("jwt", "public_key_file")],
        jwks_file=values[("jwt", "jwks_file")],
        jwks_url=values[("jwt", "jwks_url")],
        audience=values[("jwt", "audience")],
        issuer=values[("jwt", "issuer")],
        leeway_seconds=values[("jwt", "leeway_seconds")],
        tenant_claim=values[("jwt", "tenant_claim")],
        tenant_pattern=values[("jwt", "tenant_pattern")],
    )


def _check_jwt_keys(values: dict[tuple[str, str], Any], problems: Problems) -> None:
    """Read the public key or key set the verifier will use, as it will read it; check the JWKS URL."""
    public_key, jwks = values[("jwt", "public_key_file")], values[("jwt", "jwks_file")]
    if public_key is not None and _require_file(values, "jwt", "public_key_file", problems):
        try:
            load_pem_public_key(Path(public_key).read_bytes())
        except (OSError, ValueError, TypeError, pyjwt.exceptions.PyJWTError) as exc:
            problems.append(f"jwt.public_key_file: {public_key} is not a PEM public key ({type(exc).__name__})")
    if jwks is not None and _require_file(values, "jwt", "jwks_file", problems):
        try:
            pyjwt.PyJWKSet.from_dict(json.loads(Path(jwks).read_text()))
        except (OSError, ValueError, TypeError, AttributeError, pyjwt.exceptions.PyJWTError) as exc:
            problems.append(f"jwt.jwks_file: {jwks} is not a usable JSON Web Key Set ({type(exc).__name__})")
    url = values[("jwt", "jwks_url")]
    if url is not None:
        parts = urlsplit(url)
        plain_loopback = parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS
        if not parts.hostname or not (parts.scheme == "https" or plain_loopback):
            problems.append(f"jwt.jwks_url: expected an https:// URL (http:// only to localhost), got {url!r}")


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
    return TenantSettings(values[("tenant", "setting")], values[("tenant", "proof_setting")], signing_key or "")


def _pool(values: dict[tuple[str, str], Any], problems: Problems) -> PoolSettings:
    _choice(values, "pool", "mode", POOL_MODES, problems)
    if values[("pool", "min_size")] > values[("pool", "size")]:
        problems.append("pool.min_size: must be between 0 and pool.size")
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
    for network in values[("client", "allowed_networks")]:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            problems.append(f"client.allowed_networks: {network!r} is not an address or CIDR network")
    return _section(values, "client", ClientSettings)


def _http(values: dict[tuple[str, str], Any], problems: Problems) -> HttpSettings:
    if values[("http", "listen")] is not None:
        _, port = _address(values[("http", "listen")], "http.listen", problems)
        _, listen_port = _address(values[("", "listen")], "listen", [])  # its own problem is reported once
        if port and port == listen_port:
            problems.append(f"http.listen: must use another port than listen ({port})")
    return _section(values, "http", HttpSettings)
