"""Job leases (issue 15) against a real redis-server, and a worker SIGKILLed mid-slide in the real stack.

The fast tests drive :class:`worker.lease.Leases` directly on redis-server: only
one of several sweepers takes over an expired lease, a late message for a
re-queued or ended attempt is stale, a live holder's attempt is busy, a lost
job is parked after ``task_max_retries``. The slow test runs two Celery
workers with the default lease settings, kills the one scoring the slide and
checks that the other completes it within two minutes, with one SR and one
SEG in the slide's own study, and that the dead worker's original message,
once Redis hands it out again, is skipped.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from pacs_stack import scrape, wait_until
from test_faults import (
    JOB_TIMEOUT,
    PER_TILE,
    assert_one_result_set,
    copy_slide,
    header,
    mid_slide,
    send,
    slide,
    wait_done,
)

from worker.jobs import JobState, RedisJobStore
from worker.lease import Attempt, Leases, Start, requeue_expired, run_leased

pytestmark = pytest.mark.integration
__all__ = ["slide"]  # the module-scoped synthetic slide fixture of test_faults, used here too

#: Short leases for the fast tests (the slow test uses the defaults: 30 s lease, renewed every 10 s).
LEASE = 0.3


@pytest.fixture
def leases(redis_server) -> Leases:
    redis_server.client().flushall()
    return Leases(redis_server.url(2), LEASE)


def attempt(number: int = 0, task_id: str = "task-1") -> Attempt:
    """An attempt whose arguments and keyword arguments must come back unchanged when it is queued again."""
    series = "1.2.826.0.1.3680043.8.498.1"
    return Attempt(task_id, number, series, (f"/spool/1.2/{series}", series),
                   {"source": "dicomweb", "instances": {"1.2.826.0.1.3680043.8.498.2": "1.2.840.10008.1.2.4.50"}})


def test_expired_lease_is_taken_over_once_and_the_old_attempt_becomes_stale(leases):
    first = attempt()
    assert leases.start(first, "worker-a") is Start.RUN
    assert leases.start(first, "worker-b") is Start.BUSY  # a duplicate delivery while worker-a lives
    assert leases.expired() == []
    time.sleep(LEASE / 2)
    assert leases.renew(first, "worker-a") is True
    time.sleep(LEASE * 0.7)
    assert leases.expired() == []  # renewed: still alive after more than the first lease period

    time.sleep(LEASE * 1.5)  # worker-a died: no renewal
    taken: list[list[Attempt]] = []
    sweepers = [threading.Thread(target=lambda: taken.append(leases.expired())) for _ in range(4)]
    for t in sweepers:
        t.start()
    for t in sweepers:
        t.join()
    assert sorted(len(t) for t in taken) == [0, 0, 0, 1]  # exactly one sweeper got it
    (second,) = [a for t in taken for a in t]
    assert second == attempt(1)
    assert leases.renew(first, "worker-a") is False  # a stalled worker-a learns it lost the lease

    assert leases.start(first, "worker-c") is Start.STALE  # the dead worker's message, handed out again
    assert leases.start(second, "worker-b") is Start.RUN
    assert leases.record("task-1")["state"] == "running" and leases.record("task-1")["holder"] == "worker-b"
    assert leases.end("task-1", 0) is False  # ending an older attempt does not end the running one
    assert leases.end("task-1", 1) is True
    assert leases.start(second, "worker-c") is Start.STALE  # ended: a late duplicate does not score again
    assert leases.redis.smembers("her2:running") == set()
    assert 0 < leases.redis.ttl("her2:attempt:task-1") <= 7 * 24 * 3600


def test_run_leased_renews_while_working_and_ends_after(leases):
    seen = []

    def work() -> str:
        time.sleep(LEASE * 3)  # three lease periods: only renewal keeps it
        seen.append(leases.expired())
        return "done"

    assert run_leased(leases, attempt(), LEASE / 3, work) == "done"
    assert seen == [[]]
    assert leases.record("task-1")["state"] == "ended"
    assert run_leased(leases, attempt(), LEASE / 3, lambda: pytest.fail("a stale message ran")) == "stale"

    with pytest.raises(RuntimeError):  # a failing attempt ends too: Celery queues its retry itself
        run_leased(leases, attempt(0, "task-2"), LEASE / 3, lambda: (_ for _ in ()).throw(RuntimeError("fault")))
    assert leases.record("task-2")["state"] == "ended"


def test_lost_job_is_queued_again_then_parked_after_its_last_retry(leases, redis_server):
    store = RedisJobStore(redis_server.url(2))
    queued: list[Attempt] = []
    series = attempt().series_instance_uid
    why = f"worker lost: its job lease was not renewed for {LEASE:g} s"
    for number in range(3):  # attempts 1, 2 and 3 lose their worker; max_retries = 2
        assert leases.start(attempt(number), f"worker-{number}") is Start.RUN
        time.sleep(LEASE * 1.5)
        requeue_expired(leases, store, 2, LEASE, queued.append)
        if number < 2:
            assert queued[-1] == attempt(number + 1)
            status = store.get_status(series)
            assert (status.state, status.reason) == (JobState.RETRYING,
                                                     f"attempt {number + 1} failed: {why}; queued again")
    assert len(queued) == 2
    status = store.get_status(series)
    assert (status.state, status.reason) == (JobState.PARKED, f"gave up after 2 retries: {why}")
    assert leases.record("task-1")["state"] == "ended" and leases.expired() == []


def test_requeue_failing_keeps_the_job_for_the_next_sweep(leases, redis_server):
    store = RedisJobStore(redis_server.url(2))
    leases.start(attempt(), "worker-a")
    time.sleep(LEASE * 1.5)

    def broker_down(_: Attempt) -> None:
        raise ConnectionError("broker away")

    assert requeue_expired(leases, store, 2, LEASE, broker_down) == [attempt(1)]
    assert store.get_status(attempt().series_instance_uid) is None  # nothing recorded: not queued yet
    queued: list[Attempt] = []
    assert requeue_expired(leases, store, 2, LEASE, queued.append) == [attempt(1)]
    assert queued == [attempt(1)]


def test_lease_settings_renew_at_most_half_the_lease():
    from pydantic import ValidationError

    from worker.settings import Settings

    defaults = Settings()
    assert (defaults.job_lease_seconds, defaults.job_lease_renew_seconds) == (30, 10)
    with pytest.raises(ValidationError, match=r"job_lease_renew_seconds \(20\) must be at most half of "
                                              r"job_lease_seconds \(30\)"):
        Settings(job_lease_renew_seconds=20)


def redeliver_unacked(broker) -> None:
    """What kombu does once the visibility timeout has passed: the unacknowledged message back into the queue."""
    (tag,) = broker.hkeys("unacked")
    message, _exchange, _routing_key = json.loads(broker.hget("unacked", tag))
    message["headers"]["redelivered"] = True
    message["properties"]["delivery_info"]["redelivered"] = True
    with broker.pipeline() as pipe:
        pipe.hdel("unacked", tag).zrem("unacked_index", tag).rpush("celery", json.dumps(message)).execute()


def test_worker_killed_mid_slide_completes_on_the_other_worker_within_two_minutes(stack, slide, tmp_path):
    files, truth = copy_slide(slide[0], tmp_path / "slide", "LEASE-1"), slide[1]
    series = header(files).SeriesInstanceUID
    listener = stack.start_listener()
    workers = [stack.start_worker(index=i, **PER_TILE) for i in (1, 2)]  # default lease settings
    send(stack, files)
    wait_until(lambda: mid_slide(stack, series), JOB_TIMEOUT, "a worker to be scoring the slide", interval=0.02)

    state = stack.redis.client(db=2)
    (task_id,) = state.smembers("her2:running")
    holder_pid = int(state.get(f"her2:lease:{task_id}").split(":")[1])
    (victim,) = [w for w in workers if w.proc.pid == holder_pid]
    (survivor,) = [w for w in workers if w is not victim]
    victim.proc.kill()  # SIGKILL: solo pool, the process that scores
    victim.proc.wait(timeout=10)
    killed = time.monotonic()
    wait_done(stack, series)
    elapsed = time.monotonic() - killed
    print(f"killed mid-slide: done on the other worker {elapsed:.0f} s later (lease 30 s, renewed every 10 s)")
    assert elapsed < 120

    assert_one_result_set(stack, files, truth)
    logs = stack.logs()
    assert logs.count(f"scored series {series}:") == 1 and f"scored series {series}:" in survivor.log()
    assert f"series {series} queued again as attempt 2: worker lost: its job lease was not renewed for 30 s" in logs
    assert state.hgetall(f"her2:attempt:{task_id}")["number"] == "1"
    assert state.hgetall(f"her2:attempt:{task_id}")["state"] == "ended"
    retries = [scrape(p.metrics_port).get('her2_job_retries_total{cause="lease_expired"}', 0)
               for p in (listener, survivor)]
    assert sum(retries) == 1  # counted by whichever of them took it over
    assert scrape(survivor.metrics_port)['her2_slides_scored_total{call="3+"}'] == 1

    # The dead worker's message is still unacknowledged; once Redis hands it out again it is skipped.
    broker = stack.redis.client(db=0)
    assert broker.hlen("unacked") == 1 and broker.llen("celery") == 0
    redeliver_unacked(broker)
    wait_until(lambda: "message of attempt 1 skipped (queued again or already ended)" in survivor.log(), 60,
               "the redelivered message to be skipped")
    wait_until(lambda: broker.hlen("unacked") == 0 and broker.llen("celery") == 0, 30, "the message to be acknowledged")
    assert stack.job_state(series) == "done"
    assert stack.logs().count(f"scored series {series}:") == 1
    assert_one_result_set(stack, files, truth)
