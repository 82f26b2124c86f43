"""ONNX export: ONNX Runtime (through the worker's own loader) matches torch; the card passes the worker's checks."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from her2_analysis.cnn import TileModel
from her2_core.facts import INTENDED_USE
from her2_core.model_card import ModelCardError, load_model_card
from model_training.export import export_onnx
from model_training.models import TileClassifier
from model_training.recipes import deploy
from model_training.train import TrainConfig, fit, predict

pytestmark = pytest.mark.train


@pytest.fixture(scope="module")
def trained(tiny_data):
    return fit(tiny_data["train"], TrainConfig(arch="tiny", epochs=1, batch_size=8), progress=False).model


def test_worker_runs_the_export_like_torch(trained, tiny_data, tmp_path):
    tiles = tiny_data["test"].tiles[:6]
    path = tmp_path / "m.onnx"
    card = deploy(trained, {}, path, tiles, 1.0, {"data": "tiny synthetic"}, "test-model", "0.0.1")
    assert card["training"]["onnx_torch_max_abs_diff"] < 1e-4
    worker_model = TileModel(path, device="cpu", white_fraction_max=0.6)
    assert worker_model.card.tile_size == 128 and worker_model.card.magnification == 10
    got = worker_model.predict(tiles)
    want_p, want_t = predict(trained, tiles)
    assert np.abs(got.probabilities - want_p).max() < 1e-4
    assert np.abs(got.tumour_fraction - want_t).max() < 1e-4
    assert np.allclose(got.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # dynamic batch: a batch of one works too
    assert worker_model.predict(tiles[:1]).probabilities.shape == (1, 4)


def test_card_that_does_not_match_the_worker_is_refused(trained, tiny_data, tmp_path):
    path = tmp_path / "m.onnx"
    deploy(trained, {}, path, tiny_data["test"].tiles[:2], 1.0, {}, "test-model", "0.0.1")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["intended_use"] == INTENDED_USE
    load_model_card(path, white_fraction_max=0.6)
    with pytest.raises(ModelCardError, match="white_fraction_max"):
        load_model_card(path, white_fraction_max=0.5)
    card["preprocessing"]["stain"]["method"] = "macenko-percentile"
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="stain normalisation"):
        load_model_card(path)


def test_three_class_models_are_not_deployable(tmp_path):
    with pytest.raises(ValueError, match="4-class"):
        export_onnx(TileClassifier("tiny", 3), tmp_path / "m.onnx", 128)


def test_resizing_architectures_export_with_parity(tmp_path):
    from model_training.export import onnx_parity

    model = TileClassifier("resnet34", 4, input_size=64).eval()
    export_onnx(model, tmp_path / "r.onnx", 128)
    tiles = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    assert onnx_parity(model, tmp_path / "r.onnx", tiles) < 1e-4


def test_real_tissue_figures_are_written_into_the_card_and_read_back(trained, tiny_data, tmp_path):
    from her2_core.model_card import RealCoreFigure
    from model_training.export import add_real_tissue

    path = tmp_path / "m.onnx"
    deploy(trained, {}, path, tiny_data["test"].tiles[:2], 1.0, {}, "test-model", "0.0.1")
    assert load_model_card(path).real_tissue == ()
    figures = [RealCoreFigure("0", "1+", {"0": 40.0, "1+": 60.0, "2+": 0.0, "3+": 0.0}, 0.6),
               RealCoreFigure("2+ISH+", "3+", {"0": 0.0, "1+": 0.0, "2+": 49.8, "3+": 50.2}, 2.502)]
    card = add_real_tissue(path, figures, "two cores")
    assert card["real_tissue"]["data"] == "two cores"
    assert load_model_card(path).real_tissue == tuple(figures)
    card["real_tissue"]["cores"][0]["percentages"].pop("3+")
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="malformed"):
        load_model_card(path)
