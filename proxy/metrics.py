"""The proxy's counters: plain integers bumped in place on the hot path, turned into Prometheus metric
families only when someone scrapes.

The data path pays one attribute increment per event (`METRICS.transactions += 1`): no locks, no
label lookups, no prometheus-client objects. At scrape time `snapshot()` copies the numbers (and asks
the `sampler` for the gauges, read from the live connection lists) into a JSON-friendly `Snapshot`;
with `workers = N` the scraped worker merges every worker's snapshot (`merge`) before `render` turns
them into the text exposition format (prometheus-client's `generate_latest`).

Names follow the Prometheus naming rules (https://prometheus.io/docs/practices/naming/): the `pgtp_`
prefix, base units (seconds, bytes), `_total` on counters.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.exposition import generate_latest

# Upper bounds (seconds) of the checkout wait histogram's buckets; +Inf is implied.
CHECKOUT_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OTHER_TENANTS = "_other"  # the label that collects tenants past [http] max_tenant_series

# A sample: labels (name -> value) and the number. A snapshot maps a family name to its samples.
Sample = tuple[dict[str, str], float]
Snapshot = dict[str, list[Sample]]


@dataclass
class Gauges:
    """What is true right now, read from the live lists at scrape time (never kept up to date in place).

    clients: client connections by state (e.g. "login", "active", "idle", "waiting");
    servers: server connections by (database, state) (e.g. "active", "idle", "opening");
    waiting: clients waiting for a server connection, by database.
    """

    clients: dict[str, int] = field(default_factory=dict)
    servers: dict[tuple[str, str], int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)


class Metrics:
    """This process's counters. Bump the plain attributes in place; call the methods only where a label
    or a bucket must be chosen (logins, refusals, checkouts), never per message."""

    def __init__(self) -> None:
        self.transactions = 0  # ReadyForQuery 'I' forwarded to a client
        self.queries = 0  # Query messages, and Sync-ended extended-protocol groups, sent upstream for clients
        self.bytes_received = 0  # bytes read from clients
        self.bytes_sent = 0  # bytes written to clients
        self.context_sets = 0  # tenant context messages run on a server connection
        self.tenant_switches = 0  # a server connection handed to a tenant other than its previous one
        self.auth: dict[tuple[str, str], int] = {}  # (result, reason) -> logins
        self.guard_refusals: dict[str, int] = {}
        self.jwks_fetches: dict[str, int] = {}
        self.config_reloads: dict[str, int] = {}
        self.checkout_wait_buckets = [0] * (len(CHECKOUT_WAIT_BUCKETS) + 1)
        self.checkout_wait_sum = 0.0
        self.tenant_metrics = False
        self.max_tenant_series = 1000
        self.tenant_transactions: dict[str, int] = {}
        self.sampler: Callable[[], Gauges] | None = None

    def login(self, result: str, reason: str = "") -> None:
        """A login finished: result "ok" or "refused", with a refusal's short reason label."""
        key = (result, reason)
        self.auth[key] = self.auth.get(key, 0) + 1

    def guard_refusal(self, reason: str) -> None:
        self.guard_refusals[reason] = self.guard_refusals.get(reason, 0) + 1

    def jwks_fetch(self, result: str) -> None:
        """A JWKS URL fetch: result "ok" or "error"."""
        self.jwks_fetches[result] = self.jwks_fetches.get(result, 0) + 1

    def config_reload(self, result: str) -> None:
        """A configuration reload: result "ok" or "error"."""
        self.config_reloads[result] = self.config_reloads.get(result, 0) + 1

    def checkout_wait(self, seconds: float) -> None:
        """How long a client waited for a server connection (0 when one was idle)."""
        self.checkout_wait_buckets[bisect.bisect_left(CHECKOUT_WAIT_BUCKETS, seconds)] += 1
        self.checkout_wait_sum += seconds

    def tenant_transaction(self, tenant: str) -> None:
        """A transaction of `tenant` ended; counted only when [http] tenant_metrics is on, and past
        max_tenant_series distinct tenants under the label `_other`, so the series stay bounded."""
        if not self.tenant_metrics:
            return
        counts = self.tenant_transactions
        if tenant not in counts and len(counts) >= self.max_tenant_series:
            tenant = OTHER_TENANTS
        counts[tenant] = counts.get(tenant, 0) + 1

    def snapshot(self) -> Snapshot:
        """Every family's samples as they stand now."""
        gauges = self.sampler() if self.sampler is not None else Gauges()
        snap: Snapshot = {
            "pgtp_client_connections": [({"state": s}, n) for s, n in gauges.clients.items()],
            "pgtp_server_connections": [({"database": d, "state": s}, n) for (d, s), n in gauges.servers.items()],
            "pgtp_clients_waiting": [({"database": d}, n) for d, n in gauges.waiting.items()],
            "pgtp_transactions_total": [({}, self.transactions)],
            "pgtp_queries_total": [({}, self.queries)],
            "pgtp_bytes_total": [({"direction": "received"}, self.bytes_received), ({"direction": "sent"}, self.bytes_sent)],
            "pgtp_auth_total": [({"result": r, "reason": why}, n) for (r, why), n in self.auth.items()],
            "pgtp_guard_refusals_total": [({"reason": r}, n) for r, n in self.guard_refusals.items()],
            "pgtp_context_sets_total": [({}, self.context_sets)],
            "pgtp_tenant_switches_total": [({}, self.tenant_switches)],
            "pgtp_jwks_fetches_total": [({"result": r}, n) for r, n in self.jwks_fetches.items()],
            "pgtp_config_reloads_total": [({"result": r}, n) for r, n in self.config_reloads.items()],
            "pgtp_checkout_wait_seconds": self._histogram(),
            "pgtp_workers_reporting": [({}, 1)],
        }
        if self.tenant_metrics:
            snap["pgtp_tenant_transactions_total"] = [({"tenant": t}, n) for t, n in self.tenant_transactions.items()]
        return snap

    def _histogram(self) -> list[Sample]:
        """Cumulative buckets as `le` samples, then the sum and the count (labels {"stat": "sum" / "count"})."""
        samples: list[Sample] = []
        total = 0
        for bound, count in zip((*CHECKOUT_WAIT_BUCKETS, float("inf")), self.checkout_wait_buckets):
            total += count
            samples.append(({"le": _bound(bound)}, total))
        return samples + [({"stat": "sum"}, self.checkout_wait_sum), ({"stat": "count"}, total)]


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)


