"""Augmentation: unit gains leave tiles unchanged, DAB gain moves only the DAB concentration."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_training.augment import Augment, gaussian_blur, hed_jitter
from worker.preprocessing import StainNormaliser

pytestmark = pytest.mark.train


def _tile() -> torch.Tensor:
    rng = np.random.default_rng(0)
    conc = rng.uniform(0, 0.8, (2, 32, 32, 2))
    od = conc @ StainNormaliser.identity().reference.matrix()
    return torch.from_numpy((256 * np.exp(-od) - 1) / 255).permute(0, 3, 1, 2).float()


def test_unit_gains_are_identity():
    x = _tile()
    assert torch.allclose(hed_jitter(x, torch.ones(2), torch.ones(2)), x, atol=1e-4)


def test_dab_gain_scales_dab_concentration_only():
    x = _tile()
    y = hed_jitter(x, torch.ones(2), torch.full((2,), 1.5))
    norm = StainNormaliser.identity()
    to_uint8 = lambda t: np.clip(np.rint(t.permute(0, 2, 3, 1).numpy() * 255), 0, 255).astype(np.uint8)
    before, after = norm.concentrations(to_uint8(x)), norm.concentrations(to_uint8(y))
    assert np.allclose(after[..., 0], before[..., 0], atol=0.02)
    stained = before[..., 1] > 0.2
    assert np.allclose(after[..., 1][stained] / before[..., 1][stained], 1.5, atol=0.06)


def test_augment_keeps_shape_and_range_and_is_seeded():
    x = _tile()
    a = Augment(blur_p=1.0)
    y1 = a(x, torch.Generator().manual_seed(3))
    y2 = a(x, torch.Generator().manual_seed(3))
    assert y1.shape == x.shape and float(y1.min()) >= 0 and float(y1.max()) <= 1
    assert torch.equal(y1, y2)


def test_blur_preserves_mean_of_constant_image():
    x = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(gaussian_blur(x, 1.0), x, atol=1e-6)
