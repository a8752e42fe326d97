"""Configuration: TOML, PGTP_* overrides, and errors that name the key."""

import json
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

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


@pytest.mark.parametrize(
    "environ, key",
    [
        ({"PGTP_UPSTREAM_PORT": "99999"}, "upstream.port: must be between 1 and 65535, got 99999"),
        ({"PGTP_UPSTREAM_PORT": "0"}, "upstream.port"),
        ({"PGTP_JWT_LEEWAY_SECONDS": "-5"}, "jwt.leeway_seconds: must be between 0 and 3600"),
        ({"PGTP_WORKERS": "0"}, "workers"),
        ({"PGTP_POOL_CHECKOUT_TIMEOUT": "nan"}, "pool.checkout_timeout"),
        ({"PGTP_POOL_SERVER_LIFETIME": "inf"}, "pool.server_lifetime"),
        ({"PGTP_CLIENT_MAX_MESSAGE": "10"}, "client.max_message"),
        ({"PGTP_HTTP_MAX_TENANT_SERIES": "0"}, "http.max_tenant_series"),
        ({"PGTP_POOL_MIN_SIZE": "30"}, "pool.min_size"),
        ({"PGTP_UPSTREAM_PROT": "5432"}, "PGTP_UPSTREAM_PROT: this environment variable names no configuration key"),
        ({"PGTP_LOG_FORMAT": "xml"}, "log_format"),
        ({"PGTP_HTTP_LISTEN": "everywhere"}, "http.listen"),
        ({"PGTP_HTTP_LISTEN": "0.0.0.0:6432"}, "http.listen: must use another port than listen (6432)"),
        ({"PGTP_TLS_CLIENT_SSLMODE": "sometimes"}, "tls.client_sslmode"),
        ({"PGTP_TLS_CLIENT_SSLMODE": "require"}, "tls.client_sslmode: require needs tls.cert_file"),
        ({"PGTP_CLIENT_ALLOWED_NETWORKS": "10.0.0.0/8, not-a-net"}, "client.allowed_networks: 'not-a-net'"),
        ({"PGTP_JWT_ALGORITHMS": "RS256", "PGTP_JWT_JWKS_URL": "ftp://keys.example/jwks"}, "jwt.jwks_url"),
        ({"PGTP_JWT_ALGORITHMS": "RS256", "PGTP_JWT_JWKS_URL": "http://keys.example/jwks"}, "jwt.jwks_url"),
        ({"PGTP_LISTEN_UNIX": "/nonexistent/dir/.s.PGSQL.6432"}, "listen_unix"),
    ],
)
def test_ranges_and_new_keys_name_the_key(tmp_path: Path, environ: dict[str, str], key: str) -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.load(write(tmp_path, BASE), environ=environ)
    assert any(key in problem for problem in raised.value.problems), raised.value.problems


def test_every_numeric_key_has_a_range() -> None:
    numeric = {name for name, (kind, _) in config.SCHEMA.items() if kind in (int, float)}
    assert numeric == set(config.RANGES)
    for name, (lowest, highest) in config.RANGES.items():
        assert lowest <= config.SCHEMA[name][1] <= highest, name


def test_every_problem_is_reported_on_its_own_line(tmp_path: Path) -> None:
    text = BASE + "[pool]\nsize = 0\nmode = 'statement'\n"
    with pytest.raises(config.ConfigError) as raised:
        config.load(write(tmp_path, "bogus = 1\n" + text), environ={"PGTP_UPSTREAM_PORT": "70000", "PGTP_NOPE": "1"})
    problems = raised.value.problems
    assert len(problems) == 5 and str(raised.value).count("\n") == 4
    for key in ("bogus", "pool.size", "pool.mode", "upstream.port", "PGTP_NOPE"):
        assert sum(key in problem for problem in problems) == 1, (key, problems)


def key_material_problems(tmp_path: Path, jwt_keys: str, tls: str = "") -> list[str]:
    text = BASE.replace("[jwt]\n", "[jwt]\nalgorithms = ['HS256', 'RS256']\n" + jwt_keys) + tls
    with pytest.raises(config.ConfigError) as raised:
        config.load(write(tmp_path, text), environ={})
    return raised.value.problems


def test_bad_key_material_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    pem = tmp_path / "key.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    assert key_material_problems(tmp_path, f"public_key_file = '{pem}'\n") == [
        f"jwt.public_key_file: {pem} is not a PEM public key (ValueError)"
    ]
    jwks = tmp_path / "jwks.json"
    for body in ("{not json", '{"keys": []}', '{"keys": [{"kty": "RSA", "n": "AQAB"}]}', "[1, 2]"):
        jwks.write_text(body)
        (problem,) = key_material_problems(tmp_path, f"jwks_file = '{jwks}'\n")
        assert problem.startswith(f"jwt.jwks_file: {jwks} is not a usable JSON Web Key Set"), problem
    cert = tmp_path / "cert.pem"
    cert.write_text("garbage")
    tls = f"[tls]\ncert_file = '{cert}'\nkey_file = '{cert}'\nclient_ca_file = '{cert}'\n"
    problems = key_material_problems(tmp_path, "jwks_url = 'https://issuer.example/jwks'\n", tls)
    assert [p.split(":")[0] for p in problems] == ["tls.cert_file / tls.key_file", "tls.client_ca_file"], problems


def test_new_keys_defaults(tmp_path: Path) -> None:
    settings = config.load(write(tmp_path, BASE), environ={})
    assert settings.log_format == "text" and settings.listen_unix is None and settings.unix_socket_path is None
    assert settings.tls.client_sslmode == "allow" and settings.tls.client_ca_file is None
    assert settings.client.allowed_networks == []
    assert settings.http.listen is None and settings.http_address is None
    assert settings.http.upstream_check_interval == 5.0 and settings.http.tenant_metrics is False
    assert settings.http.max_tenant_series == 1000


def test_listen_unix_follows_libpq_naming(tmp_path: Path) -> None:
    directory = config.load(write(tmp_path, BASE), environ={"PGTP_LISTEN_UNIX": str(tmp_path)})
    assert directory.unix_socket_path == str(tmp_path / ".s.PGSQL.6432")
    path = config.load(write(tmp_path, BASE), environ={"PGTP_LISTEN_UNIX": str(tmp_path / ".s.PGSQL.7000")})
    assert path.unix_socket_path == str(tmp_path / ".s.PGSQL.7000")


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
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    jwks.write_text(json.dumps({"keys": [json.loads(pyjwt.algorithms.ECAlgorithm.to_jwk(public))]}))
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
