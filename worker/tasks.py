"""Celery tasks: thin wrappers over :mod:`worker.jobs`.

``score_slide`` retries faults with exponential backoff (``task_max_retries``,
``task_retry_backoff_max``). Bad input (:class:`dicom_io.errors.SlideError`)
is not retried: the job is marked *failed* with the one-line reason. A job
that still fails after its last retry is *parked* with its reason. Both are
visible with ``her2 status <series uid>``; nothing is dropped silently.

A prefork pool child that dies mid-slide (killed, out of memory) counts as a
failed attempt too (``retry_on_worker_lost``): the worker's main process
retries the job after a short delay and parks it after the last retry, so a
slide that kills its child every time is not requeued forever.
"""

from __future__ import annotations

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.signals import task_failure

from dicom_io.errors import SlideError
from worker.celery_app import app
from worker.jobs import Job, JobState, RedisJobStore, run_job
from worker.settings import get_settings

_settings = get_settings()


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]


class SlideTask(Task):
    """Records retries and final failures in the job store."""

    _store: RedisJobStore | None = None

    @property
    def store(self) -> RedisJobStore:
        if self._store is None:
            self._store = RedisJobStore(_settings.state_redis_url)
        return self._store

    def on_retry(self, exc, task_id, args, kwargs, einfo) -> None:
        self.store.set_status(args[1], JobState.RETRYING,
                              f"attempt {self.request.retries + 1} failed: {_reason(exc)}")

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        if isinstance(exc, SlideError):
            self.store.set_status(args[1], JobState.FAILED, f"not scorable: {exc}")
        else:
            self.store.set_status(args[1], JobState.PARKED,
                                  f"gave up after {self.request.retries} retries: {_reason(exc)}")


@app.task(
    bind=True,
    base=SlideTask,
    name="her2.score_slide",
    autoretry_for=(Exception,),
    dont_autoretry_for=(SlideError,),
    max_retries=_settings.task_max_retries,
    retry_backoff=True,
    retry_backoff_max=_settings.task_retry_backoff_max,
    retry_jitter=True,
    retry_on_worker_lost=True,
    default_retry_delay=min(60, _settings.task_retry_backoff_max),  # after a lost pool child
)
def score_slide(self: SlideTask, series_dir: str, series_instance_uid: str) -> str:
    """Score the spooled series and send its results; returns the final job state."""
    return run_job(Job(series_dir, series_instance_uid), _settings, self.store).value


@task_failure.connect
def _park_after_lost_workers(sender: Task, exception: BaseException, args, **_: object) -> None:
    """The last attempt's pool child died: Celery reports it in the main process, where ``on_failure`` is not called."""
    if sender.name == score_slide.name and isinstance(exception, WorkerLostError):
        sender.on_failure(exception, None, args, {}, None)
