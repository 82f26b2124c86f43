"""MAP and EC on constructed cases with known answers, and CAMs of a real (small) model."""

import numpy as np
import pytest

from her2_core.preprocessing import REFERENCE
from model_training.explain import (
    dab_membrane_mask,
    dilate,
    explanation_consistency,
    membrane_activation_precision,
)


def _membrane(size: int = 32) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[8, 4:28] = m[4:28, 20] = True
    return m


def test_map_is_one_when_all_explanation_is_on_membranes():
    membrane = _membrane()
    cam = np.where(membrane, np.random.default_rng(0).uniform(0.2, 1.0, membrane.shape), 0.0)
    assert membrane_activation_precision(cam, membrane) == pytest.approx(1.0)


def test_map_is_zero_off_membranes_and_area_share_when_uniform():
    membrane = _membrane()
    assert membrane_activation_precision(np.where(membrane, 0.0, 1.0), membrane) == 0.0
    assert membrane_activation_precision(np.ones(membrane.shape), membrane) == pytest.approx(membrane.mean())
    assert np.isnan(membrane_activation_precision(np.zeros(membrane.shape), membrane))


def test_ec_is_one_for_identical_and_scaled_explanations():
    cam = np.random.default_rng(1).uniform(0, 1, (16, 16))
    assert explanation_consistency(cam, cam) == pytest.approx(1.0)
    assert explanation_consistency(cam, 3 * cam) == pytest.approx(1.0)


def test_ec_is_zero_for_disjoint_explanations():
    a = np.zeros((16, 16))
    b = np.zeros((16, 16))
    a[:8], b[8:] = 1.0, 1.0
    assert explanation_consistency(a, b) == 0.0


def test_dab_mask_finds_stained_pixels_and_dilation_grows_it():
    od = np.zeros((1, 16, 16, 3))
    od[0, 5, :] = 0.6 * np.asarray(REFERENCE.matrix()[1])  # a DAB line
    od[0, 10, :] = 0.6 * np.asarray(REFERENCE.matrix()[0])  # a haematoxylin line
    tiles = np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)
    mask = dab_membrane_mask(tiles)
    assert mask[0, 5].all() and not mask[0, 10].any() and mask.sum() == 16
    assert dilate(mask, 1).sum() == 48


@pytest.mark.train
@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
def test_cam_report_on_a_trained_tiny_model(method, tiny_data, tmp_path):
    pytest.importorskip("pytorch_grad_cam")
    from model_training.explain import explain, explanation_report
    from model_training.train import TrainConfig, fit

    model = fit(tiny_data["train"], TrainConfig(arch="tiny", epochs=1, batch_size=8), progress=False).model
    test = tiny_data["test"]
    stained = np.flatnonzero(test.membranes.reshape(len(test), -1).any(axis=1))[:3]
    cams = explain(model, test.tiles[stained], method)
    assert cams.shape == (len(stained), test.tile_size, test.tile_size)
    assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6
    report = explanation_report(model, test.tiles[stained], test.membranes[stained], tmp_path, (method,))
    assert report["tiles"] == len(stained)
    assert 0.0 <= report[method]["map_mean"] <= 1.0
    assert 0.0 <= report[method]["ec_transforms_mean"] <= 1.0 + 1e-9
    assert 0.0 < report["uniform_baseline_map"] < 1.0
    assert (tmp_path / "explanations.json").is_file() and (tmp_path / f"{method}_000.png").is_file()
