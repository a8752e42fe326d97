"""The operations endpoint (`[http] listen`): GET /healthz, GET /readyz and GET /metrics over a minimal
HTTP/1.1 handler (one request per connection), plus the readiness state and its background checks.

- /healthz answers 200 while the process serves.
- /readyz answers 200 only while the proxy listens, the upstream answered its last check, the token keys
  are loaded and the proxy is not draining; else 503 with a one-line reason. The upstream and the JWKS
  URL are checked in the background every `[http] upstream_check_interval` seconds, never per probe.
- /metrics is the Prometheus text format (proxy.metrics). With `workers = N` each worker serves its own
  numbers on a private Unix socket (`<peer_dir>/worker-<i>.metrics.sock`, one JSON snapshot per
  connection); the worker that takes the scrape adds them all up, so any worker answers for the whole
  proxy. `pgtp_workers_reporting` says how many answered.
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy import logs
from proxy.config import Settings
from proxy.metrics import METRICS, Snapshot, merge, render
from proxy.protocol import messages

if TYPE_CHECKING:
    from proxy.server import ProxyServer, Worker
    from proxy.tokens import TokenVerifier

log = logs.HTTP

REQUEST_LIMIT = 16 * 1024  # bytes of request line and headers
REQUEST_TIMEOUT = 5.0  # seconds to send them
PEER_TIMEOUT = 2.0  # seconds a worker waits for another worker's snapshot
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class ServerLifecycle(enum.Enum):
    STARTING = "starting"  # not listening yet
    SERVING = "serving"
    DRAINING = "draining"  # stopped accepting; finishing what is in flight


class Readiness:
    """What /readyz answers. `serve()` moves the lifecycle; the background checks set the rest."""

    def __init__(self) -> None:
        self.lifecycle = ServerLifecycle.STARTING
        self.upstream_problem: str | None = "the upstream has not been checked yet"
        self.keys_problem: str | None = None

    @property
    def draining(self) -> bool:
        return self.lifecycle is ServerLifecycle.DRAINING

    @draining.setter
    def draining(self, value: bool) -> None:
        """Set on SIGTERM (drain): /readyz answers 503 at once."""
        self.lifecycle = ServerLifecycle.DRAINING if value else ServerLifecycle.SERVING

    def problem(self) -> str | None:
        """Why the proxy is not ready, in one line, or None when it is."""
        if self.lifecycle is ServerLifecycle.STARTING:
            return "not listening yet"
        if self.lifecycle is ServerLifecycle.DRAINING:
            return "draining: the proxy is shutting down"
        return self.upstream_problem or self.keys_problem


async def probe_upstream(host: str, port: int, timeout: float) -> str | None:
    """Whether a Postgres server answers at host:port: an SSLRequest must get 'S' or 'N' (no login, so
    the server logs nothing). Returns None, or the reason in one line."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        return f"upstream {host}:{port} unreachable: {exc or 'timed out'}"
    try:
        writer.write(messages.ssl_request())
        answer = await asyncio.wait_for(reader.read(1), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        answer, reason = b"", str(exc) or "timed out"
    else:
        reason = "closed the connection" if not answer else f"answered {answer!r}, not as Postgres does"
    finally:
        writer.close()
    return None if answer in (b"S", b"N") else f"upstream {host}:{port} does not answer as Postgres: {reason}"


@dataclass
class Checks:
    """The background readiness checks: `upstream` and `keys` each return a one-line problem or None;
    `keys` may block (it runs in a thread)."""

    upstream: Callable[[], Awaitable[str | None]]
    keys: Callable[[], str | None] | None
    interval: float


async def run_checks(readiness: Readiness, checks: Checks) -> None:
    """Check every `interval` seconds until cancelled, logging each change of the answer. A check that
    fails in an unexpected way makes the proxy not ready (it is never taken as a pass)."""
    while True:
        before = readiness.upstream_problem, readiness.keys_problem
        try:
            await _check_once(readiness, checks)
        except Exception as exc:
            log.exception("readiness check failed")
            readiness.upstream_problem = f"the readiness check failed: {type(exc).__name__}"
        after = readiness.upstream_problem, readiness.keys_problem
        if logs.DEBUG:
            logs.debug(logs.HTTP, "readiness check", upstream=after[0] or "ok", keys=after[1] or "ok")
        if after != before:
            log.info("readiness: %s", "ready" if after == (None, None) else "; ".join(p for p in after if p))
        await asyncio.sleep(checks.interval)


async def _check_once(readiness: Readiness, checks: Checks) -> None:
    readiness.upstream_problem = await checks.upstream()
    if checks.keys is not None:
        readiness.keys_problem = await asyncio.get_running_loop().run_in_executor(None, checks.keys)


async def peer_snapshot(path: str) -> Snapshot | None:
    """Another worker's snapshot from its private socket, or None when it does not answer in time."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), PEER_TIMEOUT)
        try:
            data = await asyncio.wait_for(reader.read(), PEER_TIMEOUT)
        finally:
            writer.close()
        return {name: [(labels, value) for labels, value in samples] for name, samples in json.loads(data).items()}
    except (OSError, asyncio.TimeoutError, ValueError) as exc:
        log.debug("no metrics from worker socket %s: %s", path, exc)
        return None


async def send_snapshot(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve this worker's snapshot to the worker that takes a scrape."""
    writer.write(json.dumps(METRICS.snapshot()).encode())
    try:
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


class Endpoint:
    """The HTTP handler; `peers` are the other workers' metrics sockets."""

    def __init__(self, readiness: Readiness, peers: list[str]) -> None:
        self.readiness = readiness
        self.peers = peers

    async def metrics(self) -> bytes:
        snapshots = [METRICS.snapshot()]
        if self.peers:
            answers = await asyncio.gather(*(peer_snapshot(path) for path in self.peers))
            snapshots += [answer for answer in answers if answer is not None]
        return render(merge(snapshots))

    async def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET is supported\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            problem = self.readiness.problem()
            return (200, "text/plain", b"ready\n") if problem is None else (503, "text/plain", problem.encode() + b"\n")
        if path == "/metrics":
            return 200, PROMETHEUS_TEXT, await self.metrics()
        return 404, "text/plain", b"not found: try /healthz, /readyz or /metrics\n"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError,
                ValueError):
            writer.close()
            return
        try:
            status, content_type, body = await self.answer(method, path)
        except Exception:  # a bug here must not take the endpoint down
            log.exception("internal error answering %s", logs.escape(path))
            status, content_type, body = 500, "text/plain", b"internal error\n"
        if logs.DEBUG:
            logs.debug(logs.HTTP, "http request", method=method, path=path, status=status)
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
                  503: "Service Unavailable"}[status]
        header = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        writer.write(header.encode() + (b"" if method == "HEAD" else body))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def start(self, sock: socket.socket) -> asyncio.Server:
        """Serve on a bound socket (shared by every worker)."""
        return await asyncio.start_server(self.handle, sock=sock, limit=REQUEST_LIMIT)


