"""Celery tasks: thin wrappers over :mod:`worker.jobs`.

``score_slide`` retries faults with exponential backoff (``task_max_retries``,
``task_retry_backoff_max``). Bad input (:class:`dicom_io.errors.SlideError`)
is not retried: the job is marked *failed* with the one-line reason. A job
that still fails after its last retry is *parked* with its reason. Both are
visible with ``her2 status <series uid>``; nothing is dropped silently.
"""

from __future__ import annotations

from celery import Task

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
)
def score_slide(self: SlideTask, series_dir: str, series_instance_uid: str) -> str:
    """Score the spooled series and send its results; returns the final job state."""
    return run_job(Job(series_dir, series_instance_uid), _settings, self.store).value
