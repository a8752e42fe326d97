"""Claims: the claim-path syntax, required-claim checks, and the signed claims that reach SQL.

A *claim path* names a value inside a token's claims:

- a path that is exactly a top-level claim name is that claim, whatever characters it holds, so an
  Auth0 namespaced claim such as ``https://example.com/tenant_id`` works as written;
- otherwise it is a dot-separated list of object keys, each optionally followed by array indexes:
  ``app_metadata.tenant``, ``groups[0]``, ``orgs[1].id``;
- a key that holds dots or brackets is written in double quotes: ``ext."https://x.example/t"[0]``.

The claims proof is `<expiry>:<hex HMAC-SHA256(key, "<pid>:<expiry>:<tenant>:<claims_json>")>`,
the tenant proof's format (proxy/tenant.py) with the canonical claims JSON appended.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

_SEGMENT = re.compile(r'(?:"(?P<quoted>[^"]*)"|(?P<plain>[^."\[\]]+))(?P<indexes>(?:\[\d+\])*)')

Step = str | int
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


class ClaimPathError(ValueError):
    """A claim path that does not follow the syntax; the message says where."""


def parse_claim_path(path: str) -> tuple[Step, ...]:
    """The steps of a claim path: object keys (str) and array indexes (int); raise ClaimPathError."""
    steps: list[Step] = []
    position = 0
    while True:
        match = _SEGMENT.match(path, position)
        if match is None:
            raise ClaimPathError(f"claim path {path!r}: expected a name or a quoted name at offset {position}")
        steps.append(match["quoted"] if match["quoted"] is not None else match["plain"])
        steps.extend(int(index) for index in re.findall(r"\d+", match["indexes"]))
        position = match.end()
        if position == len(path):
            return tuple(steps)
        if path[position] != ".":
            raise ClaimPathError(f"claim path {path!r}: expected '.' at offset {position}")
        position += 1


MISSING = object()


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The value at claim path `path`, or None when it is absent (or the path is not valid)."""
    value = lookup(claims, path)
    return None if value is MISSING else value


def lookup(claims: dict[str, Any], path: str) -> Any:
    """The value at claim path `path`, or MISSING."""
    if path in claims:
        return claims[path]
    try:
        steps = parse_claim_path(path)
    except ClaimPathError:
        return MISSING
    value: Any = claims
    for step in steps:
        if isinstance(step, int):
            if not isinstance(value, list) or step >= len(value):
                return MISSING
        elif not isinstance(value, dict) or step not in value:
            return MISSING
        value = value[step]
    return value


def satisfies(value: Any, accepted: list[Any]) -> bool:
    """True when `value` (or, for an array claim, one of its elements) equals an accepted value."""
    candidates = value if isinstance(value, list) else [value]
    return any(_same(candidate, wanted) for candidate in candidates for wanted in accepted)


def _same(left: Any, right: Any) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1 (Python's bool is an int)."""
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    return bool(left == right)


def select_claims(claims: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The top-level claims named in `names` (["*"]: all of them) that the token has."""
    if names == ["*"]:
        return dict(claims)
    return {name: claims[name] for name in names if name in claims}


def canonical_json(claims: dict[str, Any]) -> str:
    """Claims as compact JSON with sorted keys: the exact text the proof signs and SQL reads.

    Raises ValueError for what Postgres' jsonb cannot hold (NaN, infinities, a NUL character), so
    `tenant_proxy.claims()` never fails to parse what it verified."""
    text = json.dumps(claims, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if _ESCAPED_NUL.search(text):
        raise ValueError("a NUL character cannot be stored in jsonb")
    return text


def sign_claims(key: bytes, tenant: str, backend_pid: int, expires_at: int, claims_json: str) -> str:
    """The proof that backend `backend_pid` may read `claims_json` for `tenant` until `expires_at`
    (seconds since the epoch): `<expiry>:<64 hex digits>`, checked by `tenant_proxy.claims()`."""
    signed = f"{backend_pid}:{expires_at}:{tenant}:{claims_json}".encode()
    return f"{expires_at}:{hmac.new(key, signed, hashlib.sha256).hexdigest()}"
