"""Benchmark tables (Markdown) on the synthetic cohort, in the shape of the dual-centre study's table.

Four studies, each one call of :func:`run_study` and one table:

* ``architectures`` - every architecture, same data and schedule;
* ``unfreezing`` - full fine-tuning vs hybrid unfreezing vs head only
  (trainable parameters, training time, accuracy);
* ``stain`` - with and without Macenko normalisation (does it help on centre B?);
* ``magnification`` - trained at 10x / 40x, tested at 10x / 40x (cross-magnification).

All metrics are on the independent test centre B (tile level, plus
slide-level macro-AUC and QWK).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from her2_core.aggregate import CLASSES
from her2_core.facts import MAGNIFICATION_MPP
from model_training import ARCHITECTURES
from model_training.models import MIN_INPUT_SIZE
from model_training.recipes import SyntheticCohort, run_training
from model_training.train import TrainConfig

STUDIES = ("architectures", "unfreezing", "stain", "magnification")
MPP = {m: MAGNIFICATION_MPP[m] for m in (10, 40)}
MAG = {mpp: mag for mag, mpp in MPP.items()}


def _row(label: str, result, metrics: dict, split: str = "test") -> dict:
    tile, slide = metrics[split]["tile"], metrics[split]["slide"]
    return {"model": label, "macro_auc": tile["macro_auc"], **{f"auc_{c}": tile["per_class_auc"].get(c) for c in CLASSES},
            "accuracy": tile["accuracy"], "macro_f1": tile["macro_f1"], "qwk": tile["qwk"],
            "slide_macro_auc": slide["macro_auc"], "slide_qwk": slide["qwk"],
            "parameters": result.total_parameters, "trainable": result.max_trainable_parameters,
            "train_seconds": result.seconds}


def run_study(study: str, cohort: SyntheticCohort, base: TrainConfig, out_dir: Path, cache: Path,
              archs: tuple[str, ...] = ARCHITECTURES, tile_size: int = 512, workers: int = 2, n_boot: int = 200,
              progress: bool = True) -> list[dict]:
    """Train and evaluate every variant of ``study``; return one table row per variant."""
    if study not in STUDIES:
        raise ValueError(f"study must be one of {STUDIES}, got {study!r}")
    rows = []

    def run(label: str, config: TrainConfig, mpp: float = 1.0, normalise: bool = True,
            cross_mpp: float | None = None) -> None:
        """Train one variant; with ``cross_mpp`` also test on the test centre at that spacing."""
        data = cohort.datasets(mpp, tile_size, cache, workers, normalise=normalise, progress=progress)
        if cross_mpp is not None:
            data["test_cross"] = cohort.datasets(cross_mpp, tile_size, cache, workers, progress=progress)["test"]
        result, metrics = run_training(data, config, out_dir / label.replace(" ", "_"), n_boot, progress)
        if cross_mpp is None:
            rows.append(_row(label, result, metrics))
            return
        for split, test_mpp in (("test", mpp), ("test_cross", cross_mpp)):
            rows.append(_row(f"{label} test {MAG[test_mpp]}x", result, metrics, split))

    if study == "architectures":
        for arch in archs:  # a requested input size below an architecture's minimum is raised to it
            size = max(base.input_size, MIN_INPUT_SIZE[arch]) if base.input_size else None
            run(arch, replace(base, arch=arch, input_size=size))
    elif study == "unfreezing":
        for schedule in ("full", "hybrid", "head"):
            run(f"{base.arch} {schedule}", replace(base, unfreeze=schedule))
    elif study == "stain":
        for normalise in (True, False):
            run(f"{base.arch} {'Macenko' if normalise else 'no normalisation'}", base, normalise=normalise)
    else:
        for train_mag, other in ((10, 40), (40, 10)):
            run(f"{base.arch} train {train_mag}x", base, MPP[train_mag], cross_mpp=MPP[other])
    (out_dir / f"{study}.json").write_text(json.dumps(rows, indent=1, default=float))
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    """The rows as a Markdown table (metrics to 3 decimals, parameters in millions)."""
    head = ["model", "macro-AUC", *(f"AUC {c}" for c in CLASSES), "accuracy", "macro-F1", "QWK", "slide macro-AUC",
            "slide QWK", "params (M)", "trainable (M)", "train time (s)"]
    keys = ["macro_auc", *(f"auc_{c}" for c in CLASSES), "accuracy", "macro_f1", "qwk", "slide_macro_auc", "slide_qwk"]

    def fmt(v) -> str:
        return "n/a" if v is None or math.isnan(v) else f"{v:.3f}"

    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], *(fmt(r[k]) for k in keys), f"{r['parameters'] / 1e6:.3f}",
                 f"{r['trainable'] / 1e6:.3f}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
