"""Quality control on synthetic cases made for each check, and on a real H&E slide."""

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dicom_io.wsi import open_slide
from her2_analysis.options import QualityThresholds, ScoringOptions
from her2_analysis.pipeline import score_slide
from her2_analysis.quality import QualityReport, check_graded, check_slide, check_stain, sharpness
from her2_analysis.tiles import (
    sharpness_sample,
    spread_indices,
    survey_slide,
    tile_batches,
    tile_slide,
)
from her2_core.aggregate import SlideCall
from her2_core.preprocessing import REFERENCE, fit_stains, glass_colour, optical_density, tissue_mask
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec, render_region, render_thumbnail
from model_training.slide_tiles import synthetic_slide_tiles

DATA = Path(__file__).parents[1] / "data"
THRESHOLDS = QualityThresholds()


def slide_report(factor: float = 1.0, **kwargs):
    """QC of a synthetic slide as the worker runs it: thumbnail and tissue mask, stains fitted on 10x tiles.

    ``factor`` scales every stain's optical density (faded < 1 < overstained).
    """
    spec = SlideSpec(width_um=2048, height_um=2048, **kwargs)
    thumb = restained(render_thumbnail(spec), factor)
    tiles = restained(np.stack([render_region(spec, x, y, 512, 512, 1.0).rgb for x in (512, 1024) for y in (512, 1024)]),
                      factor)
    report = check_slide(thumb, tissue_mask(thumb), THRESHOLDS)
    check_stain(report, fit_stains(tiles), THRESHOLDS)
    return report


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
    report = check_slide(thumb, tissue_mask(thumb), THRESHOLDS)
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
                                        artefacts=artefacts, textured=True), tmp_path / name)
        medians[name] = float(np.median(sharpness(synthetic_slide_tiles(tmp_path / name).tiles)))
    assert medians["blurred"] < THRESHOLDS.sharpness_min < medians["sharp"]
    flags = {}
    for name, median in medians.items():
        report = QualityReport()
        check_graded(report, np.array([median]), 1.0, None, THRESHOLDS)
        flags[name] = report.flags
    assert flags == {"sharp": [], "blurred": [f"QC: out of focus (sharpness {medians['blurred']:.1f} < 3.0)"]}
    # The job measures sharpness in the decode pool on a sample of tissue tiles (here: every one of them).
    result = score_slide(tmp_path / "blurred", ScoringOptions())
    assert result.stats["qc_sharpness"] == pytest.approx(medians["blurred"], rel=1e-6)
    assert f"QC: out of focus (sharpness {medians['blurred']:.1f} < 3.0)" in result.score.flags


def test_sharpness_is_scipys_laplacian_of_gaussian():
    """The float32 numpy LoG equals scipy's ``gaussian_laplace`` (sigma 1, mirrored edges), edges included."""
    rng = np.random.default_rng(7)
    smooth = ndimage.gaussian_filter(rng.normal(128, 40, (96, 80, 3)), (2, 2, 0))
    tiles = np.stack([rng.integers(0, 256, (96, 80, 3)), np.clip(smooth, 0, 255),
                      np.full((96, 80, 3), 200)]).astype(np.uint8)
    grey = tiles.astype(np.float32).sum(-1) / 3
    expected = [np.abs(ndimage.gaussian_laplace(g, 1.0)).mean() for g in grey]
    measured = sharpness(tiles)
    assert measured == pytest.approx(expected, rel=1e-5, abs=1e-4)  # a flat tile: 0.0288 (kernel sum, as scipy's)
    assert measured[0] > 10 * measured[1] > 10 * measured[2] > 0


def test_sharpness_is_measured_only_on_the_sampled_tiles(tmp_path):
    write_synthetic_slide(SlideSpec(seed=6, width_um=1536, height_um=1536, class_mix={"2+": 1.0}), tmp_path / "s")
    with open_slide(tmp_path / "s") as slide:
        prepared = tile_slide(slide, survey_slide(slide), 512, 1.0, REFERENCE)
        sample = frozenset(prepared.candidates[::3])
        batches = list(tile_batches(prepared, 4, 2, 0.6, sample))
    positions = [p for b in batches for p in b.positions]
    measured = np.concatenate([b.sharpness for b in batches])
    tiles = np.concatenate([b.tiles for b in batches])
    in_sample = np.array([p in sample for p in positions])
    assert in_sample.any() and not in_sample.all()
    assert np.isnan(measured[~in_sample]).all()
    assert np.array_equal(measured[in_sample], sharpness(tiles[in_sample]))
    assert list(spread_indices(100, 32)) == list(range(2, 100, 4)) and list(spread_indices(5, 32)) == [0, 1, 2, 3, 4]
    assert sorted(sharpness_sample([(i, i) for i in range(1000)])) == [(i, i) for i in range(16, 1000, 32)]


