"""Long-running processes: the listener (``her2 listen``) and the embedded server (``her2 serve --embedded``).

The listener spools instances, watches series become stable and hands each
stable series to :func:`worker.jobs.dispatch_stable`, which enqueues it on
Celery. In embedded mode the same listener feeds an in-process worker thread
instead, with job state in files and no Redis.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from dicom_io.errors import SlideError
from dicom_io.listener import start_listener
from dicom_io.series_tracker import SeriesTracker
from dicom_io.spool import remove_partial_files
from worker import metrics
from worker.jobs import Enqueue, Job, JobState, JobStore, dispatch_stable, run_job, start_outbox_flusher
from worker.settings import Settings

log = logging.getLogger(__name__)


def run_listener(settings: Settings, store: JobStore, enqueue: Enqueue, stop: threading.Event) -> None:
    """Serve C-STORE/C-ECHO and queue one job per stable series until ``stop`` is set."""
    removed = remove_partial_files(settings.spool_dir)
    if removed:
        log.warning("removed %d partial file(s) left in the spool by a stopped listener", removed)
    tracker = SeriesTracker(settings.stable_seconds)
    found = tracker.rescan(settings.spool_dir)
    if found:
        log.info("%d series already in the spool are tracked again", found)
    for series in tracker.held():
        log.warning("series %s was being received when the listener stopped; held until it is sent again", series)
    server = start_listener(settings.listener_config(), tracker.note, tracker.association_ended)
    tick = min(1.0, settings.stable_seconds / 4)
    try:
        while not stop.wait(tick):
            metrics.SLIDES_RECEIVED.inc(len(dispatch_stable(tracker, store, enqueue, settings.slide_source)))
    finally:
        server.shutdown()
        log.info("listener stopped")


def celery_enqueue(job: Job) -> None:
    """Queue ``job`` on the Celery broker (a spool job's message is (series_dir, series UID), as before)."""
    from worker.tasks import score_series_task

    where = () if job.source == "spool" else (job.source, job.study_instance_uid, job.instances)
    score_series_task.delay(job.series_dir, job.series_instance_uid, *where)


def run_with_retries(job: Job, settings: Settings, store: JobStore, sleep=time.sleep) -> JobState:
    """Embedded-mode counterpart of the Celery task: retries with exponential backoff, then parks."""
    attempt = 0
    while True:
        try:
            return run_job(job, settings, store)
        except SlideError as exc:
            store.set_status(job.series_instance_uid, JobState.FAILED, f"not scorable: {exc}")
            metrics.slide_failed(metrics.NOT_SCORABLE)
            return JobState.FAILED
        except Exception as exc:  # any fault: retry, then park with the reason
            reason = f"{type(exc).__name__}: {exc}"[:500]
            if attempt >= settings.task_max_retries:
                store.set_status(job.series_instance_uid, JobState.PARKED,
                                 f"gave up after {attempt} retries: {reason}")
                metrics.slide_failed(metrics.GAVE_UP)
                return JobState.PARKED
            store.set_status(job.series_instance_uid, JobState.RETRYING, f"attempt {attempt + 1} failed: {reason}")
            metrics.job_retried(metrics.FAULT)
            sleep(min(2 ** attempt, settings.task_retry_backoff_max))
            attempt += 1


def run_embedded(settings: Settings, store: JobStore, stop: threading.Event) -> None:
    """Listener, one worker thread and the outbox flusher in this process, until ``stop`` is set."""
    jobs: queue.Queue[Job] = queue.Queue()

    def work() -> None:
        while not stop.is_set():
            try:
                job = jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            run_with_retries(job, settings, store)

    worker = threading.Thread(target=work, name="her2-embedded-worker", daemon=True)
    worker.start()
    start_outbox_flusher(settings, store, stop)
    run_listener(settings, store, jobs.put, stop)
    worker.join(timeout=5)
