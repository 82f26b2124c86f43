"""Training-time augmentation of normalised tiles (torch, batched, seeded).

Flips and 90-degree rotations (labels are rotation invariant), brightness /
contrast jitter, HED stain jitter and Gaussian blur (scanner focus).

HED jitter works on the stain concentrations of the reference stain matrix
(tiles are already normalised onto it): haematoxylin is scaled by
``1 + N(0, h_sigma)``, DAB by ``1 + N(0, dab_sigma)``. ``dab_sigma`` is kept
small on purpose: DAB intensity *is* the HER2 grade, and a large DAB jitter
would turn 2+ tiles into 3+ ones (the same reason the normaliser keeps DAB on
an absolute scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from worker.preprocessing import REFERENCE


@dataclass(frozen=True)
class Augment:
    """Random augmentation of a batch (N, 3, H, W) of RGB/255 tiles."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.05
    contrast: float = 0.05
    h_sigma: float = 0.10
    dab_sigma: float = 0.03
    blur_p: float = 0.3
    blur_sigma_max_px: float = 1.0

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
        if self.brightness or self.contrast:
            b = 1 + self.brightness * (2 * torch.rand(n, generator=g) - 1)
            c = 1 + self.contrast * (2 * torch.rand(n, generator=g) - 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            gain = (c * b).view(-1, 1, 1, 1)
            x = torch.addcmul(mean * (b.view(-1, 1, 1, 1) - gain), x, gain)
        if self.blur_p and float(torch.rand(1, generator=g)) < self.blur_p:
            x = gaussian_blur(x, max(0.1, float(torch.rand(1, generator=g)) * self.blur_sigma_max_px))
        return x.clamp(0.0, 1.0)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with reflect padding."""
    radius = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(x.shape[1], 1, 1, 1)  # (C, 1, 1, K)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.transpose(-1, -2), groups=x.shape[1])


def hed_jitter(x: torch.Tensor, h_gain: torch.Tensor, dab_gain: torch.Tensor) -> torch.Tensor:
    """Scale haematoxylin and DAB concentrations per tile (gains (N,)) on the reference stain matrix."""
    matrix = torch.as_tensor(REFERENCE.matrix(), dtype=x.dtype)  # (2, 3): OD = concentrations @ matrix
    # OD -> concentrations -> scaled -> OD is one 3x3 map per tile.
    gains = torch.stack([h_gain, dab_gain], dim=1).to(x.dtype)  # (N, 2)
    maps = torch.einsum("cs,ns,sd->ncd", torch.linalg.pinv(matrix), gains, matrix)  # (N, 3, 3)
    od = -torch.log((x * 255.0 + 1.0) / 256.0)
    od = torch.einsum("nchw,ncd->ndhw", od, maps)
    return (256.0 * torch.exp(-od) - 1.0) / 255.0
