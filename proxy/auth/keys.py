"""Signing keys: JWKS documents held in memory, a provider's key set refreshed in the background,
and OIDC discovery.

A remote key set is fetched once, then refreshed on its own schedule (the response's Cache-Control
max-age, clamped to configured bounds) by a background thread, so a login never waits on HTTP while
the set is fresh. A token whose `kid` is not in the set may trigger one extra fetch, but at most one
such fetch per `refetch_interval` whatever the flood. While the provider cannot be reached the last
good set is used for at most `max_stale` seconds past its refresh time; after that logins are refused
with KeysUnavailable. A key the provider removes stops verifying at the next refresh.

Sources: RFC 7517 (JSON Web Key), RFC 8414 / OpenID Connect Discovery 1.0 section 4, RFC 9111
section 5.2.2.1 (max-age).
"""

from __future__ import annotations

import enum
import http.client
import json
import logging
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from proxy.metrics import METRICS

log = logging.getLogger("pg_tenant_proxy")

MAX_DOCUMENT_BYTES = 1 << 20
SIGNING_KEY_TYPES = {"RSA", "EC", "OKP"}
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_STORE = re.compile(r"(?:^|,)\s*(?:no-store|no-cache)\s*(?:,|$)", re.IGNORECASE)


class KeyNotFound(Exception):
    """The token names a key the set does not hold (or names none while the set holds several)."""


class KeysUnavailable(Exception):
    """The identity provider's keys could not be fetched, and no usable set is held."""


class FetchError(Exception):
    """One HTTP fetch failed; the message says why and holds nothing secret."""


class KeysNeeded(Exception):
    """Verification needs a fetch first: call `fetch()` (blocking, never raises) off the event loop,
    then verify again without fetching."""

    def __init__(self, fetch: Callable[[], None]) -> None:
        super().__init__("the identity provider's keys must be fetched first")
        self.fetch = fetch


