"""Job leases: a running slide job holds a lease in Redis that its process renews; an expired lease means
its worker is gone, and any worker or the listener queues the job again.

Celery alone hands a dead worker's job out again only after the broker's
visibility timeout (``broker_visibility_timeout``, 36 minutes with the
default settings), because that timeout must exceed the longest job. A lease
is short instead (``job_lease_seconds``, default 30 s) and renewed every
``job_lease_renew_seconds`` (default 10 s) by a thread of the process that
scores the slide, so a SIGKILLed or lost worker's job is queued again within
about ``job_lease_seconds + job_lease_renew_seconds``.

State in the job-state Redis (``state_redis_url``), per Celery task id (one
per dispatched job; Celery's own retries keep it):

- ``her2:attempt:<task id>``: hash with the attempt number (Celery's
  ``retries``), its state (``running``, ``requeued``, ``ended``), the holder
  and the task's arguments and keyword arguments (to queue it again);
- ``her2:lease:<task id>``: the holder's name, expiring after ``job_lease_seconds``;
- ``her2:running``: the task ids whose attempt is running (what sweepers check).

Every transition is one Lua script, so of two sweepers only one re-queues
a job, and a message Redis redelivers later for an attempt that was already
re-queued or has ended (the dead worker's original message, once the
visibility timeout passes) is recognised as stale and skipped. A job queued
again counts as a failed attempt: it is queued with ``retries + 1`` and
parked after ``task_max_retries`` like any other failure. Result UIDs are
deterministic, so a second run of the same slide never duplicates results.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from worker import metrics
from worker.jobs import JobState, JobStore

log = logging.getLogger(__name__)

RUNNING_SET = "her2:running"
#: How long the record of an ended attempt is kept: longer than any visibility timeout, so a message Redis
#: redelivers for it is still recognised as stale (Celery keeps results as long: ``result_expires``).
ENDED_TTL_SECONDS = 7 * 24 * 3600


def _attempt_key(task_id: str) -> str:
    return f"her2:attempt:{task_id}"


def _lease_key(task_id: str) -> str:
    return f"her2:lease:{task_id}"


class Start(str, Enum):
    """What :meth:`Leases.start` decided for a delivered message."""

    RUN = "run"  #: this process holds the lease now: score the slide
    STALE = "stale"  #: the attempt was re-queued as a later one, or has ended: skip the message
    BUSY = "busy"  #: another live process holds this attempt's lease: skip the message


@dataclass(frozen=True)
class Attempt:
    """One attempt of a slide job: Celery task id, attempt number (Celery ``retries``), its arguments."""

    task_id: str
    number: int
    series_instance_uid: str
    args: tuple
    kwargs: dict = field(default_factory=dict)


# KEYS: attempt hash, lease, running set. ARGV: number, holder, lease ms, series uid, args json, task id, kwargs json.
_START = """
local number = tonumber(ARGV[1])
local recorded = tonumber(redis.call('HGET', KEYS[1], 'number') or '-1')
local state = redis.call('HGET', KEYS[1], 'state')
if recorded > number or (recorded == number and state == 'ended') then return 'stale' end
if recorded == number and state == 'running' then
  local holder = redis.call('GET', KEYS[2])
  if holder and holder ~= ARGV[2] then return 'busy' end
end
redis.call('PERSIST', KEYS[1])
redis.call('HSET', KEYS[1], 'number', number, 'state', 'running', 'holder', ARGV[2], 'series', ARGV[4],
           'args', ARGV[5], 'kwargs', ARGV[7])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[3], ARGV[6])
return 'run'
"""

# KEYS: attempt hash, lease. ARGV: number, holder, lease ms. 1 = still ours, 0 = lost (re-queued or ended).
_RENEW = """
if tonumber(redis.call('HGET', KEYS[1], 'number') or '-1') ~= tonumber(ARGV[1])
   or redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS: attempt hash, lease, running set. ARGV: number, ttl s, task id.
