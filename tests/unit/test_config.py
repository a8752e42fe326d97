"""Configuration: TOML, PGTP_* overrides, and errors that name the key."""

from pathlib import Path

import pytest

from proxy import config

BASE = """
[upstream]
user = "app"
database = "app"
[jwt]
secret = "%s"
[tenant]
signing_key = "%s"
""" % ("j" * 32, "k" * 32)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, BASE), environ={})
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 6432)
    assert settings.upstream.sslmode == "prefer"
    assert settings.jwt.issuers[0].algorithms == ["HS256"] and settings.jwt.issuers[0].tenant_claim == "tenant_id"
    assert settings.tenant.setting == "app.current_tenant"
    assert settings.pool.mode == "session"
    assert settings.client.auth_timeout_seconds == 15.0
    assert settings.client.max_startup_packet == 10_000


def test_environment_overrides(tmp_path: Path) -> None:
    settings = config.load(
        write(tmp_path, BASE),
        environ={"PGTP_LISTEN": "0.0.0.0:7000", "PGTP_UPSTREAM_PORT": "6543", "PGTP_JWT_ALGORITHMS": "HS256, HS512"},
    )
    assert settings.listen_port == 7000 and settings.upstream.port == 6543
    assert settings.jwt.issuers[0].algorithms == ["HS256", "HS512"]


