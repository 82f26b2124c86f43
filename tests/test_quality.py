"""Quality control on synthetic cases made for each check, and on a real H&E slide."""

from pathlib import Path

import numpy as np

from dicom_io.wsi import open_slide
from model_training.synthetic import SlideSpec, render_thumbnail
from model_training.synthetic_dicom import write_synthetic_slide
from model_training.slide_tiles import synthetic_slide_tiles
from worker.preprocessing import fit_slide
from worker.quality import check_slide, sharpness
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
