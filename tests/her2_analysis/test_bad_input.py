"""Bad input is refused or flagged with one clear reason, never a crash (issue 5, "Bad input").

The command line turns a refusal into one line on stderr and exit status 2;
the reader and the pipeline raise :class:`SlideError` with the exact reason,
which the service records as the job's *failed* reason.
"""

import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)
from pynetdicom.presentation import build_context, negotiate_as_acceptor

from dicom_io import wsi
from dicom_io.errors import SlideError
from dicom_io.listener import CANNOT_UNDERSTAND, SUCCESS, StorageHandlers, build_ae
from dicom_io.spool import receiving_marker
from dicom_io.transfer_syntax import TRANSFER_SYNTAXES
from dicom_io.wsi import open_slide
from her2_analysis.pipeline import score_slide
from her2_core.aggregate import SlideCall
from worker.settings import load_settings


def run_score(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "her2_cli.main", "score", str(path), "-q"], capture_output=True,
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


def c_store_event(path: Path, sop_class: str, sop_uid: str) -> SimpleNamespace:
    """What pynetdicom hands the C-STORE handler: the received file and the request's UIDs."""
    return SimpleNamespace(
        dataset_path=path,
        request=SimpleNamespace(AffectedSOPClassUID=sop_class, AffectedSOPInstanceUID=sop_uid),
        assoc=SimpleNamespace(requestor=SimpleNamespace(ae_title="SENDER")),
    )


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


# --- the reader and the pipeline on damaged or odd series (each asserts the exact reason) -----------------------

