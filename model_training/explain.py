"""Grad-CAM / Score-CAM explanations and two measures of their quality: MAP and EC.

* **Membrane Activation Precision (MAP)**: the share of a tile's explanation
  mass that falls on DAB membrane pixels, ``sum(cam * membrane) / sum(cam)``.
  The membrane mask is the exact one from the synthetic generator, or for
  other data a stain-deconvolution mask (DAB optical density above
  :data:`DAB_OD_THRESHOLD`, QuPath's usual threshold). Last-block CAMs are
  coarse (16x16 for a 512 px tile) while membranes are ~1 um wide, so the
  mask is dilated by ``dilate_px`` and the uniform-explanation baseline (the
  dilated membrane's area share) is reported beside MAP: MAP above it means
  the explanation prefers membranes.
* **Explanation Consistency (EC)**: cosine similarity of two non-negative
  explanations of the same tissue on the same pixel grid (1 = identical
  up to scale). Under flips / 90-degree rotations the explanation of the
  transformed tile is mapped back before comparing; across magnifications
  the explanations are resampled to a common grid
  (:func:`cross_magnification_consistency`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from her2_analysis.tiles import stain_fit_indices
from her2_core.facts import WHITE_FRACTION_MAX
from her2_core.preprocessing import StainNormaliser, fit_stains, white_fraction
from her2_synthetic.render import SlideSpec, render_region
from model_training.models import TileClassifier
from model_training.train import to_tensor

METHODS = ("gradcam", "scorecam")
#: DAB optical density above which a pixel counts as DAB-stained membrane (QuPath's usual threshold).
DAB_OD_THRESHOLD = 0.25
#: The 8 symmetries of the square: (k quarter turns, flip), as used for EC.
DIHEDRAL = [(k, f) for f in (False, True) for k in range(4)]


def membrane_activation_precision(cam: np.ndarray, membrane: np.ndarray) -> float:
    """Share of the explanation mass of ``cam`` (H, W, >= 0) on ``membrane`` (H, W bool); NaN for an empty CAM."""
    total = float(cam.sum())
    return float(cam[membrane].sum()) / total if total > 0 else float("nan")


def explanation_consistency(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two non-negative explanations of the same grid; NaN if either is all zero."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norm) if norm > 0 else float("nan")


def dab_membrane_mask(tiles: np.ndarray, threshold: float = DAB_OD_THRESHOLD) -> np.ndarray:
    """Stain-deconvolution membrane mask (N, H, W) of normalised uint8 tiles (N, H, W, 3)."""
    return StainNormaliser.identity().concentrations(tiles)[..., 1] > threshold


def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Dilate each (H, W) mask of (N, H, W) by a disc of radius ``pixels``."""
    if pixels <= 0:
        return masks
    y, x = np.mgrid[-pixels : pixels + 1, -pixels : pixels + 1]
    disc = x**2 + y**2 <= pixels**2
    return np.stack([ndimage.binary_dilation(m, structure=disc) for m in masks])


class _Logits(nn.Module):
    """The class logits alone (what the CAM libraries expect)."""

    def __init__(self, model: TileClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def target_layer(model: TileClassifier) -> tuple[nn.Module, object]:
    """The layer explained for each architecture (its last spatial block) and a reshape for NHWC outputs."""
    if model.arch == "swin_t":
        return model.features.features[-1][-1].norm1, lambda t: t.permute(0, 3, 1, 2)
    layer = {
        "tiny": lambda m: m.blocks[-1],
        "alexnet": lambda m: m.features.features[10],
        "vgg16": lambda m: m.features.features[28],
        "resnet34": lambda m: m.features.layer4[-1],
        "densenet121": lambda m: m.features.features.denseblock4,
        "inception_v3": lambda m: m.features.Mixed_7c,
    }[model.arch](model)
    return layer, None


def explain(model: TileClassifier, tiles: np.ndarray, method: str, classes: np.ndarray | None = None,
            batch_size: int = 8) -> np.ndarray:
    """CAMs (N, H, W) in [0, 1] of uint8 tiles for ``classes`` (default: the predicted class).

    Score-CAM costs one forward pass per channel of the target layer per tile.
    """
    from pytorch_grad_cam import GradCAM, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    model.eval()
    layer, reshape = target_layer(model)
    cam_class = GradCAM if method == "gradcam" else ScoreCAM
    out = []
    with cam_class(model=_Logits(model), target_layers=[layer], reshape_transform=reshape) as cam:
        cam.batch_size = 32
        for i in range(0, len(tiles), batch_size if method == "gradcam" else 1):
            x = to_tensor(tiles[i : i + (batch_size if method == "gradcam" else 1)])
            if classes is None:
                with torch.no_grad():
                    wanted = model(x).logits.argmax(dim=1).tolist()
            else:
                wanted = [int(c) for c in classes[i : i + len(x)]]
            out.append(cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in wanted]))
    return np.concatenate(out) if out else np.zeros((0, *tiles.shape[1:3]), np.float32)


