"""Token verification: a JWT from the password field becomes a verified Identity, or a TokenRejected.

Algorithms come only from the configured allowlist; the key is chosen by the algorithm family the
configuration allows (HS* use the secret, the others the public key or a key set), never by trusting
the token's header. With several issuers, the token's unverified `iss` only selects which issuer's
settings verify it. The clock is passed in by the caller.

The calls, for the side that owns the sockets:
- `await verifier.verify_async(token)`: on the event loop; it hops to a thread only when a key set
  must be fetched first (never for a token already accepted, nor while the key set is fresh);
- `verifier.verify(token, now)`: blocking, fetching inline when needed (tools and tests);
- `verifier.revoked(identity, now)`: whether the denylist now names a live session's token.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.auth.claims import MISSING, canonical_json, claim_at, lookup, satisfies, select_claims
from proxy.auth.denylist import Denylist
from proxy.auth.keys import (
    Fetcher, KeyNotFound, Keys, KeySetTiming, KeysNeeded, KeysUnavailable, RemoteKeySet, http_get_json,
)
from proxy.config import HS_ALGORITHMS, IssuerSettings, JwtSettings

__all__ = [
    "ClaimsTooLarge", "Identity", "KeysNeeded", "ProviderUnavailable", "TokenRejected", "TokenVerifier", "claim_at", "mint",
]


class TokenRejected(Exception):
    """The token is not acceptable; the message says why and contains nothing secret.

    `sqlstate` is what the client sees: 28P01 (invalid_password) unless a subclass says otherwise."""

    sqlstate = "28P01"


class ProviderUnavailable(TokenRejected):
    """The identity provider's keys could not be fetched and no usable key set is held: the token
    cannot be checked (not that it is bad). SQLSTATE 08006, so drivers and people retry later."""

    sqlstate = "08006"


class ClaimsTooLarge(TokenRejected):
    """The claims that would reach SQL exceed `[tenant] max_claims_bytes` (SQLSTATE 54000)."""

    sqlstate = "54000"


@dataclass(frozen=True)
class Identity:
    """What a verified token says about its holder.

    `expires_at` is seconds since the epoch (leeway included); `claims` are all verified claims;
    `claims_json` is the canonical JSON of those `[tenant] claims` selects, the text that goes in
    `request.jwt.claims` and that `proxy.auth.claims.sign_claims` signs; `token_id` is `jti`."""

    tenant: str
    subject: str | None
    expires_at: int
    claims: dict[str, Any]
    claims_json: str = "{}"
    token_id: str | None = None


CACHE_SIZE = 10_000


class IssuerVerifier:
    """One issuer's keys and checks."""

    def __init__(self, settings: IssuerSettings, timing: KeySetTiming, clock: Callable[[], float], fetch: Fetcher,
                 background: bool) -> None:
        self.settings = settings
        self.tenant_pattern = re.compile(settings.tenant_pattern)
        self._public_key: Any = None
        self._keys: Keys | None = None
        self.remote: RemoteKeySet | None = None
        if settings.public_key_file:
            self._public_key = load_pem_public_key(Path(settings.public_key_file).read_bytes())
        elif settings.jwks_file:
            self._keys = Keys(json.loads(Path(settings.jwks_file).read_text()))
        elif settings.jwks_url or settings.discovery:
            issuer = settings.issuer if settings.discovery else None
            self.remote = RemoteKeySet(settings.jwks_url, issuer, timing, clock, fetch, background)

    def key_for(self, header: dict[str, Any], algorithm: str, now: float, may_fetch: bool) -> Any:
        """The key for this token; raise TokenRejected, or KeysNeeded when `may_fetch`."""
        if algorithm in HS_ALGORITHMS:
            return self.settings.secret
        if self._public_key is not None:
            return self._public_key
        kid = header.get("kid")
        kid = None if kid is None else str(kid)
        try:
            if self.remote is not None:
                return self.remote.key_for(kid, algorithm, now, may_fetch)
            assert self._keys is not None
            return self._keys.key_for(kid, algorithm)
        except KeyNotFound as exc:
            raise TokenRejected(str(exc)) from exc
        except KeysUnavailable as exc:
            raise ProviderUnavailable(str(exc)) from exc


