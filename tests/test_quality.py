"""Quality control on synthetic cases made for each check, and on a real H&E slide."""

from pathlib import Path

import numpy as np
import pytest

from dicom_io.wsi import open_slide
from model_training.slide_tiles import synthetic_slide_tiles
from model_training.synthetic import SlideSpec, render_thumbnail
from model_training.synthetic_dicom import write_synthetic_slide
from worker.aggregate import SlideCall
from worker.pipeline import score_slide
from worker.preprocessing import fit_slide, optical_density
from worker.quality import QualityReport, check_graded, check_slide, sharpness
from worker.settings import load_settings

DATA = Path(__file__).parent / "data"
SETTINGS = load_settings()


def slide_report(**kwargs):
    spec = SlideSpec(width_um=2048, height_um=2048, **kwargs)
    thumb = render_thumbnail(spec)
    mask, normaliser = fit_slide(thumb)
    return check_slide(thumb, mask, normaliser, SETTINGS)


def test_clean_ihc_slides_pass():
    for centre in ("A", "B"):
        report = slide_report(seed=1, class_mix={"2+": 1.0}, centre=centre)
        assert report.not_assessable == [] and report.flags == []
        assert report.measures["eosin_share"] < 0.1


def test_he_slide_is_not_assessable():
    report = slide_report(seed=2, stain="H&E")
    assert len(report.not_assessable) == 1 and "not a HER2 IHC" in report.not_assessable[0]


def test_real_he_slide_is_not_assessable():
    """The Camelyon H&E lymph-node slide (real data, Apache-2.0/CC0) is recognised as not IHC."""
    with open_slide(DATA / "camelyon_he.dcm") as slide:
        thumb, _ = slide.thumbnail(8.0)
    mask, normaliser = fit_slide(thumb)
    report = check_slide(thumb, mask, normaliser, SETTINGS)
    assert report.measures["eosin_share"] > 0.2
    assert "not a HER2 IHC" in report.not_assessable[0]


def test_pen_and_fold_are_flagged():
    pen = slide_report(seed=3, artefacts=("pen",))
    assert any("pen marks" in f for f in pen.flags) and not any("fold" in f for f in pen.flags)
    fold = slide_report(seed=4, artefacts=("fold",))
    assert any("tissue folds" in f for f in fold.flags) and not any("pen" in f for f in fold.flags)
    assert pen.not_assessable == fold.not_assessable == []


def test_blur_separates_through_the_dicom_path(tmp_path):
    medians = {}
    for name, artefacts in (("sharp", ()), ("blurred", ("blur",))):
        write_synthetic_slide(SlideSpec(seed=5, width_um=1536, height_um=1536, class_mix={"1+": 1.0},
                                        artefacts=artefacts), tmp_path / name)
        medians[name] = float(np.median(sharpness(synthetic_slide_tiles(tmp_path / name).tiles)))
    assert medians["blurred"] < SETTINGS.qc_sharpness_min < medians["sharp"]
    flags = {}
    for name, median in medians.items():
        report = QualityReport()
        check_graded(report, np.array([median]), 1.0, SETTINGS)
        flags[name] = report.flags
    assert flags == {"sharp": [], "blurred": [f"QC: out of focus (sharpness {medians['blurred']:.1f} < 3.0)"]}


def test_too_little_tumour_is_not_assessable(tmp_path):
    """A slide that is nearly all stroma: 2 % tumour on 1.5 x 1.5 mm, well under ``qc_min_tumour_mm2``."""
    write_synthetic_slide(SlideSpec(seed=21, width_um=1536, height_um=1536, class_mix={"3+": 1.0},
                                    tumour_fraction=0.02), tmp_path / "stroma")
    score = score_slide(tmp_path / "stroma", SETTINGS).score
    assert score.call is SlideCall.NOT_ASSESSABLE
    assert score.tumour_area_mm2 < SETTINGS.qc_min_tumour_mm2
    assert f"not assessable: too little tumour: {score.tumour_area_mm2:.2f} mm2 graded < 0.2 mm2" in score.flags
    assert len(score.flags) == len(set(score.flags))


def restained(thumbnail: np.ndarray, factor: float) -> np.ndarray:
    """The same slide with every stain's optical density scaled by ``factor`` (faded < 1 < overstained)."""
    od = optical_density(thumbnail) * factor
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("factor, flag", [
    (0.3, ("QC: stain outside the training distribution (haematoxylin colour or amount not estimable: stain too "
           "faint or off-colour)")),
    (2.5, "QC: stain outside the training distribution (haematoxylin scale 0.36 outside [0.5, 2.0])"),
])
def test_stain_out_of_training_distribution_is_flagged(factor, flag):
    thumb = render_thumbnail(SlideSpec(seed=1, width_um=2048, height_um=2048, class_mix={"2+": 1.0}))
    mask, normaliser = fit_slide(restained(thumb, factor))
    report = check_slide(restained(thumb, factor), mask, normaliser, SETTINGS)
    assert flag in report.flags and report.not_assessable == []
    mask, normaliser = fit_slide(thumb)
    assert check_slide(thumb, mask, normaliser, SETTINGS).flags == []
