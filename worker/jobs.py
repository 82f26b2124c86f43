"""Jobs: one per stable series content, their status, and the plain functions a job runs.

Nothing here needs a broker: the Celery task (:mod:`worker.tasks`) and the
embedded worker (:mod:`worker.service`) both call :func:`run_job` and
:func:`deliver_outbox`, and tests call them directly.

Exactly one job per series: when a series becomes stable its *content key*
(SeriesInstanceUID + a hash of the set of SOP Instance UIDs in the spool) is
claimed with an atomic create-if-absent (Redis ``SET NX``; ``O_EXCL`` file in
embedded mode). The same series stored again has the same key and gets no
second job; a series that really changed (new instances) gets a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from dicom_io.sender import Destination, Outbox, StowDestination
from dicom_io.series_tracker import SeriesTracker, StableSeries
from dicom_io.spool import (
    SpoolPathError,
    checked_uid,
    instance_uids,
    transfer_syntaxes,
    write_atomic,
)
from worker import metrics
from worker.settings import Settings

log = logging.getLogger(__name__)


class JobState(str, Enum):
    """Life of a job: queued -> running -> (delivering ->) done; or failed (bad input) / parked (gave up)."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    DELIVERING = "delivering"
    DONE = "done"
    FAILED = "failed"
    PARKED = "parked"


@dataclass(frozen=True)
class JobStatus:
    """What ``her2 status`` shows for a series; UIDs and reasons only, never patient data."""

    series_instance_uid: str
    state: JobState
    reason: str
    updated: float

    def line(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.updated))
        return f"{self.series_instance_uid}: {self.state.value} ({stamp})" + (f" - {self.reason}" if self.reason else "")


class JobStore(Protocol):
    """Claims (one job per content key) and status per source series."""

    def claim(self, key: str) -> bool: ...
    def release(self, key: str) -> None: ...
    def set_status(self, series_uid: str, state: JobState, reason: str = "") -> None: ...
    def get_status(self, series_uid: str) -> JobStatus | None: ...


class RedisJobStore:
    """Job store in Redis: ``her2:claim:<key>`` (SET NX) and ``her2:status:<series>`` (hash)."""

    def __init__(self, url: str) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)

    def claim(self, key: str) -> bool:
        return bool(self.redis.set(f"her2:claim:{key}", str(time.time()), nx=True))

    def release(self, key: str) -> None:
        self.redis.delete(f"her2:claim:{key}")

    def set_status(self, series_uid: str, state: JobState, reason: str = "") -> None:
        self.redis.hset(f"her2:status:{series_uid}",
                        mapping={"state": state.value, "reason": reason, "updated": str(time.time())})

    def get_status(self, series_uid: str) -> JobStatus | None:
        found = self.redis.hgetall(f"her2:status:{series_uid}")
        if not found:
            return None
        return JobStatus(series_uid, JobState(found["state"]), found["reason"], float(found["updated"]))


class FileJobStore:
    """Job store on disk for embedded mode: ``claims/<SeriesUID>_<content hash>`` and ``status/<series>.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "claims").mkdir(parents=True, exist_ok=True)
        (self.root / "status").mkdir(parents=True, exist_ok=True)

    def _claim_path(self, key: str) -> Path:
        series_uid, _, digest = key.partition(":")
        return self.root / "claims" / f"{checked_uid(series_uid, 'SeriesInstanceUID')}_{digest}"

    def claim(self, key: str) -> bool:
        try:
            os.close(os.open(self._claim_path(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True

    def release(self, key: str) -> None:
        self._claim_path(key).unlink(missing_ok=True)

    def set_status(self, series_uid: str, state: JobState, reason: str = "") -> None:
        status = JobStatus(checked_uid(series_uid, "SeriesInstanceUID"), state, reason, time.time())
        write_atomic(self.root / "status" / f"{series_uid}.json", json.dumps(asdict(status)).encode())

    def get_status(self, series_uid: str) -> JobStatus | None:
        path = self.root / "status" / f"{checked_uid(series_uid, 'SeriesInstanceUID')}.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return JobStatus(data["series_instance_uid"], JobState(data["state"]), data["reason"], data["updated"])


def job_store(settings: Settings, embedded: bool) -> JobStore:
    """The store the process should use: files in embedded mode, Redis otherwise."""
    return FileJobStore(settings.state_dir) if embedded else RedisJobStore(settings.state_redis_url)


def content_key(series_uid: str, sop_uids: list[str]) -> str:
    """Dedup key of a series' content: ``<SeriesUID>:<sha256 of its sorted SOP Instance UIDs>``."""
    digest = hashlib.sha256("\n".join(sorted(sop_uids)).encode()).hexdigest()
    return f"{series_uid}:{digest[:32]}"


