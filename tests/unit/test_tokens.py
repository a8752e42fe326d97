"""Token verification: every refusal reason, key sources, and the tenant claim path."""

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.config import UUID_PATTERN, IssuerSettings, JwtSettings
from proxy.tokens import TokenRejected, TokenVerifier, claim_at

SECRET = "s" * 40
TENANT = "11111111-1111-4111-8111-111111111111"
NOW = 1_800_000_000


def issuer(**overrides: Any) -> IssuerSettings:
    values: dict[str, Any] = dict(
        issuer=None,
        discovery=False,
        algorithms=["HS256"],
        secret=SECRET,
        public_key_file=None,
        jwks_file=None,
        jwks_url=None,
        audience=None,
        required_claims={},
        tenant_claim="tenant_id",
        tenant_pattern=UUID_PATTERN,
    )
    values.update(overrides)
    return IssuerSettings(**values)


def settings(leeway_seconds: int = 0, **overrides: Any) -> JwtSettings:
    return JwtSettings(issuers=[issuer(**overrides)], leeway_seconds=leeway_seconds)


def token(claims: dict[str, Any] | None = None, key: Any = SECRET, algorithm: str = "HS256", **headers: Any) -> str:
    body = {"tenant_id": TENANT, "sub": "alice", "exp": NOW + 60}
    body.update(claims or {})
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers or None)


def test_valid_token() -> None:
    identity = TokenVerifier(settings()).verify(token(), NOW)
    assert (identity.tenant, identity.subject, identity.expires_at) == (TENANT, "alice", NOW + 60)


