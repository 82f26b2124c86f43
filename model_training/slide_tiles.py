"""Training tiles from DICOM slides, through the inference path (:mod:`her2_analysis.tiles`).

Synthetic slides are first written as DICOM (``her2 synth`` /
:func:`her2_synthetic.dicom.write_synthetic_slide`) and then read
back exactly as the worker reads a slide from the PACS: same pyramid level,
same thumbnail, same tissue mask, same stain fit, same white filter, same
normalisation, same JPEG artefacts. Only the labels come from the generator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dicom_io.wsi import Slide, open_slide
from her2_analysis.tiles import (
    Position,
    TiledSlide,
    survey_slide,
    tile_batches,
    tile_slide,
)
from her2_core.facts import WHITE_FRACTION_MAX
from her2_core.preprocessing import REFERENCE, StainNormaliser, StainReference
from her2_synthetic.dicom import TRUTH_FILE
from her2_synthetic.render import SlideSpec, truth_grid


@dataclass
class SlideTiles:
    """Normalised tissue tiles of one slide with their per-tile ground truth."""

    tiles: np.ndarray  # (N, T, T, 3) uint8, normalised
    class_fractions: np.ndarray  # (N, 4) share of the tile's tumour area per class
    tumour_fraction: np.ndarray  # (N,) share of the tile's area that is tumour
    positions: list[tuple[int, int]]
    patient_id: str
    centre: str
    normaliser: StainNormaliser | Unnormalised  # the slide's, as fitted on its DICOM tiles


def load_spec(series_dir: Path) -> SlideSpec:
    """The :class:`SlideSpec` recorded in a synthetic slide's ground-truth sidecar."""
    spec = json.loads((Path(series_dir) / TRUTH_FILE).read_text())["spec"]
    return SlideSpec.from_dict(spec)


class Unnormalised:
    """Stand-in for the slide's stain normaliser that returns tiles unchanged (normalisation ablation only)."""

    notes: tuple[str, ...] = ()

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return tiles


def read_slide_tiles(slide: Slide, tile_size: int, mpp: float, reference: StainReference = REFERENCE,
                     white_fraction_max: float = WHITE_FRACTION_MAX, batch_size: int = 16, threads: int = 2,
                     normalise: bool = True) -> tuple[np.ndarray, list[Position], TiledSlide]:
    """Kept, normalised tissue tiles of an opened slide at ``mpp`` um/px, through the worker's own tile path.

    Returns the tiles, their grid positions (row, col) and the prepared slide (survey with tissue mask,
    level, grid) they came from. ``normalise=False`` keeps the tiles' original stain colours (to measure what normalisation buys).
    """
    prepared = tile_slide(slide, survey_slide(slide), tile_size, mpp, reference)
    if not normalise:
        prepared = replace(prepared, normaliser=Unnormalised())
    tiles, positions = [], []
    for batch in tile_batches(prepared, batch_size, threads, white_fraction_max):
        tiles.append(batch.tiles)
        positions.extend(batch.positions)
    out = np.concatenate(tiles) if tiles else np.zeros((0, tile_size, tile_size, 3), np.uint8)
    return out, positions, prepared


def synthetic_slide_tiles(series_dir: Path, tile_size: int = 512, mpp: float = 1.0,
                          reference: StainReference = REFERENCE, white_fraction_max: float = WHITE_FRACTION_MAX,
                          batch_size: int = 16, threads: int = 2, normalise: bool = True) -> SlideTiles:
    """All kept tissue tiles of a synthetic DICOM slide at ``mpp`` um/px, with ground truth.

    ``normalise=False`` keeps the tiles' original stain colours (to measure what normalisation buys).
    """
    spec = load_spec(series_dir)
    fractions, tumour = truth_grid(spec, tile_size * mpp)
    with open_slide(series_dir) as slide:
        tiles, positions, prepared = read_slide_tiles(slide, tile_size, mpp, reference, white_fraction_max,
                                                      batch_size, threads, normalise)
    rows, cols = (np.array(positions, dtype=int).reshape(-1, 2).T if positions else (np.zeros(0, int),) * 2)
    # The slide's pixel grid may extend past the spec by a partial tile: clip to the truth grid.
    rows = np.minimum(rows, fractions.shape[0] - 1)
    cols = np.minimum(cols, fractions.shape[1] - 1)
    return SlideTiles(
        tiles=tiles,
        class_fractions=fractions[rows, cols].astype(np.float32),
        tumour_fraction=tumour[rows, cols].astype(np.float32),
        positions=positions,
        patient_id=spec.patient_id,
        centre=spec.centre,
        normaliser=prepared.normaliser,
    )