def metrics_socket(peer_dir: str, index: int) -> str:
    """Where worker `index` serves its snapshot."""
    return os.path.join(peer_dir, f"worker-{index}.metrics.sock")


def jwks_check(verifier: TokenVerifier) -> Callable[[], str | None] | None:
    """For remote key sets (JWKS URL or discovery): a blocking check that the keys can be had, fetching
    only when none or only too old ones are held. None when every key was read at start."""
    if all(issuer.remote is None for issuer in verifier.issuers):
        return None
    return verifier.keys_ready


async def start_endpoint(settings: Settings, proxy: ProxyServer, readiness: Readiness, sock: socket.socket | None,
                         worker: Worker | None, servers: list[asyncio.AbstractServer]) -> asyncio.Task[None] | None:
    """Set up the counters for this process and, when [http] listen is set, serve the endpoint on `sock`
    (and this worker's snapshot socket) and start the readiness checks; the servers are appended to
    `servers`, the checks' task is returned."""
    METRICS.tenant_metrics = settings.http.tenant_metrics
    METRICS.max_tenant_series = settings.http.max_tenant_series
    METRICS.sampler = proxy.gauges
    if sock is None:
        return None
    peers: list[str] = []
    if worker is not None:
        servers.append(await asyncio.start_unix_server(send_snapshot, metrics_socket(worker.peer_dir, worker.index)))
        peers = [metrics_socket(worker.peer_dir, i) for i in range(worker.count) if i != worker.index]
    servers.append(await Endpoint(readiness, peers).start(sock))

    def keys_problem() -> str | None:
        check = jwks_check(proxy.verifier)
        return check() if check is not None else None

    checks = Checks(  # read from `proxy` at each check: a reload may replace the upstream and the verifier
        upstream=lambda: probe_upstream(proxy.settings.upstream.host, proxy.settings.upstream.port,
                                        proxy.settings.upstream.connect_timeout_seconds),
        keys=keys_problem,
        interval=settings.http.upstream_check_interval,
    )
    return asyncio.get_running_loop().create_task(run_checks(readiness, checks))