class TokenVerifier:
    """Verifies tokens against one configuration's issuers, algorithms, keys, audiences, required
    claims and tenant claim, and refuses tokens the denylist names.

    Accepted tokens are remembered by their SHA-256 (never the token itself) until they expire, so a
    client that reconnects with the same token skips the signature check. `clock` (seconds since the
    epoch) and `fetch` (one HTTP GET) are injected for the key sets; `background=False` leaves key
    sets without their refresher thread (tests drive them by hand).
    """

    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.time, fetch: Fetcher = http_get_json,
                 background: bool = True) -> None:
        self.settings = settings
        self._clock = clock
        timing = KeySetTiming(
            refresh=settings.jwks_refresh_seconds,
            min_refresh=settings.jwks_min_refresh_seconds,
            max_refresh=settings.jwks_max_refresh_seconds,
            refetch_interval=settings.jwks_refetch_interval_seconds,
            max_stale=settings.jwks_max_stale_seconds,
            timeout=settings.jwks_timeout_seconds,
        )
        self.issuers = [IssuerVerifier(issuer, timing, clock, fetch, background) for issuer in settings.issuers]
        self._by_name = {issuer.settings.issuer: issuer for issuer in self.issuers}
        self._denylist = Denylist(settings.denylist_file) if settings.denylist_file else None
        self.revocable = self._denylist is not None  # `revoked` can answer True at all
        self._accepted: dict[bytes, Identity] = {}

    def keys_ready(self) -> str | None:
        """For readiness: None when every issuer's keys can verify a login now, else a one-line reason
        naming the key set. A remote set that has none yet, or only a too old one, is fetched once here
        (blocks: call it off the event loop); keys read from files at start are always ready."""
        for issuer in self.issuers:
            if issuer.remote is not None and not issuer.remote.usable():
                return f"the key set at {issuer.remote.source} cannot be fetched"
        return None

    async def verify_async(self, token: str) -> Identity:
        """Verify on the event loop; only when a key set must be fetched first does the fetch run on
        the default executor. Raises TokenRejected (its `sqlstate` for the client)."""
        try:
            return self.verify_now(token, self._clock())
        except KeysNeeded as need:
            await asyncio.get_running_loop().run_in_executor(None, need.fetch)
        return self.verify_now(token, self._clock(), may_fetch=False)

    def verify(self, token: str, now: float) -> Identity:
        """Verify `token` at `now` (seconds since the epoch), fetching keys inline if needed (blocks)."""
        try:
            return self.verify_now(token, now)
        except KeysNeeded as need:
            need.fetch()
        return self.verify_now(token, now, may_fetch=False)

    def verify_now(self, token: str, now: float, may_fetch: bool = True) -> Identity:
        """Verify without I/O. Raise TokenRejected, or KeysNeeded (only when `may_fetch`) if a key set
        must be fetched first: run its `fetch()` off the event loop, then call again with
        `may_fetch=False`."""
        digest = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        identity = self._accepted.get(digest)
        if identity is None:
            identity = self._verify(token, now, may_fetch)
            if len(self._accepted) >= CACHE_SIZE:
                del self._accepted[next(iter(self._accepted))]
            self._accepted[digest] = identity
        elif now > identity.expires_at:
            del self._accepted[digest]
            raise TokenRejected("token expired")
        if self.revoked(identity, now):
            raise TokenRejected("token revoked")
        return identity

    def revoked(self, identity: Identity, now: float) -> bool:
        """True when the denylist (re-read when it changed, checked at most once a second) names the
        token's `jti` or `sub`. Call it at each transaction boundary to end revoked sessions."""
        return self._denylist is not None and self._denylist.names(identity.token_id, identity.subject, now)

    def _issuer_of(self, token: str) -> IssuerVerifier:
        if len(self.issuers) == 1:
            return self.issuers[0]
        try:
            issuer = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError as exc:
            raise TokenRejected("malformed token") from exc
        chosen = self._by_name.get(issuer) if isinstance(issuer, str) else None
        if chosen is None:
            raise TokenRejected("token issuer does not match")
        return chosen

    def _verify(self, token: str, now: float, may_fetch: bool) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise TokenRejected("malformed token") from exc
        issuer = self._issuer_of(token)
        settings = issuer.settings
        algorithm = header.get("alg")
        if algorithm not in settings.algorithms:
            raise TokenRejected("token algorithm is not allowed")
        key = issuer.key_for(header, algorithm, now, may_fetch)
        claims = _decode(token, key, algorithm, settings)
        return self._identity(issuer, claims, now)

    def _identity(self, issuer: IssuerVerifier, claims: dict[str, Any], now: float) -> Identity:
        settings = issuer.settings
        expires_at = _check_times(claims, now, self.settings.leeway_seconds, self.settings.max_expiry_seconds)
        for path, accepted in settings.required_claims.items():
            value = lookup(claims, path)
            if value is MISSING:
                raise TokenRejected(f"token has no '{path}' claim")
            if not satisfies(value, accepted):
                raise TokenRejected(f"token claim '{path}' does not have a required value")
        claim = settings.tenant_claim
        tenant = claim_at(claims, claim)
        if tenant is None or tenant == "":
            raise TokenRejected(f"tenant claim '{claim}' missing")
        if not isinstance(tenant, str) or not issuer.tenant_pattern.fullmatch(tenant):
            raise TokenRejected(f"tenant claim '{claim}' does not match the tenant pattern")
        subject, token_id = claims.get("sub"), claims.get("jti")
        return Identity(
            tenant=tenant,
            subject=subject if isinstance(subject, str) else None,
            expires_at=expires_at,
            claims=claims,
            claims_json=self._claims_json(claims),
            token_id=token_id if isinstance(token_id, str) else None,
        )

    def _claims_json(self, claims: dict[str, Any]) -> str:
        try:
            text = canonical_json(select_claims(claims, self.settings.sql_claims))
        except ValueError as exc:
            raise TokenRejected(f"token claims cannot be passed to SQL: {exc}") from exc
        size = len(text.encode())
        if size > self.settings.max_claims_bytes:
            raise ClaimsTooLarge(
                f"token claims for SQL take {size} bytes, more than tenant.max_claims_bytes "
                f"({self.settings.max_claims_bytes}); list fewer in tenant.claims"
            )
        return text


