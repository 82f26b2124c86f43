"""Celery tasks: thin wrappers over :mod:`worker.jobs`.

``score_series_task`` (registered as ``her2.score_slide``; the scoring itself is
:func:`her2_analysis.pipeline.score_slide`) retries faults with exponential backoff
(``task_max_retries``, ``task_retry_backoff_max``). Bad input
(:class:`dicom_io.errors.SlideError`) is not retried: the job is marked *failed* with the one-line reason. A job
that still fails after its last retry is *parked* with its reason. Both are
visible with ``her2 status <series uid>``; nothing is dropped silently.

A prefork pool child that dies mid-slide (killed, out of memory) counts as a
failed attempt too (``retry_on_worker_lost``): the worker's main process
retries the job after a short delay and parks it after the last retry, so a
slide that kills its child every time is not requeued forever.

Each attempt runs under a job lease (:mod:`worker.lease`): a worker that dies
as a whole (solo pool, host lost) stops renewing it, and within about
``job_lease_seconds`` another worker or the listener queues the job again
(:func:`sweep_expired_leases`), long before the broker's visibility timeout.
"""

from __future__ import annotations

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.signals import task_failure

from dicom_io.errors import SlideError
from worker import metrics
from worker.celery_app import SCORE_TASK, app, app_settings
from worker.jobs import Job, JobState, JobStore, RedisJobStore, run_job
from worker.lease import Attempt, Leases, requeue_expired, run_leased


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]


class SlideTask(Task):
    """Records retries and final failures in the job store."""

    _store: RedisJobStore | None = None
    _leases: Leases | None = None

    @property
    def store(self) -> RedisJobStore:
        if self._store is None:
            self._store = RedisJobStore(app_settings().state_redis_url)
        return self._store

    @property
    def leases(self) -> Leases:
        if self._leases is None:
            settings = app_settings()
            self._leases = Leases(settings.state_redis_url, settings.job_lease_seconds)
        return self._leases

    def _end_lost_attempt(self, exc: BaseException, task_id: str | None) -> None:
        """A pool child died holding the attempt's lease: end it here, in the main process, so no sweeper
        queues it a second time (Celery queues the retry itself). A child that lived ended it itself."""
        if isinstance(exc, WorkerLostError) and task_id:
            self.leases.end(task_id, self.request.retries)

    def on_retry(self, exc, task_id, args, kwargs, einfo) -> None:
        self._end_lost_attempt(exc, task_id)
        metrics.job_retried(metrics.WORKER_LOST if isinstance(exc, WorkerLostError) else metrics.FAULT)
        self.store.set_status(args[1], JobState.RETRYING,
                              f"attempt {self.request.retries + 1} failed: {_reason(exc)}")

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        self._end_lost_attempt(exc, task_id)
        if isinstance(exc, SlideError):
            metrics.slide_failed(metrics.NOT_SCORABLE)
            self.store.set_status(args[1], JobState.FAILED, f"not scorable: {exc}")
        else:
            metrics.slide_failed(metrics.GAVE_UP)
            self.store.set_status(args[1], JobState.PARKED,
                                  f"gave up after {self.request.retries} retries: {_reason(exc)}")


@app.task(
    bind=True,
    base=SlideTask,
    name=SCORE_TASK,
    autoretry_for=(Exception,),
    dont_autoretry_for=(SlideError,),
    retry_backoff=True,
    retry_jitter=True,
    retry_on_worker_lost=True,
    # max_retries, retry_backoff_max and default_retry_delay: from the settings (celery_config's task_annotations)
)
def score_series_task(self: SlideTask, series_dir: str, series_instance_uid: str, source: str = "spool",
                study_instance_uid: str = "", instances: dict[str, str] | None = None) -> str:
    """Score the series (spooled, or read over DICOMweb: :class:`worker.jobs.Job`) and send its results.

    Returns the final job state ("stale"/"busy": skipped).
    """
    attempt = Attempt(self.request.id, self.request.retries, series_instance_uid, tuple(self.request.args),
                      dict(self.request.kwargs or {}))
    job = Job(series_dir, series_instance_uid, source, study_instance_uid, instances or {})
    settings = app_settings()
    return run_leased(self.leases, attempt, settings.job_lease_renew_seconds,
                      lambda: run_job(job, settings, self.store).value)


def requeue(attempt: Attempt) -> None:
    """Queue ``attempt`` of a job whose worker was lost: same task id, ``retries`` = its number."""
    score_series_task.apply_async(args=attempt.args, kwargs=attempt.kwargs, task_id=attempt.task_id, retries=attempt.number)


def sweep_expired_leases(store: JobStore, leases: Leases) -> list[Attempt]:
    """Queue again (or park) every job whose worker stopped renewing its lease; run by workers and the listener."""
    settings = app_settings()
    return requeue_expired(leases, store, settings.task_max_retries, settings.job_lease_seconds, requeue)


@task_failure.connect
def _park_after_lost_workers(sender: Task, exception: BaseException, args, task_id: str | None = None,
                             **_: object) -> None:
    """The last attempt's pool child died: Celery reports it in the main process, where ``on_failure`` is not called."""
    if sender.name == score_series_task.name and isinstance(exception, WorkerLostError):
        sender.on_failure(exception, task_id, args, {}, None)
