"""Counters: plain integers in, Prometheus text out (parsed back with prometheus-client's parser)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import FAMILIES, OTHER_TENANTS, Gauges, Metrics, merge, render


def parsed(text: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def busy_metrics() -> Metrics:
    metrics = Metrics()
    metrics.transactions += 3
    metrics.queries += 7
    metrics.bytes_received += 100
    metrics.login("ok")
    metrics.login("refused", "expired")
    metrics.login("refused", "expired")
    metrics.guard_refusal("protected_setting")
    metrics.checkout_wait(0.0)
    metrics.checkout_wait(0.2)
    metrics.checkout_wait(100.0)
    metrics.sampler = lambda: Gauges({"ready": 2}, {("app", "idle"): 1}, {"app": 4})
    return metrics


def test_families_render_with_prometheus_names_and_values() -> None:
    samples = parsed(render(busy_metrics().snapshot()))
    assert samples["pgtp_transactions_total"][()] == 3 and samples["pgtp_queries_total"][()] == 7
    assert samples["pgtp_bytes_total"][(("direction", "received"),)] == 100
    assert samples["pgtp_auth_total"][(("reason", "expired"), ("result", "refused"))] == 2
    assert samples["pgtp_guard_refusals_total"][(("reason", "protected_setting"),)] == 1
    assert samples["pgtp_client_connections"][(("state", "ready"),)] == 2
    assert samples["pgtp_server_connections"][(("database", "app"), ("state", "idle"))] == 1
    assert samples["pgtp_clients_waiting"][(("database", "app"),)] == 4
    buckets = samples["pgtp_checkout_wait_seconds_bucket"]
    assert buckets[(("le", "0.0005"),)] == 1 and buckets[(("le", "0.25"),)] == 2 and buckets[(("le", "+Inf"),)] == 3
    assert samples["pgtp_checkout_wait_seconds_count"][()] == 3
    assert abs(samples["pgtp_checkout_wait_seconds_sum"][()] - 100.2) < 1e-9
    assert all(name.startswith("pgtp_") for name in samples)
    assert "pgtp_tenant_transactions_total" not in samples  # off unless [http] tenant_metrics


def test_workers_add_up() -> None:
    one, two = busy_metrics().snapshot(), busy_metrics().snapshot()
    samples = parsed(render(merge([one, two])))
    assert samples["pgtp_transactions_total"][()] == 6
    assert samples["pgtp_auth_total"][(("reason", "expired"), ("result", "refused"))] == 4
    assert samples["pgtp_checkout_wait_seconds_bucket"][(("le", "+Inf"),)] == 6
    assert samples["pgtp_workers_reporting"][()] == 2


def test_tenant_series_are_bounded() -> None:
    metrics = Metrics()
    metrics.tenant_transaction("a")
    assert metrics.tenant_transactions == {}
    metrics.tenant_metrics, metrics.max_tenant_series = True, 2
    for tenant in ("a", "b", "c", "d", "a"):
        metrics.tenant_transaction(tenant)
    assert metrics.tenant_transactions == {"a": 2, "b": 1, OTHER_TENANTS: 2}
    samples = parsed(render(metrics.snapshot()))
    assert samples["pgtp_tenant_transactions_total"][(("tenant", OTHER_TENANTS),)] == 2


def test_every_family_is_documented_and_named_by_the_rules() -> None:
    for name, (kind, help_text, _) in FAMILIES.items():
        assert name.startswith("pgtp_") and name == name.lower() and help_text
        assert name.endswith("_total") == (kind == "counter"), name
