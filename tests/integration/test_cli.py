"""The command line as a user runs it: config errors, token minting, the demo."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import jwt

from support import ACME, REPO
from proxy.embedded import free_port


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def test_config_error_names_the_key_and_exits_before_listening(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "bad.toml"
    config.write_text(f'listen = "127.0.0.1:{port}"\n[upstream]\nuser = "app"\ndatabase = "app"\n[jwt]\nsecret = "{"s" * 40}"\n')
    result = run("run", "--config", str(config))
    assert result.returncode == 2
    assert "tenant.signing_key" in result.stderr
    config.write_text(config.read_text() + f'[tenant]\nsigning_key = "{"k" * 40}"\n[pool]\nsize = "many"\n')
    result = run("run", "--config", str(config))
    assert result.returncode == 2 and "pool.size" in result.stderr
    assert "s" * 40 not in result.stderr and "k" * 40 not in result.stderr


def test_help_for_every_command() -> None:
    for command in ("run", "check", "token", "sql", "demo", "doctor"):
        result = run(command, "--help")
        assert result.returncode == 0 and "usage: pg-tenant-proxy" in result.stdout


def test_token_command_mints_a_verifiable_token() -> None:
    secret = "t" * 40
    result = run("token", "--secret", secret, "--tenant", ACME, "--ttl", "60", "--sub", "bob", "--claim", "role=admin",
                 "--claim", "level=3")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), secret, algorithms=["HS256"])
    assert claims["tenant_id"] == ACME and claims["sub"] == "bob" and claims["role"] == "admin" and claims["level"] == 3
    assert 55 <= claims["exp"] - claims["iat"] <= 60


def test_token_command_refuses_a_secret_no_proxy_accepts() -> None:
    result = run("token", "--secret", "short", "--tenant", ACME)
    assert result.returncode == 2 and "at least 32 bytes" in result.stderr and result.stdout == ""


def test_sql_into_a_reader_that_leaves_is_not_a_traceback() -> None:
    """`true` has left before the proxy starts writing: every write meets a closed pipe."""
    result = subprocess.run(f"{sys.executable} -m proxy sql | true", shell=True, capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr


def test_demo_shows_isolation() -> None:
    result = run("demo", "--no-serve", "--port", str(free_port()), timeout=120)
    assert result.returncode == 0, result.stderr
    acme, globex, attempts = result.stdout.split("== ")[1:4]
    assert "Ada Lovelace" in acme and "Grace Hopper" not in acme and "(2 rows)" in acme
    assert "Grace Hopper" in globex and "Ada Lovelace" not in globex
    assert 'ERROR:  setting "app.current_tenant" is protected' in attempts
    assert re.search(r"globex_rows_seen\s*\n-+\s*\n\s*0\s*\n", attempts), attempts
    sessions = result.stdout.split("== ")[4]
    assert "ERROR:  permission denied for function pg_stat_get_backend_idset" in sessions, sessions
    assert "psql 'postgresql://acme@127.0.0.1:" in result.stdout
    assert "Stopped and cleaned up." in result.stdout


def test_token_command_mints_what_the_configuration_accepts(tmp_path: Path) -> None:
    """`token --config F`: the same configuration verifies the token (issuer, audience, required claims,
    a namespaced tenant claim, the configured HS algorithm)."""
    from proxy import config as config_module
    from proxy.tokens import TokenVerifier

    config = tmp_path / "proxy.toml"
    config.write_text(f"""[upstream]
user = "app"
database = "app"
[jwt]
algorithms = ["HS512"]
secret = "{"s" * 64}"
issuer = "https://idp.example/"
audience = ["tenant-app", "other"]
tenant_claim = "https://example.com/tenant_id"
required_claims = {{ token_use = "access", "app.plan" = ["gold", "silver"] }}
[tenant]
signing_key = "{"k" * 40}"
""")
    result = run("token", "--config", str(config), "--tenant", ACME, "--sub", "bob")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert jwt.get_unverified_header(token)["alg"] == "HS512"
    identity = TokenVerifier(config_module.load(config, environ={}).jwt, background=False).verify(token, time.time())
    assert (identity.tenant, identity.subject) == (ACME, "bob")
    assert identity.claims["app"] == {"plan": "gold"} and identity.claims["aud"] == "tenant-app"
