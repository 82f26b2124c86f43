"""Score one slide, top-down: read -> tissue -> tile -> normalise -> infer -> aggregate -> encode.

:func:`score_slide` is the whole job; the CLI, the embedded server and the
Celery task all call it. Every step is a named function in the module that
owns its concept: DICOM in :mod:`dicom_io`, preprocessing in
:mod:`her2_core.preprocessing`, the model in :mod:`worker.inference`, the
ASCO/CAP rules in :mod:`her2_core.aggregate`.

Research use only: not for clinical use until validated on real slides.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from pydicom import Dataset
from threadpoolctl import threadpool_limits

from dicom_io.cell_annotations import build_cell_annotations
from dicom_io.errors import SlideError
from dicom_io.result_header import AlgorithmInfo
from dicom_io.seg import build_heatmap
from dicom_io.sr import GraderResult, build_sr
from dicom_io.wsi import LevelInfo, Slide, SourceIdentity, open_slide
from her2_core.aggregate import (
    CLASSES,
    SlideCall,
    SlideScore,
    TileGrid,
    asco_cap_call,
    category_distance,
    class_percentages,
)
from her2_core.facts import INTENDED_USE
from worker.cell_grading import MEMBRANE_GRADER, CellGrading, grade_membranes, membrane_grader_version
from worker.inference import TileModel
from worker.overlay import write_cell_field, write_overlay
from worker.quality import QualityReport, check_graded, check_slide, check_stain
from worker.settings import Settings
from worker.tiles import PreparedSlide, prepare_slide, sharpness_sample, survey_slide, tile_batches, unprepared

log = logging.getLogger(__name__)

NOT_FOR_CLINICAL_USE = f"{INTENDED_USE} (not validated on real slides)."
#: File name of each result object in an output folder, by Modality.
RESULT_FILES = {"SR": "her2_sr.dcm", "SEG": "her2_heatmap_seg.dcm", "ANN": "her2_cells_ann.dcm"}
#: More undecodable tiles than this share of the tissue tiles fails the slide instead of flagging it.
MAX_CORRUPT_SHARE = 0.05


def software_version() -> str:
    try:
        return version("her2-dicom-worker")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class ScoringResult:
    """What one job produced: the score, the identity it belongs to, result objects and files.

    ``score.call`` is the slide call, made by the grader ``decided_by`` ("cnn", "membrane"; None: not
    assessable); ``cnn_call`` is the CNN tile grader's own call and ``cells`` the membrane grader's result
    (None when it did not run).
    """

    score: SlideScore
    source: SourceIdentity
    datasets: list[Dataset]
    files: list[Path] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    cnn_call: SlideCall = SlideCall.NOT_ASSESSABLE
    cells: CellGrading | None = None
    decided_by: str | None = None


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


@lru_cache(maxsize=2)
def load_model(model_path: Path, device: str, intra_op_threads: int, white_fraction_max: float,
               precision: str = "float32") -> TileModel:
    """One ONNX Runtime session per process and model."""
    return TileModel(model_path, device, intra_op_threads, white_fraction_max, precision)


def score_slide(source: Path | Slide, settings: Settings, out_dir: Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> ScoringResult:
    """Score the slide in the folder or file ``source``, or one already opened (e.g. over DICOMweb, which this
    closes); write results to ``out_dir`` when given."""
    started = time.perf_counter()
    single_threaded_blas()
    cells: CellGrading | None = None
    with source if isinstance(source, Slide) else open_slide(source) as slide:
        model = load_model(Path(settings.model_path), settings.device, settings.intra_op_threads,
                           settings.white_fraction_max, settings.precision)
        survey = survey_slide(slide)
        thresholds = settings.quality_thresholds()
        with ThreadPoolExecutor(max_workers=1) as qc:  # slide QC on the thumbnail while the stains are fitted
            slide_qc = qc.submit(check_slide, survey.thumbnail, survey.mask, thresholds)
            try:
                prepared = prepare_slide(slide, survey, model.card.tile_size, model.card.mpp, model.card.stain,
                                         settings.decode_threads)
            except SlideError:
                if not slide_qc.result().not_assessable:
                    raise
                prepared = unprepared(slide, survey, model.card.tile_size)  # e.g. H&E overview: no level to grade
            quality = slide_qc.result()
        check_stain(quality, prepared.normaliser, thresholds)
        level = prepared.level
        if quality.not_assessable:
            tiles, stats = not_assessable(prepared.grid, quality), {"tiles_candidate": 0, "tiles_scored": 0}
        else:
            tiles, sharpness, stats = grade_tiles(prepared, model, settings, progress)
            if settings.membrane_grader:
                cells = grade_membranes(slide, prepared, settings.membrane_thresholds(), settings.membrane_max_fields,
                                        settings.decode_threads, settings.evidence_floor_percent)
            check_graded(quality, sharpness, tiles.tumour_area_mm2,
                         None if cells is None else cells.summary.tumour_cells, thresholds)
            stats.update(cell_stats(cells))
        score, decided_by = conclude(tiles, cells, quality, prepared.normaliser.notes, stats.get("tiles_corrupt", 0),
                                     settings)
        try:
            datasets = result_objects(slide, level, score, tiles, cells, decided_by, model, settings)
        except ValueError as exc:  # the builders refuse source metadata they cannot encode: bad input, not a fault
            raise SlideError(f"result objects could not be built from this slide's metadata: {exc}") from exc
        source = slide.identity
    stats["seconds"] = time.perf_counter() - started
    stats.update(prepared.tiles.summary())
    stats.update({f"qc_{k}": v for k, v in quality.measures.items()})
    result = ScoringResult(score=score, source=source, datasets=datasets, stats=stats, cnn_call=tiles.call,
                           cells=cells, decided_by=decided_by)
    if out_dir is not None:
        result.files = write_outputs(result, survey.thumbnail, survey.thumbnail_mpp / level.mpp, Path(out_dir), model)
    log.info("scored series %s: %s in %.1f s (%d tiles)", source.series_instance_uid, score.call.value,
             stats["seconds"], stats["tiles_scored"])
    return result


def result_objects(slide: Slide, level: LevelInfo, score: SlideScore, tiles: SlideScore, cells: CellGrading | None,
                   decided_by: str | None, model: TileModel, settings: Settings) -> list[Dataset]:
    """SR, SEG heatmap (tiles graded) and cell ANN (cells graded): the SR lists both graders and references the rest.

    ``decided_by`` names the grader whose call is the slide call ("cnn", "membrane"; None: not assessable).
    """
    level_ds = slide.level_dataset(level.index)
    cnn = AlgorithmInfo(name=model.card.name, version=model.card.version, software_version=software_version())
    graders = [GraderResult(algorithm=cnn, call=tiles.call, percentages=tiles.percentages, basis="tumour area")]
    evidence: list[Dataset] = []
    if score.scored.any():
        evidence.append(build_heatmap(slide.source_datasets, level_ds, score, cnn))
    if cells is not None:
        membrane = AlgorithmInfo(name=MEMBRANE_GRADER, version=membrane_grader_version(settings.membrane_thresholds()),
                                 software_version=software_version())
        s = cells.summary
        graders.append(GraderResult(algorithm=membrane, call=cells.call, percentages=s.percentages,
                                    basis="tumour cells", cell_counts=s.counts, connectivity=s.connectivity))
        tumour = cells.tumour
        if len(tumour):  # centroids are pixel indices; the annotation's (0, 0) is the first pixel's corner
            evidence.append(build_cell_annotations(
                slide.source_datasets, slide.level_dataset(cells.level.index), tumour.centroids + 0.5,
                tumour.cell_class, membrane,
                measurements={"completeness": tumour.completeness, "intensity": tumour.intensity}))
    if tiles.call is SlideCall.NOT_ASSESSABLE:  # quality control stopped the slide before any grading
        graders = []
    deciding = {"cnn": 0, "membrane": 1}.get(decided_by) if graders else None
    sr = build_sr(slide.source_datasets, level_ds, score, cnn, graders, deciding, evidence)
    return [sr, *evidence]


def grade_tiles(prepared: PreparedSlide, model: TileModel, settings: Settings,
                progress: Callable[[int, int], None] | None = None) -> tuple[SlideScore, np.ndarray, dict[str, float]]:
    """Grade the slide's tissue tiles with the CNN batch by batch and aggregate them to a :class:`SlideScore`.

    Also returns the sharpness of the sampled tiles (for blur QC) and the tile counts.
    """
    grid = prepared.grid
    probabilities = np.full((grid.rows, grid.cols, len(CLASSES)), np.nan, np.float32)
    tumour = np.zeros((grid.rows, grid.cols), np.float32)
    scored = np.zeros((grid.rows, grid.cols), bool)
    corrupt = done = 0
    infer_seconds = 0.0
    tile_sharpness: list[np.ndarray] = []
    for batch in tile_batches(prepared, settings.batch_size, settings.decode_threads, settings.white_fraction_max,
                              sharpness_sample(prepared.candidates)):
        corrupt += batch.corrupt
        done += batch.read
        if batch.positions:
            t0 = time.perf_counter()
            pred = model.predict(batch.tiles)
            infer_seconds += time.perf_counter() - t0
            fractions = pred.tumour_fraction if pred.tumour_fraction is not None else 1.0 - batch.white
            rows, cols = np.array(batch.positions).T
            probabilities[rows, cols] = pred.probabilities
            tumour[rows, cols] = fractions
            scored[rows, cols] = True
            tile_sharpness.append(batch.sharpness[~np.isnan(batch.sharpness)])
        if progress:
            progress(done, len(prepared.candidates))
    if corrupt > MAX_CORRUPT_SHARE * max(1, len(prepared.candidates)):
        raise SlideError(f"{corrupt} of {len(prepared.candidates)} tissue tiles could not be decoded: slide is corrupt")
    score = tile_area_score(grid, probabilities, tumour, scored, settings.evidence_floor_percent)
    stats = {"tiles_candidate": len(prepared.candidates), "tiles_scored": int(scored.sum()),
             "tiles_corrupt": corrupt, "infer_seconds": infer_seconds}
    return score, np.concatenate(tile_sharpness) if tile_sharpness else np.zeros(0), stats


def conclude(tiles: SlideScore, cells: CellGrading | None, quality: QualityReport, stain_notes: list[str],
             corrupt: int, settings: Settings) -> tuple[SlideScore, str | None]:
    """The slide's score and which grader made its call ("cnn", "membrane"; None when not assessable).

    The call is the deciding grader's (``settings.grader``), or not assessable, with every flag.

    The membrane grader decides when ``settings.grader`` is "membrane" and it
    graded tumour cells; otherwise the CNN's call stands, and the flags say why.
    A difference of more than one category between the two graders is flagged
    for review (0 and ultralow count as one category).
    """
    decided_by = None
    if quality.not_assessable:
        score = not_assessable(tiles.grid, quality, tiles.probabilities, tiles.tumour_fraction, tiles.scored)
    else:
        decided_by = "cnn"
        score = replace(tiles, flags=tiles.flags + quality.flags)
        if cells is None and settings.membrane_grader:
            score.flags.append("membrane grader not run: no pyramid level at 0.5 um/px or finer (a 10x-only scan); "
                               "the CNN made the call")
        elif cells is not None and cells.call is SlideCall.NOT_ASSESSABLE:
            score.flags.append("membrane grader found no tumour cells; the CNN made the call")
        elif cells is not None:
            if category_distance(cells.call, tiles.call) > 1:
                score.flags.append(f"graders disagree by more than one category: membrane {cells.call.value}, "
                                   f"CNN {tiles.call.value}: review")
            if settings.grader == "membrane":
                score.call, decided_by = cells.call, "membrane"
        if score.call.reflex_ish:
            score.flags.append("HER2 2+ (equivocal): reflex in-situ hybridisation (ISH) recommended")
    if corrupt:
        score.flags.append(f"{corrupt} corrupt tile(s) skipped")
    score.flags.extend(stain_notes)
    return score, decided_by


def cell_stats(cells: CellGrading | None) -> dict[str, float]:
    """The membrane grader's counts and cost for the summary's ``stats``."""
    if cells is None:
        return {}
    return {"membrane_fields": cells.fields, "membrane_seconds": cells.seconds, "membrane_mpp": cells.level.mpp,
            "membrane_source_mpp": cells.source_level.mpp, "membrane_tumour_cells": cells.summary.tumour_cells,
            "membrane_other_cells": cells.summary.non_tumour, "membrane_h_gain": cells.h_gain}


def not_assessable(grid: TileGrid, quality: QualityReport, probabilities: np.ndarray | None = None,
                   tumour: np.ndarray | None = None, scored: np.ndarray | None = None) -> SlideScore:
    """A slide that gets no HER2 call; the reasons become its flags (tile grades kept if any)."""
    empty = np.zeros((grid.rows, grid.cols), bool)
    return SlideScore(
        call=SlideCall.NOT_ASSESSABLE,
        percentages={c: 0.0 for c in CLASSES},
        grid=grid,
        probabilities=probabilities if probabilities is not None
        else np.full((grid.rows, grid.cols, len(CLASSES)), np.nan, np.float32),
        tumour_fraction=tumour if tumour is not None else empty.astype(np.float32),
        scored=scored if scored is not None else empty,
        flags=[NOT_FOR_CLINICAL_USE] + [f"not assessable: {r}" for r in quality.not_assessable] + quality.flags,
    )


def tile_area_score(grid: TileGrid, probabilities: np.ndarray, tumour: np.ndarray, scored: np.ndarray,
                    evidence_floor: float) -> SlideScore:
    """Tumour-area weighted class percentages and the ASCO/CAP slide call (no tumour: quality control decides)."""
    flags: list[str] = [NOT_FOR_CLINICAL_USE]
    pct = class_percentages(probabilities[scored], tumour[scored])
    return SlideScore(call=asco_cap_call(pct, evidence_floor), percentages=pct, grid=grid,
                      probabilities=probabilities, tumour_fraction=tumour, scored=scored, flags=flags)


def write_outputs(result: ScoringResult, thumbnail: np.ndarray, thumb_scale: float, out_dir: Path,
                  model: TileModel) -> list[Path]:
    """Write SR, SEG, overlay PNGs and a JSON summary into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / RESULT_FILES[ds.Modality] for ds in result.datasets]
    for ds, path in zip(result.datasets, files):
        ds.save_as(path, enforce_file_format=True)
    files.append(write_overlay(thumbnail, result.score, thumb_scale, out_dir / "her2_overlay.png"))
    cells = result.cells
    if cells is not None and cells.example is not None:
        files.append(write_cell_field(*cells.example, out_dir / "her2_cells.png"))
    summary = {
        "series_instance_uid": result.source.series_instance_uid,
        "call": result.score.call.value,
        "reflex_ish": result.score.reflex_ish,
        "percentages": result.score.percentages,
        "tumour_area_mm2": result.score.tumour_area_mm2,
        "flags": result.score.flags,
        "decided_by": result.decided_by,
        "graders": grader_summary(result),
        "model": {"name": model.card.name, "version": model.card.version, "provider": model.provider,
                  "precision": model.precision},
        "stats": result.stats,
        "intended_use": NOT_FOR_CLINICAL_USE,
    }
    files.append(out_dir / "summary.json")
    files[-1].write_text(json.dumps(summary, indent=1))
    return files


def grader_summary(result: ScoringResult) -> dict[str, dict]:
    """Each grader's own call and percentages (tumour area for the CNN, tumour cells for the membrane grader)."""
    out: dict[str, dict] = {"cnn": {"call": result.cnn_call.value, "percentages_of": "tumour area",
                                    "percentages": result.score.percentages}}
    if result.cells is not None:
        s = result.cells.summary
        out["membrane"] = {"call": result.cells.call.value, "percentages_of": "tumour cells",
                           "percentages": s.percentages, "tumour_cells": s.counts, "other_cells": s.non_tumour,
                           "connectivity": s.connectivity, "mpp": result.cells.level.mpp,
                           "fields": result.cells.fields}
    return out