_END = """
if tonumber(redis.call('HGET', KEYS[1], 'number') or '-1') ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ended')
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
return 1
"""

# KEYS: attempt hash, lease, running set. ARGV: task id. The next attempt's number when taken over, else -1.
_TAKE_OVER = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then
  redis.call('SREM', KEYS[3], ARGV[1])
  return -1
end
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
local number = redis.call('HINCRBY', KEYS[1], 'number', 1)
redis.call('HSET', KEYS[1], 'state', 'requeued')
redis.call('SREM', KEYS[3], ARGV[1])
return number
"""

# KEYS: attempt hash, running set. ARGV: the number take-over gave, task id. Undo a take-over whose queueing failed.
_UNDO_TAKE_OVER = """
if tonumber(redis.call('HGET', KEYS[1], 'number') or '-1') ~= tonumber(ARGV[1])
   or redis.call('HGET', KEYS[1], 'state') ~= 'requeued' then return 0 end
redis.call('HSET', KEYS[1], 'number', tonumber(ARGV[1]) - 1, 'state', 'running')
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""


def holder_name() -> str:
    """Who holds a lease, for logs and for telling holders apart: host, process id and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """Job leases in Redis (see the module docstring); every method is one atomic script."""

    def __init__(self, url: str, lease_seconds: float) -> None:
        import redis

        self.redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
        self.lease_ms = max(1, round(lease_seconds * 1000))
        self._start = self.redis.register_script(_START)
        self._renew = self.redis.register_script(_RENEW)
        self._end = self.redis.register_script(_END)
        self._take_over = self.redis.register_script(_TAKE_OVER)
        self._undo = self.redis.register_script(_UNDO_TAKE_OVER)

    def _keys(self, task_id: str) -> list[str]:
        return [_attempt_key(task_id), _lease_key(task_id), RUNNING_SET]

    def start(self, attempt: Attempt, holder: str) -> Start:
        """Take the lease of ``attempt`` for ``holder``, unless the attempt is stale or held by another live process."""
        found = self._start(keys=self._keys(attempt.task_id),
                            args=[attempt.number, holder, self.lease_ms, attempt.series_instance_uid,
                                  json.dumps(list(attempt.args)), attempt.task_id, json.dumps(attempt.kwargs)])
        return Start(found)

    def renew(self, attempt: Attempt, holder: str) -> bool:
        """Extend the lease; False when it is no longer ours (the job was queued again, or has ended)."""
        return bool(self._renew(keys=self._keys(attempt.task_id)[:2], args=[attempt.number, holder, self.lease_ms]))

    def end(self, task_id: str, number: int) -> bool:
        """Attempt ``number`` of ``task_id`` is over (finished, failed, or Celery queued its retry itself)."""
        return bool(self._end(keys=self._keys(task_id), args=[number, ENDED_TTL_SECONDS, task_id]))

    def expired(self) -> list[Attempt]:
        """Take over every running attempt whose lease has expired; each comes back with its next number.

        Only one caller gets a given attempt, however many sweep at once.
        """
        taken = []
        for task_id in sorted(self.redis.smembers(RUNNING_SET)):
            number = self._take_over(keys=self._keys(task_id), args=[task_id])
            if number >= 0:
                record = self.redis.hgetall(_attempt_key(task_id))
                taken.append(Attempt(task_id, int(number), record["series"], tuple(json.loads(record["args"])),
                                     json.loads(record["kwargs"])))
        return taken

    def undo_take_over(self, attempt: Attempt) -> None:
        """Give back an attempt :meth:`expired` returned but that could not be queued: the next sweep retries it."""
        self._undo(keys=[_attempt_key(attempt.task_id), RUNNING_SET], args=[attempt.number, attempt.task_id])

    def record(self, task_id: str) -> dict[str, str]:
        """The attempt record of ``task_id`` (empty when none), for status and tests."""
        return self.redis.hgetall(_attempt_key(task_id))


def run_leased(leases: Leases, attempt: Attempt, renew_seconds: float, work: Callable[[], str]) -> str:
    """Run ``work`` holding the lease of ``attempt``, renewed every ``renew_seconds`` from a thread.

    A message for a stale attempt (queued again as a later one, or ended), or
    for one another live process holds, is skipped: returns "stale" or "busy"
    without running ``work``. When ``work`` returns or raises the attempt is
    ended. A renewal that finds the lease gone (this process stalled for
    longer than the lease and the job was queued again) is logged and
    ``work`` still runs to its end, which is safe because result UIDs are
    deterministic.
    """
    holder = holder_name()
    decision = leases.start(attempt, holder)
    if decision is not Start.RUN:
        log.info("series %s: message of attempt %d skipped (%s)", attempt.series_instance_uid, attempt.number + 1,
                 "queued again or already ended" if decision is Start.STALE else "held by another live worker")
        return decision.value
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(renew_seconds):
            try:
                if not leases.renew(attempt, holder):
                    log.warning("job lease of series %s (attempt %d) was lost: it was queued again after this "
                                "process stopped renewing it", attempt.series_instance_uid, attempt.number + 1)
                    return
            except Exception as exc:  # Redis briefly away: keep trying until the lease runs out
                log.warning("job lease of series %s not renewed (%s: %s)", attempt.series_instance_uid,
                            type(exc).__name__, exc)

    thread = threading.Thread(target=renew, name="her2-lease", daemon=True)
    thread.start()
    try:
        return work()
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            leases.end(attempt.task_id, attempt.number)
        except Exception as exc:  # the outcome stands; the sweeper re-queues the attempt later (safe, same UIDs)
            log.warning("job lease of series %s not released (%s: %s)", attempt.series_instance_uid,
                        type(exc).__name__, exc)


#: Queues an attempt taken over from a lost worker (Celery ``retries`` = its number).
Requeue = Callable[[Attempt], None]


def requeue_expired(leases: Leases, store: JobStore, max_retries: int, lease_seconds: float,
                    requeue: Requeue) -> list[Attempt]:
    """Queue again (or park, after ``max_retries``) every job whose lease expired; returns those taken over.

    Counts as a failed attempt, like a fault: status *retrying* with the
    reason, or *parked* after the last retry, and the metrics say so.
    """
    taken = leases.expired()
    for attempt in taken:
        lost = attempt.number - 1
        why = f"worker lost: its job lease was not renewed for {lease_seconds:g} s"
        if lost >= max_retries:
            store.set_status(attempt.series_instance_uid, JobState.PARKED, f"gave up after {lost} retries: {why}")
            leases.end(attempt.task_id, attempt.number)
            metrics.slide_failed(metrics.GAVE_UP)
            log.warning("series %s parked: attempt %d %s", attempt.series_instance_uid, attempt.number, why)
            continue
        try:
            requeue(attempt)
        except Exception as exc:  # broker away: give it back, the next sweep tries again
            leases.undo_take_over(attempt)
            log.warning("series %s not queued again yet (%s: %s)", attempt.series_instance_uid,
                        type(exc).__name__, exc)
            continue
        store.set_status(attempt.series_instance_uid, JobState.RETRYING,
                         f"attempt {attempt.number} failed: {why}; queued again")
        metrics.job_retried(metrics.LEASE_EXPIRED)
        log.warning("series %s queued again as attempt %d: %s", attempt.series_instance_uid, attempt.number + 1, why)
    return taken


def start_sweeper(sweep: Callable[[], object], every_seconds: float, stop: threading.Event) -> threading.Thread:
    """Background thread calling ``sweep`` every ``every_seconds`` until ``stop`` (a failing sweep is logged)."""

    def loop() -> None:
        while not stop.wait(every_seconds):
            try:
                sweep()
            except Exception as exc:  # Redis away: the next sweep tries again
                log.warning("job lease check failed (%s: %s); retrying in %.0f s", type(exc).__name__, exc,
                            every_seconds)

    thread = threading.Thread(target=loop, name="her2-lease-sweeper", daemon=True)
    thread.start()
    return thread
