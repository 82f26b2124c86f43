"""The membrane grader over a whole slide: fine fields under the tissue tiles -> cells -> slide summary.

ASCO/CAP defines the HER2 IHC score per invasive tumour **cell** (the share
of tumour cells with complete or incomplete, faint / weak-moderate / intense
membrane staining). Membranes are about 1.7-2 um wide, so cells are graded on
fields at :data:`GRADING_MPP` (0.5 um/px, a 20x level, or resampled from a 40x
one), never at the CNN's 1 um/px. :func:`grade_slide` reads only fields that lie
under the tissue tiles the CNN's tile grid already found, at most
``max_fields`` of them spread evenly over the slide (a bounded cost per slide,
as a pathologist scores representative fields of a large section), grades
their cells with :func:`her2_analysis.membrane.field.grade_field` in a thread pool, and
sums them up with :func:`her2_analysis.membrane.field.summarise_cells`. The slide call is
the ASCO/CAP rules of :mod:`her2_core.aggregate` applied to the **cell**
percentages.

A slide without a level fine enough (a 10x-only scan) is not graded here: the
pipeline says so in a flag and the CNN's call stands.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np

from dicom_io.wsi import LEVEL_TOLERANCE, LevelInfo, Slide, TileSource
from her2_analysis.membrane.field import (
    GRADING_MPP,
    CellTable,
    MembraneSummary,
    counterstain_gain,
    grade_field,
    summarise_cells,
)
from her2_analysis.options import MembraneThresholds
from her2_analysis.tiles import Position, TiledSlide, spread_indices
from her2_core.aggregate import SlideCall, asco_cap_call
from her2_core.preprocessing import white_fraction
from her2_core.preprocessing.stain import estimate_stain_vectors, optical_density

#: Side of one graded field in pixels (512 um).
FIELD_PX = 1024
#: Name of the membrane grader in result objects (Algorithm Name, TID 4019).
MEMBRANE_GRADER = "her2-membrane-grader"
#: Its version; a change of method changes it, and with it the result UIDs.
MEMBRANE_GRADER_VERSION = "1.3"
#: Fields with more glass than this hold (almost) no cells and are not graded. High, so that no field with cells is
#: on the edge of it: at 0.8 a field of the real 2+ ISH+ core read 0.7999 through one writer and 0.8000 through
#: another, and its 400 tumour cells were counted in one only.
FIELD_WHITE_MAX = 0.98
#: Fields are resampled from the finest level at least this coarse (um/px): a 40x scan's base (0.25), not an 80x one.
SOURCE_MPP_MIN = 0.2
#: Fields (spread over the slide) the membrane grader's stain estimate is made on.
STAIN_FIELDS = 8


@dataclass
class CellGrading:
    """The membrane grader's result for one slide.

    ``tumour`` holds the graded **tumour** cells, their nucleus centres in
    pixels (column, row) of ``level``, the level the fields were read at (a
    resampled one unless the slide was scanned at :data:`GRADING_MPP`), made
    from ``source_level`` (:func:`membrane_fields`).
    ``example`` is the graded field with the most tumour cells, its RGB
    pixels and cells, for the overlay a pathologist checks. ``h_gain`` is
    the factor applied to the slide's haematoxylin (:func:`her2_analysis.membrane.field.counterstain_gain`).
    """

    summary: MembraneSummary
    call: SlideCall
    level: LevelInfo
    source_level: LevelInfo
    tumour: CellTable
    fields: int
    seconds: float
    example: tuple[np.ndarray, CellTable] | None
    h_gain: float = 1.0


def membrane_grader_version(thresholds: MembraneThresholds) -> str:
    """:data:`MEMBRANE_GRADER_VERSION`, with a digest of the cut-offs when they are not the defaults.

    Other cut-offs grade differently, so their results must not share the
    default's UIDs (a retried job re-sends the same objects; other content
    needs other objects).
    """
    if thresholds == MembraneThresholds():
        return MEMBRANE_GRADER_VERSION
    digest = hashlib.sha256(repr(sorted(asdict(thresholds).items())).encode()).hexdigest()[:8]
    return f"{MEMBRANE_GRADER_VERSION}+{digest}"


def membrane_fields(slide: Slide) -> TileSource | None:
    """Fields of :data:`FIELD_PX` at :data:`GRADING_MPP`, or None when the slide has no level that fine.

    Box-resampled from the slide's **scanned** resolution: the finest level
    no finer than :data:`SOURCE_MPP_MIN` (a 40x scan's base, 0.25 um/px; a
    20x scan's base is read as it is). The pyramid's own lower levels are made
    by each writer, with its own filter and a second lossy encoding, and on a
    real core those moved the cell percentages by up to 6 points between
    writers; the base is what the scanner captured. A slide whose only fine
    levels are finer than that (an 80x scan without a 40x level) is resampled
    from the nearest of them.
    """
    fine = [lvl for lvl in slide.levels if lvl.mpp <= GRADING_MPP * (1 + LEVEL_TOLERANCE)]
    if not fine:
        return None
    scanned = [lvl for lvl in fine if lvl.mpp >= SOURCE_MPP_MIN]
    source = min(scanned, key=lambda lvl: lvl.mpp) if scanned else max(fine, key=lambda lvl: lvl.mpp)
    return slide.tile_source(GRADING_MPP, FIELD_PX, source=source)


def membrane_stains(fields: list[np.ndarray], fallback: np.ndarray,
                    glass: tuple[float, float, float] | None) -> np.ndarray:
    """The slide's (haematoxylin, DAB) OD matrix estimated on graded fields (RGB at :data:`GRADING_MPP`).

    The membrane grader unmixes at its own resolution with stains estimated
    there (:func:`her2_core.preprocessing.stain.estimate_stain_vectors`; DAB
    is always the reference vector), not with the CNN's fit on the writer's
    1 um/px level: JPEG chroma subsampling of a derived level tilts the
    haematoxylin estimate by a few degrees, which moved real-core cell
    percentages by 2-3 points between writers.

    Optical density is relative to the slide's ``glass``, as the cells are
    graded. Relative to 255 the glass tint is part of every pale pixel and
    tilts the estimate: on synthetic 1+ to 3+ fields whose haematoxylin lies
    3 (centre A) and 9 (centre B) degrees from the reference it read 13-15,
    glass-relative 3-3.5 and 9-9.3; and a scanner's white balance moved it,
    which moved the real cores' cell percentages (see :func:`grade_slide`).
    ``fallback`` when the fields hold too few stained pixels.
    """
    if not fields:
        return fallback
    od = optical_density(np.concatenate([f[::2, ::2].reshape(-1, 3) for f in fields]), glass)
    matrix, notes = estimate_stain_vectors(od)
    return fallback if notes else matrix


@dataclass(frozen=True)
class FieldCalibration:
    """What the membrane grader measures on a slide before it grades cells: the slide's glass RGB (optical
    density is relative to it), its stains (:func:`membrane_stains`) and its counterstain gain
    (:func:`her2_analysis.membrane.field.counterstain_gain`)."""

    glass: tuple[float, float, float] | None
    stains: np.ndarray
    h_gain: float

    @classmethod
    def measure(cls, sample: list[np.ndarray], mpp: float, glass: tuple[float, float, float] | None,
                fallback: np.ndarray, thresholds: MembraneThresholds) -> FieldCalibration:
        """Measured on ``sample``, fields spread over the slide (RGB at ``mpp``); ``fallback`` stains (see
        :func:`membrane_stains`)."""
        stains = membrane_stains(sample, fallback, glass)
        return cls(glass, stains, counterstain_gain(sample, mpp, stains, glass, thresholds))

    def grade(self, rgb: np.ndarray, mpp: float, thresholds: MembraneThresholds) -> CellTable:
        """The cells of one field (:func:`her2_analysis.membrane.field.grade_field`) on this calibration."""
        return grade_field(rgb, mpp, self.stains, thresholds, glass=self.glass, h_gain=self.h_gain)


def field_positions(prepared: TiledSlide, level: LevelInfo, max_fields: int) -> list[Position]:
    """Fields (row, col) of :data:`FIELD_PX` on ``level`` under the prepared slide's tissue tiles, spread evenly.

    A field belongs to the tissue tile under its centre, so every field is
    inside tissue the tile grid found and no field is counted twice.
    """
    grid = prepared.grid
    tile_um = grid.tile_size * grid.pixel_spacing_mm[1] * 1000.0
    field_um = FIELD_PX * level.mpp
    tissue = set(prepared.candidates)
    rows, cols = -(-level.height // FIELD_PX), -(-level.width // FIELD_PX)
    fields = [(r, c) for r in range(rows) for c in range(cols)
              if (int((r + 0.5) * field_um // tile_um), int((c + 0.5) * field_um // tile_um)) in tissue]
    return [fields[i] for i in spread_indices(len(fields), max_fields)]


def grade_slide(slide: Slide, prepared: TiledSlide, thresholds: MembraneThresholds, max_fields: int,
                    threads: int, evidence_floor: float) -> CellGrading | None:
    """Grade tumour cells on fine fields under the slide's tissue tiles; None without a fine enough level.

    Optical density is taken relative to the slide's glass (measured on the
    survey thumbnail); the stains (:func:`membrane_stains`) and the
    counterstain gain (:func:`her2_analysis.membrane.field.counterstain_gain`) are
    estimated on :data:`STAIN_FIELDS` of the fields, spread over the slide
    (:class:`FieldCalibration`). Every measure is glass-relative (fields kept
    by :func:`her2_core.preprocessing.white_fraction` on the slide's glass), so a scanner's white balance does not
    move the grade. Measured on the real cores with each channel scaled so
    that their glass reads (252, 250, 253), (246, 244, 250), (245, 236, 222)
    or (222, 226, 244) instead of about (234, 233, 240): before grader 1.3
    (stains estimated relative to 255, a fixed white level, pure white left
    out as "not image") the 1+ core read up to 74.5 % 1+ cells instead of
    38.5 % and the 2+ ISH- core was called 0 (ultralow); since, every call
    holds, no class moves by more than 1.7 points and the tumour cells by
    more than 4 % (``tests/her2_analysis/test_real_tissue.py``, white balance).

    The slide call applies ASCO/CAP to the cell percentages with the same
    ``evidence_floor`` as the CNN's area percentages: a class held by no more
    than that percentage of tumour cells counts as absent (without it one
    intense cell among thousands would make a slide 2+).
    """
    source = membrane_fields(slide)
    if source is None:
        return None
    started = time.perf_counter()
    level = source.level
    positions = field_positions(prepared, level, max_fields)

    glass = prepared.survey.glass

    def fetch(pos: Position) -> np.ndarray | None:
        rgb = source.decodable(*pos)
        return None if rgb is None or white_fraction(rgb, glass) > FIELD_WHITE_MAX else rgb

    tables: list[CellTable] = []
    tumour: list[CellTable] = []
    example: tuple[np.ndarray, CellTable] | None = None
    with ThreadPoolExecutor(max_workers=threads) as pool:
        sampled = [positions[i] for i in spread_indices(len(positions), STAIN_FIELDS)]
        fetched = dict(zip(sampled, pool.map(fetch, sampled)))
        sample = [rgb for rgb in fetched.values() if rgb is not None]
        calibration = FieldCalibration.measure(sample, level.mpp, glass, prepared.normaliser.source_matrix,
                                               thresholds)

        def grade(pos: Position) -> tuple[Position, np.ndarray, CellTable] | None:
            rgb = fetched.pop(pos) if pos in fetched else fetch(pos)
            if rgb is None:
                return None
            return pos, rgb, calibration.grade(rgb, level.mpp, thresholds)

        for graded in pool.map(grade, positions):
            if graded is None:
                continue
            (row, col), rgb, table = graded
            tables.append(table)
            cells = table.select(table.tumour)
            tumour.append(replace(cells, centroids=cells.centroids + np.array([col, row], np.float32) * FIELD_PX))
            if example is None or table.tumour.sum() > example[1].tumour.sum():
                example = (rgb, table)
    summary = summarise_cells(tables)
    return CellGrading(
        summary=summary,
        call=asco_cap_call(summary.percentages, evidence_floor) if summary.tumour_cells else SlideCall.NOT_ASSESSABLE,
        level=level,
        source_level=source.source_level,
        tumour=CellTable.concatenate(tumour),
        fields=len(tables),
        seconds=time.perf_counter() - started,
        example=example,
        h_gain=calibration.h_gain,
    )
