"""Non-overlapping tile grid at the model's magnification and the white-background filter."""

from __future__ import annotations

import math

import numpy as np

from her2_core.aggregate import TileGrid
from her2_core.preprocessing.tissue import REFERENCE_GLASS

#: A pixel is background ("white") when all three channels are at least this bright, on glass that reads
#: :data:`~her2_core.preprocessing.tissue.REFERENCE_GLASS` (scaled to a slide's own glass: :func:`white_fraction`).
WHITE_LEVEL = 220


def grid_for_level(width: int, height: int, tile_size: int, pixel_spacing_mm: tuple[float, float]) -> TileGrid:
    """Tiles of ``tile_size`` covering a level of ``width x height`` pixels.

    Edge tiles that run past the level are kept (the reader pads them with
    white, so the white filter decides whether they are scored).
    """
    return TileGrid(
        rows=math.ceil(height / tile_size),
        cols=math.ceil(width / tile_size),
        tile_size=tile_size,
        pixel_spacing_mm=pixel_spacing_mm,
    )


def candidate_tiles(mask: np.ndarray, grid: TileGrid, min_coverage: float = 0.02) -> list[tuple[int, int]]:
    """Tiles (row, col) whose footprint on the tissue ``mask`` covers at least ``min_coverage``.

    ``mask`` is the tissue mask of any level of the same slide; it is mapped
    onto the grid by proportion, so only tissue tiles are ever read. A tile's
    footprint is mask rows ``[r0, r1)`` and columns ``[c0, c1)``, at least one
    pixel each way (neighbours may share a row or column); its tissue pixels
    are summed for all tiles at once, along each mask row, then down the columns.
    """
    rows, r_sizes = _footprints(grid.rows, mask.shape[0])
    cols, c_sizes = _footprints(grid.cols, mask.shape[1])
    padded = np.pad(np.asarray(mask, bool), ((0, 1), (0, 1)))  # an end index may be the mask's size
    along = np.add.reduceat(padded, cols, axis=1, dtype=np.int32)[:, ::2]  # a row of a footprint: < 2**31
    tissue = np.add.reduceat(along, rows, axis=0, dtype=np.int64)[::2]
    coverage = tissue / np.outer(r_sizes, c_sizes)
    return [(int(r), int(c)) for r, c in np.argwhere(coverage >= min_coverage)]


def _footprints(tiles: int, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """The footprints of ``tiles`` tiles spread over ``pixels`` mask pixels: their first and end indices
    interleaved (``np.add.reduceat`` sums each footprint at the even places), and their sizes."""
    start = np.array([int(i * pixels / tiles) for i in range(tiles)], np.int64)
    end = np.maximum(start + 1, [math.ceil((i + 1) * pixels / tiles) for i in range(tiles)])
    return np.stack([start, end], axis=1).reshape(-1), end - start


def white_levels(glass: tuple[float, float, float] | None) -> tuple[int, int, int]:
    """Per-channel background levels on a slide whose glass reads ``glass``: :data:`WHITE_LEVEL` times the glass over
    the reference glass (a scanner's white balance is a gain per channel); :data:`WHITE_LEVEL` without a glass."""
    if glass is None:
        return WHITE_LEVEL, WHITE_LEVEL, WHITE_LEVEL
    r, g, b = (min(255, round(WHITE_LEVEL * (c + 1.0) / (ref + 1.0))) for c, ref in zip(glass, REFERENCE_GLASS))
    return r, g, b


def white_fraction(tiles: np.ndarray, glass: tuple[float, float, float] | None = None) -> np.ndarray:
    """Fraction of white background (glass) pixels per tile; ``tiles`` is (..., H, W, 3) uint8.

    A pixel is background when every channel reaches :func:`white_levels` of
    the slide's ``glass``: a fixed level let a scanner with darker glass
    (215, 215, 225) send glass tiles to the CNN and to blur QC.
    """
    levels = white_levels(glass)
    if levels[0] == levels[1] == levels[2]:
        white = np.minimum(np.minimum(tiles[..., 0], tiles[..., 1]), tiles[..., 2]) >= levels[0]
    else:
        white = (tiles[..., 0] >= levels[0]) & (tiles[..., 1] >= levels[1]) & (tiles[..., 2] >= levels[2])
    return np.count_nonzero(white, axis=(-2, -1)) / (white.shape[-2] * white.shape[-1])
