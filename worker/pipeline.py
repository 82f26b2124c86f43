"""Score one slide, top-down: read -> tissue -> tile -> normalise -> infer -> aggregate -> encode.

:func:`score_slide` is the whole job; the CLI, the embedded server and the
Celery task all call it. Every step is a named function in the module that
owns its concept: DICOM in :mod:`dicom_io`, preprocessing in
:mod:`worker.preprocessing`, the model in :mod:`worker.inference`, the
ASCO/CAP rules in :mod:`worker.aggregate`.

Research use only: not for clinical use until validated on real slides.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from pydicom import Dataset
from threadpoolctl import threadpool_limits

from dicom_io.errors import SlideError
from dicom_io.results import AlgorithmInfo, build_heatmap, build_sr
from dicom_io.wsi import SourceIdentity, open_slide
from worker.aggregate import CLASSES, SlideCall, SlideScore, TileGrid, asco_cap_call, class_percentages
from worker.inference import TileModel
from worker.overlay import write_overlay
from worker.settings import Settings
from worker.quality import QualityReport, check_graded, check_slide
from worker.tiles import PreparedSlide, prepare_slide, sharpness_sample, survey_slide, tile_batches

log = logging.getLogger(__name__)

NOT_FOR_CLINICAL_USE = "Research use only - not for clinical use (not validated on real slides)."
#: More undecodable tiles than this share of the tissue tiles fails the slide instead of flagging it.
MAX_CORRUPT_SHARE = 0.05


def software_version() -> str:
    try:
        return version("her2-dicom-worker")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class ScoringResult:
    """What one job produced: the score, the identity it belongs to, result objects and files."""

    score: SlideScore
    source: SourceIdentity
    datasets: list[Dataset]
    files: list[Path] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)


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


def score_slide(series_dir: Path, settings: Settings, out_dir: Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> ScoringResult:
    """Score the slide in ``series_dir``; write results to ``out_dir`` when given."""
    started = time.perf_counter()
    single_threaded_blas()
    with open_slide(series_dir) as slide:
        model = load_model(Path(settings.model_path), settings.device, settings.intra_op_threads,
                           settings.white_fraction_max, settings.precision)
        survey = survey_slide(slide)
        prepared = prepare_slide(slide, survey, model.card.tile_size, model.card.mpp, model.card.stain)
        level = prepared.level
        quality = check_slide(survey.thumbnail, survey.mask, prepared.normaliser, settings)
        if quality.not_assessable:
            score, stats = not_assessable(prepared.grid, quality), {"tiles_candidate": 0, "tiles_scored": 0}
        else:
            score, stats = grade_tiles(prepared, model, settings, quality, progress)
        level_ds = slide.level_dataset(level.index)
        algorithm = AlgorithmInfo(name=model.card.name, version=model.card.version,
                                  software_version=software_version())
        datasets = [build_sr(slide.source_datasets, level_ds, score, algorithm)]
        if score.scored.any():
            datasets.append(build_heatmap(slide.source_datasets, level_ds, score, algorithm))
        source = slide.identity
    stats["seconds"] = time.perf_counter() - started
    stats.update(prepared.tiles.summary())
    stats.update({f"qc_{k}": v for k, v in quality.measures.items()})
    result = ScoringResult(score=score, source=source, datasets=datasets, stats=stats)
    if out_dir is not None:
        result.files = write_outputs(result, survey.thumbnail, survey.thumbnail_mpp / level.mpp, Path(out_dir), model)
    log.info("scored series %s: %s in %.1f s (%d tiles)", source.series_instance_uid, score.call.value,
             stats["seconds"], stats["tiles_scored"])
    return result


def grade_tiles(prepared: PreparedSlide, model: TileModel, settings: Settings, quality: QualityReport,
                progress: Callable[[int, int], None] | None = None) -> tuple[SlideScore, dict[str, float]]:
    """Grade the slide's tissue tiles batch by batch and aggregate them to a :class:`SlideScore`.

    Completes ``quality`` with the checks that need graded tiles (blur, tumour amount).
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
    score = aggregate(grid, probabilities, tumour, scored, settings.evidence_floor_percent)
    check_graded(quality, np.concatenate(tile_sharpness) if tile_sharpness else np.zeros(0), score.tumour_area_mm2,
                 settings)
    if quality.not_assessable:
        score = not_assessable(grid, quality, probabilities, tumour, scored)  # its flags include the QC flags
    else:
        score.flags.extend(quality.flags)
    if corrupt:
        score.flags.append(f"{corrupt} corrupt tile(s) skipped")
    score.flags.extend(prepared.normaliser.notes)
    stats = {"tiles_candidate": len(prepared.candidates), "tiles_scored": int(scored.sum()),
             "tiles_corrupt": corrupt, "infer_seconds": infer_seconds}
    return score, stats


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


def aggregate(grid: TileGrid, probabilities: np.ndarray, tumour: np.ndarray, scored: np.ndarray,
              evidence_floor: float) -> SlideScore:
    """Tumour-area weighted class percentages and the ASCO/CAP slide call (no tumour: quality control decides)."""
    flags: list[str] = [NOT_FOR_CLINICAL_USE]
    pct = class_percentages(probabilities[scored], tumour[scored])
    call = asco_cap_call(pct, evidence_floor)
    if call.reflex_ish:
        flags.append("HER2 2+ (equivocal): reflex in-situ hybridisation (ISH) recommended")
    return SlideScore(call=call, percentages=pct, grid=grid, probabilities=probabilities, tumour_fraction=tumour,
                      scored=scored, flags=flags)


def write_outputs(result: ScoringResult, thumbnail: np.ndarray, thumb_scale: float, out_dir: Path,
                  model: TileModel) -> list[Path]:
    """Write SR, SEG, overlay PNG and a JSON summary into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / name for name in ("her2_sr.dcm", "her2_heatmap_seg.dcm")[: len(result.datasets)]]
    for ds, path in zip(result.datasets, files):
        ds.save_as(path, enforce_file_format=True)
    files.append(write_overlay(thumbnail, result.score, thumb_scale, out_dir / "her2_overlay.png"))
    summary = {
        "series_instance_uid": result.source.series_instance_uid,
        "call": result.score.call.value,
        "reflex_ish": result.score.reflex_ish,
        "percentages": result.score.percentages,
        "tumour_area_mm2": result.score.tumour_area_mm2,
        "flags": result.score.flags,
        "model": {"name": model.card.name, "version": model.card.version, "provider": model.provider,
                  "precision": model.precision},
        "stats": result.stats,
        "intended_use": NOT_FOR_CLINICAL_USE,
    }
    files.append(out_dir / "summary.json")
    files[-1].write_text(json.dumps(summary, indent=1))
    return files
