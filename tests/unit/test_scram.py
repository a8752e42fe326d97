"""SCRAM-SHA-256 client against the RFC 7677 section 3 example."""

import pytest

from proxy.protocol.errors import ProtocolViolation
from proxy.protocol.scram import ScramClient

SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def client() -> ScramClient:
    return ScramClient("pencil", "rOprNGfwEbeRWgbNEkqO", username="user")


def test_rfc7677_exchange() -> None:
    scram = client()
    assert scram.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert scram.client_final(SERVER_FIRST) == CLIENT_FINAL
    scram.verify_server_final(SERVER_FINAL)


def test_wrong_server_signature_is_refused() -> None:
    scram = client()
    scram.client_final(SERVER_FIRST)
    with pytest.raises(ProtocolViolation, match="signature"):
        scram.verify_server_final(b"v=" + b"A" * 44)


def test_server_nonce_must_extend_client_nonce() -> None:
    with pytest.raises(ProtocolViolation, match="nonce"):
        client().client_final(b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


def test_server_error_attribute() -> None:
    scram = client()
    scram.client_final(SERVER_FIRST)
    with pytest.raises(ProtocolViolation, match="invalid-proof"):
        scram.verify_server_final(b"e=invalid-proof")


def test_malformed_server_first() -> None:
    with pytest.raises(ProtocolViolation):
        client().client_final(b"garbage")