@pytest.mark.parametrize(
    "claims, overrides, reason",
    [
        ({"exp": NOW - 1}, {}, "token expired"),
        ({"exp": None}, {}, "token has no 'exp' claim"),
        ({"exp": "soon"}, {}, "'exp' is not a number"),
        ({"nbf": NOW + 10}, {}, "token not yet valid"),
        ({"iat": NOW + 10}, {}, "issued in the future"),
        ({"aud": "other"}, {"audience": ["app"]}, "audience does not match"),
        ({}, {"audience": ["app"]}, "no 'aud' claim"),
        ({"iss": "evil"}, {"issuer": "https://issuer"}, "issuer does not match"),
        ({"tenant_id": None}, {}, "tenant claim 'tenant_id' missing"),
        ({"tenant_id": ""}, {}, "tenant claim 'tenant_id' missing"),
        ({"tenant_id": "not-a-uuid"}, {}, "does not match the tenant pattern"),
        ({"tenant_id": 42}, {}, "does not match the tenant pattern"),
    ],
)
def test_refusals(claims: dict[str, Any], overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(TokenRejected, match=reason):
        TokenVerifier(settings(**overrides)).verify(token(claims), NOW)


def test_leeway_applies_to_exp_and_nbf() -> None:
    verifier = TokenVerifier(settings(leeway_seconds=30))
    assert verifier.verify(token({"exp": NOW - 10, "nbf": NOW + 10}), NOW).expires_at == NOW + 20


def test_bad_signature() -> None:
    with pytest.raises(TokenRejected, match="signature does not verify"):
        TokenVerifier(settings()).verify(token(key="x" * 40), NOW)


@pytest.mark.parametrize("garbage", ["", "abc", "a.b.c", "eyJhbGciOiJIUzI1NiJ9.e30", "\x00"])
def test_malformed(garbage: str) -> None:
    with pytest.raises(TokenRejected, match="malformed token|algorithm"):
        TokenVerifier(settings()).verify(garbage, NOW)


def test_alg_none_is_refused() -> None:
    unsigned = jwt.encode({"tenant_id": TENANT, "exp": NOW + 60}, None, algorithm="none")
    with pytest.raises(TokenRejected, match="algorithm is not allowed"):
        TokenVerifier(settings()).verify(unsigned, NOW)


def test_algorithm_outside_allowlist_is_refused() -> None:
    with pytest.raises(TokenRejected, match="algorithm is not allowed"):
        TokenVerifier(settings()).verify(token(key=SECRET * 2, algorithm="HS512"), NOW)


def _rsa_pair() -> tuple[Any, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public_pem


def test_rs256_with_public_key_file(tmp_path: Path) -> None:
    private, public_pem = _rsa_pair()
    (tmp_path / "key.pem").write_bytes(public_pem)
    verifier = TokenVerifier(settings(algorithms=["RS256"], secret=None, public_key_file=str(tmp_path / "key.pem")))
    assert verifier.verify(token(key=private, algorithm="RS256"), NOW).tenant == TENANT


def _hs256_by_hand(claims: dict[str, Any], secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(claims).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


@pytest.mark.parametrize("algorithms", [["RS256"], ["RS256", "HS256"]])
def test_hs256_signed_with_public_key_is_refused(tmp_path: Path, algorithms: list[str]) -> None:
    """The classic confusion attack: an HS256 token whose HMAC secret is the server's RSA public key."""
    _, public_pem = _rsa_pair()
    (tmp_path / "key.pem").write_bytes(public_pem)
    secret = SECRET if "HS256" in algorithms else None
    verifier = TokenVerifier(settings(algorithms=algorithms, secret=secret, public_key_file=str(tmp_path / "key.pem")))
    forged = _hs256_by_hand({"tenant_id": TENANT, "exp": NOW + 60}, public_pem)
    with pytest.raises(TokenRejected, match="algorithm is not allowed|signature does not verify"):
        verifier.verify(forged, NOW)


def test_jwks_file_selects_key_by_kid(tmp_path: Path) -> None:
    first, _ = _rsa_pair()
    second, _ = _rsa_pair()
    keys = []
    for kid, private in (("one", first), ("two", second)):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
        jwk.update(kid=kid, alg="RS256", use="sig")
        keys.append(jwk)
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    verifier = TokenVerifier(settings(algorithms=["RS256"], secret=None, jwks_file=str(tmp_path / "jwks.json")))
    assert verifier.verify(token(key=second, algorithm="RS256", kid="two"), NOW).tenant == TENANT
    with pytest.raises(TokenRejected, match="signature"):
        verifier.verify(token(key=second, algorithm="RS256", kid="one"), NOW)
    with pytest.raises(TokenRejected, match="key id is not in the key set"):
        verifier.verify(token(key=second, algorithm="RS256", kid="three"), NOW)
    with pytest.raises(TokenRejected, match="no 'kid'"):
        verifier.verify(token(key=second, algorithm="RS256"), NOW)


def test_dotted_tenant_claim() -> None:
    verifier = TokenVerifier(settings(tenant_claim="app_metadata.tenant"))
    identity = verifier.verify(token({"app_metadata": {"tenant": TENANT}, "tenant_id": None}), NOW)
    assert identity.tenant == TENANT


def test_claim_at_prefers_literal_key_with_dots() -> None:
    claims = {"https://example.com/tenant": "a", "https://example": {"com/tenant": "b"}}
    assert claim_at(claims, "https://example.com/tenant") == "a"
    assert claim_at({"a": {"b": {"c": 1}}}, "a.b.c") == 1
    assert claim_at({"a": 1}, "a.b") is None


def test_accepted_tokens_are_cached_until_they_expire() -> None:
    verifier = TokenVerifier(settings())
    valid = token()
    first = verifier.verify(valid, NOW)
    assert verifier.verify(valid, NOW + 30) is first
    with pytest.raises(TokenRejected, match="token expired"):
        verifier.verify(valid, NOW + 61)
    with pytest.raises(TokenRejected, match="token expired"):
        verifier.verify(valid, NOW + 61)


def test_rejected_tokens_are_not_cached() -> None:
    verifier = TokenVerifier(settings())
    early = token({"nbf": NOW + 10})
    with pytest.raises(TokenRejected, match="not yet valid"):
        verifier.verify(early, NOW)
    assert verifier.verify(early, NOW + 20).tenant == TENANT


@pytest.mark.parametrize(
    "required, claims, reason",
    [
        ({"token_use": ["access"]}, {"token_use": "access"}, None),
        ({"token_use": ["access"]}, {"token_use": "id"}, "claim 'token_use' does not have a required value"),
        ({"client_id": ["a", "b"]}, {"client_id": "b"}, None),
        ({"client_id": ["a", "b"]}, {}, "token has no 'client_id' claim"),
        ({"groups": ["admin"]}, {"groups": ["staff", "admin"]}, None),
        ({"groups[1]": ["admin"]}, {"groups": ["admin", "staff"]}, "claim 'groups\\[1\\]' does not have"),
        ({"app.plan": ["gold"]}, {"app": {"plan": "gold"}}, None),
        ({"https://example.com/plan": ["gold"]}, {"https://example.com/plan": "gold"}, None),
        ({"level": [1]}, {"level": True}, "does not have a required value"),
        ({"level": [1]}, {"level": 1.0}, None),
    ],
)
def test_required_claims(required: dict[str, list[Any]], claims: dict[str, Any], reason: str | None) -> None:
    verifier = TokenVerifier(settings(required_claims=required))
    if reason is None:
        assert verifier.verify(token(claims), NOW).tenant == TENANT
    else:
        with pytest.raises(TokenRejected, match=reason):
            verifier.verify(token(claims), NOW)


def test_audience_list_accepts_any_listed_audience() -> None:
    verifier = TokenVerifier(settings(audience=["api://a", "api://b"]))
    assert verifier.verify(token({"aud": ["other", "api://b"]}), NOW).tenant == TENANT
    with pytest.raises(TokenRejected, match="audience does not match"):
        verifier.verify(token({"aud": "a,b"}), NOW)


def test_the_token_iss_selects_one_issuer_and_only_its_settings() -> None:
    first = issuer(issuer="https://a.example", tenant_claim="org")
    second = issuer(issuer="https://b.example", required_claims={"token_use": ["access"]})
    verifier = TokenVerifier(JwtSettings(issuers=[first, second]))
    assert verifier.verify(token({"iss": "https://a.example", "org": TENANT, "tenant_id": None}), NOW).tenant == TENANT
    with pytest.raises(TokenRejected, match="tenant claim 'org' missing"):
        verifier.verify(token({"iss": "https://a.example"}), NOW)
    with pytest.raises(TokenRejected, match="no 'token_use' claim"):
        verifier.verify(token({"iss": "https://b.example"}), NOW)
    numeric = _hs256_by_hand({"iss": 7, "tenant_id": TENANT, "exp": NOW + 60}, SECRET.encode())
    for other in (token({"iss": "https://c.example"}), token({"iss": None}), numeric):
        with pytest.raises(TokenRejected, match="issuer does not match"):
            verifier.verify(other, NOW)


def test_claims_for_sql_are_selected_and_canonical() -> None:
    claims = {"role": "editor", "email": "a@example.com", "zeta": {"b": 1, "a": "é"}}
    default = TokenVerifier(settings()).verify(token(claims), NOW)
    assert default.claims_json == '{"role":"editor","sub":"alice"}'
    everything = TokenVerifier(JwtSettings(issuers=[issuer()], sql_claims=["*"])).verify(token(claims), NOW)
    assert everything.claims_json == (
        '{"email":"a@example.com","exp":%d,"role":"editor","sub":"alice","tenant_id":"%s","zeta":{"a":"é","b":1}}'
        % (NOW + 60, TENANT))
    assert json.loads(everything.claims_json) == everything.claims


def test_claims_over_the_size_bound_are_refused_with_54000() -> None:
    verifier = TokenVerifier(JwtSettings(issuers=[issuer()], sql_claims=["*"], max_claims_bytes=200))
    with pytest.raises(TokenRejected, match="more than tenant.max_claims_bytes") as info:
        verifier.verify(token({"padding": "p" * 200}), NOW)
    assert info.value.sqlstate == "54000"


@pytest.mark.parametrize("value", ["nul\x00inside", 1e400])
def test_claims_jsonb_cannot_hold_are_refused(value: Any) -> None:
    text = _hs256_by_hand({"tenant_id": TENANT, "exp": NOW + 60, "sub": "alice", "role": value}, SECRET.encode())
    with pytest.raises(TokenRejected, match="cannot be passed to SQL"):
        TokenVerifier(settings()).verify(text, NOW)


def test_sign_claims_matches_the_documented_format() -> None:
    from proxy.auth.claims import sign_claims

    proof = sign_claims(b"k" * 32, TENANT, 4242, NOW, '{"sub":"alice"}')
    mac = hmac.new(b"k" * 32, f'4242:{NOW}:{TENANT}:{{"sub":"alice"}}'.encode(), hashlib.sha256).hexdigest()
    assert proof == f"{NOW}:{mac}"


def test_the_denylist_refuses_listed_ids_and_subjects(tmp_path: Path) -> None:
    denylist = tmp_path / "denylist"
    denylist.write_text("# revoked tokens\n\n")
    verifier = TokenVerifier(JwtSettings(issuers=[issuer()], denylist_file=str(denylist)))
    listed = token({"jti": "t-1"})
    identity = verifier.verify(listed, NOW)
    assert not verifier.revoked(identity, NOW)
    denylist.write_text("t-1\n")
    os.utime(denylist, ns=(1, 1))  # a different mtime, whatever the file system's resolution
    assert not verifier.revoked(identity, NOW + 0.5)  # looked at once a second at most
    assert verifier.revoked(identity, NOW + 1)
    with pytest.raises(TokenRejected, match="^token revoked$"):
        verifier.verify(listed, NOW + 1)  # the accepted-token cache does not bypass it
    assert verifier.verify(token({"jti": "t-2"}), NOW + 1).token_id == "t-2"
    denylist.write_text("alice\n")
    os.utime(denylist, ns=(2, 2))
    with pytest.raises(TokenRejected, match="^token revoked$"):
        verifier.verify(token({"jti": "t-3"}), NOW + 2)
    denylist.unlink()  # unreadable: the entries read before stay in force
    assert verifier.revoked(identity, NOW + 3)
    with pytest.raises(TokenRejected, match="^token revoked$"):
        verifier.verify(token({"jti": "t-4"}), NOW + 3)


@pytest.mark.parametrize("claims, reason", [
    ({"exp": NOW + 367 * 86_400}, "'exp' is further ahead than jwt.max_expiry_seconds allows"),
    ({"exp": NOW + 60.5}, "claim 'exp' is not a whole number of seconds"),
    ({"exp": NOW + 60, "iat": float("nan")}, "claim 'iat' is not a whole number of seconds"),
    ({"exp": float("inf")}, "claim 'exp' is not a whole number of seconds"),
])
def test_times_beyond_the_horizon_or_not_whole_seconds_are_malformed(claims: dict[str, Any], reason: str) -> None:
    """An expiry far ahead (a token that never really expires) and a non-finite or fractional time are
    refused as malformed; a service token valid for a year still works."""
    with pytest.raises(TokenRejected, match=reason):
        TokenVerifier(settings()).verify(token(claims), NOW)
    assert TokenVerifier(settings()).verify(token({"exp": NOW + 365 * 86_400}), NOW).expires_at == NOW + 365 * 86_400


def test_the_tenant_pattern_must_match_the_whole_claim() -> None:
    """A tenant that merely contains a matching part (a UUID with a suffix) is refused."""
    with pytest.raises(TokenRejected, match="does not match the tenant pattern"):
        TokenVerifier(settings()).verify(token({"tenant_id": TENANT + "' OR true --"}), NOW)
