"""Region outlines <-> per-tile areas: trace a raster mask into polygons, sample polygons on a tile grid.

Coordinates are (x, y) = (column, row) in pixels with (0, 0) at the top-left
corner of the first pixel (the convention of highdicom's image transformers
and of :mod:`dicom_io.annotations`).

A Microscopy Bulk Simple Annotations POLYGON has no holes, so
:func:`mask_outlines` joins each hole to its outline by a zero-width "keyhole"
bridge (out along an edge, round the hole the other way, back along the same
edge). Filled by the even-odd rule - as :func:`class_areas` does, via
skimage's point-in-polygon test - the doubled bridge adds nothing and the hole
stays empty.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.spatial import cKDTree
from skimage import draw, measure

from her2_core.aggregate import CLASSES


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _join(ring: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """``ring`` with ``hole`` spliced in at their closest vertices (keyhole bridge)."""
    dist, nearest = cKDTree(ring).query(hole)
    j = int(np.argmin(dist))
    i = int(nearest[j])
    return np.concatenate([ring[: i + 1], np.roll(hole, -j, axis=0), hole[j : j + 1], ring[i:]])


def mask_outlines(mask: np.ndarray) -> list[np.ndarray]:
    """One closed polygon (N, 2) per connected region of ``mask``, holes keyholed in.

    Outlines run along the 0.5 iso-line between pixel centres (skimage's
    marching squares), so a region's area is exact up to 1/8 pixel per corner.
    The first point is not repeated at the end (PS3.3 C.37.1.2 POLYGON).
    """
    contours = measure.find_contours(np.pad(mask, 1).astype(np.float32), 0.5, positive_orientation="high")
    # (row, col) of the padded array -> (x, y) pixel-corner coordinates of the mask.
    rings = [c[:-1, ::-1] - 0.5 for c in contours if len(c) > 3]
    outers = sorted((r for r in rings if _signed_area(r) < 0), key=lambda r: -_signed_area(r))
    holes = [r for r in rings if _signed_area(r) > 0]
    joined = list(outers)
    for hole in holes:
        # The innermost outline that contains the hole (outers sorted by area, smallest first).
        k = next((k for k, r in enumerate(outers) if measure.points_in_poly(hole[:1], r)[0]), None)
        if k is not None:
            joined[k] = _join(joined[k], hole)
    return joined


def class_areas(polygons: Mapping[str, Sequence[np.ndarray]], tissue: np.ndarray, grid: tuple[int, int],
                tile_px: float, level_size: tuple[int, int], downsample: float,
                samples: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Share of each tile's area on tissue inside the polygons of each class (rows, cols, 4), and of any class.

    Parameters
    ----------
    polygons:
        HER2 class -> polygons (N, 2) in base-level pixels.
    tissue:
        Tissue mask of the whole slide at any resolution (mapped onto the level by proportion,
        as :func:`her2_core.preprocessing.candidate_tiles` does).
    grid:
        (rows, cols) of the tile grid at the training level; ``tile_px`` its tile size in level pixels.
    level_size:
        (width, height) of the training level; points past it are glass.
    downsample:
        Base-level pixels per training-level pixel.
    samples:
        Sample points per tile side (each tile is sampled at ``samples**2`` point centres).

    A point inside polygons of two classes counts for both classes, once for "any class".
    """
    rows, cols = grid
    h, w = rows * samples, cols * samples
    step = tile_px / samples  # level pixels between sample points
    centre_y = (np.arange(h) + 0.5) * step
    centre_x = (np.arange(w) + 0.5) * step
    mh, mw = tissue.shape
    inside_y = centre_y < level_size[1]
    inside_x = centre_x < level_size[0]
    ty = np.minimum((centre_y / level_size[1] * mh).astype(int), mh - 1)
    tx = np.minimum((centre_x / level_size[0] * mw).astype(int), mw - 1)
    on_tissue = tissue[np.ix_(ty, tx)] & inside_y[:, None] & inside_x[None, :]
    out = np.zeros((rows, cols, len(CLASSES)))
    annotated = np.zeros((h, w), bool)
    for k, name in enumerate(CLASSES):
        hit = np.zeros((h, w), bool)
        for poly in polygons.get(name, ()):
            # Sample (i, j) sits at level pixel ((j + 0.5) * step, (i + 0.5) * step).
            rr, cc = draw.polygon(poly[:, 1] / downsample / step - 0.5, poly[:, 0] / downsample / step - 0.5, (h, w))
            hit[rr, cc] = True
        hit &= on_tissue
        annotated |= hit
        out[..., k] = hit.reshape(rows, samples, cols, samples).mean(axis=(1, 3))
    return out, annotated.reshape(rows, samples, cols, samples).mean(axis=(1, 3))