def test_too_little_tumour_is_not_assessable(tmp_path):
    """A slide that is nearly all stroma: 2 % tumour on 1.5 x 1.5 mm, well under ``qc_min_tumour_mm2``."""
    write_synthetic_slide(SlideSpec(seed=21, width_um=1536, height_um=1536, class_mix={"3+": 1.0},
                                    tumour_fraction=0.02), tmp_path / "stroma")
    score = score_slide(tmp_path / "stroma", ScoringOptions()).score
    assert score.call is SlideCall.NOT_ASSESSABLE
    assert score.tumour_area_mm2 < THRESHOLDS.min_tumour_mm2
    assert f"not assessable: too little tumour: {score.tumour_area_mm2:.2f} mm2 graded < 0.2 mm2" in score.flags
    assert len(score.flags) == len(set(score.flags))


def restained(rgb: np.ndarray, factor: float) -> np.ndarray:
    """The same pixels with every stain's optical density scaled by ``factor`` (faded < 1 < overstained)."""
    if factor == 1.0:
        return rgb
    od = optical_density(rgb) * factor
    return np.clip(255.0 * np.exp(-od), 0, 255).astype(np.uint8)


SCALE_FLAG = "QC: stain outside the training distribution (haematoxylin scale {:.2f} outside [0.5, 2.0])"


@pytest.mark.parametrize("factor, h_scale", [(0.3, (2.0, 6.0)), (2.5, (0.2, 0.5))])
def test_stain_out_of_training_distribution_is_flagged(factor, h_scale):
    """Faded (stains at 30 % of their optical density) and overstained (250 %) versions of a clean slide."""
    report = slide_report(factor, seed=1, class_mix={"2+": 1.0})
    measured = report.measures["h_scale"]
    assert h_scale[0] < measured < h_scale[1]
    assert SCALE_FLAG.format(measured) in report.flags and report.not_assessable == []
    assert slide_report(seed=1, class_mix={"2+": 1.0}).flags == []


def test_stain_too_faint_to_estimate_is_flagged():
    """At 20 % of its optical density (glass included) the synthetic tissue is still found against its own glass
    (the tissue mask is relative to the glass; relative to 255 it left the mask: "no tissue found"), and its tiles'
    haematoxylin cannot be estimated: flagged, not dropped."""
    report = slide_report(0.2, seed=1, class_mix={"2+": 1.0})
    assert report.not_assessable == []
    assert report.flags == ["QC: stain outside the training distribution (haematoxylin colour or amount not "
                            "estimable: stain too faint or off-colour)"]


def test_glass_beside_pale_even_tissue_is_the_glass():
    """A core filling three quarters of the thumbnail with pale, even tissue (textured synthetic HER2 0): the glass
    found is the slide's own glass. With fixed histogram bins its peak fell on a bin edge, the tissue's bin won, and
    the tissue was taken for glass (glass read (209, 209, 228) instead of about (232, 234, 241), and the membrane
    grader found no tumour cell)."""
    spec = SlideSpec(seed=5, width_um=1024, height_um=1024, class_mix={"0": 1.0}, tumour_fraction=1.0, textured=True)
    thumb = render_thumbnail(spec)
    mask = tissue_mask(thumb)
    assert 0.6 < mask.mean() < 0.9
    assert glass_colour(thumb, mask) == pytest.approx(tuple(spec.layout.glass), abs=2.0)


def test_empty_glass_has_no_tissue():
    """A slide of glass only, with sensor noise, at the reference glass and at a darker scanner's glass: no tissue."""
    rng = np.random.default_rng(0)
    for glass in ((233.0, 232.0, 240.0), (215.0, 215.0, 225.0)):
        thumb = np.clip(rng.normal(glass, 1.0, (128, 128, 3)), 0, 255).round().astype(np.uint8)
        assert not tissue_mask(thumb).any(), glass
        assert check_slide(thumb, tissue_mask(thumb), THRESHOLDS).not_assessable == ["no tissue found on the slide"]
