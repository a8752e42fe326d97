"""Client transport policy: TLS required, client certificates, allowed networks, Unix sockets exempt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from integration.certificates import make_certificates
from proxy import config
from proxy.access import check_transport, network_allowed


class FakeSSL:
    def __init__(self, cert: dict[str, Any]) -> None:
        self.cert = cert

    def getpeercert(self) -> dict[str, Any]:
        return self.cert


class FakeTransport:
    def __init__(self, peer: Any, ssl_object: FakeSSL | None = None) -> None:
        self.extra = {"peername": peer, "ssl_object": ssl_object}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def settings(tmp_path: Path, certs: tuple[Path, Path, Path], mode: str, networks: str = "") -> config.Settings:
    ca, cert, key = certs
    environ = {
        "PGTP_UPSTREAM_USER": "app", "PGTP_UPSTREAM_DATABASE": "app", "PGTP_JWT_SECRET": "j" * 32,
        "PGTP_TENANT_SIGNING_KEY": "k" * 32,
        "PGTP_TLS_CERT_FILE": str(cert), "PGTP_TLS_KEY_FILE": str(key), "PGTP_TLS_CLIENT_SSLMODE": mode,
        "PGTP_CLIENT_ALLOWED_NETWORKS": networks,
    }
    if mode == "verify-ca":
        environ["PGTP_TLS_CLIENT_CA_FILE"] = str(ca)
    return config.load(None, environ)


TCP = ("127.0.0.1", 50000)


def test_require_refuses_plaintext_with_28000_and_a_hint(tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    strict = settings(tmp_path, certs, "require")
    refusal = check_transport(FakeTransport(TCP), strict)
    assert refusal is not None and refusal.sqlstate == "28000" and "sslmode=require" in (refusal.hint or "")
    assert check_transport(FakeTransport(TCP, FakeSSL({})), strict) is None
    assert check_transport(FakeTransport(""), strict) is None  # Unix socket: local, never TLS
    assert check_transport(FakeTransport(TCP), settings(tmp_path, certs, "allow")) is None


def test_verify_ca_needs_a_client_certificate(tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    mutual = settings(tmp_path, certs, "verify-ca")
    refusal = check_transport(FakeTransport(TCP, FakeSSL({})), mutual)
    assert refusal is not None and refusal.sqlstate == "28000" and "certificate" in refusal.message
    assert check_transport(FakeTransport(TCP, FakeSSL({"subject": ((("commonName", "app"),),)})), mutual) is None


def test_allowed_networks(tmp_path: Path, certs: tuple[Path, Path, Path]) -> None:
    fenced = settings(tmp_path, certs, "allow", "10.0.0.0/8, fd00::/8")
    refusal = check_transport(FakeTransport(TCP), fenced)
    assert refusal is not None and refusal.sqlstate == "28000" and "127.0.0.1" in refusal.message
    assert check_transport(FakeTransport(("10.1.2.3", 5)), fenced) is None
    assert check_transport(FakeTransport(("fd00::1", 5, 0, 0)), fenced) is None
    assert check_transport(FakeTransport(None), fenced) is None


def test_network_allowed() -> None:
    assert network_allowed("192.0.2.7", [])
    assert network_allowed("::ffff:10.0.0.1", ["10.0.0.0/8"])
    assert not network_allowed("::1", ["127.0.0.0/8"])
    assert network_allowed("fe80::1%eth0", ["fe80::/10"])
    assert not network_allowed("11.0.0.1", ["10.0.0.0/8", "192.168.1.1"])