@dataclass(frozen=True)
class Job:
    """What a worker needs to score one series: where it is and which series it must be.

    ``source`` "spool": the instances are in ``series_dir``. "dicomweb": the
    listener kept headers only; the worker reads ``instances`` (SOP Instance
    UID -> Transfer Syntax UID as received) of the study and series from the
    PACS at its ``dicomweb_url``.
    """

    series_dir: str
    series_instance_uid: str
    source: str = "spool"
    study_instance_uid: str = ""
    instances: dict[str, str] = field(default_factory=dict)


#: Hands a claimed job to a worker (Celery ``delay`` or the embedded queue's ``put``).
Enqueue = Callable[[Job], None]


def dispatch_stable(tracker: SeriesTracker, store: JobStore, enqueue: Enqueue, source: str = "spool") -> list[Job]:
    """Turn every series that just became stable into at most one queued job (read from ``source``).

    If the store or the queue is unreachable the series goes back to the
    tracker and is tried again after another quiet period; nothing is lost.
    """
    queued = []
    for stable in tracker.pop_stable():
        try:
            job = _dispatch_one(stable, store, enqueue, source)
        except Exception as exc:  # broker or store down: keep the series, try again later
            log.warning("series %s not queued yet (%s: %s); will retry", stable.series_instance_uid,
                        type(exc).__name__, exc)
            tracker.note(stable.study_instance_uid, stable.series_instance_uid, stable.folder)
            continue
        if job is not None:
            queued.append(job)
    return queued


def _dispatch_one(stable: StableSeries, store: JobStore, enqueue: Enqueue, source: str) -> Job | None:
    uids = instance_uids(stable.folder)
    key = content_key(stable.series_instance_uid, uids)
    if not store.claim(key):
        log.info("series %s (%d instances) already had its job; not queued again",
                 stable.series_instance_uid, len(uids))
        return None
    job = Job(str(stable.folder), stable.series_instance_uid)
    if source == "dicomweb":
        job = Job(str(stable.folder), stable.series_instance_uid, source, stable.study_instance_uid,
                  transfer_syntaxes(stable.folder))
    try:
        store.set_status(job.series_instance_uid, JobState.QUEUED, f"{len(uids)} instances")
        enqueue(job)
    except Exception:
        store.release(key)
        raise
    log.info("series %s stable with %d instances: job queued", job.series_instance_uid, len(uids))
    return job


#: Job states ``her2 retry`` accepts: the job has stopped and will not be tried again by itself.
RETRYABLE = (JobState.FAILED, JobState.PARKED)


class RetryError(ValueError):
    """A job cannot be retried; the message says why."""


def retry_job(settings: Settings, store: JobStore, series_uid: str, enqueue: Enqueue) -> Job:
    """Queue a failed or parked series again (``her2 retry``): release its claim, claim it anew, enqueue.

    The series is scored from what the spool holds now, so fix the cause first
    (re-send a corrected series, free the PACS); results keep their
    deterministic UIDs, so a retry never duplicates delivered objects.
    """
    try:
        series_uid = checked_uid(series_uid, "SeriesInstanceUID")
    except SpoolPathError as exc:
        raise RetryError(str(exc)) from None
    status = store.get_status(series_uid)
    if status is None:
        raise RetryError(f"{series_uid}: no job known")
    if status.state not in RETRYABLE:
        raise RetryError(f"{series_uid}: job is {status.state.value}, only failed or parked jobs are retried")
    folders = [p for p in Path(settings.spool_dir).glob(f"*/{series_uid}") if any(p.glob("*.dcm"))]
    if len(folders) != 1:
        raise RetryError(f"{series_uid}: {len(folders)} spool folders hold this series in {settings.spool_dir}, "
                         "expected 1")
    folder = folders[0]
    store.release(content_key(series_uid, instance_uids(folder)))
    job = _dispatch_one(StableSeries(folder.parent.name, series_uid, folder), store, enqueue, settings.slide_source)
    if job is None:  # another retry claimed it in between
        raise RetryError(f"{series_uid}: already queued again by someone else")
    log.info("series %s queued again after being %s", series_uid, status.state.value)
    return job


