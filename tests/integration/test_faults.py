"""Faults against the real stack (issue 5): workers, Redis, the listener and the PACS failing mid-work.

Slides go straight to the listener (storescu or a pynetdicom SCU, as a PACS
would send them) and results come back to Orthanc, so a study in Orthanc
holds only results: exactly one SR and one SEG, with the UIDs
:func:`dicom_io.uids.result_uids` derives, means "scored once, nothing
duplicated". One small synthetic slide is rendered per module and copied under
new UIDs for each use (rendering is the slow part).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import redis as redis_client
from pacs_stack import LISTENER_AET, TEST_AET, binary, her2, wait_until
from pydicom.uid import JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import VLWholeSlideMicroscopyImageStorage
from test_routing import check_results, results_in_study

from dicom_io.uids import result_uids
from her2_analysis.options import BUNDLED_MODEL
from her2_core.model_card import card_path, load_model_card
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec
from worker.jobs import content_key

pytestmark = pytest.mark.integration

#: One progress report per tile, so a test sees the worker in the middle of the slide.
PER_TILE = {"HER2_BATCH_SIZE": "1"}
#: Seconds before Redis redelivers an unacknowledged job in the SIGKILL test (production: 2160).
VISIBILITY = 4
JOB_TIMEOUT = 180


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[list[Path], dict]:
    files, truth = write_synthetic_slide(SlideSpec(seed=61, width_um=2048, height_um=2048, class_mix={"3+": 1.0},
                                                   patient_id="FAULTS"), tmp_path_factory.mktemp("slide"))
    return files, json.loads(truth.read_text())


def copy_slide(files: list[Path], out: Path, patient_id: str) -> list[Path]:
    """The slide as a new patient's study and series: same pixels, new Study/Series/Frame/SOP UIDs."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out.mkdir(parents=True)
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


