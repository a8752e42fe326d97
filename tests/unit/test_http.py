"""The operations endpoint's answers, from the readiness state alone (no sockets)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.http import Endpoint, Readiness, ServerLifecycle


def test_readiness_reasons_in_order() -> None:
    readiness = Readiness()
    assert readiness.problem() == "not listening yet"
    readiness.lifecycle = ServerLifecycle.SERVING
    assert readiness.problem() == "the upstream has not been checked yet"
    readiness.upstream_problem = None
    assert readiness.problem() is None
    readiness.keys_problem = "the key set at jwt.jwks_url cannot be fetched: timed out"
    assert readiness.problem() == readiness.keys_problem
    readiness.keys_problem = None
    readiness.draining = True
    assert readiness.draining and readiness.problem() == "draining: the proxy is shutting down"


async def test_answers() -> None:
    readiness = Readiness()
    endpoint = Endpoint(readiness, [])
    assert await endpoint.answer("GET", "/healthz") == (200, "text/plain", b"ok\n")
    status, _, body = await endpoint.answer("GET", "/readyz")
    assert status == 503 and body == b"not listening yet\n"
    readiness.lifecycle, readiness.upstream_problem = ServerLifecycle.SERVING, None
    assert (await endpoint.answer("GET", "/readyz?verbose=1"))[0] == 200
    assert (await endpoint.answer("POST", "/readyz"))[0] == 405
    assert (await endpoint.answer("GET", "/nope"))[0] == 404
    status, content_type, body = await endpoint.answer("GET", "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"pgtp_transactions", "pgtp_auth", "pgtp_checkout_wait_seconds"} <= names


async def test_a_missing_worker_is_left_out() -> None:
    endpoint = Endpoint(Readiness(), ["/nonexistent/worker-1.metrics.sock"])
    body = await endpoint.metrics()
    assert b"pgtp_workers_reporting 1.0" in body
