"""A real proxy against an identity provider simulated on 127.0.0.1: OIDC discovery and a JWKS with
RS256, ES256 and EdDSA keys; rotation, withdrawal, an outage and a flood of unknown key ids, counted at
the provider. Also several issuers, audience lists, required claims and the denylist."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from support import ACME, GLOBEX, ProxyProcess, wait_until


class IdentityProvider:
    """OIDC discovery and a JWKS over HTTP on 127.0.0.1, with counters and a switch to take it down."""

    def __init__(self) -> None:
        self.keys: dict[str, tuple[Any, str]] = {}
        self.published: list[str] = []
        self.max_age = 3600
        self.jwks_fetches = 0
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self.up()

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}/tenant-idp"

    def up(self) -> None:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                if self.path == "/tenant-idp/.well-known/openid-configuration":
                    body = {"issuer": provider.issuer, "jwks_uri": f"http://127.0.0.1:{provider.port}/jwks"}
                elif self.path == "/jwks":
                    provider.jwks_fetches += 1
                    body = {"keys": [provider.jwk(kid) for kid in provider.published]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", f"public, max-age={provider.max_age}")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def add(self, kid: str, algorithm: str) -> None:
        private: Any
        if algorithm == "RS256":
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            private = ec.generate_private_key(ec.SECP256R1())
        else:
            private = ed25519.Ed25519PrivateKey.generate()
        self.keys[kid] = (private, algorithm)
        self.published.append(kid)

    def jwk(self, kid: str) -> dict[str, Any]:
        private, algorithm = self.keys[kid]
        family = {"RS256": jwt.algorithms.RSAAlgorithm, "ES256": jwt.algorithms.ECAlgorithm}.get(
            algorithm, jwt.algorithms.OKPAlgorithm)
        return {**json.loads(family.to_jwk(private.public_key())), "kid": kid, "use": "sig", "alg": algorithm}

    def token(self, kid: str, tenant: str = ACME, **claims: Any) -> str:
        private, algorithm = self.keys[kid]
        body = {"iss": self.issuer, "tenant_id": tenant, "sub": "carol", "exp": int(time.time()) + 600,
                "jti": str(uuid.uuid4()), **claims}
        return jwt.encode(body, private, algorithm=algorithm, headers={"kid": kid})


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    for kid, algorithm in (("rsa-1", "RS256"), ("ec-1", "ES256"), ("ed-1", "EdDSA")):
        provider.add(kid, algorithm)
    yield provider
    provider.down()


def oidc(idp: IdentityProvider, **jwt_keys: Any) -> dict[str, dict[str, Any]]:
    return {"jwt": {"algorithms": ["RS256", "ES256", "EdDSA"], "issuer": idp.issuer, "discovery": True, **jwt_keys}}


async def login(proxy: ProxyProcess, token: str) -> str | None:
    """The tenant the session sees, or raise the refusal."""
    conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="u", database="app", password=token,
                                 ssl=False, timeout=10)
    try:
        return await conn.fetchval("SELECT tenant_proxy.current_tenant()")
    finally:
        await conn.close()


async def refusal(proxy: ProxyProcess, token: str) -> tuple[str, str]:
    with pytest.raises(asyncpg.PostgresError) as info:
        await login(proxy, token)
    return info.value.sqlstate, str(info.value)


async def test_every_key_type_and_a_rotation(make_proxy: Any, idp: IdentityProvider) -> None:
    proxy = make_proxy(oidc(idp))
    for kid in ("rsa-1", "ec-1", "ed-1"):
        assert await login(proxy, idp.token(kid)) == ACME
    assert idp.jwks_fetches == 1
    idp.add("rsa-2", "RS256")  # the provider publishes a new key: accepted at its first use
    assert await login(proxy, idp.token("rsa-2", tenant=GLOBEX)) == GLOBEX
    assert idp.jwks_fetches == 2


async def test_a_withdrawn_key_stops_verifying_after_the_next_refresh(make_proxy: Any, idp: IdentityProvider) -> None:
    idp.max_age = 1
    proxy = make_proxy(oidc(idp, jwks_min_refresh_seconds=1))
    assert await login(proxy, idp.token("ec-1")) == ACME
    idp.published.remove("ec-1")
    fetched = idp.jwks_fetches
    wait_until(lambda: idp.jwks_fetches > fetched + 1)  # a whole refresh after the withdrawal
    assert await refusal(proxy, idp.token("ec-1")) == ("28P01", "token key id is not in the key set")
    assert await login(proxy, idp.token("ed-1")) == ACME


async def test_a_flood_of_unknown_key_ids_fetches_at_most_once_per_interval(make_proxy: Any,
                                                                             idp: IdentityProvider) -> None:
    proxy = make_proxy(oidc(idp, jwks_refetch_interval_seconds=60))
    assert await login(proxy, idp.token("rsa-1")) == ACME
    private, _ = idp.keys["rsa-1"]
    started = time.monotonic()
    for number in range(40):
        forged = jwt.encode({"iss": idp.issuer, "tenant_id": ACME, "exp": int(time.time()) + 60}, private,
                            algorithm="RS256", headers={"kid": f"random-{number}"})
        assert await refusal(proxy, forged) == ("28P01", "token key id is not in the key set")
    assert time.monotonic() - started < 60
    assert idp.jwks_fetches == 2  # the first set, then one fetch for the whole flood
    assert await login(proxy, idp.token("ed-1")) == ACME


async def test_an_outage_keeps_the_last_set_for_a_while_then_says_so(make_proxy: Any, idp: IdentityProvider) -> None:
    idp.max_age = 1
    proxy = make_proxy(oidc(idp, jwks_min_refresh_seconds=1, jwks_max_stale_seconds=4, jwks_refetch_interval_seconds=1))
    assert await login(proxy, idp.token("rsa-1")) == ACME
    idp.down()
    assert await login(proxy, idp.token("ec-1")) == ACME  # within the stale window
    wait_until(lambda: "the identity provider's keys could not be fetched from" in proxy.log())
    refused = await eventually(proxy, lambda: idp.token("ed-1"), "the identity provider's keys could not be fetched")
    assert refused in ("08006", "28P01")  # 08006 once the login refuses with TokenRejected.sqlstate
    idp.up()
    assert await eventually(proxy, lambda: idp.token("ed-1"), ACME) == "ok"


async def eventually(proxy: ProxyProcess, make_token: Any, expected: str, deadline: float = 20.0) -> str:
    """Log in with fresh tokens until the outcome (the tenant seen, or the refusal's message) is
    `expected`; return "ok" or the refusal's SQLSTATE."""
    end = time.monotonic() + deadline
    while True:
        try:
            outcome, code = await login(proxy, make_token()), "ok"
        except asyncpg.PostgresError as exc:
            outcome, code = str(exc), exc.sqlstate
        if outcome == expected:
            return code
        assert time.monotonic() < end, outcome
        await asyncio.sleep(0.05)


async def test_several_issuers_audiences_and_required_claims(make_proxy: Any, idp: IdentityProvider) -> None:
    """An Auth0-style provider (discovery, namespaced tenant claim) next to a Cognito-style one (HS here,
    `token_use` and `client_id` required, no `aud`)."""
    proxy = make_proxy(start=False)
    with open(proxy.config, "a") as config:
        config.write(f"""
[[jwt.issuers]]
issuer = "{idp.issuer}"
discovery = true
algorithms = ["RS256", "ES256", "EdDSA"]
audience = ["api://tenants", "other"]
tenant_claim = "https://example.com/tenant_id"

[[jwt.issuers]]
issuer = "https://cognito.example/pool"
algorithms = ["HS256"]
required_claims = {{ token_use = "access", client_id = ["app-one", "app-two"] }}
""")
    proxy.start()
    auth0 = idp.token("ed-1", **{"aud": ["other"], "https://example.com/tenant_id": GLOBEX})
    assert await login(proxy, auth0) == GLOBEX
    assert await refusal(proxy, idp.token("ed-1", aud="nobody")) == ("28P01", "token audience does not match")
    cognito = {"iss": "https://cognito.example/pool", "token_use": "access", "client_id": "app-two"}
    assert await login(proxy, proxy.token(ACME, **cognito)) == ACME
    assert await refusal(proxy, proxy.token(ACME, **{**cognito, "token_use": "id"})) == (
        "28P01", "token claim 'token_use' does not have a required value")
    assert await refusal(proxy, proxy.token(ACME, **{**cognito, "client_id": None})) == (
        "28P01", "token has no 'client_id' claim")
    assert await refusal(proxy, proxy.token(ACME, iss="https://elsewhere.example")) == (
        "28P01", "token issuer does not match")


async def test_a_listed_token_is_refused_at_login(make_proxy: Any, tmp_path: Path) -> None:
    denylist = tmp_path / "denylist"
    denylist.write_text("# revoked\n")
    proxy = make_proxy({"jwt": {"denylist_file": str(denylist)}})
    token = proxy.token(ACME, jti="token-1")
    assert await login(proxy, token) == ACME
    denylist.write_text("# revoked\ntoken-1\n")
    assert await eventually(proxy, lambda: token, "token revoked") == "28P01"
    assert await login(proxy, proxy.token(ACME, jti="token-2")) == ACME
    denylist.write_text("tester\n")  # a subject: every token of it
    assert await eventually(proxy, lambda: proxy.token(ACME, jti=str(uuid.uuid4())), "token revoked") == "28P01"
