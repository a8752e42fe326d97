"""Logging: set-up (text or JSON lines on stderr), escaping of client-chosen text, and the audit events.

Every record may carry structured fields (`extra={"fields": {...}}`). The text format writes them as
`key=value` after the message, the JSON format as keys of the line's object. In both formats every
character that could break a line (control characters, Unicode line separators) is escaped, in the
message and in every field (the text format with `escape`, the JSON format by JSON's own string
escapes), so a client that puts a newline in its startup user cannot forge a line.

The audit events (`AUDIT.session_start(...)` and the like) go to the logger `pg_tenant_proxy.audit` at
INFO and also bump the matching counters in `proxy.metrics.METRICS`. Debug events go to the loggers
named below; callers on the data path test `logs.DEBUG` first so a disabled debug log costs one global
read. Nothing here ever receives a token, a signature, a key or a password.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import sys
import time
from typing import Any

from proxy.metrics import METRICS

ROOT = "pg_tenant_proxy"
AUDIT_LOGGER = logging.getLogger(f"{ROOT}.audit")
PROTOCOL = logging.getLogger(f"{ROOT}.protocol")  # client phases: startup, TLS, auth, ready, closed
POOL = logging.getLogger(f"{ROOT}.pool")  # checkouts, releases, server connections opened and closed
CONTEXT = logging.getLogger(f"{ROOT}.context")  # tenant contexts set and re-asserted
KEYS = logging.getLogger(f"{ROOT}.keys")  # JWKS fetches, key loads
HTTP = logging.getLogger(f"{ROOT}.http")  # the health, readiness and metrics endpoint
DEBUG = False  # True when log_level = "debug": test it before building a debug event's fields

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape(text: str) -> str:
    """`text` with backslashes, control characters and line separators written as escapes, so it stays
    on one line and cannot be mistaken for the log's own punctuation."""
    return _UNSAFE.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                                             else f"\\u{ord(m.group()):04x}"), text)


def _text_value(value: Any) -> str:
    text = escape(str(value)) if value is not None else "-"
    if text == "" or any(c in text for c in ' ="'):
        return '"' + text.replace('"', '\\"') + '"'
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    """`2026-11-29T12:00:00+0000 INFO message key=value ...`, one line per record (tracebacks aside); the
    `event` field is left out, the message names it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape(record.message)
        line = super().formatMessage(record)
        extra = " ".join(f"{key}={_text_value(value)}" for key, value in _fields(record).items() if key != "event")
        return f"{line} {extra}" if extra else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's fields (and `error`
    with the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)  # ensure_ascii: control characters and U+2028 come out escaped


def setup(level: str, log_format: str) -> None:
    """Send the proxy's records at `level` and above to stderr in `log_format` ("text" or "json");
    other libraries' records at WARNING and above. Calling it again (a reload) replaces the set-up."""
    global DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(getattr(logging, level.upper()))
    DEBUG = level == "debug"


def debug(logger: logging.Logger, event: str, **fields: Any) -> None:
    """A debug event with fields, e.g. `if logs.DEBUG: logs.debug(logs.POOL, "checkout", database=db)`."""
    logger.debug(event, extra={"fields": {"event": event, **fields}})


# Refusal texts (the client's error message) -> the short, bounded `reason` label of the audit event
# and of pgtp_auth_total / pgtp_guard_refusals_total. The first pattern that matches wins.
LOGIN_REASONS = (
    ("malformed", r"malformed token|password message"),
    ("expired", r"expired"),
    ("not_yet_valid", r"not yet valid|issued in the future"),
    ("algorithm", r"algorithm"),
    ("signature", r"signature"),
    ("audience", r"audience"),
    ("issuer", r"issuer"),
    ("key_unknown", r"key id|key set|keys could not"),
    ("revoked", r"revoked"),
    ("tenant_claim", r"tenant claim"),
    ("claims", r"claim"),
    ("tls_required", r"TLS|SSL|certificate"),
    ("network", r"connections from|network"),
    ("timeout", r"timed out"),
    ("too_many_clients", r"too many"),
    ("parameter", r"parameter|option|protected"),
    ("upstream", r"upstream|server"),
)
GUARD_REASONS = (
    ("protected_setting", r"protected"),
    ("role_change", r"role is fixed|SET ROLE|SESSION AUTHORIZATION"),
    ("do_block", r"DO blocks"),
    ("transaction_mode", r"transaction pool|transaction mode|session feature"),
    ("statement", r"is not allowed"),
)


def reason_label(text: str, table: tuple[tuple[str, str], ...] = LOGIN_REASONS) -> str:
    """The bounded label for a refusal text ("other" when no pattern matches)."""
    for label, pattern in table:
        if re.search(pattern, text, re.IGNORECASE):
            return label
    return "other"