def test_secret_files(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("z" * 40 + "\n")
    text = BASE.replace('secret = "%s"' % ("j" * 32), f'secret_file = "{tmp_path / "secret"}"')
    assert config.load(write(tmp_path, text), environ={}).jwt.secret == "z" * 40


@pytest.mark.parametrize(
    "extra, environ, key",
    [
        ("bogus = 1\n", {}, "bogus"),
        ("[nope]\nx = 1\n", {}, "[nope]"),
        ("[pool]\nsize = 'ten'\n", {}, "pool.size"),
        ("", {"PGTP_POOL_SIZE": "ten"}, "pool.size"),
        ("", {"PGTP_JWT_ALGORITHMS": "none"}, "jwt.algorithms"),
        ("", {"PGTP_JWT_ALGORITHMS": "RS256"}, "jwt.public_key_file"),
        ("", {"PGTP_UPSTREAM_SSLMODE": "sometimes"}, "upstream.sslmode"),
        ("", {"PGTP_UPSTREAM_SSLMODE": "verify-full"}, "upstream.ca_file"),
        ("", {"PGTP_TENANT_SETTING": "notdotted"}, "tenant.setting"),
        ("", {"PGTP_LISTEN": "nowhere"}, "listen"),
        ("", {"PGTP_JWT_TENANT_PATTERN": "("}, "jwt.tenant_pattern"),
        ("", {"PGTP_TLS_CERT_FILE": "/nonexistent"}, "tls."),
        ("", {"PGTP_POOL_MODE": "statement"}, "pool.mode"),
        ("", {"PGTP_JWT_SECRET_FILE": "/nonexistent"}, "jwt.secret"),
        ("", {"PGTP_UPSTREAM_SSLCERT": "/nonexistent"}, "upstream.sslcert and upstream.sslkey"),
        ("", {"PGTP_UPSTREAM_SSLCERT": "/nonexistent", "PGTP_UPSTREAM_SSLKEY": "/nonexistent"}, "upstream.sslcert"),
        ("", {"PGTP_UPSTREAM_DATABASES": "app,reports"}, "upstream.database and upstream.databases"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, extra: str, environ: dict[str, str], key: str) -> None:
    with pytest.raises(config.ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        config.load(write(tmp_path, extra + BASE if not extra.startswith("[") else BASE + extra), environ=environ)


def test_missing_required_keys(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="upstream.user"):
        config.load(write(tmp_path, ""), environ={})
    with pytest.raises(config.ConfigError, match="tenant.signing_key"):
        config.load(write(tmp_path, BASE.replace('signing_key = "%s"' % ("k" * 32), "")), environ={})


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "listen = "), environ={})


def test_env_name() -> None:
    assert config.env_name("jwt", "leeway_seconds") == "PGTP_JWT_LEEWAY_SECONDS"
    assert config.env_name("", "listen") == "PGTP_LISTEN"


def test_database_allowlist(tmp_path: Path) -> None:
    """Only the configured database, or the listed ones, may be reached; neither set is an error, since
    the client could then name postgres or template1."""
    fixed = config.load(write(tmp_path, BASE), environ={}).upstream
    assert fixed.allowed("app") and not fixed.allowed("postgres") and not fixed.allowed("template1")
    unset = BASE.replace('database = "app"\n', "")
    listed = config.load(write(tmp_path, unset), environ={"PGTP_UPSTREAM_DATABASES": "app, reports"})
    assert listed.upstream.databases == ["app", "reports"]
    assert listed.upstream.allowed("reports") and not listed.upstream.allowed("postgres")
    with pytest.raises(config.ConfigError, match="upstream.database or upstream.databases"):
        config.load(write(tmp_path, unset), environ={})


@pytest.mark.parametrize("text, expected", [("a", ["a"]), ("a, b", ["a", "b"]), ('["a,b", "c"]', ["a,b", "c"])])
def test_audience_in_the_environment(tmp_path: Path, text: str, expected: list[str]) -> None:
    """PGTP_JWT_AUDIENCE: a JSON array, or a comma-separated list (never the literal 'a,b')."""
    settings = config.load(write(tmp_path, BASE), environ={"PGTP_JWT_AUDIENCE": text})
    assert settings.jwt.issuers[0].audience == expected


def test_several_issuers_default_to_the_jwt_keys(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    text = BASE.replace("[tenant]", f"""audience = ["app"]
tenant_claim = "org"
[[jwt.issuers]]
issuer = "https://a.example"
[[jwt.issuers]]
issuer = "https://b.example"
algorithms = ["RS256"]
jwks_file = "{jwks}"
tenant_claim = "https://b.example/tenant"
required_claims = {{ token_use = "access", client_id = ["one", "two"] }}
[tenant]""")
    first, second = config.load(write(tmp_path, text), environ={}).jwt.issuers
    assert (first.issuer, first.algorithms, first.audience, first.tenant_claim) == ("https://a.example", ["HS256"], ["app"], "org")
    assert (second.algorithms, second.jwks_file, second.tenant_claim) == (["RS256"], str(jwks), "https://b.example/tenant")
    assert second.required_claims == {"token_use": ["access"], "client_id": ["one", "two"]}


@pytest.mark.parametrize(
    "extra, environ, key",
    [
        ('[[jwt.issuers]]\njwks_url = "https://x"\n', {}, r"jwt.issuers\[0\].issuer"),
        ('[[jwt.issuers]]\nissuer = "a"\nbogus = 1\n', {}, r"jwt.issuers\[0\].bogus"),
        ('[[jwt.issuers]]\nissuer = "a"\n[[jwt.issuers]]\nissuer = "a"\n', {}, "same issuer"),
        ("", {"PGTP_JWT_ISSUER": "https://a", "PGTP_JWT_ISSUERS": '[{"issuer": "https://b"}]'}, "jwt.issuer"),
        ("", {"PGTP_JWT_DISCOVERY": "true"}, "jwt.discovery"),
        ("", {"PGTP_JWT_JWKS_URL": "file:///etc/passwd"}, "jwt.jwks_url"),
        ("", {"PGTP_JWT_REQUIRED_CLAIMS": '{"a..b": 1}'}, "claim path"),
        ("", {"PGTP_JWT_REQUIRED_CLAIMS": "[1]"}, "jwt.required_claims"),
        ("", {"PGTP_JWT_DENYLIST_FILE": "/nonexistent"}, "jwt.denylist_file"),
        ("", {"PGTP_JWT_JWKS_REFETCH_INTERVAL_SECONDS": "0.5"}, "jwt.jwks_refetch_interval_seconds"),
        ("", {"PGTP_TENANT_CLAIMS": "*,sub"}, "tenant.claims"),
        ("", {"PGTP_TENANT_CLAIMS_SETTING": "tenant_proxy.proof"}, "tenant.claims_setting"),
        ("", {"PGTP_UPSTREAM_CHANNEL_BINDING": "maybe"}, "upstream.channel_binding"),
        ("", {"PGTP_UPSTREAM_CHANNEL_BINDING": "require", "PGTP_UPSTREAM_SSLMODE": "disable"}, "upstream.channel_binding"),
        ("", {"PGTP_UPSTREAM_REQUIRE_AUTH": "scram-sha-256,!md5"}, "upstream.require_auth"),
        ("", {"PGTP_UPSTREAM_REQUIRE_AUTH": "kerberos"}, "upstream.require_auth"),
    ],
)
def test_identity_errors_name_the_key(tmp_path: Path, extra: str, environ: dict[str, str], key: str) -> None:
    with pytest.raises(config.ConfigError, match=key):
        config.load(write(tmp_path, BASE.replace("[tenant]", extra + "[tenant]")), environ=environ)
