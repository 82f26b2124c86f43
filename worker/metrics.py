"""Prometheus metrics and the health endpoint of ``her2 listen`` and ``her2 worker``.

One small HTTP server per process (:func:`serve`): ``GET /metrics`` in the
Prometheus text format, ``GET /health`` a small JSON, status 200 when every
Redis the process needs answers a PING, 503 otherwise. Labels never carry
patient data or UIDs: only the slide call, a failure reason or a retry cause,
each from a short fixed list.

Counters are incremented where things happen (the listener queues a job,
a job is scored, fails, is retried or parked); queue depth and outbox backlog
are read from Redis and the outbox when scraped.

Celery's prefork pool scores slides in child processes, which the worker's
main process forks and replaces; an in-memory registry in the main process
would never see their counts, and one per child would be lost with the
child. Workers therefore run prometheus-client in multiprocess mode
(:mod:`prometheus_client.multiprocess`): every process writes its values to
memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR``, which the main process
sums when scraped, including the counts of children that have died. The
worker gives itself a fresh, private directory before it imports this module
(:func:`worker.metrics_store.use_private_store`). The listener is one
process (threads only) and uses the ordinary in-memory registry.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from worker.metrics_store import MULTIPROC_ENV

log = logging.getLogger(__name__)

#: The Celery queue our jobs go to (Celery's default queue name; a Redis list of that name).
QUEUE = "celery"

# --- reasons and causes: the only label values there are ---------------------------------------------
#: Job failed for good: input that cannot be scored (not retried).
NOT_SCORABLE = "not_scorable"
#: Job parked: it failed on every attempt (faults, lost workers).
GAVE_UP = "gave_up"
#: Job parked: the destination refused a result with a failure status.
RESULT_REFUSED = "result_refused"
#: An attempt raised (a fault) and Celery queued a retry.
FAULT = "fault"
#: A prefork pool child died mid-slide and the worker's main process queued a retry.
WORKER_LOST = "worker_lost"
#: A worker stopped renewing the job's lease (killed, host lost) and another process queued it again.
LEASE_EXPIRED = "lease_expired"

SLIDES_RECEIVED = Counter("her2_slides_received", "Slides (stable series) the listener queued as jobs.")
SLIDES_SCORED = Counter("her2_slides_scored", "Slides scored, by slide call (0, 1+, 2+, 3+, not assessable).",
                        ["call"])
SLIDES_FAILED = Counter("her2_slides_failed", "Jobs that ended without results in the PACS, by reason "
                        f"({NOT_SCORABLE}, {GAVE_UP}, {RESULT_REFUSED}).", ["reason"])
JOB_RETRIES = Counter("her2_job_retries", f"Attempts that failed and were queued again, by cause ({FAULT}, "
                      f"{WORKER_LOST}, {LEASE_EXPIRED}).", ["cause"])
SLIDE_SECONDS = Histogram("her2_slide_seconds", "Seconds to score one slide (open, grade, build results).",
                          buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600))
SLIDE_BYTES_FETCHED = Histogram("her2_slide_bytes_fetched", "Bytes fetched over DICOMweb (WADO-RS response "
                                "bodies) to score one slide; slides read from the spool are not counted.",
                                buckets=tuple(2.0**k for k in range(20, 36, 2)))  # 1 MiB .. 32 GiB
TILES_SCORED = Counter("her2_tiles_scored", "Tissue tiles graded by the CNN.")
TILES_PER_SECOND = Gauge("her2_tiles_per_second", "Tissue tiles graded per second on the last slide scored.",
                         multiprocess_mode="mostrecent")


def slide_scored(call: str, stats: dict[str, float]) -> None:
    """Count one scored slide from its call and the pipeline's ``stats`` (seconds, tiles_scored, bytes_fetched)."""
    SLIDES_SCORED.labels(call=call).inc()
    seconds, tiles = stats.get("seconds", 0.0), stats.get("tiles_scored", 0)
    SLIDE_SECONDS.observe(seconds)
    TILES_SCORED.inc(tiles)
    if seconds > 0:
        TILES_PER_SECOND.set(tiles / seconds)
    if "bytes_fetched" in stats:  # the DICOMweb slide source counts what it fetched
        SLIDE_BYTES_FETCHED.observe(stats["bytes_fetched"])


