"""The listener against real clients (dcmtk, pynetdicom) and real Redis/Orthanc; no scoring needed."""

from __future__ import annotations

import json
import subprocess
import time

import pydicom
import pytest
import redis as redis_client
from pacs_stack import LISTENER_AET, associate, binary, her2, tiny_ct, tiny_dataset, tiny_wsi, wait_until
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage, Verification, VLWholeSlideMicroscopyImageStorage

from dicom_io.sender import Outbox
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec
from worker.jobs import JobState, RedisJobStore

pytestmark = pytest.mark.integration


def redis_keys(stack, pattern: str) -> list[str]:
    return redis_client.Redis(port=stack.redis.port, db=2, decode_responses=True).keys(pattern)


def test_c_echo_and_calling_ae_allow_list_with_dcmtk(stack):
    stack.start_listener()
    echoscu = binary("echoscu")
    ok = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", LISTENER_AET, "127.0.0.1", str(stack.listener_port)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run([echoscu, "-v", "-aet", "INTRUDER", "-aec", LISTENER_AET, "127.0.0.1",
                              str(stack.listener_port)], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    wait_until(lambda: "association from INTRUDER" in stack.logs(), 10, "the rejection in the listener log")
    assert "rejected (Rejected Permanent, Service User): Calling AE title not recognised" in stack.logs()


def test_unknown_calling_ae_gets_a_associate_rj_with_reason(stack):
    stack.start_listener()
    received = []
    assoc = associate(stack.listener_port, calling="INTRUDER",
                      handlers=[(evt.EVT_ACSE_RECV, lambda event: received.append(event.primitive))])
    assert assoc.is_rejected
    rj = received[-1]
    # PS3.8 7.1.1.9: rejected-permanent (1), source service-user (1), reason calling AE not recognized (3)
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


def test_ct_image_is_refused_with_logged_reason_and_no_job(stack, tmp_path):
    stack.start_listener()
    assoc = associate(stack.listener_port, contexts=(CTImageStorage, Verification))
    assert assoc.is_established
    ct_context = next(cx for cx in assoc.rejected_contexts if cx.abstract_syntax == CTImageStorage)
    assert ct_context.result == 0x03  # abstract syntax not supported (PS3.8 9.3.3.2)
    with pytest.raises(ValueError, match="No presentation context"):
        assoc.send_c_store(tiny_ct())
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    ct_file = tmp_path / "ct.dcm"
    tiny_ct().save_as(ct_file, enforce_file_format=True)
    storescu = subprocess.run([binary("storescu"), "-aet", "STORESCU", "-aec", LISTENER_AET, "127.0.0.1",
                               str(stack.listener_port), str(ct_file)], capture_output=True, text=True, timeout=30)
    assert storescu.returncode != 0

    time.sleep(3)  # longer than stable_seconds: a job would have been queued by now
    assert "1.2.840.10008.5.1.4.1.1.2 (abstract syntax (SOP class) not supported)" in stack.logs()
    spool = stack.root / "spool"
    assert not [p for p in spool.rglob("*.dcm")] if spool.exists() else True
    assert redis_keys(stack, "her2:*") == []


def test_slide_spooled_atomically_and_queued_once_with_dcmtk(stack, tmp_path):
    stack.start_listener()  # no worker: the job stays queued, which is what we look at
    files, _ = write_synthetic_slide(SlideSpec(seed=31, width_um=1024, height_um=1024, class_mix={"3+": 1.0},
                                               patient_id="SPOOL-1"), tmp_path / "slide")
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in files}
    first = next(iter(sources.values()))
    study, series = first.StudyInstanceUID, first.SeriesInstanceUID

    storescu = [binary("storescu"), "--required", "--propose-jpeg8", "-aet", "STORESCU", "-aec", LISTENER_AET, "127.0.0.1", str(stack.listener_port)]
    run = subprocess.run([*storescu, *map(str, files)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    series_dir = stack.root / "spool" / study / series
    assert sorted(p.stem for p in series_dir.glob("*.dcm")) == sorted(sources)
    assert list((stack.root / "spool" / ".incoming").glob("*")) == []
    for sop_uid, source in sources.items():
        spooled = pydicom.dcmread(series_dir / f"{sop_uid}.dcm")
        assert spooled.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
        assert spooled.PixelData == source.PixelData
        assert spooled.SOPClassUID == VLWholeSlideMicroscopyImageStorage

    wait_until(lambda: stack.job_state(series) == "queued", 15, "the series to be queued")
    status = subprocess.run(her2("status", series), env=stack.env(), capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and f"{series}: queued" in status.stdout and "3 instances" in status.stdout

    # The same series again (what a PACS re-routing it would do): no second job.
    run = subprocess.run([*storescu, *map(str, files)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    wait_until(lambda: "already had its job" in stack.logs(), 15, "the duplicate to be recognised")
    broker = redis_client.Redis(port=stack.redis.port, db=0)
    assert broker.llen("celery") == 1
    assert len(redis_keys(stack, f"her2:claim:{series}:*")) == 1
    message = json.loads(broker.lindex("celery", 0))
    assert message["headers"]["task"] == "her2.score_slide"
    assert message["headers"]["argsrepr"] == repr((str(series_dir), series))


def test_spool_write_failure_is_out_of_resources_and_listener_keeps_serving(stack, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool's parent should be")
    stack.start_listener(HER2_SPOOL_DIR=str(blocker / "spool"))
    assoc = associate(stack.listener_port)
    assert assoc.is_established
    ds = tiny_wsi()
    assert assoc.send_c_store(ds).Status == 0xA700  # PS3.4 B.2.3 Refused: Out of Resources
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert "refused (out of resources)" in stack.logs()


def test_bad_uid_is_cannot_understand(stack):
    stack.start_listener()
    assoc = associate(stack.listener_port)
    ds = tiny_wsi(series_uid="1.2.3.4/../../etc")
    assert assoc.send_c_store(ds).Status == 0xC000
    assoc.release()
    assert not (stack.root / "spool").exists() or not list((stack.root / "spool").rglob("*.dcm"))


def test_results_wait_in_outbox_while_pacs_is_down_and_arrive_after(stack):
    source_series = generate_uid()
    results = [tiny_dataset(SecondaryCaptureImageStorage, "OUTBOX-1", generate_uid(), generate_uid(), "OT")
               for _ in range(2)]
    stack.orthanc.stop()
    outbox = Outbox(stack.root / "outbox")
    outbox.put(source_series, results)
    RedisJobStore(stack.redis.url(2)).set_status(source_series, JobState.DELIVERING, "test results")
    stack.start_worker()
    wait_until(lambda: stack.logs().count("no association with ORTHANC") >= 2, 30, "two failed delivery rounds")
    assert len(outbox.pending(source_series)[source_series]) == 2
    assert stack.job_state(source_series) == "delivering"

    stack.orthanc.start()
    wait_until(lambda: stack.job_state(source_series) == "done", 30, "delivery after the PACS came back")
    assert outbox.pending() == {}
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in stack.orthanc.find("Instance", {"PatientID": "OUTBOX-1"})}
    assert stored == {ds.SOPInstanceUID for ds in results}
    status = subprocess.run(her2("status", source_series), env=stack.env(), capture_output=True, text=True,
                            timeout=60)
    assert f"{source_series}: done" in status.stdout and "2 result instance(s) delivered" in status.stdout
