"""Tile datasets from DICOM slides with HER2 region annotations (``--data dicom-annotated``).

Layout (docs/training.md, "Data"): any folder tree holding, per slide, the VL
WSM series and, in the same study, a Microscopy Bulk Simple Annotations object
that references it, whose groups outline tumour by HER2 class (read by
:mod:`dicom_io.annotations`). Each slide is tiled by the worker's own path
(:func:`model_training.slide_tiles.read_slide_tiles`: survey, stain fit, >60 %
white filter, Macenko), and each kept tile is labelled from the outlines:

* ``class_fractions``: the areas of the tile's tissue inside the outlines of each
  class, as shares of their sum (a point in outlines of two classes counts for both);
* ``tumour_fraction``: the share of the tile's area that is tissue inside any outline.

The outlines are read as tumour outlines and as exhaustive: a tile outside every
outline is kept as a tumour-free tile (class fractions 0, tumour fraction 0), as
tumour-free synthetic tiles are, so the class loss skips it and the tumour head
learns it as stroma. Slide truth (percentages and ASCO/CAP call) is the outlined
tumour area per class; patient = the slide's PatientID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from dicom_io.annotations import (
    AnnotatedSlide,
    Polygons,
    find_annotated_slides,
    her2_regions,
    read_annotations,
)
from dicom_io.errors import AnnotationError
from dicom_io.wsi import Slide, open_slide
from her2_core.aggregate import CLASSES, asco_cap_call
from her2_core.facts import WHITE_FRACTION_MAX
from her2_core.preprocessing import REFERENCE, StainReference
from her2_synthetic.regions import class_areas
from model_training.slide_tiles import read_slide_tiles
from model_training.splits import split_datasets
from model_training.tileset import CALL_CLASS, SlideInfo, TileSet

#: Sample points per tile side when measuring outline areas.
SAMPLES_PER_TILE = 16


def slide_regions(item: AnnotatedSlide, slide: Slide) -> Polygons:
    """All HER2 outlines of a slide, from every ANN object that references it, in base-level pixels."""
    out: Polygons = {}
    for path in item.annotation_files:
        for name, polys in her2_regions(read_annotations(path), slide.source_datasets, where=path.name).items():
            out.setdefault(name, []).extend(polys)
    return out


def annotated_slide_tileset(item: AnnotatedSlide, centre: str, tile_size: int = 512, mpp: float = 1.0,
                            reference: StainReference = REFERENCE, white_fraction_max: float = WHITE_FRACTION_MAX,
                            normalise: bool = True, threads: int = 1) -> TileSet:
    """The kept tiles of one annotated slide at ``mpp`` um/px with targets from its HER2 outlines."""
    with open_slide(list(item.slide_files)) as slide:
        patient = slide.identity.patient_id
        if not patient:
            raise AnnotationError(f"{item.name}: slide has no PatientID (patient-level splits need one)")
        polygons = slide_regions(item, slide)
        tiles, positions, prepared = read_slide_tiles(slide, tile_size, mpp, reference, white_fraction_max,
                                                      threads=threads, normalise=normalise)
        level = prepared.level
        areas, annotated = class_areas(polygons, prepared.survey.mask, (prepared.grid.rows, prepared.grid.cols),
                                       tile_size, (level.width, level.height), level.mpp / slide.levels[0].mpp,
                                       SAMPLES_PER_TILE)
    totals = areas.sum(axis=-1, keepdims=True)
    fractions = np.divide(areas, totals, out=np.zeros_like(areas), where=totals > 0)
    rows, cols = np.array(positions, dtype=int).reshape(-1, 2).T
    slide_area = areas.sum(axis=(0, 1))
    pct = {c: float(100.0 * slide_area[k] / slide_area.sum()) if slide_area.sum() else 0.0
           for k, c in enumerate(CLASSES)}
    info = SlideInfo(item.series_instance_uid, patient, centre, CALL_CLASS[asco_cap_call(pct)],
                     tuple(pct[c] for c in CLASSES))
    return TileSet(tiles, fractions[rows, cols].astype(np.float32), annotated[rows, cols].astype(np.float32),
                   np.zeros(len(tiles), int), [info], mpp)


def annotated_tileset(root: Path, centre: str, tile_size: int, mpp: float, normalise: bool = True,
                      progress: bool = True) -> TileSet:
    """Every annotated slide under ``root`` as one tile set."""
    items = find_annotated_slides(root)
    sets = [annotated_slide_tileset(item, centre, tile_size, mpp, normalise=normalise)
            for item in tqdm(items, unit="slide", desc=f"annotated slides @ {mpp} um/px", disable=not progress)]
    return TileSet.concat(sets)


def annotated_datasets(root: Path, test_root: Path | None, tile_size: int, seed: int, mpp: float,
                       normalise: bool = True, progress: bool = True) -> dict[str, TileSet]:
    """``train`` / ``val`` / ``test`` by patient; ``test_root`` (same layout) is an independent test centre."""
    tiles = annotated_tileset(root, "train-centre", tile_size, mpp, normalise, progress)
    test = None if test_root is None else annotated_tileset(test_root, "test-centre", tile_size, mpp, normalise,
                                                             progress)
    return split_datasets(tiles, test, seed)
