"""``her2`` subcommands of the PACS service: listen, worker, serve, status, retry, flush-outbox.

Registered into the main parser by :func:`register`; each command is a thin
wrapper over :mod:`worker.service`, :mod:`worker.jobs` and the Celery app.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from worker.preflight import check_tls, preflight
from worker.settings import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {key: value for key, value in {
        "listen_host": getattr(args, "host", None),
        "listen_port": getattr(args, "port", None),
    }.items() if value is not None}
    return load_settings(args.config, **overrides)


def _configure_celery(settings: Settings) -> None:
    """The Celery app and its tasks use this command's settings (its ``--config``), not ``HER2_CONFIG``'s."""
    from worker.celery_app import configure

    configure(settings)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _service_logging() -> None:
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)


def cmd_listen(args: argparse.Namespace) -> int:
    from worker.jobs import RedisJobStore
    from worker.lease import Leases, start_sweeper
    from worker.metrics import start_endpoint
    from worker.service import celery_enqueue, run_listener
    from worker.tasks import sweep_expired_leases

    settings = _settings(args)
    _configure_celery(settings)
    _service_logging()
    preflight(settings)
    store, stop = RedisJobStore(settings.state_redis_url), _stop_on_signals()
    if settings.metrics_enabled:
        start_endpoint("listener", settings.metrics_host, settings.listener_metrics_port, settings.broker_url,
                       settings.state_redis_url, settings.outbox_dir)
    leases = Leases(settings.state_redis_url, settings.job_lease_seconds)  # jobs of lost workers go back in the queue
    start_sweeper(lambda: sweep_expired_leases(store, leases), settings.job_lease_renew_seconds, stop)
    run_listener(settings, store, celery_enqueue, stop)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_celery(settings)
    preflight(settings)  # fail early, in one line, on invalid settings, credentials or certificates
    from worker.celery_app import app

    app.worker_main(["worker", f"--loglevel={args.loglevel}", f"--pool={args.pool}",
                     f"--concurrency={args.concurrency}", f"--hostname={args.hostname}"])
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from worker.jobs import FileJobStore
    from worker.service import run_embedded

    settings = _settings(args)
    _service_logging()
    check_tls(settings)
    run_embedded(settings, FileJobStore(settings.state_dir), _stop_on_signals())
    return 0


def _unreachable(exc: Exception) -> int:
    print(f"her2: error: job store unreachable ({type(exc).__name__}: {exc})", file=sys.stderr)
    return 2


def cmd_status(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from dicom_io.sender import Outbox
    from worker.jobs import job_store

    settings = _settings(args)
    try:
        status = job_store(settings, args.embedded).get_status(args.series_uid)
    except RedisError as exc:
        return _unreachable(exc)
    if status is None:
        print(f"{args.series_uid}: no job known")
        return 1
    print(status.line())
    waiting = Outbox(settings.outbox_dir).pending(args.series_uid).get(args.series_uid, [])
    if waiting:
        print(f"  {len(waiting)} result instance(s) waiting in {settings.outbox_dir}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from worker.jobs import RetryError, job_store, retry_job
    from worker.service import celery_enqueue, run_with_retries

    settings = _settings(args)
    if not args.embedded:
        _configure_celery(settings)
    store = job_store(settings, args.embedded)
    # Embedded mode has no queue another process can reach: the job runs here, now.
    enqueue = (lambda job: run_with_retries(job, settings, store)) if args.embedded else celery_enqueue
    try:
        retry_job(settings, store, args.series_uid, enqueue)
    except RetryError as exc:
        print(f"her2: error: {exc}", file=sys.stderr)
        return 1
    except RedisError as exc:
        return _unreachable(exc)
    print(store.get_status(args.series_uid).line())
    return 0


def cmd_flush_outbox(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from dicom_io.sender import Outbox
    from worker.jobs import deliver_outbox, job_store

    settings = _settings(args)
    try:
        sent = deliver_outbox(settings, job_store(settings, args.embedded))
    except RedisError as exc:
        return _unreachable(exc)
    waiting = sum(len(files) for files in Outbox(settings.outbox_dir).pending().values())
    print(f"delivered {sent} result instance(s); {waiting} still waiting")
    return 0 if waiting == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the service subcommands to the ``her2`` parser."""

    def config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="settings file (JSON or TOML); env HER2_<KEY> overrides it")

    def network(p: argparse.ArgumentParser) -> None:
        p.add_argument("--host", help="address the Storage SCP binds to (setting listen_host)")
        p.add_argument("--port", type=int, help="port the Storage SCP binds to (setting listen_port)")

    def embedded(p: argparse.ArgumentParser) -> None:
        p.add_argument("--embedded", action="store_true",
                       help="use the embedded server's job state in state_dir instead of Redis")

    p = subparsers.add_parser(
        "listen", help="DICOM Storage SCP: receive slides, queue one Celery job per stable series",
        description="Accept VL Whole Slide Microscopy instances (C-STORE) and C-ECHO from allowed AE titles, "
        "spool them atomically, and queue one scoring job per series once no instance arrived for "
        "stable_seconds. Needs Redis (broker_url, state_redis_url). See docs/conformance.md.")
    config(p)
    network(p)
    p.set_defaults(func=cmd_listen)

    p = subparsers.add_parser(
        "worker", help="Celery worker that scores queued slides and sends results to the PACS",
        description="Run a Celery worker (Redis broker) for the score_slide task; it also retries the "
        "outbox every outbox_retry_seconds until the destination PACS has every result.")
    config(p)
    p.add_argument("--concurrency", type=int, default=1, help="slides scored in parallel (default 1)")
    p.add_argument("--pool", choices=["solo", "prefork", "threads"], default="solo",
                   help="Celery execution pool (default solo: one slide per process)")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    p.add_argument("--hostname", default="her2@%h", help="Celery node name (default her2@%%h)")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser(
        "serve", help="single machine: listener + in-process worker, no Redis (--embedded)",
        description="Run the listener, one worker thread and the outbox retry in one process; job state "
        "lives in state_dir. For a single machine without Redis or Celery.")
    config(p)
    network(p)
    p.add_argument("--embedded", action="store_true", required=True,
                   help="in-process worker and file-based job state (the only serve mode)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("status", help="show the job state of a series (queued, running, done, failed, parked)",
                              description="Print the job state of one source series and the reason of a "
                              "failure; exit status 1 when no job is known for it.")
    p.add_argument("series_uid", help="SeriesInstanceUID of the slide")
    config(p)
    embedded(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("retry", help="queue a failed or parked series again, after fixing the cause",
                              description="Score a failed or parked series again from the spool: its claim is "
                              "released and one new job is queued (with --embedded it runs in this process). "
                              "Exit status 1 when the job is unknown, not failed or parked, or not in the spool.")
    p.add_argument("series_uid", help="SeriesInstanceUID of the slide")
    config(p)
    embedded(p)
    p.set_defaults(func=cmd_retry)

    p = subparsers.add_parser("flush-outbox", help="try now to deliver every result waiting in the outbox",
                              description="Send every result in outbox_dir to the destination PACS once; "
                              "exit status 1 when some are still waiting.")
    config(p)
    embedded(p)
    p.set_defaults(func=cmd_flush_outbox)