def series_copy(tmp_path: Path, source: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.json"))
    return folder


def edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        if value is None:
            delattr(ds, key)
        elif key == "TransferSyntaxUID":
            ds.file_meta.TransferSyntaxUID = value
        else:
            setattr(ds, key, value)
    ds.save_as(path)


def not_a_jpeg(frame: bytes) -> bytes:
    return b"\x00 not a JPEG frame " * 8


def replace_frames(path: Path, indices, damage=not_a_jpeg) -> int:
    """Replace the given JPEG frames with ``damage(frame)`` (default: bytes that are no image); returns the count."""
    ds = pydicom.dcmread(path)
    frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    for i in indices(len(frames)):
        frames[i] = damage(frames[i])
    ds.PixelData = encapsulate(frames)
    ds.save_as(path)
    return len(frames)


@pytest.mark.parametrize("syntax, shown", [
    (RLELossless, "RLE Lossless (1.2.840.10008.1.2.5)"),
    (DeflatedExplicitVRLittleEndian, "Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99)"),
    ("1.2.3.4.5.6", "'1.2.3.4.5.6'"),
])
def test_unsupported_transfer_syntax_is_refused_by_the_reader(tmp_path, slides, syntax, shown):
    folder = series_copy(tmp_path, slides["3+"], "syntax")
    edit(folder / "level-1.dcm", TransferSyntaxUID=syntax)
    with pytest.raises(SlideError) as refused:
        open_slide(folder)
    assert str(refused.value) == (f"level-1.dcm: transfer syntax {shown} is not supported "
                                  "(uncompressed, JPEG, JPEG-LS, JPEG 2000 or HTJ2K)")


def test_listener_refuses_unsupported_transfer_syntaxes_and_accepts_the_readers():
    """Presentation context negotiation (PS3.8 9.3.3.2): result 4 when no proposed transfer syntax is supported."""
    ae = build_ae("HER2WORKER", ["PACS"], timeout=5, max_associations=1)
    proposed = []
    for i, syntaxes in enumerate(([RLELossless, DeflatedExplicitVRLittleEndian], [JPEGBaseline8Bit, RLELossless],
                                  [JPEGLSLossless]), start=0):
        cx = build_context(VLWholeSlideMicroscopyImageStorage, syntaxes)
        cx.context_id = 2 * i + 1
        proposed.append(cx)
    accepted, _ = negotiate_as_acceptor(proposed, ae.supported_contexts)
    results = {cx.context_id: (cx.result, cx.transfer_syntax) for cx in accepted}
    assert results[1][0] == 0x04
    assert results[3] == (0x00, [JPEGBaseline8Bit])
    assert results[5] == (0x00, [JPEGLSLossless])
    wsi_context = next(cx for cx in ae.supported_contexts if cx.abstract_syntax == VLWholeSlideMicroscopyImageStorage)
    assert set(wsi_context.transfer_syntax) == set(TRANSFER_SYNTAXES)


def test_level_far_from_the_models_magnification_is_refused(tmp_path, slides):
    folder = series_copy(tmp_path, slides["3+"], "only-4um")
    for level in ("level-0.dcm", "level-1.dcm"):
        (folder / level).unlink()
    with pytest.raises(SlideError) as refused:
        score_slide(folder, load_settings().scoring_options())
    assert str(refused.value) == ("missing pyramid level: none within 15% of 1 um/px, the model's magnification "
                                  "(the slide has 4 um/px); none is finer to resample from")


def test_series_without_image_and_organization_type_gets_them_from_its_levels(tmp_path, slides):
    """OrthancWSIDicomizer writes no Image Type or Dimension Organization Type (see design notes)."""
    folder = series_copy(tmp_path, slides["3+"], "dicomizer")
    for path in sorted(folder.glob("level-*.dcm")):
        edit(path, ImageType=None, DimensionOrganizationType=None)
    with open_slide(folder) as slide:
        assert [lvl.width for lvl in slide.levels] == [2048, 1024, 512]
        assert list(slide.level_dataset(0).ImageType) == ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        assert list(slide.level_dataset(2).ImageType) == ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        assert slide.level_dataset(1).DimensionOrganizationType == "TILED_FULL"


def test_series_whose_frames_imply_no_organization_says_what_is_missing(tmp_path, slides):
    folder = series_copy(tmp_path, slides["3+"], "dicomizer")
    edit(folder / "level-0.dcm", DimensionOrganizationType=None, NumberOfFrames=3)  # 16 tiles, no plane positions
    with pytest.raises(SlideError) as refused:
        open_slide(folder)
    assert str(refused.value) == ("level-0.dcm: VL WSM instance lacks DimensionOrganizationType "
                                  "(needed to place it in the pyramid)")


def test_series_without_low_resolution_levels_is_refused_before_reading_it_whole(tmp_path, slides, monkeypatch):
    folder = series_copy(tmp_path, slides["3+"], "base-only")
    for level in ("level-1.dcm", "level-2.dcm"):
        (folder / level).unlink()
    monkeypatch.setattr(wsi, "MAX_THUMBNAIL_SOURCE_PIXELS", 2**20)  # the 2048 x 2048 base stands for a huge one
    with open_slide(folder) as slide, pytest.raises(SlideError) as refused:
        slide.thumbnail(8.0)
    assert str(refused.value) == ("missing pyramid levels: the coarsest level at least as fine as 8.0 um/px is "
                                  "2048 x 2048 px at 1 um/px, more than 1 Mpx to read whole; the series needs "
                                  "lower-resolution levels")


@pytest.mark.parametrize("damage", [not_a_jpeg, lambda frame: frame[: len(frame) * 2 // 3]],
                         ids=["not-a-jpeg", "truncated"])
def test_a_few_corrupt_tiles_are_skipped_and_flagged(tmp_path, slides, damage):
    """A truncated frame counts as corrupt too: libjpeg-turbo would decode it silently (grey lower part)."""
    folder = series_copy(tmp_path, slides["mixed"], "one-corrupt")
    replace_frames(folder / "level-0.dcm", lambda n: [n // 2 + 4], damage)  # a tile in the middle of the tissue
    result, clean = score_slide(folder, load_settings().scoring_options()), score_slide(slides["mixed"], load_settings().scoring_options())
    assert (result.stats["tiles_corrupt"], clean.stats["tiles_corrupt"]) == (1, 0)
    assert result.stats["tiles_scored"] == clean.stats["tiles_scored"] - 1
    assert "1 corrupt tile(s) skipped" in result.score.flags
    assert result.score.call is not SlideCall.NOT_ASSESSABLE


def test_many_corrupt_tiles_fail_the_slide(tmp_path, slides):
    folder = series_copy(tmp_path, slides["mixed"], "all-corrupt")
    replace_frames(folder / "level-0.dcm", range)
    with pytest.raises(SlideError, match=r"^(\d+) of \1 tissue tiles could not be decoded: slide is corrupt$"):
        score_slide(folder, load_settings().scoring_options())


def test_undecodable_low_resolution_level_is_refused(tmp_path, slides):
    folder = series_copy(tmp_path, slides["3+"], "bad-thumbnail-level")
    replace_frames(folder / "level-2.dcm", range)
    with open_slide(folder) as slide, pytest.raises(SlideError) as refused:
        slide.thumbnail(8.0)
    assert str(refused.value).startswith("pyramid level 2 could not be decoded at (0, 0) (")


def test_absurd_dimensions_are_refused_with_memory_bounded(tmp_path, slides):
    folder = series_copy(tmp_path, slides["3+"], "absurd")
    edit(folder / "level-1.dcm", TotalPixelMatrixColumns=10**7, TotalPixelMatrixRows=10**7)
    tracemalloc.start()
    try:
        with pytest.raises(SlideError) as refused:
            open_slide(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(refused.value) == ("level-1.dcm: absurd dimensions 10000000 x 10000000 px in 512 x 512 tiles "
                                  "(more than 2097152 px a side)")
    assert peak < 32 * 2**20


def test_tiled_full_frame_count_must_match_the_total_pixel_matrix(tmp_path, slides):
    folder = series_copy(tmp_path, slides["3+"], "frames")
    edit(folder / "level-1.dcm", TotalPixelMatrixColumns=100_000, TotalPixelMatrixRows=100_000)
    with pytest.raises(SlideError) as refused:
        open_slide(folder)
    assert str(refused.value) == ("level-1.dcm: TILED_FULL 100000 x 100000 px in 512 x 512 tiles needs 38416 "
                                  "frames, the file has 4")


def test_duplicate_instance_is_read_once(tmp_path, slides):
    folder = series_copy(tmp_path, slides["3+"], "duplicate")
    shutil.copy(folder / "level-0.dcm", folder / "level-0-again.dcm")
    with open_slide(folder) as slide:
        assert len(slide.headers) == 3
        assert len({ds.SOPInstanceUID for ds in slide.headers.values()}) == 3
        assert [(lvl.width, lvl.mpp) for lvl in slide.levels] == [(2048, 1.0), (1024, 2.0), (512, 4.0)]


def test_different_files_with_one_sop_instance_uid_are_refused(tmp_path, slides):
    folder = series_copy(tmp_path, slides["3+"], "uid-clash")
    level0 = pydicom.dcmread(folder / "level-0.dcm", stop_before_pixels=True)
    edit(folder / "level-1.dcm", SOPInstanceUID=level0.SOPInstanceUID)
    with pytest.raises(SlideError) as refused:
        open_slide(folder)
    assert str(refused.value) == ("level-0.dcm and level-1.dcm are different files with the same SOPInstanceUID: "
                                  "refusing an ambiguous series")


@pytest.mark.parametrize("key, value", [("PatientID", "SOMEONE-ELSE"), ("PatientName", "OTHER^PATIENT"),
                                        ("StudyInstanceUID", "1.2.826.0.1.3680043.10.1.5")])
def test_conflicting_identity_inside_one_series_is_refused(tmp_path, slides, key, value):
    folder = series_copy(tmp_path, slides["3+"], "identity")
    edit(folder / "level-2.dcm", **{key: value})
    with pytest.raises(SlideError) as refused:
        score_slide(folder, load_settings().scoring_options())
    assert str(refused.value) == f"instances disagree on {key} (2 different values): refusing to mix slides"


def test_series_spooled_under_another_study_is_refused_by_the_listener(tmp_path, slides):
    """One Series Instance UID arriving under two studies: the second study's instances get 0xC000, unspooled."""
    level = slides["3+"] / "level-1.dcm"
    ds = pydicom.dcmread(level, stop_before_pixels=True)
    other_study = tmp_path / "other-study.dcm"
    edit(shutil.copy(level, other_study), StudyInstanceUID="1.2.826.0.1.3680043.10.1.6", SOPInstanceUID="1.2.3.4.5")
    spooled = []
    handlers = StorageHandlers(tmp_path / "spool", lambda *args: spooled.append(args), lambda *args: None)
    marker = receiving_marker(tmp_path / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID)
    marker.parent.mkdir(parents=True)
    marker.touch()  # the series is being received: its marker is no other study
    assert handlers.handle_store(c_store_event(level, ds.SOPClassUID, ds.SOPInstanceUID)) == SUCCESS
    assert handlers.handle_store(c_store_event(other_study, ds.SOPClassUID, "1.2.3.4.5")) == CANNOT_UNDERSTAND
    assert [p.relative_to(tmp_path / "spool").parts[:2] for p in (tmp_path / "spool").glob("*/*/*.dcm")] == [
        (ds.StudyInstanceUID, ds.SeriesInstanceUID)]
    assert len(spooled) == 1