def token_facts(token: str | None) -> dict[str, Any]:
    """What an operator may see of a refused token: its header's alg and kid, and its unverified iss
    and aud claims (RFC 7519 section 4.1). Never the token, its signature or its other claims; only the
    facts that could be read."""
    facts: dict[str, Any] = {}
    parts = (token or "").split(".")
    if len(parts) != 3:
        return facts
    header, claims = _json_part(parts[0]), _json_part(parts[1])
    facts.update({key: header[key] for key in ("alg", "kid") if isinstance(header.get(key), str)})
    for key in ("iss", "aud"):
        value = claims.get(key)
        if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            facts[key] = value
    return facts


def _json_part(part: str) -> dict[str, Any]:
    """A base64url JSON object of a compact JWS (RFC 7515 section 7.1), or {} when it is not one."""
    try:
        value = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _kid(token: str | None) -> str | None:
    kid = token_facts(token).get("kid")
    return kid if isinstance(kid, str) else None


def _identity_fields(identity: Any) -> dict[str, Any]:
    """tenant, sub, iss, kid and jti of a verified identity (proxy.tokens.Identity), or all None."""
    claims = getattr(identity, "claims", None) or {}
    jti = claims.get("jti")
    return {
        "tenant": getattr(identity, "tenant", None),
        "sub": getattr(identity, "subject", None),
        "iss": claims.get("iss") if isinstance(claims.get("iss"), str) else None,
        "jti": jti if isinstance(jti, str) else None,
    }


class Audit:
    """The audit events: each one log record on `pg_tenant_proxy.audit` with the fields as fields."""

    def _emit(self, level: int, event: str, message: str, **fields: Any) -> None:
        AUDIT_LOGGER.log(level, message, extra={"fields": {"event": event, **fields}})

    def session_start(self, *, client: str, user: str, database: str, identity: Any, token: str | None = None,
                      login_role: str | None = None) -> None:
        """A client logged in: its address, startup user, database, verified identity (proxy.tokens.Identity:
        tenant, sub, iss and jti are taken from it; kid from the token's header) and the upstream role its
        server connections log in as (`[roles]`, else `[upstream] user`)."""
        METRICS.login("ok")
        self._emit(logging.INFO, "session_start", "session start", client=client, user=user, database=database,
                   **_identity_fields(identity), kid=_kid(token), login_role=login_role)

    def session_end(self, *, client: str, user: str | None, database: str | None, identity: Any,
                    duration: float, bytes_received: int, bytes_sent: int) -> None:
        """A logged-in client left: duration in seconds, bytes received from and sent to it."""
        self._emit(logging.INFO, "session_end", "session end", client=client, user=user, database=database,
                   **_identity_fields(identity), duration=round(duration, 3), bytes_received=bytes_received,
                   bytes_sent=bytes_sent)

    def login_refused(self, *, client: str, user: str | None, reason: str, sqlstate: str,
                      token: str | None = None, database: str | None = None) -> None:
        """A login refused with an ErrorResponse: the client's message as `reason`, its SQLSTATE, and the
        token's alg, kid, iss and aud when a token was sent (the token itself is not logged)."""
        label = reason_label(reason)
        METRICS.login("refused", label)
        self._emit(logging.WARNING, "login_refused", "login refused", client=client, user=user, database=database,
                   reason=reason, reason_label=label, sqlstate=sqlstate, **token_facts(token))

    def checkout_failed(self, *, client: str, user: str | None, database: str, identity: Any, reason: str,
                        sqlstate: str) -> None:
        """A logged-in client got no server connection (53300 after `checkout_timeout`, 57P03 while the
        database is paused, the upstream refusing a new connection) and its session ends: the client's
        message as `reason`, its SQLSTATE. Its login succeeded (`session_start`), so this is no login
        refusal and counts in no login metric; `session_end` follows."""
        self._emit(logging.WARNING, "checkout_failed", "checkout failed", client=client, user=user, database=database,
                   **_identity_fields(identity), reason=reason, sqlstate=sqlstate)

    def statement_refused(self, *, client: str, tenant: str | None, reason: str) -> None:
        """The SQL guard refused a statement (not its text: it may hold a tenant's data)."""
        label = reason_label(reason, GUARD_REASONS)
        METRICS.guard_refusal(label)
        self._emit(logging.INFO, "statement_refused", "statement refused", client=client, tenant=tenant,
                   reason=reason, reason_label=label)

    def admin_command(self, *, client: str, user: str | None, via: str, sub: str | None, iss: str | None,
                      command: str, result: str) -> None:
        """An admin console command (its text, escaped as every field is) and its result ("ok" or the
        error message); who gave it: `via` "token" with the token's `sub` and `iss`, or "unix socket"."""
        self._emit(logging.INFO, "admin_command", "admin command", client=client, user=user, via=via, sub=sub,
                   iss=iss, command=command, result=result)

    def reload(self, *, result: str, reason: str | None = None, restart_needed: list[str] | None = None) -> None:
        """A configuration reload: result "ok" or "error" (with the reason); keys that need a restart."""
        METRICS.config_reload(result)
        self._emit(logging.INFO if result == "ok" else logging.ERROR, "reload", "configuration reload",
                   result=result, reason=reason, restart_needed=",".join(restart_needed or []) or None)


AUDIT = Audit()
