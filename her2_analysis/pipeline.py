"""Score one slide, top-down: read -> tissue -> tile -> normalise -> grade -> conclude -> encode.

:func:`score_slide` is the whole job; the command line, the embedded server
and the Celery task all call it with :class:`her2_analysis.options.ScoringOptions`.
Every step is a named function in the module that owns its concept: the
slide's tiles in :mod:`her2_analysis.tiles`, quality control in
:mod:`her2_analysis.quality`, the graders in :mod:`her2_analysis.cnn` and
:mod:`her2_analysis.membrane`, the call in :mod:`her2_analysis.conclusion`, the
DICOM objects in :mod:`her2_analysis.results` (built by :mod:`dicom_io`). It
writes no files: the caller stores or sends :attr:`ScoringResult.datasets`.

Research use only: not for clinical use until validated on real slides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydicom import Dataset
from threadpoolctl import threadpool_limits

from dicom_io.errors import SlideError
from dicom_io.wsi import Slide, SourceIdentity, open_slide
from her2_analysis.cnn import grade_tiles, load_model
from her2_analysis.conclusion import conclude, not_assessable
from her2_analysis.membrane.slide import CellGrading, grade_slide
from her2_analysis.options import Grader, ScoringOptions
from her2_analysis.quality import check_graded, check_slide, check_stain
from her2_analysis.results import result_objects
from her2_analysis.tiles import survey_slide, tile_slide, ungraded_tiling
from her2_core.aggregate import SlideCall, SlideScore

log = logging.getLogger(__name__)


@dataclass
class ScoringResult:
    """What one job produced: the slide's score, the identity it belongs to, its result objects and measures.

    ``score.call`` is the slide call, made by the grader ``decided_by`` (None: not assessable); ``cnn_call`` is
    the CNN tile grader's own call and ``cells`` the membrane grader's result (None when it did not run).
    ``thumbnail`` (with ``thumbnail_scale``, scored-level pixels per thumbnail pixel) and ``model`` (the tile
    model's name, version, provider and precision) are for the overlays and summary a caller may write.
    """

    score: SlideScore
    source: SourceIdentity
    datasets: list[Dataset]
    stats: dict[str, float] = field(default_factory=dict)
    cnn_call: SlideCall = SlideCall.NOT_ASSESSABLE
    cells: CellGrading | None = None
    decided_by: Grader | None = None
    thumbnail: np.ndarray | None = None
    thumbnail_scale: float = 1.0
    model: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=1)
def single_threaded_blas() -> None:
    """Run numpy's BLAS (OpenBLAS) on one thread in this process, from now on.

    The job parallelises over tiles (decode pool) and inside ONNX Runtime; its
    BLAS calls are thin products of (pixels, 3) by (3, 2) arrays in the stain
    fit, QC and the first tiles' normalisation, after each of which OpenBLAS's
    extra threads spin for about 0.1 s, taking a core from decoding (measured:
    20 % of a 229-tile slide's CPU time on 2 cores).
    """
    threadpool_limits(limits=1, user_api="blas")


def score_slide(source: Path | Slide, options: ScoringOptions,
                progress: Callable[[int, int], None] | None = None) -> ScoringResult:
    """Score the slide in the folder or file ``source``, or one already opened (e.g. over DICOMweb, which this
    closes)."""
    started = time.perf_counter()
    single_threaded_blas()
    cells: CellGrading | None = None
    with source if isinstance(source, Slide) else open_slide(source) as slide:
        model = load_model(Path(options.model_path), options.device, options.intra_op_threads,
                           options.white_fraction_max, options.precision)
        survey = survey_slide(slide)
        thresholds = options.quality
        with ThreadPoolExecutor(max_workers=1) as qc:  # slide QC on the thumbnail while the stains are fitted
            slide_qc = qc.submit(check_slide, survey.thumbnail, survey.mask, thresholds)
            try:
                tiled = tile_slide(slide, survey, model.card.tile_size, model.card.mpp, model.card.stain,
                                   options.decode_threads)
            except SlideError:
                if not slide_qc.result().not_assessable:
                    raise
                tiled = ungraded_tiling(slide, survey, model.card.tile_size)  # e.g. H&E overview: no level to grade
            quality = slide_qc.result()
        check_stain(quality, tiled.normaliser, thresholds)
        level = tiled.level
        if quality.not_assessable:
            cnn, stats = not_assessable(tiled.grid, quality), {"tiles_candidate": 0, "tiles_scored": 0}
        else:
            cnn, sharpness, stats = grade_tiles(tiled, model, options.batch_size, options.decode_threads,
                                                options.white_fraction_max, options.evidence_floor_percent, progress)
            if options.membrane_grader:
                cells = grade_slide(slide, tiled, options.membrane, options.membrane_max_fields,
                                    options.decode_threads, options.evidence_floor_percent)
            check_graded(quality, sharpness, cnn.tumour_area_mm2,
                         None if cells is None else cells.summary.tumour_cells, thresholds)
            stats.update(cell_stats(cells))
        score, decided_by = conclude(cnn, cells, quality, tiled.normaliser.notes, stats.get("tiles_corrupt", 0),
                                     options.grader, options.membrane_grader)
        try:
            datasets = result_objects(slide, level, score, cnn, cells, decided_by, model.card, options.membrane)
        except ValueError as exc:  # the builders refuse source metadata they cannot encode: bad input, not a fault
            raise SlideError(f"result objects could not be built from this slide's metadata: {exc}") from exc
        identity = slide.identity
    stats["seconds"] = time.perf_counter() - started
    stats.update(tiled.tiles.summary())
    stats.update({f"qc_{k}": v for k, v in quality.measures.items()})
    log.info("scored series %s: %s in %.1f s (%d tiles)", identity.series_instance_uid, score.call.value,
             stats["seconds"], stats["tiles_scored"])
    return ScoringResult(score=score, source=identity, datasets=datasets, stats=stats, cnn_call=cnn.call,
                         cells=cells, decided_by=decided_by, thumbnail=survey.thumbnail,
                         thumbnail_scale=survey.thumbnail_mpp / level.mpp,
                         model={"name": model.card.name, "version": model.card.version, "provider": model.provider,
                                "precision": model.precision})


def cell_stats(cells: CellGrading | None) -> dict[str, float]:
    """The membrane grader's counts and cost for the result's ``stats``."""
    if cells is None:
        return {}
    return {"membrane_fields": cells.fields, "membrane_seconds": cells.seconds, "membrane_mpp": cells.level.mpp,
            "membrane_source_mpp": cells.source_level.mpp, "membrane_tumour_cells": cells.summary.tumour_cells,
            "membrane_other_cells": cells.summary.non_tumour, "membrane_h_gain": cells.h_gain}