METRICS = Metrics()


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Add up the same series of several workers' snapshots (counters, gauges and buckets alike)."""
    totals: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for snap in snapshots:
        for name, samples in snap.items():
            family = totals.setdefault(name, {})
            for labels, value in samples:
                key = tuple(sorted(labels.items()))
                family[key] = family.get(key, 0) + value
    return {name: [(dict(key), value) for key, value in family.items()] for name, family in totals.items()}


# name -> (type, help, label names)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pgtp_client_connections": ("gauge", "Client connections by state.", ("state",)),
    "pgtp_server_connections": ("gauge", "Server connections by database and state.", ("database", "state")),
    "pgtp_clients_waiting": ("gauge", "Clients waiting for a server connection, by database.", ("database",)),
    "pgtp_transactions_total": ("counter", "Transactions ended (ReadyForQuery 'I' sent to a client).", ()),
    "pgtp_queries_total": ("counter", "Queries sent upstream for clients (Query messages and Sync groups).", ()),
    "pgtp_bytes_total": ("counter", "Bytes received from and sent to clients.", ("direction",)),
    "pgtp_auth_total": ("counter", "Logins by result and refusal reason.", ("result", "reason")),
    "pgtp_guard_refusals_total": ("counter", "Statements refused by the SQL guard, by reason.", ("reason",)),
    "pgtp_context_sets_total": ("counter", "Tenant contexts set on server connections.", ()),
    "pgtp_tenant_switches_total": ("counter", "Server connections handed to a different tenant.", ()),
    "pgtp_jwks_fetches_total": ("counter", "JWKS URL fetches by result.", ("result",)),
    "pgtp_config_reloads_total": ("counter", "Configuration reloads by result.", ("result",)),
    "pgtp_checkout_wait_seconds": ("histogram", "Time a client waited for a server connection.", ()),
    "pgtp_workers_reporting": ("gauge", "Worker processes whose numbers are in this scrape.", ()),
    "pgtp_tenant_transactions_total": ("counter", "Transactions ended, by tenant (bounded).", ("tenant",)),
}


def _family(name: str, samples: list[Sample]) -> Metric:
    kind, help_text, label_names = FAMILIES[name]
    if kind == "histogram":
        family = HistogramMetricFamily(name, help_text)
        values = {labels.get("le") or labels.get("stat"): value for labels, value in samples}
        buckets = [(_bound(b), values.get(_bound(b), 0.0)) for b in (*CHECKOUT_WAIT_BUCKETS, float("inf"))]
        family.add_metric([], buckets, values.get("sum", 0.0))
        return family
    metric_class: Any = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    family = metric_class(name, help_text, labels=list(label_names))
    for labels, value in samples:
        family.add_metric([labels[label] for label in label_names], value)
    return family


class SnapshotCollector(Collector):
    """A prometheus-client collector over one (merged) snapshot."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for name, samples in self.snapshot.items():
            yield _family(name, samples)


def render(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition format (version 0.0.4) of a snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)
