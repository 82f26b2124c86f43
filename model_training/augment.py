"""Training-time augmentation of normalised tiles (torch, batched, seeded).

Flips and 90-degree rotations (labels are rotation invariant), brightness /
contrast jitter, HED stain jitter, a glass colour shift, Gaussian blur
(scanner focus) or an unsharp mask, and a random writer's codec.

Blur and sharpening vary a tile's fine detail whatever its class: on the
synthetic cohort, fine-detail energy (the QC sharpness) rose with the HER2
class (DAB membranes are edges) and the CNN trained on it called every
real core, sharp with texture the generator did not draw, 2+
(docs/training.md, "texture").

HED jitter works on the stain concentrations of the reference stain matrix
(tiles are already normalised onto it): haematoxylin is scaled by
``1 + N(0, h_sigma)``, DAB by ``1 + N(0, dab_sigma)``. The normaliser rescales
haematoxylin to the reference per slide, but on the real HER2 cores its
per-slide scale still spread 1.06-1.23 and synthetic slides 1.07-1.5, hence
``h_sigma`` 0.2. ``dab_sigma`` stays small on purpose: DAB intensity *is*
the HER2 grade (the normaliser keeps DAB on an absolute scale), and a large
DAB jitter would turn 2+ tiles into 3+ ones; 0.06 covers the spread of
real membranes of one grade around their median (2+ ISH-: p50 0.22, p90 0.37)
only in part, on purpose. ``glass`` scales each channel by ``1 + U(-glass,
glass)``: real glass reads ~(233, 232, 240), varying by a few levels per
channel between slides.

The codec: tiles arrive from PACS written by any tool - our writer's JPEG
4:2:0, wsidicomizer's 4:4:4, 4:2:2 from scanners, or lossless (JPEG 2000,
HTJ2K, uncompressed). With probability ``codec_p`` a tile is re-encoded as
JPEG with one of the three chroma subsamplings at a quality in
``jpeg_quality``; otherwise it stays as it came (lossless). Used with
uncompressed training tiles (``SyntheticCohort.lossless_train``), the model
never learns one writer's chroma.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from her2_core.preprocessing import REFERENCE


@dataclass(frozen=True)
class Augment:
    """Random augmentation of a batch (N, 3, H, W) of RGB/255 tiles."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.05
    contrast: float = 0.05
    h_sigma: float = 0.20
    dab_sigma: float = 0.06
    glass: float = 0.03
    blur_p: float = 0.3
    blur_sigma_max_px: float = 1.0
    sharpen_p: float = 0.3
    sharpen_max: float = 1.0
    codec_p: float = 0.75
    jpeg_quality: tuple[int, int] = (70, 95)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        if self.flips:
            flip = torch.rand(n, generator=g) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.rot90:
            k = torch.randint(0, 4, (n,), generator=g)
            x = x.clone()
            for r in range(1, 4):
                x[k == r] = torch.rot90(x[k == r], r, dims=(-2, -1))
        if self.h_sigma or self.dab_sigma:
            x = hed_jitter(x, 1 + self.h_sigma * torch.randn(n, generator=g),
                           1 + self.dab_sigma * torch.randn(n, generator=g))
        if self.glass:
            x = x * (1 + self.glass * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)).to(x.dtype)
        if self.brightness or self.contrast:
            b = 1 + self.brightness * (2 * torch.rand(n, generator=g) - 1)
            c = 1 + self.contrast * (2 * torch.rand(n, generator=g) - 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            gain = (c * b).view(-1, 1, 1, 1)
            x = torch.addcmul(mean * (b.view(-1, 1, 1, 1) - gain), x, gain)
        if self.blur_p and float(torch.rand(1, generator=g)) < self.blur_p:
            x = gaussian_blur(x, max(0.1, float(torch.rand(1, generator=g)) * self.blur_sigma_max_px))
        elif self.sharpen_p and float(torch.rand(1, generator=g)) < self.sharpen_p:
            x = unsharp_mask(x, float(torch.rand(1, generator=g)) * self.sharpen_max)
        x = x.clamp(0.0, 1.0)
        if self.codec_p:
            coded = torch.rand(n, generator=g) < self.codec_p
            subsampling = torch.randint(0, len(SUBSAMPLING), (n,), generator=g)
            quality = torch.randint(self.jpeg_quality[0], self.jpeg_quality[1] + 1, (n,), generator=g)
            for i in torch.nonzero(coded).flatten().tolist():
                x[i] = jpeg_roundtrip(x[i], SUBSAMPLING[int(subsampling[i])], int(quality[i]))
        return x


#: PIL's JPEG chroma subsampling codes: 4:4:4, 4:2:2, 4:2:0.
SUBSAMPLING = (0, 1, 2)


def jpeg_roundtrip(tile: torch.Tensor, subsampling: int, quality: int) -> torch.Tensor:
    """A (3, H, W) RGB/255 tile encoded as baseline JPEG (PIL ``subsampling`` code, ``quality``) and decoded."""
    rgb = (tile.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(tile.dtype) / 255.0


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflect padding."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)  # (C, 1, 1, K)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(-1, -2), groups=x.shape[1])


def unsharp_mask(x: torch.Tensor, amount: float, sigma: float = 1.0) -> torch.Tensor:
    """x + amount * (x - blur(x)): more fine detail, the mean kept (a sharper scanner or a thinner section)."""
    return x + amount * (x - gaussian_blur(x, sigma))


def hed_jitter(x: torch.Tensor, h_gain: torch.Tensor, dab_gain: torch.Tensor) -> torch.Tensor:
    """Scale haematoxylin and DAB concentrations per tile (gains (N,)) on the reference stain matrix."""
    matrix = torch.as_tensor(REFERENCE.matrix(), dtype=x.dtype)  # (2, 3): OD = concentrations @ matrix
    # OD -> concentrations -> scaled -> OD is one 3x3 map per tile.
    gains = torch.stack([h_gain, dab_gain], dim=1).to(x.dtype)  # (N, 2)
    maps = torch.einsum("cs,ns,sd->ncd", torch.linalg.pinv(matrix), gains, matrix)  # (N, 3, 3)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)
    od = torch.einsum("nchw,ncd->ndhw", od, maps)
    return (256.0 * torch.exp(-od) - 1.0) / 255.0
