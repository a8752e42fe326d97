"""Tenant context: the proof, the HMAC pads used by the SQL verifier, and the context messages."""

import hashlib
import hmac

from proxy.protocol.framing import MessageReader
from proxy.tenant import ContextBuilder, hmac_pads, quote_literal, sign
from proxy.verifier import verifier_sql

KEY = b"k" * 40


def test_proof_binds_tenant_pid_and_expiry() -> None:
    proof = sign(KEY, "t1", 100, 2000)
    expiry, mac = proof.split(":")
    assert expiry == "2000"
    assert mac == hmac.new(KEY, b"100:2000:t1", hashlib.sha256).hexdigest()
    assert proof != sign(KEY, "t2", 100, 2000)
    assert proof != sign(KEY, "t1", 101, 2000)
    assert proof != sign(KEY, "t1", 100, 2001)


def test_pads_reproduce_hmac_with_plain_sha256() -> None:
    for key in (KEY, b"x" * 100):
        inner, outer = hmac_pads(key)
        message = b"123:456:tenant"
        by_pads = hashlib.sha256(outer + hashlib.sha256(inner + message).digest()).hexdigest()
        assert by_pads == hmac.new(key, message, hashlib.sha256).hexdigest()


def test_context_values_travel_as_bind_parameters() -> None:
    """Session mode: the proxy's own named statement and portal, closed again; the values only in Bind."""
    builder = ContextBuilder("app.current_tenant", "tenant_proxy.proof", "k" * 40)
    reader = MessageReader(1 << 20)
    reader.feed(b"".join(raw for raw, _ in builder.session_messages("tenant-a", 77, 5000)))
    parsed = list(reader)
    assert [t for t, _ in parsed] == [b"P", b"B", b"E", b"C", b"C", b"S"]
    statement = parsed[0][1]
    assert statement.startswith(b"pg_tenant_proxy_session_context\0")
    assert b"tenant-a" not in statement and b"5000" not in statement and b", false)" in statement
    assert b"tenant-a" in parsed[1][1]
    assert builder.proof("tenant-a", 77, 5000).encode() in parsed[1][1]
    assert parsed[3][1] == b"Ppg_tenant_proxy_context\0" and parsed[4][1] == b"Spg_tenant_proxy_session_context\0"


def test_transaction_context_is_local_and_never_unnamed() -> None:
    """Transaction mode: Bind, Execute and Close of the proxy's own portal, for the transaction only."""
    builder = ContextBuilder("app.current_tenant", "tenant_proxy.proof", "k" * 40)
    assert ", true)" in builder.statement and ", false)" not in builder.statement
    reader = MessageReader(1 << 20)
    reader.feed(builder.transaction_messages("tenant-a", 77, 5000))
    parsed = list(reader)
    assert [t for t, _ in parsed] == [b"B", b"E", b"C"]
    assert parsed[0][1].startswith(b"pg_tenant_proxy_context\0pg_tenant_proxy_context\0")
    assert parsed[1][1].startswith(b"pg_tenant_proxy_context\0")


def test_quote_literal() -> None:
    assert quote_literal("a'b") == "'a''b'"


def test_verifier_sql_is_stable_and_never_immutable() -> None:
    script = verifier_sql("app.current_tenant", "tenant_proxy.proof", "k" * 40)
    assert "STABLE SECURITY DEFINER" in script
    assert "IMMUTABLE" not in script.upper().replace("NEVER IMMUTABLE", "")
    assert "SET search_path" not in script.replace("No SET search_path clause", "").replace("a SET search_path clause", "")
    assert "PARALLEL RESTRICTED" in script and "OPERATOR(pg_catalog.=)" in script
    inner, outer = hmac_pads(b"k" * 40)
    assert inner.hex() in script and outer.hex() in script
    assert "k" * 40 not in script
    assert "INSERT INTO tenant_proxy.signing_key" not in verifier_sql("app.t", "tenant_proxy.proof", None)