def result_destination(settings: Settings) -> Destination | StowDestination:
    """Where results go (``result_delivery``): C-STORE to destination_host/port/aet, or STOW-RS to dicomweb_url."""
    if settings.result_delivery == "stow":
        return StowDestination(settings.dicomweb_server())
    return settings.destination()


def run_job(job: Job, settings: Settings, store: JobStore) -> JobState:
    """Score one series, from the spool or over DICOMweb, and deliver its results (through the outbox).

    Returns the final state. Raises :class:`dicom_io.errors.SlideError` for
    input that cannot be scored (the caller records it as failed) and anything
    else for faults worth a retry (a PACS that cannot be read now:
    :class:`dicom_io.errors.SourceError`). A slide read over DICOMweb adds
    ``bytes_fetched`` and ``http_requests`` to the job's stats.
    """
    from dicom_io.dicomweb import TransferCount, open_web_slide
    from dicom_io.errors import SlideError
    from her2_analysis.pipeline import score_slide

    def progress(done: int, total: int) -> None:
        store.set_status(job.series_instance_uid, JobState.RUNNING, f"scoring: {done} of {total} tissue tiles read")

    store.set_status(job.series_instance_uid, JobState.RUNNING)
    fetched = TransferCount()
    if job.source == "dicomweb":
        slide = open_web_slide(settings.dicomweb_server(), job.study_instance_uid, job.series_instance_uid,
                               job.instances, fetched)
    else:
        slide = Path(job.series_dir)
    result = score_slide(slide, settings.scoring_options(), progress=progress)
    if result.source.series_instance_uid != job.series_instance_uid:
        raise SlideError(f"spool folder of series {job.series_instance_uid} holds series "
                         f"{result.source.series_instance_uid}")
    if job.source == "dicomweb":
        result.stats.update(fetched.stats())
        log.info("series %s: %d bytes fetched over DICOMweb in %d requests", job.series_instance_uid,
                 fetched.bytes, fetched.responses)
    metrics.slide_scored(result.score.call.value, result.stats)
    series = job.series_instance_uid
    # Status first, files second: whichever flusher delivers them records its outcome after this.
    destination = result_destination(settings)
    store.set_status(series, JobState.DELIVERING, f"results in the outbox for {destination.name}")
    Outbox(settings.outbox_dir).put(series, result.datasets)
    outcome: list[JobState] = []
    Outbox(settings.outbox_dir).flush(destination, series,
                                      on_series=lambda *args: outcome.append(_record_delivery(store, *args)))
    state = outcome[-1] if outcome else JobState.DELIVERING
    log.info("series %s scored (%s): %s", series, result.score.call.value, state.value)
    return state


def _record_delivery(store: JobStore, series_uid: str, delivered: int, waiting: int, rejected: str | None) -> JobState:
    """Record the outcome of sending one series' results (called under the outbox's series lock)."""
    if rejected:
        store.set_status(series_uid, JobState.PARKED, f"result refused by the destination: {rejected}")
        metrics.slide_failed(metrics.RESULT_REFUSED)
        return JobState.PARKED
    if waiting:
        store.set_status(series_uid, JobState.DELIVERING, f"{waiting} result instance(s) still in the outbox")
        return JobState.DELIVERING
    store.set_status(series_uid, JobState.DONE, f"{delivered} result instance(s) delivered")
    return JobState.DONE


def deliver_outbox(settings: Settings, store: JobStore) -> int:
    """Retry everything in the outbox once, recording each series' outcome. Returns instances delivered."""
    report = Outbox(settings.outbox_dir).flush(result_destination(settings),
                                               on_series=lambda *args: _record_delivery(store, *args))
    return sum(report.delivered.values())


def start_outbox_flusher(settings: Settings, store: JobStore, stop: threading.Event) -> threading.Thread:
    """Background thread that calls :func:`deliver_outbox` every ``outbox_retry_seconds`` until ``stop``."""

    def loop() -> None:
        while not stop.wait(settings.outbox_retry_seconds):
            try:
                deliver_outbox(settings, store)
            except Exception:  # a flush failing must not end the retry loop
                log.exception("outbox flush failed; retrying in %.0f s", settings.outbox_retry_seconds)

    thread = threading.Thread(target=loop, name="her2-outbox", daemon=True)
    thread.start()
    return thread
