"""The Celery application: Redis broker and result backend, one slide at a time per worker process.

``celery -A worker.celery_app worker`` or ``her2 worker`` runs it. Its configuration comes from the
settings in one place (:func:`celery_config`), read when Celery first needs it (:class:`_App`): the settings
given to :func:`configure` (``her2 worker`` / ``her2 listen`` / ``her2 retry`` with their ``--config``), else
those of ``HER2_CONFIG`` and the environment (``celery -A``). Delivery
guarantees follow Celery's guidance for long, idempotent jobs: a task is
acknowledged only after it finished (``acks_late``), a worker that dies mid-slide
gives its message back (``task_reject_on_worker_lost``), and a worker reserves
one message at a time (``worker_prefetch_multiplier = 1``). Redis redelivers an
unacknowledged message after ``visibility_timeout``
(:attr:`worker.settings.Settings.visibility_timeout`), set just above the hard
time limit and the longest retry backoff so a running or waiting slide is never
handed out twice. A worker sweeps for such messages when it starts and then
about every 100 s (kombu's ``unacked_restore_interval`` x ``unacked_restore_throttle``).
A worker that dies mid-slide is noticed much sooner through the job lease
(:mod:`worker.lease`): every worker's main process checks for expired
leases every ``job_lease_renew_seconds`` and queues those jobs again.

Every worker also serves ``/metrics`` and ``/health`` (:mod:`worker.metrics`)
on ``worker_metrics_port`` from its main process, in prometheus-client's
multiprocess mode so the counts of prefork pool children are included.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from celery.signals import import_modules, worker_ready, worker_shutdown

from worker.settings import Settings, get_settings

#: The registered name of the scoring task (:func:`worker.tasks.score_series_task`).
SCORE_TASK = "her2.score_slide"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration from ``settings`` (broker, backend, limits, the scoring task's retries): its one home."""
    return dict(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        worker_hijack_root_logger=False,
        # Set on the task class when the app binds it, before Celery wraps it for autoretry.
        task_annotations={SCORE_TASK: {
            "max_retries": settings.task_max_retries,
            "retry_backoff_max": settings.task_retry_backoff_max,
            "default_retry_delay": min(60, settings.task_retry_backoff_max),  # after a lost pool child
        }},
    )


class _App(Celery):
    """Configured from settings when Celery first needs its configuration, not when this module is imported."""

    def on_configure(self) -> None:
        self.config_from_object(celery_config(app_settings()))


#: The settings this process's app and tasks use (:func:`configure`, else the process-wide ones on first use).
_settings: list[Settings] = []


def configure(settings: Settings) -> None:
    """Use ``settings`` (e.g. from ``her2 worker --config``) for the app and its tasks; call it before first use."""
    if app.configured and _settings and _settings[0] != settings:
        raise RuntimeError("the Celery app is already configured from other settings")
    _settings[:] = [settings]


def app_settings() -> Settings:
    """The settings of the app and its tasks: those given to :func:`configure`, else ``HER2_CONFIG`` + environment."""
    if not _settings:
        _settings.append(get_settings())
    return _settings[0]


app = _App("her2", include=["worker.tasks"])
_stop_flusher = threading.Event()
#: The worker's metrics endpoint, once started (a list: set from a signal handler).
_metrics_server: list = []


@import_modules.connect
def _metrics_store(**_: object) -> None:
    """Before the worker imports the task modules (and long before the pool forks): an empty multiprocess
    metric store for this worker. Celery sends ``import_modules`` first thing in ``WorkController.__init__``;
    ``celeryd_init`` would come too late (task modules, hence prometheus_client, already imported)."""
    from worker.metrics_store import use_private_store

    use_private_store()


@worker_ready.connect
def _start_background(**_: object) -> None:
    """Every worker's main process retries the outbox, re-queues jobs of lost workers and serves its metrics."""
    from worker.jobs import RedisJobStore, start_outbox_flusher
    from worker.lease import Leases, start_sweeper
    from worker.tasks import sweep_expired_leases

    settings = app_settings()
    store = RedisJobStore(settings.state_redis_url)
    start_outbox_flusher(settings, store, _stop_flusher)
    leases = Leases(settings.state_redis_url, settings.job_lease_seconds)
    start_sweeper(lambda: sweep_expired_leases(store, leases), settings.job_lease_renew_seconds, _stop_flusher)
    if settings.metrics_enabled:
        from worker.metrics import start_endpoint

        _metrics_server.append(start_endpoint("worker", settings.metrics_host, settings.worker_metrics_port,
                                              settings.broker_url, settings.state_redis_url, settings.outbox_dir))


@worker_shutdown.connect
def _stop(**_: object) -> None:
    from worker.metrics_store import remove_private_store

    _stop_flusher.set()
    for server in filter(None, _metrics_server):
        server.shutdown()
    remove_private_store()