# Fetches one JSON document: (url, timeout seconds) -> (document, max-age seconds or None).
Fetcher = Callable[[str, float], tuple[Any, float | None]]


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        if not newurl.lower().startswith(("https://", "http://")):
            raise FetchError("redirected to a URL that is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def max_age(cache_control: str | None) -> float | None:
    """Seconds a response may be reused by its Cache-Control header (0 for no-store / no-cache), or None."""
    if not cache_control:
        return None
    if _NO_STORE.search(cache_control):
        return 0.0
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


def http_get_json(url: str, timeout: float) -> tuple[Any, float | None]:
    """GET `url` and parse its JSON body (at most 1 MiB); raise FetchError with a reason."""
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "pg-tenant-proxy"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            body = response.read(MAX_DOCUMENT_BYTES + 1)
            cache_control = response.headers.get("Cache-Control")
    except urllib.error.HTTPError as exc:
        raise FetchError(f"HTTP status {exc.code}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise FetchError(f"cannot reach it ({reason})") from exc
    if len(body) > MAX_DOCUMENT_BYTES:
        raise FetchError(f"the document is larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(body), max_age(cache_control)
    except ValueError as exc:
        raise FetchError("the document is not JSON") from exc


class Keys:
    """An immutable JWKS: signing keys by `kid`, with the key object for each algorithm built once."""

    def __init__(self, document: Any) -> None:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise FetchError("the key set has no 'keys' list")
        self.by_kid: dict[str | None, dict[str, Any]] = {}
        for jwk in document["keys"]:
            if self._usable(jwk):
                self.by_kid[str(jwk["kid"]) if "kid" in jwk else None] = jwk
        self._built: dict[tuple[str | None, str], jwt.PyJWK | None] = {}

    @staticmethod
    def _usable(jwk: Any) -> bool:
        """Public signing keys only: never a symmetric ("oct") key, never one marked for encryption."""
        if not isinstance(jwk, dict) or jwk.get("kty") not in SIGNING_KEY_TYPES or jwk.get("use", "sig") != "sig":
            return False
        try:
            jwt.PyJWK(jwk)
        except Exception:
            return False
        return True

    def find(self, kid: str | None) -> dict[str, Any]:
        """The JWK for a token's `kid`; raise KeyNotFound."""
        if kid is None:
            if len(self.by_kid) == 1:
                return next(iter(self.by_kid.values()))
            raise KeyNotFound("token has no 'kid' header and the key set holds several keys")
        jwk = self.by_kid.get(kid)
        if jwk is None:
            raise KeyNotFound("token key id is not in the key set")
        return jwk

    def key_for(self, kid: str | None, algorithm: str) -> jwt.PyJWK:
        """The key to verify a token of `algorithm` with; raise KeyNotFound when the key does not fit."""
        jwk = self.find(kid)
        cache_key = (kid, algorithm)
        if cache_key not in self._built:
            built: jwt.PyJWK | None = None
            if jwk.get("alg", algorithm) == algorithm:
                try:
                    built = jwt.PyJWK(jwk, algorithm=algorithm)
                except Exception:
                    built = None
            self._built[cache_key] = built
        key = self._built[cache_key]
        if key is None:
            raise KeyNotFound("token algorithm does not match the configured key")
        return key


@dataclass(frozen=True)
class KeySetTiming:
    """Seconds: default refresh period, bounds on a provider's max-age, the least time between two
    fetches for unknown key ids, how long past its refresh time a set is used while the provider is
    down, and the HTTP timeout."""

    refresh: float = 300.0
    min_refresh: float = 60.0
    max_refresh: float = 3600.0
    refetch_interval: float = 10.0
    max_stale: float = 3600.0
    timeout: float = 5.0


class Freshness(enum.Enum):
    """How a remote key set stands at a given moment."""

    NONE = "no key set fetched yet"
    FRESH = "fresh"
    STALE = "past its refresh time, still usable"
    EXPIRED = "too old to use"


class FetchReason(enum.Enum):
    """Why a login asks for a fetch; each reason is rate-limited on its own, so fetching the first set
    does not delay a newly published key."""

    NO_USABLE_SET = "no usable key set"
    UNKNOWN_KID = "a key id the set lacks"


class RemoteKeySet:
    """A provider's key set, from `jwks_url` or from OIDC discovery of `issuer`.

    `clock` gives seconds since the epoch (injected, so tests run on a fake clock); `fetch` performs
    one HTTP GET. Lookups run on the event loop and never block; fetches run on a background thread
    or, via KeysNeeded, on an executor thread.
    """

    def __init__(
        self,
        jwks_url: str | None,
        issuer: str | None,
        timing: KeySetTiming,
        clock: Callable[[], float] = time.time,
        fetch: Fetcher = http_get_json,
        background: bool = True,
    ) -> None:
        if jwks_url is None and issuer is None:
            raise ValueError("a remote key set needs jwks_url or an issuer to discover")
        self.source = jwks_url or f"{issuer} (discovery)"
        self._configured_jwks_url = jwks_url
        self._issuer = issuer
        self._jwks_url = jwks_url
        self.timing = timing
        self._clock = clock
        self._fetch = fetch
        self._keys: Keys | None = None
        self._refresh_at = float("-inf")  # when the held set is due for a refresh
        self._attempted_at = float("-inf")  # start of the latest fetch, whatever its outcome
        self._on_demand_at = {reason: float("-inf") for reason in FetchReason}  # the latest granted, by reason
        self._next_fetch_at = float("-inf")  # when the background refresher fetches next
        self._lock = threading.Lock()  # held across a fetch: never taken on the event loop
        self._claim_lock = threading.Lock()  # guards _on_demand_at only, never held across I/O
        self._thread: threading.Thread | None = None
        self._background = background
        self.fetches = 0
        self.fetch_failures = 0

    # -- lookups (event loop, never block) -------------------------------------------------------

    def freshness(self, now: float) -> Freshness:
        if self._keys is None:
            return Freshness.NONE
        if now < self._refresh_at:
            return Freshness.FRESH
        if now <= self._refresh_at + self.timing.max_stale:
            return Freshness.STALE
        return Freshness.EXPIRED

    def key_for(self, kid: str | None, algorithm: str, now: float, may_fetch: bool) -> jwt.PyJWK:
        """The key for a token; raise KeyNotFound, KeysUnavailable, or KeysNeeded (only if `may_fetch`)."""
        self._start_background()
        keys = self._keys
        if keys is None or self.freshness(now) is Freshness.EXPIRED:
            self._claim_fetch(now, may_fetch, FetchReason.NO_USABLE_SET)
            raise KeysUnavailable("the identity provider's keys could not be fetched")
        try:
            return keys.key_for(kid, algorithm)
        except KeyNotFound as exc:
            if kid is not None and kid not in keys.by_kid:
                self._claim_fetch(now, may_fetch, FetchReason.UNKNOWN_KID)
            raise exc

    def _claim_fetch(self, now: float, may_fetch: bool, reason: FetchReason) -> None:
        """Raise KeysNeeded if an on-demand fetch for `reason` is allowed now (one per refetch interval)."""
        if not may_fetch:
            return
        with self._claim_lock:
            if now < self._on_demand_at[reason] + self.timing.refetch_interval:
                return
            self._on_demand_at[reason] = now
        raise KeysNeeded(lambda: self.fetch_unless_fetched_since(now))

    def usable(self) -> bool:
        """Whether logins can be verified now: a set is held and not too old; when not, fetch (blocks:
        call it off the event loop), at most once per refetch interval, and answer for the result."""
        now = self._clock()
        if self.freshness(now) not in (Freshness.NONE, Freshness.EXPIRED):
            return True
        with self._lock:
            if now >= self._attempted_at + self.timing.refetch_interval:
                self._refresh_locked()
        return self.freshness(self._clock()) not in (Freshness.NONE, Freshness.EXPIRED)

    # -- fetching (blocking) ---------------------------------------------------------------------

    def fetch_unless_fetched_since(self, since: float) -> None:
        """Fetch now, unless a fetch started at or after `since` (another login's, or the refresher's)."""
        with self._lock:
            if self._attempted_at >= since:
                return
            self._refresh_locked()

    def refresh(self) -> bool:
        """Fetch the key set now; True on success. Failures are logged and counted, never raised."""
        with self._lock:
            return self._refresh_locked()

    def _refresh_locked(self) -> bool:
        now = self._clock()
        self._attempted_at = now
        self.fetches += 1
        try:
            document, age = self._fetch(self._jwks_location(), self.timing.timeout)
            keys = Keys(document)
        except Exception as exc:  # whatever went wrong, the outcome is the same: no new keys
            self.fetch_failures += 1
            METRICS.jwks_fetch("error")
            self._jwks_url = self._configured_jwks_url  # discover again next time
            self._next_fetch_at = now + self.timing.refetch_interval
            log.warning("the identity provider's keys could not be fetched from %s: %s", self.source, exc)
            return False
        METRICS.jwks_fetch("ok")
        period = self.timing.refresh if age is None else age
        self._keys = keys
        self._refresh_at = now + min(max(period, self.timing.min_refresh), self.timing.max_refresh)
        self._next_fetch_at = self._refresh_at
        return True

    def _jwks_location(self) -> str:
        if self._jwks_url is None:
            assert self._issuer is not None
            self._jwks_url = discover_jwks_uri(self._issuer, self._fetch, self.timing.timeout)
        return self._jwks_url

    # -- the background refresher ----------------------------------------------------------------

    def next_fetch_at(self) -> float:
        """When the background refresher fetches next (seconds since the epoch)."""
        return self._next_fetch_at

    def _start_background(self) -> None:
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._refresh_forever, name="jwks-refresh", daemon=True)
            self._thread.start()

    def _refresh_forever(self) -> None:
        while True:
            delay = self.next_fetch_at() - self._clock()
            if delay > 0:
                time.sleep(min(delay, 60.0))  # wake at least each minute, in case the clock jumped
                continue
            with self._lock:
                if self._next_fetch_at <= self._clock():  # not just done by a login's on-demand fetch
                    self._refresh_locked()


def discover_jwks_uri(issuer: str, fetch: Fetcher, timeout: float) -> str:
    """The `jwks_uri` of `issuer`'s OpenID configuration, after checking that the document's `issuer`
    is exactly the configured one (OpenID Connect Discovery 1.0, section 4.3); raise FetchError."""
    document, _ = fetch(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout)
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise FetchError("the discovery document names another issuer")
    jwks_uri = document.get("jwks_uri")
    if not isinstance(jwks_uri, str) or not jwks_uri.lower().startswith(("https://", "http://")):
        raise FetchError("the discovery document has no http(s) jwks_uri")
    return jwks_uri
