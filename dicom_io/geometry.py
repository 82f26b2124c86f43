"""Geometry of a graded slide level: pixel spacing, the tile grid on it, tile centres, the scored outline.

Image coordinates are continuous (column, row) of a level's Total Pixel Matrix
with (0, 0) at the top-left corner of the top-left pixel; highdicom's
:class:`~highdicom.spatial.ImageToReferenceTransformer` maps them into the
slide coordinate system (mm) from the level's Total Pixel Matrix Origin and
Image Orientation (Slide) (Whole Slide Microscopy Image Module, PS3.3 C.8.12.4).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset

from her2_core.aggregate import CLASSES, SlideScore, TileGrid


def level_spacing(level: Dataset) -> tuple[float, float]:
    """(row, column) Pixel Spacing in mm of a WSM level (Shared Functional Groups, PS3.3 C.7.6.16.2.1)."""
    try:
        spacing = level.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError) as exc:
        raise ValueError(
            f"scored level {level.get('SOPInstanceUID', '?')} has no "
            "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing"
        ) from exc
    return float(spacing[0]), float(spacing[1])


def check_score_fits(scored_level: Dataset, score: SlideScore) -> TileGrid:
    """Refuse a score whose arrays or grid do not fit ``scored_level``; return the grid."""
    grid = score.grid
    for keyword in ("FrameOfReferenceUID", "TotalPixelMatrixOriginSequence", "ImageOrientationSlide",
                    "TotalPixelMatrixRows", "TotalPixelMatrixColumns"):
        if keyword not in scored_level:
            raise ValueError(f"scored level {scored_level.get('SOPInstanceUID', '?')} has no {keyword}")
    if grid.rows < 1 or grid.cols < 1 or grid.tile_size < 1:
        raise ValueError(f"tile grid is empty: {grid}")
    if score.probabilities.shape != (grid.rows, grid.cols, len(CLASSES)):
        raise ValueError(
            f"score.probabilities has shape {score.probabilities.shape}, "
            f"expected {(grid.rows, grid.cols, len(CLASSES))} from the tile grid"
        )
    missing = [c for c in CLASSES if c not in score.percentages]
    if missing:
        raise ValueError(f"score.percentages has no value for class(es) {missing}")
    for name in ("scored", "tumour_fraction"):
        if getattr(score, name).shape != (grid.rows, grid.cols):
            raise ValueError(f"score.{name} has shape {getattr(score, name).shape}, expected {(grid.rows, grid.cols)}")
    spacing = level_spacing(scored_level)
    if not np.allclose(spacing, grid.pixel_spacing_mm, rtol=0.01):
        raise ValueError(
            f"tile grid pixel spacing {grid.pixel_spacing_mm} mm does not match the scored level's "
            f"PixelSpacing {spacing} mm: the grid was not made on this level"
        )
    if (grid.rows - 1) * grid.tile_size >= scored_level.TotalPixelMatrixRows or \
            (grid.cols - 1) * grid.tile_size >= scored_level.TotalPixelMatrixColumns:
        raise ValueError(
            f"tile grid {grid.rows}x{grid.cols} of {grid.tile_size} px extends beyond the scored level's "
            f"Total Pixel Matrix ({scored_level.TotalPixelMatrixRows}x{scored_level.TotalPixelMatrixColumns})"
        )
    return grid


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull (Andrew's monotone chain) of (n, 2) points, collinear points dropped."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def scored_region_outline(scored_level: Dataset, score: SlideScore) -> np.ndarray:
    """Closed polygon (n, 3) in slide coordinates (mm) around the scored tiles.

    The outline is the convex hull of the corners of the scored tiles, clipped
    to the Total Pixel Matrix; with no scored tile it is the whole level.
    Image coordinates are continuous (column, row) with (0, 0) at the top-left
    corner of the top-left pixel; :class:`highdicom.spatial.ImageToReferenceTransformer`
    maps them into the slide coordinate system using the level's Total Pixel
    Matrix Origin and Image Orientation (Slide) (Whole Slide Microscopy Image
    Module, PS3.3 C.8.12.4).

    Parameters
    ----------
    scored_level: pydicom.Dataset
        The graded VL Whole Slide Microscopy Image instance.
    score: SlideScore
        Its score; ``score.scored`` marks the graded tiles.

    Returns
    -------
    numpy.ndarray
        (n, 3) float array, first point repeated at the end (SCOORD3D POLYGON).

    """
    grid = score.grid
    width, height = int(scored_level.TotalPixelMatrixColumns), int(scored_level.TotalPixelMatrixRows)
    rows, cols = np.nonzero(score.scored)
    if rows.size == 0:
        corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], float)
    else:
        t = grid.tile_size
        corners = np.concatenate([
            np.stack([(cols + dc) * t, (rows + dr) * t], axis=1) for dr in (0, 1) for dc in (0, 1)
        ]).astype(float)
        corners[:, 0] = corners[:, 0].clip(0, width)
        corners[:, 1] = corners[:, 1].clip(0, height)
    hull = _convex_hull(corners)
    if len(hull) < 3:  # tiles clipped to a line: fall back to the level outline
        hull = np.array([[0, 0], [width, 0], [width, height], [0, height]], float)
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(scored_level, for_total_pixel_matrix=True)
    polygon = to_slide(hull)
    return np.vstack([polygon, polygon[:1]])


def tile_centre_position(scored_level: Dataset, tile_size: int, row: int = 0,
                         col: int = 0) -> tuple[float, float, float]:
    """Slide coordinates (x, y, z) in mm of the centre of tile (``row``, ``col``).

    Tile (r, c) covers image coordinates [c*T, (c+1)*T) x [r*T, (r+1)*T) of the
    level's Total Pixel Matrix, so its centre is at image coordinate
    ((c + 1/2) T, (r + 1/2) T), where (0, 0) is the top-left corner of the
    top-left pixel. The Total Pixel Matrix Origin Sequence is read, as highdicom
    reads it, as the position of the *centre* of the top-left pixel -- the
    convention of Image Position (Patient) (PS3.3 C.7.6.2.1.1), which also
    holds for every Plane Position (Slide) item highdicom writes.

    Parameters
    ----------
    scored_level: pydicom.Dataset
        A tiled VL Whole Slide Microscopy Image instance.
    tile_size: int
        Tile edge in pixels of that level.
    row, col: int
        Tile indices.

    Returns
    -------
    tuple of float
        (x, y, z) in mm.

    """
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(scored_level, for_total_pixel_matrix=True)
    x, y, z = to_slide(np.array([[(col + 0.5) * tile_size, (row + 0.5) * tile_size]], float))[0]
    return float(x), float(y), float(z)