def transform_consistency(model: TileClassifier, tiles: np.ndarray, method: str,
                          classes: np.ndarray | None = None) -> np.ndarray:
    """EC per tile: mean over the 7 non-identity dihedral transforms of the mapped-back explanation vs the original."""
    base = explain(model, tiles, method, classes)
    classes = classes if classes is not None else _predicted(model, tiles)
    scores = np.zeros((len(tiles), len(DIHEDRAL) - 1))
    for j, (k, flip) in enumerate(DIHEDRAL[1:]):
        moved = np.rot90(tiles[:, :, ::-1] if flip else tiles, k, axes=(1, 2))
        cams = explain(model, np.ascontiguousarray(moved), method, classes)
        back = np.rot90(cams, -k, axes=(1, 2))
        back = back[:, :, ::-1] if flip else back
        scores[:, j] = [explanation_consistency(a, b) for a, b in zip(base, back)]
    return np.nanmean(scores, axis=1)


def cross_magnification_consistency(model_low: TileClassifier, model_high: TileClassifier, spec: SlideSpec,
                                    method: str, mpp_low: float = 1.0, mpp_high: float = 0.25, tile_size: int = 512,
                                    regions: int = 4, seed: int = 0) -> np.ndarray:
    """EC between explanations of the same tissue at two magnifications (synthetic slide ``spec``).

    Low-magnification tiles with tissue are explained with ``model_low``; inside each, a random
    sub-region the size of one high-magnification tile is rendered at ``mpp_high`` and explained
    with ``model_high`` (both for the low-magnification model's predicted class). The low-mag
    explanation is cropped to the sub-region, upsampled, and compared by cosine similarity. Tiles
    are prepared by the shared preprocessing (slide stain fit on a sample of its tissue tiles, white filter,
    normalisation). Returns one EC per region compared.
    """
    rng = np.random.default_rng(seed)
    ratio = round(mpp_low / mpp_high)
    tile_um, sub_px = tile_size * mpp_low, tile_size // ratio
    positions = [(r, c) for r in range(int(spec.height_um // tile_um)) for c in range(int(spec.width_um // tile_um))]
    rendered = ((pos, render_region(spec, pos[1] * tile_um, pos[0] * tile_um, tile_size, tile_size, mpp_low).rgb)
                for pos in positions)
    tissue = {pos: tile for pos, tile in rendered if white_fraction(tile[None])[0] <= WHITE_FRACTION_MAX}
    if not tissue:
        return np.zeros(0)
    kept = list(tissue.values())
    normaliser = fit_stains(np.stack([kept[i] for i in stain_fit_indices(len(kept))]))
    scores: list[float] = []
    for r, c in rng.permutation(positions):
        if (r, c) not in tissue:
            continue
        low = normaliser(tissue[(r, c)][None])
        target = _predicted(model_low, low)
        i, j = rng.integers(0, ratio, 2)
        high = normaliser(render_region(spec, c * tile_um + j * sub_px * mpp_low, r * tile_um + i * sub_px * mpp_low,
                                        tile_size, tile_size, mpp_high).rgb[None])
        crop = explain(model_low, low, method, target)[0, i * sub_px : (i + 1) * sub_px, j * sub_px : (j + 1) * sub_px]
        scores.append(explanation_consistency(ndimage.zoom(crop, ratio, order=1),
                                              explain(model_high, high, method, target)[0]))
        if len(scores) == regions:
            break
    return np.asarray(scores)


def _predicted(model: TileClassifier, tiles: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(to_tensor(tiles)).logits.argmax(dim=1).numpy()


def explanation_report(model: TileClassifier, tiles: np.ndarray, membranes: np.ndarray, out_dir: Path | None,
                       methods: tuple[str, ...] = METHODS, dilate_px: int = 2) -> dict:
    """MAP (with its uniform baseline) and transform EC per method, on tiles that have membrane pixels.

    With ``out_dir``: ``explanations.json`` and one overlay PNG per tile and method.
    """
    has_membrane = membranes.reshape(len(membranes), -1).any(axis=1)
    tiles, membranes = tiles[has_membrane], dilate(membranes[has_membrane], dilate_px)
    classes = _predicted(model, tiles)
    report: dict = {"tiles": len(tiles), "membrane_dilation_px": dilate_px,
                    "uniform_baseline_map": float(membranes.mean()) if len(tiles) else float("nan")}
    for method in methods:
        cams = explain(model, tiles, method, classes)
        maps = [membrane_activation_precision(c, m) for c, m in zip(cams, membranes)]
        ec = transform_consistency(model, tiles, method, classes)
        report[method] = {"map_mean": float(np.nanmean(maps)), "map_per_tile": maps,
                          "ec_transforms_mean": float(np.nanmean(ec)), "ec_per_tile": ec.tolist()}
        if out_dir is not None:
            for i, (tile, cam) in enumerate(zip(tiles, cams)):
                save_overlay(tile, cam, Path(out_dir) / f"{method}_{i:03d}.png")
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "explanations.json").write_text(json.dumps(report, indent=1, default=float))
    return report


def save_overlay(tile: np.ndarray, cam: np.ndarray, path: Path) -> None:
    """The tile beside the tile with its explanation as a jet heat map (PNG)."""
    from matplotlib import colormaps
    from PIL import Image

    heat = (colormaps["jet"](cam)[..., :3] * 255).astype(np.uint8)
    blend = (0.55 * tile + 0.45 * heat).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([tile, blend], axis=1)).save(path)
