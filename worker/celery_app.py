"""The Celery application: Redis broker and result backend, one slide at a time per worker process.

``celery -A worker.celery_app worker`` or ``her2 worker`` runs it. Delivery
guarantees follow Celery's guidance for long, idempotent jobs: a task is
acknowledged only after it finished (``acks_late``), a worker that dies mid-slide
gives its message back (``task_reject_on_worker_lost``), and a worker reserves
one message at a time (``worker_prefetch_multiplier = 1``). Redis redelivers an
unacknowledged message after ``visibility_timeout``
(:attr:`worker.settings.Settings.visibility_timeout`), set just above the hard
time limit and the longest retry backoff so a running or waiting slide is never
handed out twice. A worker sweeps for such messages when it starts and then
about every 100 s (kombu's ``unacked_restore_interval`` x ``unacked_restore_throttle``).
"""

from __future__ import annotations

import threading

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from worker.settings import Settings, get_settings


def make_app(settings: Settings) -> Celery:
    """A Celery app configured from ``settings`` (broker, backend, limits)."""
    app = Celery("her2", broker=settings.broker_url, backend=settings.result_backend, include=["worker.tasks"])
    app.conf.update(
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
    )
    return app


app = make_app(get_settings())
_stop_flusher = threading.Event()


@worker_ready.connect
def _start_flusher(**_: object) -> None:
    """Every worker process also retries the outbox, so results wait for the PACS, never get lost."""
    from worker.jobs import RedisJobStore, start_outbox_flusher

    settings = get_settings()
    start_outbox_flusher(settings, RedisJobStore(settings.state_redis_url), _stop_flusher)


@worker_shutdown.connect
def _stop(**_: object) -> None:
    _stop_flusher.set()
