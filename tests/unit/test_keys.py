"""A provider's key set on a fake clock and a scripted fetcher: refresh by max-age, unknown key ids
rate-limited, the last good set kept while the provider is down, withdrawn keys, discovery."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy.auth.keys import FetchError, KeySetTiming, max_age
from proxy.config import UUID_PATTERN, IssuerSettings, JwtSettings
from proxy.metrics import METRICS
from proxy.tokens import KeysNeeded, ProviderUnavailable, TokenRejected, TokenVerifier

TENANT = "11111111-1111-4111-8111-111111111111"
ISSUER = "https://idp.example"
JWKS = "https://idp.example/keys"
T0 = 1_800_000_000.0
TIMING = KeySetTiming(refresh=300, min_refresh=60, max_refresh=3600, refetch_interval=10, max_stale=600, timeout=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Provider:
    """The identity provider as the fetcher sees it: documents by URL, a switch to take it down."""

    def __init__(self) -> None:
        self.private: dict[str, Any] = {}
        self.published: list[dict[str, Any]] = []
        self.max_age: float | None = None
        self.down = False
        self.requests: list[str] = []

    def publish(self, kid: str, private: Any, algorithm: str) -> None:
        public = private.public_key()
        if algorithm.startswith("RS"):
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        elif algorithm.startswith("ES"):
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
        else:
            jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(public))
        self.private[kid] = (private, algorithm)
        self.published.append({**jwk, "kid": kid, "use": "sig"})

    def withdraw(self, kid: str) -> None:
        self.published = [jwk for jwk in self.published if jwk["kid"] != kid]

    def __call__(self, url: str, timeout: float) -> tuple[Any, float | None]:
        self.requests.append(url)
        if self.down:
            raise FetchError("cannot reach it (connection refused)")
        if url == ISSUER + "/.well-known/openid-configuration":
            return {"issuer": ISSUER, "jwks_uri": JWKS}, None
        assert url == JWKS
        return {"keys": list(self.published)}, self.max_age

    def fetches(self) -> int:
        return self.requests.count(JWKS)

    def token(self, kid: str, **claims: Any) -> str:
        private, algorithm = self.private[kid]
        body = {"tenant_id": TENANT, "sub": "alice", "exp": int(T0) + 86_400, "iss": ISSUER, **claims}
        return jwt.encode(body, private, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def provider() -> Provider:
    idp = Provider()
    idp.publish("rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    idp.publish("ec", ec.generate_private_key(ec.SECP256R1()), "ES256")
    idp.publish("ed", ed25519.Ed25519PrivateKey.generate(), "EdDSA")
    return idp


def verifier(provider: Provider, clock: FakeClock, discovery: bool = True, **jwt_keys: Any) -> TokenVerifier:
    issuer = IssuerSettings(
        issuer=ISSUER, discovery=discovery, algorithms=["RS256", "ES256", "EdDSA"], secret=None,
        public_key_file=None, jwks_file=None, jwks_url=None if discovery else JWKS, audience=None,
        required_claims={}, tenant_claim="tenant_id", tenant_pattern=UUID_PATTERN,
    )
    timing = dict(jwks_refresh_seconds=TIMING.refresh, jwks_min_refresh_seconds=TIMING.min_refresh,
                  jwks_max_refresh_seconds=TIMING.max_refresh, jwks_refetch_interval_seconds=TIMING.refetch_interval,
                  jwks_max_stale_seconds=TIMING.max_stale)
    settings = JwtSettings(issuers=[issuer], **{**timing, **jwt_keys})
    return TokenVerifier(settings, clock=clock, fetch=provider, background=False)


def refresher(check: TokenVerifier) -> Any:
    remote = check.issuers[0].remote
    assert remote is not None
    return remote


def test_every_key_type_verifies_after_discovery(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock)
    for kid in ("rsa", "ec", "ed"):
        assert check.verify(provider.token(kid), clock.now).tenant == TENANT
    assert provider.requests == [ISSUER + "/.well-known/openid-configuration", JWKS]


def test_discovery_refuses_a_document_naming_another_issuer(provider: Provider) -> None:
    clock = FakeClock()
    impostor = Provider()

    def fetch(url: str, timeout: float) -> tuple[Any, float | None]:
        if url.endswith("openid-configuration"):
            return {"issuer": "https://evil.example", "jwks_uri": JWKS}, None
        return provider(url, timeout)

    impostor.__call__ = fetch  # type: ignore[method-assign]
    check = verifier(provider, clock)
    refresher(check)._fetch = fetch
    with pytest.raises(ProviderUnavailable, match="the identity provider's keys could not be fetched") as info:
        check.verify(provider.token("rsa"), clock.now)
    assert info.value.sqlstate == "08006"
    assert provider.fetches() == 0


def test_the_refresh_period_honours_max_age_within_bounds(provider: Provider) -> None:
    clock = FakeClock()
    remote = refresher(verifier(provider, clock, discovery=False))
    for advertised, period in ((None, 300), (120, 120), (5, 60), (86_400, 3600)):
        provider.max_age = advertised
        assert remote.refresh()
        assert remote.next_fetch_at() - clock.now == period
    assert max_age("public, max-age=42, must-revalidate") == 42
    assert max_age("no-store") == 0
    assert max_age("private") is None


def test_a_fresh_set_is_served_without_fetching(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    check.verify(provider.token("rsa"), clock.now)
    clock.now += 299
    for kid in ("ec", "ed"):
        assert check.verify_now(provider.token(kid), clock.now, may_fetch=False).tenant == TENANT
    assert provider.fetches() == 1


def test_a_newly_published_key_is_accepted_at_first_use(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    check.verify(provider.token("rsa"), clock.now)
    clock.now += 1  # well inside the refresh period
    provider.publish("rsa-2", rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    assert check.verify(provider.token("rsa-2"), clock.now).tenant == TENANT
    assert provider.fetches() == 2


def test_a_flood_of_unknown_key_ids_fetches_once_per_interval(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    check.verify(provider.token("rsa"), clock.now)
    forged = [jwt.encode({"tenant_id": TENANT, "exp": int(T0) + 60}, provider.private["rsa"][0], algorithm="RS256",
                         headers={"kid": f"random-{n}"}) for n in range(200)]
    clock.now += 1
    for second in range(30):
        for token in forged[second::30]:
            with pytest.raises(TokenRejected, match="^token key id is not in the key set$"):
                check.verify(token, clock.now)
        clock.now += 1
    assert provider.fetches() == 1 + 3  # the first fetch, then one per 10 s interval
    # The flood does not stop known keys from verifying, without a fetch.
    assert check.verify_now(provider.token("ec"), clock.now, may_fetch=False).tenant == TENANT


def test_a_withdrawn_key_stops_verifying_after_the_next_refresh(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    remote = refresher(check)
    before = provider.token("ec", jti="before")
    after = provider.token("ec", jti="after")
    check.verify(before, clock.now)
    provider.withdraw("ec")
    clock.now = remote.next_fetch_at()
    assert remote.refresh()
    with pytest.raises(TokenRejected, match="^token key id is not in the key set$"):
        check.verify(after, clock.now)


def test_the_last_good_set_is_kept_for_a_bounded_time(provider: Provider, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    remote = refresher(check)
    check.verify(provider.token("rsa"), clock.now)
    provider.down = True
    clock.now = remote.next_fetch_at()
    assert not remote.refresh()
    assert "the identity provider's keys could not be fetched from https://idp.example/keys" in caplog.text
    assert remote.next_fetch_at() == clock.now + TIMING.refetch_interval  # retried soon, not in 300 s
    clock.now += TIMING.max_stale  # the last moment the stale set may be used
    assert check.verify(provider.token("ec", jti="1"), clock.now).tenant == TENANT
    clock.now += 1
    with pytest.raises(ProviderUnavailable, match="^the identity provider's keys could not be fetched$"):
        check.verify(provider.token("ec", jti="2"), clock.now)
    provider.down = False
    clock.now += TIMING.refetch_interval
    assert check.verify(provider.token("ec", jti="3"), clock.now).tenant == TENANT


def test_an_unreachable_provider_is_not_a_bad_token(provider: Provider) -> None:
    clock = FakeClock()
    provider.down = True
    check = verifier(provider, clock, discovery=False)
    with pytest.raises(ProviderUnavailable):
        check.verify(provider.token("rsa"), clock.now)
    with pytest.raises(ProviderUnavailable):  # within the interval: refused without another fetch
        check.verify(provider.token("rsa"), clock.now + 1)
    assert provider.fetches() == 1


def test_no_kid_with_several_keys_is_refused_without_a_fetch(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    check.verify(provider.token("rsa"), clock.now)
    bare = jwt.encode({"tenant_id": TENANT, "exp": int(T0) + 60}, provider.private["rsa"][0], algorithm="RS256")
    with pytest.raises(TokenRejected, match="no 'kid' header and the key set holds several keys"):
        check.verify(bare, clock.now)
    assert provider.fetches() == 1


def test_a_key_published_for_another_algorithm_does_not_verify(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    private, _ = provider.private["rsa"]
    provider.published[0]["alg"] = "RS256"
    confused = jwt.encode({"tenant_id": TENANT, "exp": int(T0) + 60}, private, algorithm="PS256",
                          headers={"kid": "rsa"})
    strict = TokenVerifier(JwtSettings(issuers=[check.settings.issuers[0].__class__(
        **{**check.settings.issuers[0].__dict__, "algorithms": ["RS256", "PS256"]})]), clock=clock, fetch=provider,
        background=False)
    with pytest.raises(TokenRejected, match="algorithm does not match"):
        strict.verify(confused, clock.now)


class NoThreads(concurrent.futures.ThreadPoolExecutor):
    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a login hopped to a thread")


async def test_verify_async_hops_to_a_thread_only_to_fetch(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    token = provider.token("rsa")
    assert (await check.verify_async(token)).tenant == TENANT  # the first fetch runs on the executor
    asyncio.get_running_loop().set_default_executor(NoThreads())
    assert (await check.verify_async(token)).tenant == TENANT  # accepted-token cache hit
    assert (await check.verify_async(provider.token("ed"))).tenant == TENANT  # fresh set
    assert provider.fetches() == 1


def test_a_lookup_never_waits_for_a_fetch_in_progress(provider: Provider) -> None:
    """The event loop must not block while the refresher holds the fetch lock across HTTP."""
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    check.verify(provider.token("rsa"), clock.now)
    clock.now += 1
    outcomes: list[str] = []

    def login() -> None:
        try:
            check.verify_now(provider.token("rsa", jti="x"), clock.now)
            outcomes.append("accepted")
            check.verify_now(jwt.encode({"tenant_id": TENANT, "exp": int(T0) + 60}, provider.private["rsa"][0],
                                        algorithm="RS256", headers={"kid": "new"}), clock.now)
        except KeysNeeded:
            outcomes.append("needs a fetch")

    with refresher(check)._lock:  # as during a slow fetch
        thread = threading.Thread(target=login)
        thread.start()
        thread.join(5)
    assert outcomes == ["accepted", "needs a fetch"]


def test_readiness_fetches_only_without_a_usable_set_and_counts_each_fetch(provider: Provider) -> None:
    clock = FakeClock()
    check = verifier(provider, clock, discovery=False)
    counts = dict(METRICS.jwks_fetches)
    provider.down = True
    assert check.keys_ready() == f"the key set at {JWKS} cannot be fetched"
    assert check.keys_ready() is not None and provider.fetches() == 1  # within the refetch interval: no fetch
    provider.down = False
    clock.now += TIMING.refetch_interval
    assert check.keys_ready() is None and provider.fetches() == 2
    clock.now += TIMING.refresh  # stale but usable: ready without fetching
    assert check.keys_ready() is None and provider.fetches() == 2
    assert METRICS.jwks_fetches.get("error", 0) == counts.get("error", 0) + 1
    assert METRICS.jwks_fetches.get("ok", 0) == counts.get("ok", 0) + 1