def slide_failed(reason: str) -> None:
    """Count a job that ended without results (``NOT_SCORABLE``, ``GAVE_UP``, ``RESULT_REFUSED``)."""
    SLIDES_FAILED.labels(reason=reason).inc()


def job_retried(cause: str) -> None:
    """Count a failed attempt that was queued again (``FAULT``, ``WORKER_LOST``, ``LEASE_EXPIRED``)."""
    JOB_RETRIES.labels(cause=cause).inc()


class BacklogCollector(Collector):
    """Queue depth (Redis) and outbox backlog (files), read when scraped."""

    def __init__(self, broker_url: str, outbox_dir: Path) -> None:
        import redis

        self.broker = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self.outbox_dir = Path(outbox_dir)

    def collect(self):
        from dicom_io.sender import Outbox

        try:
            depth = self.broker.llen(QUEUE)
        except Exception as exc:  # Redis away: no sample rather than a wrong one; /health says why
            log.debug("queue depth not read (%s)", type(exc).__name__)
        else:
            yield GaugeMetricFamily("her2_queue_depth", "Jobs waiting in the Celery queue for a worker.", value=depth)
        waiting = Outbox(self.outbox_dir).pending()
        yield GaugeMetricFamily("her2_outbox_backlog", "Result instances in this process's outbox waiting for the PACS",
                                value=sum(len(files) for files in waiting.values()))
        yield GaugeMetricFamily("her2_outbox_backlog_series", "Source series with results waiting in the outbox.",
                                value=len(waiting))


def registry(broker_url: str, outbox_dir: Path) -> CollectorRegistry:
    """What ``/metrics`` serves: this process's metrics (all processes' in multiprocess mode) and the backlog."""
    served = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        MultiProcessCollector(served)
    else:
        served.register(REGISTRY)
    served.register(BacklogCollector(broker_url, outbox_dir))
    return served


#: ``() -> (healthy, details)``: details are key names and short words, never URLs or passwords.
HealthCheck = Callable[[], tuple[bool, dict[str, str]]]


def redis_health(urls: dict[str, str]) -> HealthCheck:
    """Health = every Redis in ``urls`` (setting name -> URL) answers PING within 2 s."""
    import redis

    clients = {key: redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) for key, url in urls.items()}

    def check() -> tuple[bool, dict[str, str]]:
        details = {}
        for key, client in clients.items():
            try:
                client.ping()
                details[key] = "ok"
            except Exception as exc:  # any failure means unhealthy; the type says enough, the URL stays out
                details[key] = f"unreachable ({type(exc).__name__})"
        return all(v == "ok" for v in details.values()), details

    return check


def serve(host: str, port: int, role: str, served: CollectorRegistry, health: HealthCheck) -> ThreadingHTTPServer:
    """Serve ``/metrics`` and ``/health`` on ``host:port`` from a daemon thread; ``shutdown()`` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's method name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, content_type, encoder(served))
            elif path == "/health":
                ok, details = health()
                body = {"status": "ok" if ok else "unavailable", "role": role, "redis": details}
                self._reply(200 if ok else 503, "application/json", json.dumps(body).encode())
            else:
                self._reply(404, "text/plain", b"not found: try /metrics or /health\n")

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # scraped every few seconds: no log line per request

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"her2-metrics-{role}", daemon=True).start()
    log.info("%s metrics on http://%s:%d/metrics, health on /health", role, host, server.server_address[1])
    return server


def start_endpoint(role: str, host: str, port: int, broker_url: str, state_redis_url: str,
                   outbox_dir: Path) -> ThreadingHTTPServer | None:
    """The endpoint of a listener or worker (``role``); None (one error line) when the port is taken.

    ``/metrics`` counts the backlog of ``broker_url``'s queue and of ``outbox_dir``; ``/health`` pings the broker
    and the job-state Redis.
    """
    try:
        return serve(host, port, role, registry(broker_url, outbox_dir),
                     redis_health({"broker_url": broker_url, "state_redis_url": state_redis_url}))
    except OSError as exc:
        log.error("%s metrics endpoint not started on %s:%d: %s (set %s_metrics_port)", role, host,
                  port, exc.strerror or exc, role)
        return None
