"""Metrics and health endpoints (issue 15): scraped from the real listener and a prefork Celery worker.

The fast test serves the endpoint in this process against redis-server; the
slow one sends two good slides and one that cannot be scored through the real
stack, then reads the counters from both processes' ``/metrics``. The worker
runs with ``--pool prefork``: the slides are scored in a pool child, so the
counts reach the main process's endpoint only through prometheus-client's
multiprocess store. Health turns 503 when Redis stops and 200 again when it
is back.
"""

from __future__ import annotations

import re
import urllib.request

import pydicom
import pytest
from pacs_stack import (
    associate,
    free_port,
    health,
    scrape,
    tiny_dataset,
    tiny_wsi,
    wait_until,
)
from pydicom.uid import SecondaryCaptureImageStorage
from test_faults import JOB_TIMEOUT, copy_slide, header, send, slide, wait_done

from dicom_io.sender import Outbox
from worker import metrics

pytestmark = pytest.mark.integration
__all__ = ["slide"]  # the module-scoped synthetic slide fixture of test_faults, used here too


def test_endpoint_serves_counters_backlog_and_health(redis_server, tmp_path):
    redis_server.client().flushall()
    broker_url = redis_server.url(0)
    served = metrics.registry(broker_url, tmp_path / "outbox")
    up = metrics.serve("127.0.0.1", free_port(), "listener", served,
                       metrics.redis_health({"broker_url": broker_url, "state_redis_url": redis_server.url(2)}))
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    down = metrics.serve("127.0.0.1", free_port(), "worker", served,
                         metrics.redis_health({"broker_url": broker_url, "state_redis_url": nowhere}))
    try:
        port = up.server_address[1]
        before = scrape(port)
        assert before["her2_queue_depth"] == 0 and before["her2_outbox_backlog"] == 0
        metrics.slide_scored("2+", {"seconds": 4.0, "tiles_scored": 100})
        metrics.slide_scored("2+", {"seconds": 2.0, "tiles_scored": 50, "bytes_fetched": 3 * 2**20})
        metrics.slide_failed(metrics.NOT_SCORABLE)
        metrics.job_retried(metrics.LEASE_EXPIRED)
        redis_server.client(0).rpush(metrics.QUEUE, "job-a", "job-b")
        results = [result_dataset(f"1.2.826.0.1.3680043.8.498.7{i}") for i in (1, 2)]
        Outbox(tmp_path / "outbox").put("1.2.826.0.1.3680043.8.498.7", results)
        after = scrape(port)

        def grew(key: str) -> float:
            return after.get(key, 0) - before.get(key, 0)

        assert grew('her2_slides_scored_total{call="2+"}') == 2
        assert grew('her2_slides_failed_total{reason="not_scorable"}') == 1
        assert grew('her2_job_retries_total{cause="lease_expired"}') == 1
        assert grew("her2_tiles_scored_total") == 150
        assert after["her2_tiles_per_second"] == 25  # the last slide: 50 tiles in 2 s
        assert grew("her2_slide_seconds_count") == 2 and grew("her2_slide_seconds_sum") == 6
        assert grew('her2_slide_seconds_bucket{le="2.0"}') == 1 and grew('her2_slide_seconds_bucket{le="5.0"}') == 2
        assert grew("her2_slide_bytes_fetched_count") == 1
        assert grew('her2_slide_bytes_fetched_bucket{le="4.194304e+06"}') == 1  # 3 MiB: in the 4 MiB bucket
        assert after["her2_queue_depth"] == 2
        assert after["her2_outbox_backlog"] == 2 and after["her2_outbox_backlog_series"] == 1

        assert health(port) == (200, {"status": "ok", "role": "listener",
                                      "redis": {"broker_url": "ok", "state_redis_url": "ok"}})
        assert health(down.server_address[1]) == (503, {"status": "unavailable", "role": "worker", "redis": {
            "broker_url": "ok", "state_redis_url": "unreachable (ConnectionError)"}})
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
        assert missing.value.code == 404
    finally:
        up.shutdown()
        down.shutdown()


def result_dataset(sop_uid: str) -> pydicom.Dataset:
    """A small result-like instance for the outbox."""
    ds = tiny_dataset(SecondaryCaptureImageStorage, "METRICS", "1.2.826.0.1.3680043.8.498.8",
                      "1.2.826.0.1.3680043.8.498.9", "OT")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return ds


def test_counters_after_a_real_run_with_a_prefork_worker_and_health_follows_redis(persistent_stack, slide, tmp_path):
    stack = persistent_stack
    good = [copy_slide(slide[0], tmp_path / f"slide-{i}", f"METRICS-{i}") for i in range(2)]
    listener = stack.start_listener()
    worker = stack.start_worker(pool="prefork")
    for port in (listener.metrics_port, worker.metrics_port):
        assert health(port)[0] == 200
    before = scrape(worker.metrics_port)
    assert 'her2_slides_scored_total{call="3+"}' not in before and before["her2_queue_depth"] == 0

    for files in good:
        send(stack, files)
    bad = tiny_wsi("METRICS-BAD")  # a WSI instance without a pyramid: spooled, then refused by the worker
    assoc = associate(stack.listener_port)
    assert assoc.send_c_store(bad).Status == 0x0000
    assoc.release()
    for files in good:
        wait_done(stack, header(files).SeriesInstanceUID)
    wait_until(lambda: stack.job_state(bad.SeriesInstanceUID) == "failed", JOB_TIMEOUT, "the bad slide to fail")

    scored = scrape(worker.metrics_port)
    tiles = sum(int(n) for n in re.findall(r"scored series \S+: 3\+ in [\d.]+ s \((\d+) tiles\)", worker.log()))
    assert tiles > 0
    assert scored['her2_slides_scored_total{call="3+"}'] == 2
    assert sum(v for k, v in scored.items() if k.startswith("her2_slides_scored_total")) == 2
    assert scored['her2_slides_failed_total{reason="not_scorable"}'] == 1
    assert scored["her2_slide_seconds_count"] == 2 and 0 < scored["her2_slide_seconds_sum"] < JOB_TIMEOUT
    assert scored["her2_tiles_scored_total"] == tiles and scored["her2_tiles_per_second"] > 0
    assert scored["her2_queue_depth"] == 0 and scored["her2_outbox_backlog"] == 0
    received = scrape(listener.metrics_port)
    assert received["her2_slides_received_total"] == 3 and received["her2_queue_depth"] == 0
    assert "her2_slides_scored_total" not in str(received)  # the listener scores nothing

    text = "".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=10).read().decode()
                   for p in (listener.metrics_port, worker.metrics_port))
    for files in [*good]:
        source = header(files)
        for phi in (source.PatientID, source.StudyInstanceUID, source.SeriesInstanceUID):
            assert phi not in text
    assert "METRICS-BAD" not in text and bad.SeriesInstanceUID not in text

    stack.redis.stop()
    for port, role in ((listener.metrics_port, "listener"), (worker.metrics_port, "worker")):
        status, body = health(port)
        assert (status, body["status"], body["role"]) == (503, "unavailable", role)
        assert body["redis"]["broker_url"].startswith("unreachable")
    assert "her2_queue_depth" not in scrape(worker.metrics_port)  # unknown while Redis is away: no sample
    stack.redis.start()
    wait_until(lambda: all(health(p)[0] == 200 for p in (listener.metrics_port, worker.metrics_port)), 30,
               "health to be 200 again")