def _decode(token: str, key: Any, algorithm: str, settings: IssuerSettings) -> dict[str, Any]:
    """The verified claims (signature, audience, issuer); times are checked by `_check_times`."""
    try:
        return jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=settings.audience,
            issuer=settings.issuer,
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": settings.audience is not None,
                "verify_iss": settings.issuer is not None,
                "require": [],
            },
        )
    except jwt.InvalidSignatureError as exc:
        raise TokenRejected("token signature does not verify") from exc
    except jwt.InvalidAudienceError as exc:
        raise TokenRejected("token audience does not match") from exc
    except jwt.InvalidIssuerError as exc:
        raise TokenRejected("token issuer does not match") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise TokenRejected(f"token has no '{exc.claim}' claim") from exc
    except jwt.InvalidAlgorithmError as exc:
        raise TokenRejected("token algorithm does not match the configured key") from exc
    except (jwt.InvalidKeyError, jwt.InvalidTokenError) as exc:
        raise TokenRejected("malformed token") from exc


def _check_times(claims: dict[str, Any], now: float, leeway: int, max_expiry: int) -> int:
    """`exp` (required), `nbf` and `iat` against `now` (seconds since the epoch); return the expiry with
    leeway (RFC 7519 4.1.4-6). A time that is not a finite whole number of seconds, or an `exp` more than
    `max_expiry` seconds ahead, makes the token malformed (28P01)."""
    times: dict[str, float] = {}
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TokenRejected(f"token claim '{name}' is not a number")
        if not math.isfinite(value) or value != int(value):
            raise TokenRejected(f"malformed token: claim '{name}' is not a whole number of seconds")
        times[name] = value
    if "exp" not in times:
        raise TokenRejected("token has no 'exp' claim")
    if times["exp"] > now + max_expiry:
        raise TokenRejected("malformed token: 'exp' is further ahead than jwt.max_expiry_seconds allows")
    if now > times["exp"] + leeway:
        raise TokenRejected("token expired")
    if "nbf" in times and now < times["nbf"] - leeway:
        raise TokenRejected("token not yet valid")
    if "iat" in times and times["iat"] > now + leeway:
        raise TokenRejected("token issued in the future")
    return int(times["exp"] + leeway)


def mint(secret: str, claims: dict[str, Any], algorithm: str = "HS256") -> str:
    """Sign a development token with an HS secret."""
    return jwt.encode(claims, secret, algorithm=algorithm)
