"""The shipped example configuration stays loadable: every key in it exists and has the right type."""

from pathlib import Path

from integration.certificates import make_certificates
from proxy import config

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "pg-tenant-proxy.toml"


def test_example_config_loads(tmp_path: Path) -> None:
    secrets = {name: tmp_path / name for name in ("upstream-password", "jwt-secret", "tenant-signing-key", "ca.pem")}
    for path in secrets.values():
        path.write_text("x" * 40)
    make_certificates(tmp_path / "certs")
    secrets["ca.pem"] = tmp_path / "certs" / "ca.pem"  # loading reads it as a CA bundle
    text = EXAMPLE.read_text()
    for name, path in secrets.items():
        text = text.replace(f"/run/secrets/{name}", str(path))
    text = text.replace("/etc/ssl/certs/db-ca.pem", str(secrets["ca.pem"]))
    target = tmp_path / "example.toml"
    target.write_text(text)
    settings = config.load(target, environ={})
    assert settings.upstream.sslmode == "verify-full" and settings.jwt.leeway_seconds == 30
    assert settings.client.allowed_parameters == config.DEFAULT_ALLOWED_PARAMETERS
