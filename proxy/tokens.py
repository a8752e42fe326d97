"""Token verification: a JWT from the password field becomes a verified Identity, or a TokenRejected.

Algorithms come only from the configured allowlist; the key is chosen by the algorithm family the
configuration allows (HS* use the secret, the others the public key or JWKS), never by trusting the
token's header. The clock is passed in by the caller.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.config import HS_ALGORITHMS, JwtSettings


class TokenRejected(Exception):
    """The token is not acceptable; the message says why and contains nothing secret."""


@dataclass(frozen=True)
class Identity:
    """What a verified token says about its holder."""

    tenant: str
    subject: str | None
    expires_at: int
    claims: dict[str, Any]


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The claim named `path`: a top-level key of that exact name, else a dotted path into objects."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


CACHE_SIZE = 10_000


class TokenVerifier:
    """Verifies tokens against one configuration's algorithms, keys, audience, issuer and tenant claim.

    Accepted tokens are remembered by their SHA-256 (never the token itself) until they expire, so a
    client that reconnects with the same token skips the signature check.
    """

    def __init__(self, settings: JwtSettings) -> None:
        self.settings = settings
        self._accepted: dict[bytes, Identity] = {}
        self._tenant_pattern = re.compile(settings.tenant_pattern)
        self._public_key: Any = None
        self._jwks: jwt.PyJWKSet | None = None
        self._jwks_client: jwt.PyJWKClient | None = None
        if settings.public_key_file:
            self._public_key = load_pem_public_key(Path(settings.public_key_file).read_bytes())
        elif settings.jwks_file:
            self._jwks = jwt.PyJWKSet.from_dict(json.loads(Path(settings.jwks_file).read_text()))
        elif settings.jwks_url:
            self._jwks_client = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300, timeout=5)

    @property
    def needs_io(self) -> bool:
        """True when verifying may fetch keys over the network (run it off the event loop)."""
        return self._jwks_client is not None

    def _key_for(self, token: str, algorithm: str) -> Any:
        if algorithm in HS_ALGORITHMS:
            return self.settings.secret
        if self._public_key is not None:
            return self._public_key
        try:
            if self._jwks_client is not None:
                return self._jwks_client.get_signing_key_from_jwt(token).key
            assert self._jwks is not None
            kid = jwt.get_unverified_header(token).get("kid")
            if kid is None:
                if len(self._jwks.keys) == 1:
                    return self._jwks.keys[0].key
                raise TokenRejected("token has no 'kid' header and the key set holds several keys")
            return self._jwks[str(kid)].key
        except KeyError as exc:
            raise TokenRejected("token key id is not in the key set") from exc
        except jwt.PyJWKClientError as exc:
            raise TokenRejected("token key could not be found in the key set") from exc

    def verify(self, token: str, now: float) -> Identity:
        """Verify `token` at time `now` (seconds since the epoch); raise TokenRejected if it fails."""
        digest = hashlib.sha256(token.encode(errors="surrogateescape")).digest()
        identity = self._accepted.get(digest)
        if identity is not None:
            if now <= identity.expires_at:
                return identity
            del self._accepted[digest]
            raise TokenRejected("token expired")
        identity = self._verify(token, now)
        if len(self._accepted) >= CACHE_SIZE:
            del self._accepted[next(iter(self._accepted))]
        self._accepted[digest] = identity
        return identity

    def _verify(self, token: str, now: float) -> Identity:
        settings = self.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise TokenRejected("malformed token") from exc
        algorithm = header.get("alg")
        if algorithm not in settings.algorithms:
            raise TokenRejected("token algorithm is not allowed")
        try:
            claims = jwt.decode(
                token,
                self._key_for(token, algorithm),
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
        except (jwt.InvalidKeyError, jwt.DecodeError, jwt.InvalidTokenError) as exc:
            raise TokenRejected("malformed token") from exc
        return self._identity(claims, now)

    def _identity(self, claims: dict[str, Any], now: float) -> Identity:
        leeway = self.settings.leeway_seconds
        times: dict[str, float] = {}
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TokenRejected(f"token claim '{name}' is not a number")
            times[name] = value
        if "exp" not in times:
            raise TokenRejected("token has no 'exp' claim")
        if now > times["exp"] + leeway:
            raise TokenRejected("token expired")
        if "nbf" in times and now < times["nbf"] - leeway:
            raise TokenRejected("token not yet valid")
        if "iat" in times and times["iat"] > now + leeway:
            raise TokenRejected("token issued in the future")
        claim = self.settings.tenant_claim
        tenant = claim_at(claims, claim)
        if tenant is None or tenant == "":
            raise TokenRejected(f"tenant claim '{claim}' missing")
        if not isinstance(tenant, str) or not self._tenant_pattern.search(tenant):
            raise TokenRejected(f"tenant claim '{claim}' does not match the tenant pattern")
        subject = claims.get("sub")
        return Identity(
            tenant=tenant,
            subject=subject if isinstance(subject, str) else None,
            expires_at=int(times["exp"] + leeway),
            claims=claims,
        )


def mint(secret: str, claims: dict[str, Any], algorithm: str = "HS256") -> str:
    """Sign a development token with an HS secret."""
    return jwt.encode(claims, secret, algorithm=algorithm)
