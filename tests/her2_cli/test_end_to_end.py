"""Score synthetic DICOM slides end to end with the bundled default model and check the results."""

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_io.sr import read_sr_call
from her2_analysis.pipeline import score_slide
from her2_cli.outputs import write_outputs
from her2_core.aggregate import CLASSES, SlideCall
from worker.settings import load_settings


@pytest.fixture(scope="module")
def scored(slides):
    options = load_settings().scoring_options()
    return {name: score_slide(folder, options) for name, folder in slides.items()}


@pytest.fixture(scope="module")
def written(scored, tmp_path_factory):
    """The files `her2 score` writes for each scored slide, by slide name."""
    root = tmp_path_factory.mktemp("results")
    return {name: write_outputs(result, root / name) for name, result in scored.items()}


def truth(folder):
    return json.loads((folder / "ground_truth.json").read_text())


def test_clear_cut_slides_get_the_right_call(scored, slides):
    assert truth(slides["0"])["call"] == "0" and truth(slides["3+"])["call"] == "3+"
    assert scored["0"].score.call is SlideCall.ZERO
    assert scored["3+"].score.call is SlideCall.THREE
    assert not scored["0"].score.reflex_ish


def test_mixed_slide_percentages_within_10_points(scored, slides):
    expected = truth(slides["mixed"])["percentages"]
    got = scored["mixed"].score.percentages
    for c in CLASSES:
        assert abs(got[c] - expected[c]) <= 10.0, (c, got, expected)


def test_result_objects_read_back(scored, written, slides):
    for name, result in scored.items():
        files = {p.name: p for p in written[name]}
        sr = pydicom.dcmread(files["her2_sr.dcm"])
        seg = pydicom.dcmread(files["her2_heatmap_seg.dcm"])
        source = pydicom.dcmread(slides[name] / "level-0.dcm", stop_before_pixels=True)
        expected = {SlideCall.ULTRALOW: "0", SlideCall.NOT_ASSESSABLE: "Indeterminate"}
        assert read_sr_call(sr) == expected.get(result.score.call, result.score.call.value)
        for ds in (sr, seg):
            assert ds.PatientID == source.PatientID
            assert ds.PatientName == source.PatientName
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        referenced = {
            inst.ReferencedSOPInstanceUID
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for inst in series.ReferencedSOPSequence
        }
        source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in slides[name].glob("*.dcm")}
        evidence = {ds.SOPInstanceUID for ds in result.datasets if ds is not result.datasets[0]}  # SEG (and ANN)
        assert seg.SOPInstanceUID in evidence
        assert referenced - evidence and referenced - evidence <= source_uids
        assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
        # The heatmap's pixels tile each scored tile (step scored-level pixels each, step | tile size, 8..128 per
        # tile) and, where the pyramid has such a level, share that level's pixel grid.
        grid = result.score.grid
        spacing = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
        step = round(spacing[0] / grid.pixel_spacing_mm[0])
        assert spacing == pytest.approx([step * grid.pixel_spacing_mm[0]] * 2)
        assert grid.tile_size % step == 0 and 8 <= grid.tile_size // step <= 128
        assert seg.TotalPixelMatrixRows >= (grid.rows - 1) * grid.tile_size // step
        assert seg.TotalPixelMatrixColumns >= (grid.cols - 1) * grid.tile_size // step
        levels = [pydicom.dcmread(p, stop_before_pixels=True) for p in slides[name].glob("*.dcm")]
        same = [ds for ds in levels if float(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                                             .PixelSpacing[0]) == pytest.approx(spacing[0], rel=1e-6)]
        assert not same or (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns) == \
            (same[0].TotalPixelMatrixRows, same[0].TotalPixelMatrixColumns)


def test_heatmap_holds_tile_probabilities(scored, written):
    result = scored["mixed"]
    files = {p.name: p for p in written["mixed"]}
    seg = hd.seg.segread(files["her2_heatmap_seg.dcm"])
    grid = result.score.grid
    step = round(float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
                 / grid.pixel_spacing_mm[0])
    per_tile = grid.tile_size // step
    probs = np.nan_to_num(result.score.probabilities)
    for k in range(len(CLASSES)):
        tpm = seg.get_total_pixel_matrix(segment_numbers=[k + 1], combine_segments=False)[..., 0]
        expected = np.repeat(np.repeat(probs[..., k], per_tile, axis=0), per_tile, axis=1)
        rows, cols = min(tpm.shape[0], expected.shape[0]), min(tpm.shape[1], expected.shape[1])
        assert np.abs(tpm[:rows, :cols] - expected[:rows, :cols]).max() <= 1 / 255 + 1e-6
        assert not tpm[rows:].any() and not tpm[:, cols:].any()


def test_scoring_twice_gives_identical_uids(scored, slides, tmp_path):
    again = score_slide(slides["3+"], load_settings().scoring_options())
    write_outputs(again, tmp_path)
    first = scored["3+"]
    for a, b in zip(first.datasets, again.datasets):
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["call"] == first.score.call.value
    assert "not for clinical use" in summary["intended_use"].lower()
    assert summary["model"]["precision"] == "float32"

