"""Logs: one line per record whatever the client sends, JSON that parses, audit events as fields."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator

import pytest

from proxy import logs
from proxy.metrics import METRICS
from proxy.tokens import Identity, mint


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger(logs.ROOT)
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    yield stream, handler
    root.removeHandler(handler)
    root.setLevel(level)


FORGED = "alice\n2026-11-29T00:00:00+0000 INFO session start client=10.0.0.1 user=admin\u2028x"


def test_escape_keeps_one_line() -> None:
    assert logs.escape("a\nb\r\tc\\d\x00e\u2028f\x7f") == "a\\nb\\r\\tc\\\\d\\x00e\\u2028f\\x7f"
    assert "\n" not in logs.escape(FORGED) and logs.escape("plain text") == "plain text"


def test_text_format_escapes_messages_and_fields(captured: tuple[io.StringIO, logging.Handler]) -> None:
    stream, handler = captured
    handler.setFormatter(logs.TextFormatter())
    logging.getLogger("pg_tenant_proxy").warning("refused user=%s", FORGED)
    logs.AUDIT.login_refused(client="127.0.0.1:5", user=FORGED, reason="token expired", sqlstate="28P01")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and all(" WARNING " in line for line in lines)
    assert 'reason="token expired"' in lines[1] and "reason_label=expired" in lines[1]
    assert "user=\"alice\\n2026-11-29T00:00:00+0000 INFO session start" in lines[1]


def test_json_lines_parse_and_carry_fields(captured: tuple[io.StringIO, logging.Handler]) -> None:
    stream, handler = captured
    handler.setFormatter(logs.JsonFormatter())
    token = mint("s" * 32, {"tenant_id": "t1", "iss": "https://idp", "aud": ["app"], "jti": "j-1", "sub": "bob"})
    identity = Identity("t1", "bob", 2_000_000_000, {"iss": "https://idp", "jti": "j-1", "sub": "bob"})
    logs.AUDIT.session_start(client="127.0.0.1:5", user=FORGED, database="app", identity=identity, token=token)
    logs.AUDIT.session_end(client="127.0.0.1:5", user="alice", database="app", identity=identity, duration=1.23456,
                           bytes_received=10, bytes_sent=20)
    logs.AUDIT.login_refused(client="127.0.0.1:6", user="alice", reason="token signature does not verify",
                             sqlstate="28P01", token=token)
    logs.AUDIT.statement_refused(client="127.0.0.1:5", tenant="t1", reason='setting "app.x" is protected: ...')
    logs.AUDIT.reload(result="error", reason="tls.cert_file: ...", restart_needed=["listen"])
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["event"] for line in lines] == ["session_start", "session_end", "login_refused", "statement_refused",
                                                  "reload"]
    start, end, refused, guard, reload = lines
    assert start["user"] == FORGED and start["tenant"] == "t1" and start["sub"] == "bob" and start["jti"] == "j-1"
    assert start["iss"] == "https://idp" and start["logger"] == "pg_tenant_proxy.audit"
    assert end["duration"] == 1.235 and end["bytes_sent"] == 20
    assert refused["alg"] == "HS256" and refused["iss"] == "https://idp" and refused["aud"] == ["app"]
    assert refused["reason_label"] == "signature" and refused["level"] == "warning"
    assert guard["reason_label"] == "protected_setting" and reload["restart_needed"] == "listen"
    assert token not in text and token.split(".")[2] not in text and "\u2028" not in text


def test_audit_events_move_the_counters() -> None:
    before = (METRICS.auth.get(("refused", "expired"), 0), METRICS.guard_refusals.get("do_block", 0),
              METRICS.config_reloads.get("ok", 0))
    logs.AUDIT.login_refused(client="c", user="u", reason="token expired", sqlstate="28P01")
    logs.AUDIT.statement_refused(client="c", tenant="t", reason="DO blocks are not allowed through pg-tenant-proxy")
    logs.AUDIT.reload(result="ok")
    after = (METRICS.auth[("refused", "expired")], METRICS.guard_refusals["do_block"], METRICS.config_reloads["ok"])
    assert after == tuple(n + 1 for n in before)


def test_token_facts_never_fail() -> None:
    assert logs.token_facts(None) == {} and logs.token_facts("not.a.token") == {}
    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    odd = f"{part({'alg': 'HS256', 'kid': 7})}.{part({'iss': 5, 'aud': 'a'})}.c2ln"
    assert logs.token_facts(odd) == {"alg": "HS256", "aud": "a"}


@pytest.mark.parametrize(
    "reason, label",
    [("token expired", "expired"), ("malformed token", "malformed"), ("tenant claim 'tenant_id' missing", "tenant_claim"),
     ("token algorithm is not allowed", "algorithm"), ("this proxy accepts only TLS connections", "tls_required"),
     ("connections from 10.0.0.1 are not allowed", "network"), ("something new", "other"),
     ("the identity provider's keys could not be fetched", "key_unknown"), ("token revoked", "revoked")],
)
def test_reason_labels_are_bounded(reason: str, label: str) -> None:
    assert logs.reason_label(reason) == label


def test_setup_switches_format_and_debug() -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level, logging.getLogger(logs.ROOT).level
    try:
        logs.setup("debug", "json")
        assert logs.DEBUG and isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        logs.setup("info", "text")
        assert not logs.DEBUG and isinstance(root.handlers[0].formatter, logs.TextFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger(logs.ROOT).setLevel(saved[2])
