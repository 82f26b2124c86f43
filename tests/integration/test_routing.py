"""End to end through the real servers: Orthanc routes a slide, a Celery worker scores it, results land back.

Orthanc (with deploy/orthanc/route_her2.lua) -> `her2 listen` -> Redis/Celery
-> `her2 worker` (the pipeline with the bundled model) -> C-STORE -> Orthanc.
All checks go through Orthanc's REST API.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
import redis as redis_client
from pacs_stack import LISTENER_AET, binary, her2, wait_until

from dicom_io.sr import read_sr_call
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec

pytestmark = pytest.mark.integration

SR, SEG = "SR", "SEG"
RESULT_TIMEOUT = 300


def synth(root: Path, seed: int, patient_id: str, grade: str, size_um: float = 2048) -> tuple[list[Path], dict]:
    files, truth = write_synthetic_slide(SlideSpec(seed=seed, width_um=size_um, height_um=size_um,
                                                   class_mix={grade: 1.0}, patient_id=patient_id),
                                         root / f"slide-{seed}")
    return files, json.loads(truth.read_text())


def source_header(files: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(files[0], stop_before_pixels=True)


def results_in_study(orthanc, study_uid: str) -> dict[str, list[str]]:
    """Orthanc instance IDs in a study, by series Modality (SM source, SR and SEG results)."""
    found: dict[str, list[str]] = {}
    for series in orthanc.find("Series", {"StudyInstanceUID": study_uid}):
        found.setdefault(series["MainDicomTags"].get("Modality"), []).extend(series["Instances"])
    return found


def wait_for_results(stack, files: list[Path]) -> dict[str, list[str]]:
    """Wait until the slide's study holds an SR and a SEG; fail at once if its job failed or was parked."""
    source = source_header(files)
    study_uid = source.StudyInstanceUID

    def both() -> dict[str, list[str]] | None:
        job = stack.job(source.SeriesInstanceUID)
        if job.get("state") in ("failed", "parked"):
            pytest.fail(f"job of series {source.SeriesInstanceUID} {job['state']}: {job['reason']}")
        results = results_in_study(stack.orthanc, study_uid)
        return results if SR in results and SEG in results else None

    return wait_until(both, RESULT_TIMEOUT, f"SR and SEG in study {study_uid}", interval=2)


def check_results(orthanc, results: dict[str, list[str]], files: list[Path], truth: dict) -> None:
    source = source_header(files)
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    assert len(results[SR]) == 1 and len(results[SEG]) == 1
    sr = orthanc.instance(results[SR][0])
    seg = orthanc.instance(results[SEG][0])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation
    for ds in (sr, seg):
        assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert read_sr_call(sr) == truth["call"]
    referenced = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert seg.SOPInstanceUID in referenced  # the SR's evidence lists its heatmap and the source instances
    assert referenced - {seg.SOPInstanceUID} and referenced - {seg.SOPInstanceUID} <= source_uids
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence} == {source.SeriesInstanceUID}


def test_routed_slide_is_scored_and_results_land_in_its_study(scoring_stack, tmp_path):
    files, truth = synth(tmp_path, seed=41, patient_id="ROUTE-3P", grade="3+")
    source = source_header(files)
    scoring_stack.orthanc.upload(files)
    results = wait_for_results(scoring_stack, files)
    check_results(scoring_stack.orthanc, results, files, truth)
    wait_until(lambda: scoring_stack.job_state(source.SeriesInstanceUID) == "done", 30, "job state done")
    assert "ROUTE-3P" not in scoring_stack.logs() and "SYNTHETIC^SLIDE" not in scoring_stack.logs()


def test_two_patients_sent_concurrently_each_get_their_own_results(scoring_stack, tmp_path):
    slides = {"CONC-A": synth(tmp_path, seed=42, patient_id="CONC-A", grade="0"),
              "CONC-B": synth(tmp_path, seed=43, patient_id="CONC-B", grade="3+")}
    uploads = [threading.Thread(target=scoring_stack.orthanc.upload, args=(files,)) for files, _ in slides.values()]
    for t in uploads:
        t.start()
    for t in uploads:
        t.join(timeout=60)
    for patient, (files, truth) in slides.items():
        study = source_header(files).StudyInstanceUID
        check_results(scoring_stack.orthanc, wait_for_results(scoring_stack, files), files, truth)
        # Every instance Orthanc holds in this study, sources and results, belongs to this patient only.
        patients_in_study = {scoring_stack.orthanc.get(f"/instances/{i['ID']}/patient")["MainDicomTags"]["PatientID"]
                             for i in scoring_stack.orthanc.find("Instance", {"StudyInstanceUID": study})}
        assert patients_in_study == {patient}
    assert {slides["CONC-A"][1]["call"], slides["CONC-B"][1]["call"]} == {"0", "3+"}


def test_same_series_stored_twice_yields_one_set_of_results(scoring_stack, tmp_path):
    files, truth = synth(tmp_path, seed=44, patient_id="TWICE-1", grade="3+")
    source = source_header(files)
    orthanc = scoring_stack.orthanc
    orthanc.upload(files)
    check_results(orthanc, wait_for_results(scoring_stack, files), files, truth)

    # Route the same series again, once from Orthanc and once from a third-party SCU.
    series_id = orthanc.find("Series", {"SeriesInstanceUID": source.SeriesInstanceUID})[0]["ID"]
    orthanc.post("/modalities/her2/store", series_id)
    subprocess.run([binary("storescu"), "--required", "--propose-jpeg8", "-aet", "STORESCU", "-aec", LISTENER_AET,
                    "127.0.0.1", str(scoring_stack.listener_port), *map(str, files)], check=True, timeout=60)
    wait_until(lambda: any(source.SeriesInstanceUID in line and "already had its job" in line
                           for line in scoring_stack.logs().splitlines()), 30,
               "the re-sent series to be recognised as already done")
    time.sleep(3)
    results = results_in_study(orthanc, source.StudyInstanceUID)
    assert len(results[SR]) == 1 and len(results[SEG]) == 1
    claims = redis_client.Redis(port=scoring_stack.redis.port, db=2).keys(f"her2:claim:{source.SeriesInstanceUID}:*")
    assert len(claims) == 1
    assert scoring_stack.job_state(source.SeriesInstanceUID) == "done"


def test_embedded_mode_scores_and_delivers_without_redis(stack, tmp_path):
    stack.start_embedded()
    files, truth = synth(tmp_path, seed=45, patient_id="EMBED-1", grade="0")
    source = source_header(files)
    stack.orthanc.upload(files)
    check_results(stack.orthanc, wait_for_results(stack, files), files, truth)
    def status() -> str:
        return subprocess.run(her2("status", "--embedded", source.SeriesInstanceUID), env=stack.env(),
                              capture_output=True, text=True, timeout=60, check=False).stdout

    assert wait_until(lambda: ": done" in status(), 30, "embedded job state done")
    assert status().startswith(f"{source.SeriesInstanceUID}: done")
    assert "EMBED-1" not in stack.logs()
