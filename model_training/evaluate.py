"""Evaluate a tile classifier on a :class:`TileSet` at tile, slide and patient level.

Tile level: tiles with at least ``min_tumour`` tumour (or unknown tumour
fraction), truth = majority tumour class. Slide and patient level: the tiles
of each slide (patient) are aggregated as the worker does and compared with
the slide's ground-truth call (patient truth: the highest slide call). Results
are a JSON-ready dict and, with ``out_dir``, ``metrics.json`` plus ROC and
confusion-matrix PNGs per level.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from her2_analysis.options import ScoringOptions
from her2_core.aggregate import CLASSES
from model_training.metrics import aggregate_groups, plot_confusion, plot_roc, report
from model_training.models import TileClassifier
from model_training.splits import patient_labels
from model_training.tileset import TileSet
from model_training.train import predict

#: The worker's default evidence floor, so slide calls here are the worker's calls.
EVIDENCE_FLOOR: float = ScoringOptions().evidence_floor_percent


def tile_level(tiles: TileSet, probabilities: np.ndarray, classes: tuple[str, ...],
               min_tumour: float) -> tuple[np.ndarray, np.ndarray]:
    """Truth labels (in head class indices) and scores of the tiles tile-level metrics count."""
    tumour = tiles.tumour_fraction
    keep = ~(np.isfinite(tumour) & (tumour < min_tumour))
    labels = tiles.labels - (len(CLASSES) - len(classes))  # 3-class head: 1+ -> 0
    keep &= labels >= 0
    return labels[keep], probabilities[keep]


def evaluate_predictions(tiles: TileSet, probabilities: np.ndarray, tumour: np.ndarray, classes: tuple[str, ...],
                         evidence_floor: float = EVIDENCE_FLOOR, n_boot: int = 500, min_tumour: float = 0.05,
                         use_true_tumour: bool = False) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Metrics at tile, slide and patient level from per-tile outputs.

    ``use_true_tumour`` weights tiles by their ground-truth tumour fraction
    instead of the predicted one (isolates the class head from the tumour head).
    Returns the metrics and, per level, the truth labels and class scores (for ROC plots).
    """
    offset = len(CLASSES) - len(classes)
    result: dict = {"classes": list(classes), "evidence_floor_percent": evidence_floor}
    y, s = tile_level(tiles, probabilities, classes, min_tumour)
    result["tile"] = report(y, s, s.argmax(axis=1), classes, n_boot)
    curves = {"tile": (y, s)}
    weights = np.nan_to_num(tiles.tumour_fraction) if use_true_tumour else tumour
    slide_truth = np.array([info.label for info in tiles.slides])
    patients = patient_labels(tiles)
    patient_of_slide = np.array([info.patient_id for info in tiles.slides])
    for level, groups, truth_of in (
        ("slide", tiles.slide, lambda ids: slide_truth[ids]),
        ("patient", patient_of_slide[tiles.slide], lambda ids: np.array([patients[p] for p in ids])),
    ):
        pred, scores, ids = aggregate_groups(groups, probabilities, weights, evidence_floor)
        truth = truth_of(ids)
        keep = truth >= offset
        curves[level] = (truth[keep] - offset, scores[keep][:, offset:])
        result[level] = report(*curves[level], pred[keep] - offset, classes, n_boot)
        if level == "slide":
            result["slide"]["calls"] = {tiles.slides[i].slide_id: {"truth": CLASSES[t], "predicted": CLASSES[p]}
                                        for i, t, p in zip(ids, truth, pred)}
    return result, curves


def evaluate(model: TileClassifier, tiles: TileSet, out_dir: Path | None = None, title: str = "",
             evidence_floor: float = EVIDENCE_FLOOR, n_boot: int = 500, progress: bool = True) -> dict:
    """Run ``model`` on ``tiles`` and report (and, with ``out_dir``, write) its metrics."""
    probabilities, tumour = predict(model, tiles.tiles, progress=progress)
    result, curves = evaluate_predictions(tiles, probabilities, tumour, model.classes, evidence_floor, n_boot)
    finite = np.isfinite(tiles.tumour_fraction)
    if finite.any():
        result["tumour_fraction_mae"] = float(np.abs(tumour[finite] - tiles.tumour_fraction[finite]).mean())
    if out_dir is not None:
        write_report(result, curves, model.classes, Path(out_dir), title)
    return result


def write_report(result: dict, curves: dict[str, tuple[np.ndarray, np.ndarray]], classes: tuple[str, ...],
                 out_dir: Path, title: str) -> None:
    """``metrics.json`` and per-level ROC / confusion-matrix PNGs in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    for level, (y, scores) in curves.items():
        plot_roc(y, scores, classes, f"{title} {level}s".strip(), out_dir / f"roc_{level}.png")
        plot_confusion(result[level]["confusion"], classes, f"{title} {level}s".strip(),
                       out_dir / f"confusion_{level}.png")
