"""Augmentation: unit gains leave tiles unchanged, DAB gain moves only the DAB concentration, codecs re-encode."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from her2_core.preprocessing import StainNormaliser
from model_training.augment import SUBSAMPLING, Augment, gaussian_blur, hed_jitter, jpeg_roundtrip, unsharp_mask

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


def test_unsharp_mask_adds_fine_detail_and_keeps_flat_areas():
    flat = torch.full((1, 3, 16, 16), 0.4)
    assert torch.allclose(unsharp_mask(flat, 1.0), flat, atol=1e-6)
    x = _tile()
    detail = lambda t: float((t - gaussian_blur(t, 1.0)).abs().mean())
    assert detail(unsharp_mask(x, 1.0)) == pytest.approx(2 * detail(x), rel=0.15)  # (1 + amount) x, up to the blur
    assert torch.equal(unsharp_mask(x, 0.0), x)


def _fine_chroma() -> torch.Tensor:
    """A 64 px tile of 1 px wide alternating brown (DAB) and blue (haematoxylin) columns: chroma at full resolution."""
    od = np.zeros((64, 64, 2))
    od[:, 0::2, 1] = 0.5
    od[:, 1::2, 0] = 0.5
    rgb = 256 * np.exp(-(od @ StainNormaliser.identity().reference.matrix())) - 1
    return torch.from_numpy(rgb / 255).permute(2, 0, 1).float()


def test_jpeg_roundtrip_subsampling_loses_fine_chroma_444_keeps_it():
    x = _fine_chroma()
    err = {s: float((jpeg_roundtrip(x, s, 95) - x).abs().mean()) for s in SUBSAMPLING}
    assert err[0] < 0.02  # 4:4:4 at quality 95: close to the input
    assert err[1] > 2 * err[0] and err[2] > 2 * err[0]  # 4:2:2 / 4:2:0 average neighbouring columns' colour
    assert jpeg_roundtrip(x, 2, 95).shape == x.shape


def test_codec_augmentation_reencodes_a_share_of_tiles_seeded():
    x = _fine_chroma().repeat(40, 1, 1, 1)
    plain = Augment(flips=False, rot90=False, brightness=0, contrast=0, h_sigma=0, dab_sigma=0, glass=0, blur_p=0, sharpen_p=0,
                    codec_p=0.5)
    y = plain(x, torch.Generator().manual_seed(1))
    changed = (y - x).abs().flatten(1).max(dim=1).values > 1 / 255
    assert 8 <= int(changed.sum()) <= 32  # about half re-encoded, the rest passed through losslessly
    assert torch.equal(y[~changed], x[~changed])
    assert torch.equal(y, plain(x, torch.Generator().manual_seed(1)))
    off = Augment(flips=False, rot90=False, brightness=0, contrast=0, h_sigma=0, dab_sigma=0, glass=0, blur_p=0, sharpen_p=0,
                  codec_p=0)
    assert torch.equal(off(x, torch.Generator().manual_seed(1)), x)
