"""Real HER2 IHC tissue end to end: four real cores, written as DICOM by a third-party tool, through `her2 score`.

The cores (tests/data/real_her2, pathologists' scores 0, 1+, 2+ ISH-negative,
2+ ISH-positive; gastro-oesophageal adenocarcinoma) are converted by
wsidicomizer (the ``real_cores`` fixture), then scored by the command a user
runs. Expectations are what issue 12 asks, as orderings and admissible calls,
not exact percentages: four cores are for calibration and regression, never
for fitting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_io.sr import read_sr_call

ORDER = ("0", "1+", "2+ISH-", "2+ISH+")
#: Admissible default-grader calls per core (issue 12, "Done when").
ADMISSIBLE = {"0": {"0", "0 (ultralow)"}, "2+ISH-": {"1+", "2+"}, "2+ISH+": {"2+", "3+"}}


def expected_score(percentages: dict[str, float]) -> float:
    """0 x p0 + 1 x p1 + 2 x p2 + 3 x p3 of class percentages (as fractions): a continuous HER2 score."""
    return sum(k * percentages[c] / 100.0 for k, c in enumerate(("0", "1+", "2+", "3+")))


@pytest.fixture(scope="module")
def scored(real_cores: dict[str, Path], tmp_path_factory) -> dict[str, dict]:
    """summary.json of `her2 score` on each real core, with the SR's call."""
    out = {}
    for label in ORDER:
        result_dir = tmp_path_factory.mktemp(label.replace("+", "p"))
        run = subprocess.run([sys.executable, "-m", "her2_cli.main", "score", str(real_cores[label]), "--out",
                              str(result_dir), "--quiet"], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        assert "Traceback" not in run.stderr
        summary = json.loads((result_dir / "summary.json").read_text())
        summary["sr_call"] = read_sr_call(pydicom.dcmread(result_dir / "her2_sr.dcm"))
        out[label] = summary
    for label, s in out.items():
        m = s["graders"]["membrane"]
        print(f"{label}: call {s['call']}, membrane {m['call']} {m['percentages']} cells {m['tumour_cells']} "
              f"connectivity {m['connectivity']:.3f}; CNN {s['graders']['cnn']['call']}")
    return out


def test_real_cores_are_assessable_without_blur_or_stain_flags(scored: dict[str, dict]) -> None:
    for label, s in scored.items():
        assert s["call"] != "not assessable", (label, s["flags"])
        flags = " ".join(s["flags"])
        assert "out of focus" not in flags, (label, flags)
        assert "stain outside the training distribution" not in flags, (label, flags)
        assert s["stats"]["membrane_mpp"] <= 0.5, label
        assert sum(s["graders"]["membrane"]["tumour_cells"].values()) >= 1000, label


def test_membrane_grader_orders_the_cores(scored: dict[str, dict]) -> None:
    """0 core lowest, 2+ ISH-positive highest, on connectivity and on the expected score of the cell percentages."""
    for measure in ("connectivity", "expected"):
        values = {label: (s["graders"]["membrane"]["connectivity"] if measure == "connectivity"
                          else expected_score(s["graders"]["membrane"]["percentages"]))
                  for label, s in scored.items()}
        middle = (values["1+"], values["2+ISH-"])
        assert values["0"] < min(middle), (measure, values)
        assert values["2+ISH+"] > max(middle), (measure, values)


def test_default_grader_calls_are_admissible(scored: dict[str, dict]) -> None:
    for label, admissible in ADMISSIBLE.items():
        s = scored[label]
        assert s["call"] in admissible, (label, s["call"], s["graders"])
        assert s["sr_call"] == {"0 (ultralow)": "0"}.get(s["call"], s["call"]), label


#: Issue 13: percentages within 2 points across writers. Measured on the 2+ ISH+ core (session 20): wsidicomizer
#: JPEG 4:2:2 (the fixture), ours and OrthancWSIDicomizer (JPEG 4:2:0, which decode to the same base pixels) and
#: highdicom lossless spread by at most 1.5 points (1+ 27.5-29.0 %, 3+ 26.6-28.0 %). It was 6.3 points while fields
#: were read from each writer's own 0.5 um/px level and unmixed with the CNN's stain fit on its 1 um/px level.
WRITER_SPREAD_POINTS = 2.0


def test_membrane_grader_call_does_not_depend_on_the_writer(scored: dict[str, dict], tmp_path: Path) -> None:
    """The 2+ ISH+ core written by our writer (JPEG 4:2:0), by OrthancWSIDicomizer (TILED_SPARSE, no ImageType) and
    by highdicom (lossless, a 0.25 / 1 / 4 um/px pyramid with no 0.5 um/px level) gets the membrane call and, within
    2 points, the cell percentages of the wsidicomizer series. Fields come from each slide's scanned (0.25 um/px)
    level, and the stains and counterstain strength from those fields, so no writer's derived levels count."""
    from pydicom.uid import ExplicitVRLittleEndian

    from dicom_io.wsi_writer import SlideIdentity, write_wsi
    from her2_analysis.pipeline import score_slide
    from tests.conftest import real_core_rgb
    from tests.third_party import highdicom_write, orthanc_dicomize
    from worker.settings import load_settings

    reference = scored["2+ISH+"]["graders"]["membrane"]
    rgb = real_core_rgb("2+ISH+")
    height, width = rgb.shape[:2]
    ours = tmp_path / "ours"
    write_wsi(lambda x, y, w, h: rgb[y : y + h, x : x + w], width, height, 0.25, SlideIdentity.synthetic(2, "W"), ours)
    lossless = highdicom_write(rgb, 0.25, tmp_path / "highdicom", tile_size=512, downsamples=(1, 4, 16),
                               transfer_syntax=ExplicitVRLittleEndian)
    orthanc = orthanc_dicomize(rgb, 0.25, tmp_path / "orthanc", tile_size=512, levels=6)
    for series in (ours, orthanc, lossless):
        result = score_slide(series, load_settings().scoring_options())
        assert result.decided_by == "membrane" and result.cells is not None, series.name
        assert result.cells.level.mpp == pytest.approx(0.5), series.name
        assert result.stats["membrane_source_mpp"] == pytest.approx(0.25), series.name
        percentages = result.cells.summary.percentages
        assert result.score.call.value == reference["call"], (series.name, percentages, reference)
        assert percentages == pytest.approx(reference["percentages"], abs=WRITER_SPREAD_POINTS), series.name
        cells = result.cells.summary.tumour_cells
        assert abs(cells - sum(reference["tumour_cells"].values())) < 0.05 * cells, series.name


@pytest.mark.parametrize(("label", "h_scale"), [("1+", 0.6), ("2+ISH-", 1.5)])
def test_a_lighter_or_darker_counterstain_keeps_the_call_and_the_tumour_cells(label: str, h_scale: float,
                                                                              tmp_path: Path) -> None:
    """Another lab's haematoxylin: the core's haematoxylin rescaled (HED colour space) is graded like the core.

    Both are written the same way (HED round trip, our writer); the rescaled one must keep the call and most of its
    tumour cells, the counterstain gain making up most of the rescaling (measured: gain x1.38 for H x0.6, x0.73 for
    H x1.5; cells 0.72x and 1.26x). Without the gain the 1+ core at 0.6x kept 377 of its tumour cells (a quarter) and
    the 2+ ISH- core at 1.5x was called 0 (ultralow).
    """
    import numpy as np
    from skimage.color import hed2rgb, rgb2hed

    from dicom_io.wsi_writer import SlideIdentity, write_wsi
    from her2_analysis.pipeline import score_slide
    from tests.conftest import real_core_rgb
    from worker.settings import load_settings

    source = rgb2hed(real_core_rgb(label))
    results = {}
    for scale in (1.0, h_scale):
        hed = source.copy()
        hed[..., 0] *= scale
        rgb = (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)
        series = tmp_path / f"h{scale}"
        write_wsi(lambda x, y, w, h, rgb=rgb: rgb[y : y + h, x : x + w], rgb.shape[1], rgb.shape[0], 0.25,
                  SlideIdentity.synthetic(4, "H"), series)
        results[scale] = score_slide(series, load_settings().scoring_options())
    reference, result = results[1.0], results[h_scale]
    assert result.decided_by == reference.decided_by == "membrane", result.score.flags
    assert result.score.call == reference.score.call, (result.cells.summary.percentages,
                                                       reference.cells.summary.percentages)
    gain = result.stats["membrane_h_gain"] / reference.stats["membrane_h_gain"]
    # The HED round trip puts haematoxylin into the glass as well (2+ ISH- at x1.5: glass (233.6, 227.9, 239.6) ->
    # (222.2, 218.2, 234.2)); relative to the glass that part is not the tissue's, so the gain makes up less of the
    # rescaling (measured x0.84 for 1 / 1.5 since the tissue mask found that glass too; x0.81 before).
    assert gain == pytest.approx(1 / h_scale, rel=0.3)
    cells, reference_cells = result.cells.summary.tumour_cells, reference.cells.summary.tumour_cells
    assert 0.6 * reference_cells <= cells <= 1.7 * reference_cells, (cells, reference_cells)


#: Issue 12, grader 1.3: the most a class percentage may move when a real core's glass is white-balanced to another
#: scanner's, as across writers. Measured through our writer: 0.85 points (2+ ISH-, bright glass) and 1.1 (1+,
#: bluish). Grader 1.2 (stains estimated relative to 255, a fixed white level, pure white left out as "not image")
#: failed both: 2+ ISH- 17.2 -> 6.6 % 1+ cells, called 0 (ultralow); 1+ 41.9 -> 67.6 % 1+ cells. Grader 1.3 before
#: OD was clipped at 0 moved the 1+ core 4.1 points (the reader's white beyond the image unmixed into DAB).
WHITE_BALANCE_POINTS = 2.0
#: Darker glass is less light, and JPEG's error is the same in grey levels, so faint membranes are lost: the 1+ core
#: at (215, 215, 225) read 27.8 % 1+ cells against 33.6 % (5.8 points; graded without the JPEG round trip, 0.4). With
#: the tissue mask and white filter fixed to 255 it read 22.7 %, and glass tiles went to the CNN and to blur QC
#: ("out of focus").
DARK_GLASS_POINTS = 7.0


@pytest.mark.parametrize(("label", "glass", "points"), [("2+ISH-", (252, 250, 253), WHITE_BALANCE_POINTS),
                                                        ("1+", (222, 226, 244), WHITE_BALANCE_POINTS),
                                                        ("1+", (215, 215, 225), DARK_GLASS_POINTS)])
def test_a_scanners_white_balance_keeps_the_call_and_the_percentages(label: str, glass: tuple[int, int, int],
                                                                    points: float, tmp_path: Path) -> None:
    """Another scanner: the core with each channel scaled so that its glass reads ``glass`` (about (234, 233, 240)
    as scanned) is graded like the core, both through our writer, with no QC flag.

    Transmitted light through the slide's glass is what tissue attenuates, so optical density relative to the glass
    does not change with a gain per channel; the tissue mask, the white filter and the membrane grader's stains,
    fields and cells are all relative to the glass. Grader 1.2 failed these cases (see the constants above).
    """
    import numpy as np

    from dicom_io.wsi_writer import SlideIdentity, write_wsi
    from her2_analysis.pipeline import score_slide
    from her2_core.preprocessing.tissue import glass_colour, tissue_mask
    from tests.conftest import real_core_rgb
    from worker.settings import load_settings

    rgb = real_core_rgb(label)
    side = (min(rgb.shape[:2]) // 32) * 32
    thumb = rgb[:side, :side].reshape(side // 32, 32, side // 32, 32, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    gain = np.asarray(glass, np.float32) / np.asarray(glass_colour(thumb, tissue_mask(thumb)), np.float32)
    results = {}
    for name, image in (("scanned", rgb), ("balanced", np.clip(np.rint(rgb * gain), 0, 255).astype(np.uint8))):
        series = tmp_path / name
        write_wsi(lambda x, y, w, h, image=image: image[y : y + h, x : x + w], image.shape[1], image.shape[0], 0.25,
                  SlideIdentity.synthetic(5, "B"), series)
        results[name] = score_slide(series, load_settings().scoring_options())
    reference, result = results["scanned"], results["balanced"]
    assert result.decided_by == reference.decided_by == "membrane", result.score.flags
    assert result.score.flags == reference.score.flags and result.stats["tiles_scored"] == reference.stats["tiles_scored"]
    percentages, expected = result.cells.summary.percentages, reference.cells.summary.percentages
    assert result.score.call == reference.score.call, (percentages, expected)
    assert percentages == pytest.approx(expected, abs=points)
    cells, reference_cells = result.cells.summary.tumour_cells, reference.cells.summary.tumour_cells
    assert 0.9 * reference_cells <= cells <= 1.1 * reference_cells, (cells, reference_cells)


#: JPEG quality 70 (a common scanner setting, e.g. Aperio's) against the wsidicomizer series: its block and chroma
#: error reads as faint membrane runs. Measured through our writer (session 23): 1+ cells 1.0 -> 3.7 % on the 0 core
#: (called 0 (ultralow)), 13.8 -> 20.8 % on the 2+ ISH- core (at quality 90: 1.0 % and 13.8 %); the calls hold.
JPEG_QUALITY_POINTS = 8.0


@pytest.mark.parametrize("label", ["0", "2+ISH-"])
def test_a_scanners_lower_jpeg_quality_keeps_an_admissible_call(label: str, scored: dict[str, dict],
                                                                 tmp_path: Path) -> None:
    """The core written at JPEG quality 70 gets an admissible call, no QC flag and cell percentages within
    :data:`JPEG_QUALITY_POINTS` of the wsidicomizer series (the cores whose calls sit nearest a boundary)."""
    from dicom_io.wsi_writer import SlideIdentity, write_wsi
    from her2_analysis.pipeline import score_slide
    from tests.conftest import real_core_rgb
    from worker.settings import load_settings

    rgb = real_core_rgb(label)
    write_wsi(lambda x, y, w, h: rgb[y : y + h, x : x + w], rgb.shape[1], rgb.shape[0], 0.25,
              SlideIdentity.synthetic(6, "Q"), tmp_path / "q70", quality=70)
    result = score_slide(tmp_path / "q70", load_settings().scoring_options())
    reference = scored[label]
    assert result.decided_by == "membrane" and result.score.call.value in ADMISSIBLE[label], result.score.flags
    assert not [flag for flag in result.score.flags if flag.startswith("QC")], result.score.flags
    percentages = result.cells.summary.percentages
    assert percentages == pytest.approx(reference["graders"]["membrane"]["percentages"], abs=JPEG_QUALITY_POINTS)


def test_model_card_real_tissue_figures_are_the_bundled_cnns(scored: dict[str, dict]) -> None:
    """The bundled card's real_tissue block (her2 real-tissue) is what the CNN gives on these cores now."""
    from her2_core.model_card import load_model_card
    from worker.settings import load_settings

    figures = {f.label: f for f in load_model_card(load_settings().model_path).real_tissue}
    assert sorted(figures) == sorted(ORDER)
    for label, s in scored.items():
        cnn = s["graders"]["cnn"]
        assert cnn["call"] == figures[label].call, label
        assert cnn["percentages"] == pytest.approx(figures[label].percentages, abs=1.0), label
        assert expected_score(cnn["percentages"]) == pytest.approx(figures[label].expected_score, abs=0.02), label
