"""Slide source "dicomweb" without a server: what the listener keeps and what a job carries (issue 15).

The DICOMweb client itself is tested against a real Orthanc in tests/integration/test_dicomweb_stack.py.
"""

from __future__ import annotations

import io

import pydicom
import requests
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dicom_io.dicomweb import DicomWebServer, TransferCount, session
from dicom_io.listener import StorageHandlers
from dicom_io.series_tracker import SeriesTracker
from dicom_io.spool import transfer_syntaxes
from worker.jobs import FileJobStore, Job, JobState, dispatch_stable, retry_job
from worker.settings import load_settings


class _Request:
    def __init__(self, ds: pydicom.Dataset) -> None:
        self.AffectedSOPClassUID, self.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID


class _Event:
    """The parts of a pynetdicom C-STORE event the handler reads."""

    def __init__(self, path, ds: pydicom.Dataset) -> None:
        self.dataset_path, self.request = path, _Request(ds)
        self.assoc = type("Assoc", (), {"requestor": type("Requestor", (), {"ae_title": "ORTHANC"})()})()


def received_instance(tmp_path, name: str, series: str, study: str) -> tuple:
    """A JPEG-baseline WSM instance with 64 kB of pixel data as pynetdicom would stream it to disk."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PixelData = ds.PixelData + bytes(64 * 1024)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def test_listener_keeps_headers_only_and_the_job_names_each_instance_transfer_syntax(tmp_path):
    spool, study, series = tmp_path / "spool", generate_uid(), generate_uid()
    tracker = SeriesTracker(stable_seconds=0)
    handlers = StorageHandlers(spool, lambda *a: tracker.note(*a[:3]), lambda *a: None, keep_pixels=False)
    sent = [received_instance(tmp_path, f"in-{i}.dcm", series, study) for i in range(2)]
    for path, ds in sent:
        assert handlers.handle_store(_Event(path, ds)) == 0x0000
    folder = spool / study / series
    for path, ds in sent:
        kept = folder / f"{ds.SOPInstanceUID}.dcm"
        header = pydicom.dcmread(kept)
        assert "PixelData" not in header and header.SOPInstanceUID == ds.SOPInstanceUID
        assert header.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert kept.stat().st_size < path.stat().st_size - 64 * 1024

    store, queued = FileJobStore(tmp_path / "state"), []
    jobs = dispatch_stable(tracker, store, queued.append, "dicomweb")
    instances = {ds.SOPInstanceUID: JPEGBaseline8Bit for _, ds in sent}
    assert jobs == queued == [Job(str(folder), series, "dicomweb", study, instances)]
    assert transfer_syntaxes(folder) == instances

    # `her2 retry` of such a series queues the same kind of job from the headers in the spool.
    store.set_status(series, JobState.PARKED, "gave up after 2 retries: DicomWebError: ...")
    settings = load_settings(spool_dir=spool, slide_source="dicomweb")
    assert retry_job(settings, store, series, queued.append) == jobs[0]


def test_transfer_count_counts_response_bodies_streamed_or_not():
    count = TransferCount()
    for body, streamed in ((b"x" * 1000, False), (b"y" * 300, True)):
        response = requests.Response()
        response.status_code, response.raw = 200, io.BytesIO(body)
        count.hook(response)
        if streamed:
            assert b"".join(response.iter_content(100)) == body
        else:
            assert response.content == body
    assert count.stats() == {"bytes_fetched": 1300, "http_requests": 2}
    assert count.hook in session(DicomWebServer("http://pacs/dicom-web"), count).hooks["response"]
