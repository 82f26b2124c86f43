"""PNG overlays for pathologists: tile grades over the slide thumbnail, and one field's graded cells, with legends."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from dicom_io.codes import CLASS_COLOURS
from her2_analysis.membrane.field import CellTable
from her2_core.aggregate import CLASSES, SlideScore
from her2_core.facts import INTENDED_USE

#: Colour per class index (:data:`dicom_io.codes.CLASS_COLOURS`, as in the SEG and the ANN).
_COLOURS = np.array([CLASS_COLOURS[c] for c in CLASSES], np.float32)


def overlay_image(thumbnail: np.ndarray, score: SlideScore, level_px_per_thumb_px: float,
                  alpha: float = 0.45) -> Image.Image:
    """Blend the argmax class of each scored tile over ``thumbnail``.

    ``level_px_per_thumb_px`` is the size of one thumbnail pixel in pixels of
    the scored level (thumbnail mpp / level mpp).
    """
    grid = score.grid
    h, w = thumbnail.shape[:2]
    colours = np.zeros((grid.rows, grid.cols, 3), np.float32)
    weight = np.zeros((grid.rows, grid.cols), np.float32)
    if score.scored.any():
        cls = np.argmax(np.where(score.scored[..., None], np.nan_to_num(score.probabilities), -1.0), axis=-1)
        colours = _COLOURS[cls]
        weight = np.where(score.scored, alpha * np.clip(0.3 + score.tumour_fraction, 0, 1), 0.0)
    # Each thumbnail pixel takes the value of the tile under its centre.
    ri = np.clip(((np.arange(h) + 0.5) * level_px_per_thumb_px // grid.tile_size).astype(int), 0, grid.rows - 1)
    ci = np.clip(((np.arange(w) + 0.5) * level_px_per_thumb_px // grid.tile_size).astype(int), 0, grid.cols - 1)
    tile_colour = colours[ri][:, ci]
    tile_weight = weight[ri][:, ci][..., None]
    blended = thumbnail.astype(np.float32) * (1 - tile_weight) + tile_colour * tile_weight
    image = Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8))
    return _legend(image, f"HER2 IHC call: {score.call.value}   ({INTENDED_USE})",
                   [f"{name}: {score.percentages[name]:.1f} % of tumour area" for name in CLASSES], ring=False)


def _legend(image: Image.Image, title: str, lines: list[str], ring: bool) -> Image.Image:
    """``image`` above a white legend: ``title``, then one line per class beside its colour (a ring or a square)."""
    legend_h = 22 * (len(CLASSES) + 2)
    canvas = Image.new("RGB", (max(image.width, 320), image.height + legend_h), "white")
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = image.height + 4
    draw.text((6, y), title, fill="black")
    for k, line in enumerate(lines):
        y += 22
        colour = CLASS_COLOURS[CLASSES[k]]
        if ring:
            draw.ellipse((6, y, 20, y + 14), outline=colour, width=3)
        else:
            draw.rectangle((6, y, 22, y + 14), fill=colour)
        draw.text((30, y), line, fill="black")
    return canvas


#: Non-tumour cells (left out by the tumour rule) in the cell field.
OTHER_CELL_COLOUR = (150, 150, 150)


def cell_field_image(rgb: np.ndarray, cells: CellTable, radius: int = 6) -> Image.Image:
    """One graded field with a ring per detected cell, coloured by its membrane class, and a legend.

    Tumour cells get their class colour (:data:`dicom_io.codes.CLASS_COLOURS`, as in the
    thumbnail overlay); cells left out by the tumour rule a small grey dot.
    """
    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    for (x, y), tumour, cls in zip(cells.centroids, cells.tumour, cells.cell_class):
        if tumour:
            colour = CLASS_COLOURS[CLASSES[cls]]
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=3)
        else:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=OTHER_CELL_COLOUR)
    counts = [int(np.count_nonzero(cells.tumour & (cells.cell_class == k))) for k in range(len(CLASSES))]
    return _legend(image, f"Membrane grader, one field: tumour cells by class ({INTENDED_USE})",
                   [f"{name}: {counts[k]} tumour cells" for k, name in enumerate(CLASSES)], ring=True)

