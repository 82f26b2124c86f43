"""The PACS service's plain functions, without broker or servers: spool, stability, claims, retries, outbox."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt

from dicom_io.errors import SlideError
from dicom_io.sender import Destination, Outbox
from dicom_io.series_tracker import SeriesTracker
from dicom_io.spool import (
    INCOMING,
    RECEIVING,
    SpoolPathError,
    instance_uids,
    remove_partial_files,
    spool_instance,
    write_atomic,
)
from worker import service
from worker.jobs import FileJobStore, Job, JobState, content_key, dispatch_stable
from worker.settings import load_settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def result_dataset(sop_uid: str | None = None) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "P", generate_uid(), generate_uid(), "OT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


# --- spool -------------------------------------------------------------------

@pytest.fixture
def received(tmp_path_factory):
    """A file as pynetdicom leaves it for the C-STORE handler, outside the spool."""
    path = tmp_path_factory.mktemp("received") / "tmp123.dcm"
    path.write_bytes(b"received data set")
    return path


def test_spool_paths_are_built_from_valid_uids_only(tmp_path, received):
    path = spool_instance(tmp_path, "1.2.3", "1.2.3.4", "1.2.3.4.5", received)
    assert path == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm" and path.read_bytes() == b"received data set"
    for study, series, sop in [("1.2.3", "../../etc", "1.2"), ("1.2.3", "1.2", "/etc/passwd"),
                               ("1." + "1" * 64, "1.2", "1.3"), ("", "1.2", "1.3"), ("1.2", "1.02", "1.3")]:
        with pytest.raises(SpoolPathError):
            spool_instance(tmp_path, study, series, sop, received)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.dcm")) == ["1.2.3/1.2.3.4/1.2.3.4.5.dcm"]


def test_failed_write_leaves_old_file_and_no_partial(tmp_path, received, monkeypatch):
    path = spool_instance(tmp_path, "1.2", "1.3", "1.4", received)
    received.write_bytes(b"a newer version")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        spool_instance(tmp_path, "1.2", "1.3", "1.4", received)
    assert path.read_bytes() == b"received data set"
    assert list((tmp_path / INCOMING).iterdir()) == []
    with pytest.raises(OSError):
        write_atomic(tmp_path / "other.dcm", b"x")
    assert not (tmp_path / "other.dcm").exists()


# --- stability and one job per series content ------------------------------------

def test_series_is_stable_only_after_the_quiet_period(tmp_path):
    clock = Clock()
    tracker = SeriesTracker(stable_seconds=10, clock=clock)
    tracker.note("1.2", "1.3", tmp_path / "a")
    clock.now += 9
    tracker.note("1.2", "1.3", tmp_path / "a")  # a new instance restarts the quiet period
    clock.now += 9.9
    assert tracker.pop_stable() == []
    clock.now += 0.1
    assert [s.series_instance_uid for s in tracker.pop_stable()] == ["1.3"]
    assert tracker.pop_stable() == [] and tracker.pending() == 0


def test_rescan_tracks_spooled_series_and_skips_foreign_folders(tmp_path, received):
    spool_instance(tmp_path, "1.2", "1.3", "1.4", received)
    spool_instance(tmp_path, "1.2", "1.5", "1.6", received)
    (tmp_path / "not-a-uid" / "1.7").mkdir(parents=True)
    (tmp_path / INCOMING).mkdir(exist_ok=True)
    clock = Clock()
    tracker = SeriesTracker(stable_seconds=1, clock=clock)
    assert tracker.rescan(tmp_path) == 2
    clock.now += 1
    assert sorted(s.series_instance_uid for s in tracker.pop_stable()) == ["1.3", "1.5"]


def test_series_waits_for_its_open_association_and_an_interrupted_one_for_a_resend(tmp_path, received):
    clock = Clock()
    tracker = SeriesTracker(stable_seconds=1, clock=clock)
    folder = spool_instance(tmp_path, "1.2", "1.3", "1.4", received).parent
    marker = tmp_path / RECEIVING / "1.3"
    tracker.note("1.2", "1.3", folder, association="first")
    clock.now += 5
    assert tracker.pop_stable() == [] and marker.exists()  # the sender is still connected
    tracker.association_ended("first", released=False)  # aborted: the series may be incomplete
    clock.now += 5
    assert tracker.pop_stable() == [] and tracker.held() == ["1.3"] and marker.exists()
    tracker.note("1.2", "1.3", folder, association="resend")
    tracker.association_ended("resend", released=True)
    assert tracker.pop_stable() == []  # quiet period still counts from the last instance
    clock.now += 1
    assert [s.series_instance_uid for s in tracker.pop_stable()] == ["1.3"]
    assert tracker.held() == [] and not marker.exists()


def test_restarted_listener_holds_a_series_it_was_receiving_and_drops_partial_files(tmp_path, received):
    folder = spool_instance(tmp_path, "1.2", "1.3", "1.4", received).parent
    SeriesTracker(stable_seconds=1).note("1.2", "1.3", folder, association="killed with the listener")
    (tmp_path / INCOMING / "incoming-x.part").write_bytes(b"half of an instance")
    assert remove_partial_files(tmp_path) == 1 and list((tmp_path / INCOMING).iterdir()) == []
    clock = Clock()
    tracker = SeriesTracker(stable_seconds=1, clock=clock)
    assert tracker.rescan(tmp_path) == 1
    clock.now += 10
    assert tracker.pop_stable() == [] and tracker.held() == ["1.3"]


def test_content_key_depends_on_the_set_of_instances_only():
    assert content_key("1.2", ["1.3", "1.4"]) == content_key("1.2", ["1.4", "1.3"])
    assert content_key("1.2", ["1.3"]) != content_key("1.2", ["1.3", "1.4"])
    assert content_key("1.2", ["1.3"]).startswith("1.2:")


def test_one_job_per_series_content_even_when_sent_again(tmp_path, received):
    spool, clock, queued = tmp_path / "spool", Clock(), []
    tracker = SeriesTracker(stable_seconds=5, clock=clock)
    store = FileJobStore(tmp_path / "state")

    def receive(*sop_uids: str) -> None:
        for sop in sop_uids:
            tracker.note("1.2", "1.3", spool_instance(spool, "1.2", "1.3", sop, received).parent)
        clock.now += 5

    receive("1.3.1", "1.3.2")
    assert dispatch_stable(tracker, store, queued.append) == [Job(str(spool / "1.2" / "1.3"), "1.3")]
    receive("1.3.2", "1.3.1")  # the PACS routes the same series again
    assert dispatch_stable(tracker, store, queued.append) == []
    receive("1.3.3")  # the series really changed
    assert len(dispatch_stable(tracker, store, queued.append)) == 1
    assert len(queued) == 2 and instance_uids(spool / "1.2" / "1.3") == ["1.3.1", "1.3.2", "1.3.3"]
    assert store.get_status("1.3").state is JobState.QUEUED
    assert store.get_status("1.3").reason == "3 instances"


def test_series_goes_back_to_the_tracker_when_the_queue_is_down(tmp_path, received):
    clock = Clock()
    tracker = SeriesTracker(stable_seconds=1, clock=clock)
    store = FileJobStore(tmp_path / "state")
    folder = spool_instance(tmp_path / "spool", "1.2", "1.3", "1.4", received).parent
    tracker.note("1.2", "1.3", folder)
    clock.now += 1

    def broker_down(job: Job) -> None:
        raise ConnectionError("broker unreachable")

    assert dispatch_stable(tracker, store, broker_down) == []
    assert tracker.pending() == 1
    clock.now += 1
    queued: list[Job] = []
    assert len(dispatch_stable(tracker, store, queued.append)) == 1 and len(queued) == 1


# --- retries, failures, parking -------------------------------------------------

@pytest.fixture
def settings(tmp_path):
    return load_settings(None, task_max_retries=2, task_retry_backoff_max=3, state_dir=tmp_path / "state",
                         outbox_dir=tmp_path / "outbox", spool_dir=tmp_path / "spool")


def test_job_is_parked_with_its_reason_after_the_last_retry(settings, monkeypatch):
    def boom(job, settings, store):
        raise RuntimeError("model server exploded")

    monkeypatch.setattr(service, "run_job", boom)
    store, sleeps = FileJobStore(settings.state_dir), []
    state = service.run_with_retries(Job("/nowhere", "1.2.3"), settings, store, sleep=sleeps.append)
    assert state is JobState.PARKED and sleeps == [1, 2]
    status = store.get_status("1.2.3")
    assert status.state is JobState.PARKED
    assert status.reason == "gave up after 2 retries: RuntimeError: model server exploded"


def test_bad_input_fails_at_once_with_the_reason(settings, monkeypatch):
    def bad(job, settings, store):
        raise SlideError("level-0.dcm: truncated file")

    monkeypatch.setattr(service, "run_job", bad)
    store, sleeps = FileJobStore(settings.state_dir), []
    assert service.run_with_retries(Job("/x", "1.2.4"), settings, store, sleep=sleeps.append) is JobState.FAILED
    assert sleeps == [] and store.get_status("1.2.4").reason == "not scorable: level-0.dcm: truncated file"


def test_visibility_timeout_outlasts_the_time_limit_and_the_retry_backoff_unless_set():
    assert load_settings(task_time_limit=2100, task_retry_backoff_max=600).visibility_timeout == 2160
    assert load_settings(task_time_limit=60, task_retry_backoff_max=900).visibility_timeout == 960
    assert load_settings(broker_visibility_timeout=5).visibility_timeout == 5


def test_celery_task_is_configured_for_at_least_once_delivery():
    from worker.celery_app import app
    from worker.tasks import score_series_task

    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["visibility_timeout"] > app.conf.task_time_limit
    assert score_series_task.name == "her2.score_slide"
    assert score_series_task.autoretry_for == (Exception,) and score_series_task.dont_autoretry_for == (SlideError,)
    assert score_series_task.retry_backoff is True
    assert score_series_task.retry_on_worker_lost is True  # a pool child that dies every time ends parked


def test_celery_task_records_failed_and_parked(tmp_path):
    from worker.tasks import score_series_task

    store = FileJobStore(tmp_path)
    score_series_task._store = store
    try:
        score_series_task.on_failure(SlideError("not a WSI"), "t1", ("/spool/x", "1.2.5"), {}, None)
        score_series_task.on_failure(TimeoutError("PACS slow"), "t2", ("/spool/y", "1.2.6"), {}, None)
    finally:
        score_series_task._store = None
    assert (store.get_status("1.2.5").state, store.get_status("1.2.5").reason) == (JobState.FAILED,
                                                                                   "not scorable: not a WSI")
    assert store.get_status("1.2.6").state is JobState.PARKED
    assert store.get_status("1.2.6").reason.endswith("TimeoutError: PACS slow")


# --- outbox -------------------------------------------------------------------

def test_outbox_keeps_results_while_the_destination_is_unreachable(tmp_path):
    outbox = Outbox(tmp_path)
    paths = outbox.put("1.2.7", [result_dataset(), result_dataset()])
    report = outbox.flush(Destination("127.0.0.1", free_port(), "NOBODY", "HER2WORKER", 2))
    assert report.unreachable.startswith("no association with NOBODY")
    assert report.waiting == {"1.2.7": 2} and report.delivered == {}
    assert all(p.exists() for p in paths) and outbox.pending() == {"1.2.7": sorted(paths)}


def test_outbox_delivers_and_parks_refused_results(tmp_path):
    keep, refuse = result_dataset("1.2.8.1"), result_dataset("1.2.8.2")
    received = []

    def handle_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0xA900 if event.request.AffectedSOPInstanceUID == refuse.SOPInstanceUID else 0x0000

    scp = AE("PACS")
    scp.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    try:
        outbox = Outbox(tmp_path)
        outbox.put("1.2.8", [keep, refuse])
        report = outbox.flush(Destination("127.0.0.1", port, "PACS", "HER2WORKER", 10))
    finally:
        server.shutdown()
    assert sorted(received) == ["1.2.8.1", "1.2.8.2"]
    assert report.delivered == {"1.2.8": 1} and report.waiting == {}
    assert report.rejected == {"1.2.8": "destination answered C-STORE status 0xA900"}
    assert outbox.pending() == {}
    parked = tmp_path / ".rejected" / "1.2.8"
    assert sorted(p.name for p in parked.iterdir()) == ["1.2.8.2.dcm", "1.2.8.2.reason"]
    assert (parked / "1.2.8.2.reason").read_text() == "destination answered C-STORE status 0xA900\n"


def test_outbox_refuses_a_series_uid_that_is_a_path(tmp_path):
    with pytest.raises(SpoolPathError):
        Outbox(tmp_path).put("../escape", [result_dataset()])
    assert list(Path(tmp_path).rglob("*.dcm")) == []


# --- command line ---------------------------------------------------------------

def test_status_and_flush_outbox_commands_in_embedded_mode(tmp_path, capsys):
    from her2_cli.main import main

    config = tmp_path / "her2.json"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "outbox_dir": str(tmp_path / "outbox"),
                                  "destination_port": free_port(), "dicom_timeout_seconds": 2}))
    Outbox(tmp_path / "outbox").put("1.2.9", [result_dataset(), result_dataset()])
    FileJobStore(tmp_path / "state").set_status("1.2.9", JobState.DELIVERING, "2 result instance(s) in the outbox")

    assert main(["flush-outbox", "--embedded", "--config", str(config)]) == 1
    assert capsys.readouterr().out == "delivered 0 result instance(s); 2 still waiting\n"
    assert main(["status", "--embedded", "--config", str(config), "1.2.9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1.2.9: delivering (") and lines[0].endswith(") - 2 result instance(s) in the outbox")
    assert lines[1] == f"  2 result instance(s) waiting in {tmp_path / 'outbox'}"
    assert main(["status", "--embedded", "--config", str(config), "1.2.10"]) == 1
    assert capsys.readouterr().out == "1.2.10: no job known\n"


def test_a_series_locked_by_another_flusher_is_left_to_it(tmp_path):
    import fcntl

    received = []

    def handle_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    scp = AE("PACS")
    scp.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle_store)])
    outbox, outcomes = Outbox(tmp_path), []
    outbox.put("1.2.11", [result_dataset("1.2.11.1")])
    destination = Destination("127.0.0.1", port, "PACS", "HER2WORKER", 10)
    try:
        with open(tmp_path / "1.2.11" / ".lock", "a+b") as other_flusher:
            fcntl.flock(other_flusher, fcntl.LOCK_EX)
            report = outbox.flush(destination, on_series=lambda *args: outcomes.append(args))
            assert received == [] and outcomes == [] and report.delivered == {}
        report = outbox.flush(destination, on_series=lambda *args: outcomes.append(args))
    finally:
        server.shutdown()
    assert received == ["1.2.11.1"] and report.delivered == {"1.2.11": 1}
    assert outcomes == [("1.2.11", 1, 0, None)]
    assert not (tmp_path / "1.2.11").exists()


# --- retrying a failed or parked job ----------------------------------------------

def spooled_series(spool: Path, study: str, series: str, sop_uids: list[str]) -> Path:
    folder = spool / study / series
    folder.mkdir(parents=True)
    for uid in sop_uids:
        (folder / f"{uid}.dcm").write_bytes(b"instance")
    return folder


def test_retry_queues_a_parked_job_once_and_refuses_others(settings):
    from worker.jobs import RetryError, retry_job

    folder = spooled_series(settings.spool_dir, "1.2.20", "1.2.20.1", ["1.2.20.1.1", "1.2.20.1.2"])
    store, queued = FileJobStore(settings.state_dir), []
    key = content_key("1.2.20.1", ["1.2.20.1.1", "1.2.20.1.2"])
    assert store.claim(key)  # the first job's claim
    store.set_status("1.2.20.1", JobState.PARKED, "gave up after 2 retries: RuntimeError: boom")

    job = retry_job(settings, store, "1.2.20.1", queued.append)
    assert queued == [job] == [Job(str(folder), "1.2.20.1")]
    assert store.get_status("1.2.20.1").state is JobState.QUEUED
    assert not store.claim(key)  # claimed again by the retry: a re-send of the series gets no second job

    with pytest.raises(RetryError, match=r"^1\.2\.20\.1: job is queued, only failed or parked jobs are retried$"):
        retry_job(settings, store, "1.2.20.1", queued.append)
    with pytest.raises(RetryError, match=r"^1\.2\.21: no job known$"):
        retry_job(settings, store, "1.2.21", queued.append)
    store.set_status("1.2.22", JobState.FAILED, "not scorable: truncated file")
    with pytest.raises(RetryError, match=r"^1\.2\.22: 0 spool folders hold this series in .*, expected 1$"):
        retry_job(settings, store, "1.2.22", queued.append)
    with pytest.raises(RetryError, match="is not a valid DICOM UID"):
        retry_job(settings, store, "../1.2.20", queued.append)
    assert len(queued) == 1


def test_retry_command_rescores_a_parked_series_in_embedded_mode(tmp_path, slides, capsys):
    from her2_cli.main import main

    spool = tmp_path / "spool"
    series = pydicom.dcmread(slides["3+"] / "level-0.dcm", stop_before_pixels=True)
    folder = spool / series.StudyInstanceUID / series.SeriesInstanceUID
    folder.mkdir(parents=True)
    for level in slides["3+"].glob("level-*.dcm"):
        shutil.copy(level, folder / f"{pydicom.dcmread(level, stop_before_pixels=True).SOPInstanceUID}.dcm")
    config = tmp_path / "her2.json"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "state"), "outbox_dir": str(tmp_path / "outbox"),
                                  "spool_dir": str(spool), "destination_port": free_port(),
                                  "dicom_timeout_seconds": 2}))
    store = FileJobStore(tmp_path / "state")
    store.set_status(series.SeriesInstanceUID, JobState.PARKED, "gave up after 3 retries: OSError: disk full")

    assert main(["retry", "--embedded", "--config", str(config), series.SeriesInstanceUID]) == 0
    out = capsys.readouterr().out
    # Scored again; the destination is down, so the results wait in the outbox.
    assert out.startswith(f"{series.SeriesInstanceUID}: delivering (")
    assert out.endswith(") - results in the outbox for ORTHANC\n")
    assert len(Outbox(tmp_path / "outbox").pending()[series.SeriesInstanceUID]) == 2
    assert main(["retry", "--embedded", "--config", str(config), series.SeriesInstanceUID]) == 1
    assert capsys.readouterr().err == (f"her2: error: {series.SeriesInstanceUID}: job is delivering, only failed or "
                                       "parked jobs are retried\n")