def header(files: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(files[0], stop_before_pixels=True)


def send(stack, files: list[Path]) -> None:
    """C-STORE the slide to the listener with dcmtk's storescu, as a PACS would."""
    run = subprocess.run([binary("storescu"), "--required", "--propose-jpeg8", "-aet", "STORESCU", "-aec",
                          LISTENER_AET, "127.0.0.1", str(stack.listener_port), *map(str, files)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def broker(stack) -> redis_client.Redis:
    return redis_client.Redis(port=stack.redis.port, db=0)


def wait_done(stack, series_uid: str) -> None:
    def done() -> bool:
        job = stack.job(series_uid)
        if job.get("state") in ("failed", "parked"):
            pytest.fail(f"job of series {series_uid} {job['state']}: {job['reason']}")
        return job.get("state") == "done"

    wait_until(done, JOB_TIMEOUT, f"the job of series {series_uid} to be done", interval=0.5)


def assert_one_result_set(stack, files: list[Path], truth: dict) -> None:
    """The slide's study in Orthanc holds one SR and one SEG, with the derived UIDs, and nothing else."""
    source = header(files)
    card = load_model_card(Path(os.environ.get("HER2_MODEL_PATH", BUNDLED_MODEL)))
    instances = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    uids = result_uids(source.SeriesInstanceUID, instances, card.name, card.version)
    results = results_in_study(stack.orthanc, source.StudyInstanceUID)
    check_results(stack.orthanc, results, files, truth)
    assert sorted(results) == ["SEG", "SR"]
    series = {s["MainDicomTags"]["SeriesInstanceUID"]
              for s in stack.orthanc.find("Series", {"StudyInstanceUID": source.StudyInstanceUID})}
    assert series == {uids.sr_series, uids.seg_series}
    instances = {i["MainDicomTags"]["SOPInstanceUID"]
                 for i in stack.orthanc.find("Instance", {"StudyInstanceUID": source.StudyInstanceUID})}
    assert instances == {uids.sr, uids.seg}


def times_scored(stack, series_uid: str) -> int:
    """How many times a worker finished scoring the series (every worker of a test logs to worker.log)."""
    return (stack.root / "worker.log").read_text().count(f"scored series {series_uid}:")


def mid_slide(stack, series_uid: str) -> bool:
    job = stack.job(series_uid)
    return job.get("state") == "running" and job.get("reason", "").startswith("scoring:")


def test_worker_killed_mid_slide_is_redelivered_and_its_results_stored_once(stack, slide, tmp_path):
    files, truth = copy_slide(slide[0], tmp_path / "slide", "KILLED-1"), slide[1]
    series = header(files).SeriesInstanceUID
    stack.start_listener()
    settings = {**PER_TILE, "HER2_BROKER_VISIBILITY_TIMEOUT": str(VISIBILITY)}
    first = stack.start_worker(**settings)
    send(stack, files)
    wait_until(lambda: mid_slide(stack, series), JOB_TIMEOUT, "the worker to be scoring the slide", interval=0.02)
    first.proc.kill()  # SIGKILL to the whole worker (solo pool: the process that scores)
    first.proc.wait(timeout=10)

    job = stack.job(series)
    assert job["state"] == "running" and re.fullmatch(r"scoring: \d+ of \d+ tissue tiles read", job["reason"])
    assert results_in_study(stack.orthanc, header(files).StudyInstanceUID) == {}
    # Not acknowledged: Redis keeps the message for the dead worker until the visibility timeout.
    assert broker(stack).llen("celery") == 0 and broker(stack).hlen("unacked") == 1
    (_, delivered_at), = broker(stack).zrange("unacked_index", 0, -1, withscores=True)
    wait_until(lambda: time.time() > delivered_at + VISIBILITY, VISIBILITY + 5, "the visibility timeout")

    stack.start_worker(**settings)  # a fresh worker takes the message back at start
    wait_done(stack, series)
    assert_one_result_set(stack, files, truth)
    assert times_scored(stack, series) == 1
    assert broker(stack).llen("celery") == 0 and broker(stack).hlen("unacked") == 0


def kill_pool_child_mid_slide(stack, worker, series_uid: str) -> None:
    wait_until(lambda: mid_slide(stack, series_uid), JOB_TIMEOUT, "the pool child to be scoring the slide",
               interval=0.02)
    pid = worker.proc.pid
    (child,) = map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: stack.job_state(series_uid) != "running", 30, "the main process to see its child die")


def test_pool_child_killed_mid_slide_is_retried_and_parked_if_it_dies_every_time(stack, slide, tmp_path):
    files, truth = copy_slide(slide[0], tmp_path / "slide", "KILLED-2"), slide[1]
    series = header(files).SeriesInstanceUID
    stack.start_listener()
    worker = stack.start_worker(pool="prefork", **PER_TILE)  # default visibility timeout: 2160 s
    send(stack, files)
    kill_pool_child_mid_slide(stack, worker, series)
    # The main process retries it (after min(60, task_retry_backoff_max) = 2 s), long before 2160 s.
    wait_done(stack, series)
    assert worker.proc.poll() is None
    assert "retry: Retry in 2s: WorkerLostError('Worker exited prematurely: signal 9 (SIGKILL)" in worker.log()
    assert_one_result_set(stack, files, truth)
    assert times_scored(stack, series) == 1

    # A slide whose child dies on every attempt (e.g. out of memory) is parked after its last retry.
    poison = copy_slide(slide[0], tmp_path / "poison", "KILLED-3")
    poison_series = header(poison).SeriesInstanceUID
    send(stack, poison)
    for _attempt in range(3):  # the first attempt and task_max_retries = 2 retries
        kill_pool_child_mid_slide(stack, worker, poison_series)
    wait_until(lambda: stack.job_state(poison_series) == "parked", 30, "the job to be parked")
    assert stack.job(poison_series)["reason"].startswith(
        "gave up after 2 retries: WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL)")
    assert results_in_study(stack.orthanc, header(poison).StudyInstanceUID) == {}
    wait_until(lambda: broker(stack).hlen("unacked") == 0, 10, "the last attempt's message to be acknowledged")
    assert broker(stack).llen("celery") == 0


def restart_redis(stack) -> None:
    """SIGKILL redis-server (a crash: no save at shutdown) and start it again on its port and data dir."""
    stack.redis.proc.kill()
    stack.redis.proc.wait(timeout=10)
    stack.redis.start()


def test_jobs_queued_across_redis_restarts_all_complete_once(persistent_stack, slide, tmp_path):
    stack = persistent_stack
    slides = {f"REDIS-{i}": copy_slide(slide[0], tmp_path / f"slide-{i}", f"REDIS-{i}") for i in range(3)}
    series = {patient: header(files).SeriesInstanceUID for patient, files in slides.items()}
    stack.start_listener()  # no worker yet: the jobs stay queued
    for patient in ("REDIS-0", "REDIS-1"):
        send(stack, slides[patient])
    wait_until(lambda: broker(stack).llen("celery") == 2, 30, "two queued jobs")

    restart_redis(stack)  # append-only file: the queued messages, claims and states survive
    assert broker(stack).llen("celery") == 2
    assert [stack.job_state(series[p]) for p in ("REDIS-0", "REDIS-1")] == ["queued", "queued"]
    stack.start_worker()
    for patient in ("REDIS-0", "REDIS-1"):
        wait_done(stack, series[patient])

    restart_redis(stack)  # now with the listener and the worker connected and idle: both reconnect
    send(stack, slides["REDIS-2"])
    wait_done(stack, series["REDIS-2"])

    for patient, files in slides.items():
        assert_one_result_set(stack, files, slide[1])
        assert times_scored(stack, series[patient]) == 1
    # the worker acknowledges a message after its task has returned (acks_late), so "done" can precede the ack
    wait_until(lambda: broker(stack).llen("celery") == 0 and broker(stack).hlen("unacked") == 0, 30,
               "queue and unacked messages empty")
    assert len(redis_client.Redis(port=stack.redis.port, db=2).keys("her2:claim:*")) == 3


def test_listener_killed_mid_transfer_scores_the_resent_slide_once_with_all_instances(stack, slide, tmp_path):
    files, truth = copy_slide(slide[0], tmp_path / "slide", "RESENT-1"), slide[1]
    source = header(files)
    series_dir = stack.root / "spool" / source.StudyInstanceUID / source.SeriesInstanceUID
    listener = stack.start_listener()
    stack.start_worker()

    # A pynetdicom SCU stores the first instance, then the listener is killed in the middle of the second.
    pdus_of_second: list[object] = []

    def kill_during_second_instance(event) -> None:
        if isinstance(event.pdu, P_DATA_TF) and any(series_dir.glob("*.dcm")):
            pdus_of_second.append(event.pdu)
            if len(pdus_of_second) == 3:
                listener.proc.kill()
                listener.proc.wait(timeout=10)

    ae = AE(ae_title=TEST_AET)
    ae.add_requested_context(VLWholeSlideMicroscopyImageStorage, JPEGBaseline8Bit)
    assoc = ae.associate("127.0.0.1", stack.listener_port, ae_title=LISTENER_AET,
                         evt_handlers=[(evt.EVT_PDU_SENT, kill_during_second_instance)])
    big_first = sorted(files, key=lambda p: -p.stat().st_size)
    assert assoc.send_c_store(pydicom.dcmread(big_first[1])).Status == 0x0000
    assert "Status" not in assoc.send_c_store(pydicom.dcmread(big_first[0]))  # no answer: the listener died
    assert listener.proc.returncode == -signal.SIGKILL and len(pdus_of_second) >= 3
    assoc.abort()
    assert [p.stem for p in series_dir.glob("*.dcm")] == [pydicom.dcmread(big_first[1]).SOPInstanceUID]

    restarted = stack.start_listener()
    wait_until(lambda: "held until it is sent again" in restarted.log(), 30, "the restarted listener to hold it")
    time.sleep(3)  # longer than stable_seconds + a tick: an incomplete series would have been queued by now
    assert stack.job_state(source.SeriesInstanceUID) is None and broker(stack).llen("celery") == 0

    send(stack, files)  # the sender retries the whole series, as a PACS does
    wait_done(stack, source.SeriesInstanceUID)
    assert_one_result_set(stack, files, truth)
    assert times_scored(stack, source.SeriesInstanceUID) == 1
    all_instances = sorted(pydicom.dcmread(p).SOPInstanceUID for p in files)
    assert sorted(p.stem for p in series_dir.glob("*.dcm")) == all_instances
    claims = redis_client.Redis(port=stack.redis.port, db=2, decode_responses=True).keys("her2:claim:*")
    assert claims == [f"her2:claim:{content_key(source.SeriesInstanceUID, all_instances)}"]
    spool = stack.root / "spool"
    assert list((spool / ".incoming").iterdir()) == [] and list((spool / ".receiving").iterdir()) == []


def test_results_of_jobs_scored_while_the_pacs_is_down_all_arrive_once(stack, slide, tmp_path):
    slides = [copy_slide(slide[0], tmp_path / f"slide-{i}", f"PACS-DOWN-{i}") for i in range(2)]
    series = [header(files).SeriesInstanceUID for files in slides]
    outbox = stack.root / "outbox"
    stack.orthanc.stop()
    stack.start_listener()
    worker = stack.start_worker()
    for files in slides:
        send(stack, files)
    wait_until(lambda: all(stack.job_state(s) == "delivering" and len(list((outbox / s).glob("*.dcm"))) == 2
                           for s in series), JOB_TIMEOUT, "both jobs' results waiting in the outbox", interval=0.5)

    worker.stop()  # results in the outbox survive a worker restart while the PACS is still down
    stack.start_worker()
    stack.orthanc.start()
    for s in series:
        wait_done(stack, s)
    for files in slides:
        assert_one_result_set(stack, files, slide[1])
    assert stack.orthanc.get("/statistics")["CountInstances"] == 4
    assert [p for p in outbox.rglob("*.dcm")] == []
    assert [times_scored(stack, s) for s in series] == [1, 1]


def test_job_failing_every_time_is_parked_with_its_reason_after_its_last_retry(stack, slide, tmp_path):
    files = copy_slide(slide[0], tmp_path / "slide", "PARKED-1")
    series = header(files).SeriesInstanceUID
    broken = tmp_path / "broken.onnx"  # a damaged model file: every attempt fails the same way
    broken.write_bytes(b"not an ONNX model")
    card_path(broken).write_bytes(card_path(BUNDLED_MODEL).read_bytes())
    stack.start_listener()
    worker = stack.start_worker(HER2_MODEL_PATH=str(broken))  # 2 retries, backoff at most 2 s (service_env)
    send(stack, files)
    wait_until(lambda: stack.job_state(series) == "parked", JOB_TIMEOUT, "the job to be parked", interval=0.5)

    reason = stack.job(series)["reason"]
    assert reason.startswith("gave up after 2 retries: ") and "INVALID_PROTOBUF" in reason
    assert worker.log().count("Retry in") == 2
    status = subprocess.run(her2("status", series), env=stack.env(), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith(f"{series}: parked (")
    assert f" - {reason}" in status.stdout
    assert results_in_study(stack.orthanc, header(files).StudyInstanceUID) == {}
    assert broker(stack).llen("celery") == 0 and broker(stack).hlen("unacked") == 0
