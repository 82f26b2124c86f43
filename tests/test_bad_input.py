"""Bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_io.errors import SlideError
from dicom_io.wsi import open_slide


def run_score(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", "score", str(path), "-q"], capture_output=True,
                          text=True, timeout=120)


def ct_slice(path: Path) -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.Modality = "CT1", "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("her2: error:"), proc.stderr
    assert needle in lines[0]


def test_ct_slice_is_refused(tmp_path):
    ct_slice(tmp_path / "ct" / "ct.dcm")
    assert_one_line_error(run_score(tmp_path / "ct"), "not a VL Whole Slide Microscopy Image")


def test_folder_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    assert_one_line_error(run_score(tmp_path / "empty"), "no DICOM files found")


def test_missing_path(tmp_path):
    assert_one_line_error(run_score(tmp_path / "nowhere"), "no such file or folder")


def test_truncated_file(tmp_path, slides):
    folder = tmp_path / "truncated"
    shutil.copytree(slides["3+"], folder)
    level = folder / "level-0.dcm"
    data = level.read_bytes()
    level.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_score(folder), "truncated")


def test_mixed_series_refused(tmp_path, slides):
    folder = tmp_path / "mixed"
    shutil.copytree(slides["3+"], folder)
    shutil.copy(slides["0"] / "level-0.dcm", folder / "other.dcm")
    with pytest.raises(SlideError, match="disagree on PatientID"):
        open_slide(folder)
