"""Throwaway certificate authorities and certificates for the TLS tests: a server certificate for
localhost, and client certificates for Postgres `cert` authentication."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _authority(ca_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        _builder(ca_name, _name(ca_name), ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, subject: str,
          extension: x509.ExtensionType) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        _builder(subject, ca.subject, key.public_key())
        .add_extension(extension, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, certificate


def _write(directory: Path, prefix: str, ca: x509.Certificate, certificate: x509.Certificate,
           key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / f"{prefix}ca.pem", directory / f"{prefix}.pem", directory / f"{prefix}.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].chmod(0o600)
    return paths


def make_certificates(directory: Path, ca_name: str = "pgtp test CA") -> tuple[Path, Path, Path]:
    """Write ca.pem, server.pem and server.key (for localhost and 127.0.0.1); return their paths."""
    ca_key, ca = _authority(ca_name)
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    key, server = _leaf(ca_key, ca, "localhost", names)
    ca_path, server_path, key_path = _write(directory, "server", ca, server, key)
    return ca_path.rename(directory / "ca.pem"), server_path, key_path


def make_client_certificate(directory: Path, role: str) -> tuple[Path, Path, Path]:
    """Write clientca.pem, client.pem and client.key: a certificate whose common name is `role`, for
    Postgres `cert` authentication (the server's ssl_ca_file is clientca.pem); return their paths."""
    ca_key, ca = _authority("pgtp client CA")
    key, client = _leaf(ca_key, ca, role, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]))
    return _write(directory, "client", ca, client, key)
