"""The ONNX Runtime tile model: its input conversion, float16 arithmetic and the IO-binding path, on CPU."""

import logging

import numpy as np
import pytest

from her2_analysis.cnn import TileModel
from her2_core.preprocessing import REFERENCE, StainNormaliser
from her2_synthetic.render import SlideSpec, render_region
from worker.settings import load_settings


@pytest.fixture(scope="module")
def model_path():
    return load_settings().model_path


@pytest.fixture(scope="module")
def tiles():
    """Normalised 512 px tiles, one from a synthetic slide of each HER2 class (0, 1+, 2+, 3+)."""
    out = []
    for seed, grade in enumerate(("0", "1+", "2+", "3+")):
        spec = SlideSpec(seed=seed, width_um=512.0, height_um=512.0, class_mix={grade: 1.0}, tumour_fraction=1.0)
        out.append(render_region(spec, 0.0, 0.0, 512, 512, 1.0).rgb)
    return StainNormaliser.identity(REFERENCE)(np.stack(out))


def test_model_input_is_tiles_over_scale_channel_first(model_path):
    model = TileModel(model_path, "cpu")
    tiles = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = model.input_tensor(tiles)
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (2, 3, 8, 8)
    assert x[1, 2, 5, 7] == np.float32(tiles[1, 5, 7, 2]) / np.float32(model.card.input_scale)
    assert np.array_equal(x, tiles.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(model.card.input_scale))
    reused = model.input_tensor(tiles, reuse=True)
    assert np.array_equal(reused, x) and model.input_tensor(tiles[:1], reuse=True).base is reused.base


def test_float16_model_grades_like_float32(model_path, tiles):
    full = TileModel(model_path, "cpu").predict(tiles)
    half_model = TileModel(model_path, "cpu", precision="float16")
    assert half_model.precision == "float16"
    assert half_model.session.get_inputs()[0].type == "tensor(float)"  # inputs and outputs stay float32
    half = half_model.predict(tiles)
    assert half.probabilities.dtype == np.float32
    np.testing.assert_allclose(half.probabilities, full.probabilities, atol=1e-2)
    np.testing.assert_allclose(half.tumour_fraction, full.tumour_fraction, atol=1e-2)
    assert np.array_equal(half.probabilities.argmax(1), full.probabilities.argmax(1))
    assert not np.array_equal(half.probabilities, full.probabilities)  # it did run in half precision


def test_unknown_precision_is_refused(model_path):
    with pytest.raises(ValueError, match="precision"):
        TileModel(model_path, "cpu", precision="int8")


def test_io_binding_path_gives_the_plain_run_results(model_path, tiles):
    model = TileModel(model_path, "cpu")
    plain = model.predict(tiles)
    model._bind = True  # the CUDA path; ORT's IO binding works the same on the CPU provider
    bound = model.predict(tiles)
    assert model._bind  # it did not fall back
    assert np.array_equal(bound.probabilities, plain.probabilities)
    assert np.array_equal(bound.tumour_fraction, plain.tumour_fraction)


def test_io_binding_failure_falls_back_to_plain_runs(model_path, tiles, monkeypatch, caplog):
    model = TileModel(model_path, "cpu")
    plain = model.predict(tiles)
    model._bind = True

    def broken():
        raise RuntimeError("no device memory")

    monkeypatch.setattr(model.session, "io_binding", broken)
    with caplog.at_level(logging.WARNING, logger="her2_analysis.cnn"):
        got = model.predict(tiles)
    assert np.array_equal(got.probabilities, plain.probabilities)
    assert not model._bind and "IO binding failed" in caplog.text
