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
from dataclasses import replace
from pathlib import Path

from model_training import ARCHITECTURES
from model_training.recipes import SyntheticCohort, run_training
from model_training.train import TrainConfig
from worker.aggregate import CLASSES

STUDIES = ("architectures", "unfreezing", "stain", "magnification")
MPP = {10: 1.0, 40: 0.25}


def _row(label: str, result, metrics: dict) -> dict:
    tile, slide = metrics["test"]["tile"], metrics["test"]["slide"]
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

    def run(label: str, config: TrainConfig, mpp: float = 1.0, test_mpp: float | None = None,
            normalise: bool = True) -> None:
        data = cohort.datasets(mpp, tile_size, cache, workers, normalise=normalise, progress=progress,
                               test_mpp=test_mpp)
        result, metrics = run_training(data, config, out_dir / label.replace(" ", "_"), n_boot, progress)
        rows.append(_row(label, result, metrics))

    if study == "architectures":
        for arch in archs:
            run(arch, replace(base, arch=arch))
    elif study == "unfreezing":
        for schedule in ("full", "hybrid", "head"):
            run(f"{base.arch} {schedule}", replace(base, unfreeze=schedule))
    elif study == "stain":
        for normalise in (True, False):
            run(f"{base.arch} {'Macenko' if normalise else 'no normalisation'}", base, normalise=normalise)
    else:
        for train_mag in (10, 40):
            for test_mag in (10, 40):
                run(f"{base.arch} train {train_mag}x test {test_mag}x", base, MPP[train_mag], MPP[test_mag])
    (out_dir / f"{study}.json").write_text(json.dumps(rows, indent=1, default=float))
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    """The rows as a Markdown table (metrics to 3 decimals, parameters in millions)."""
    head = ["model", "macro-AUC", *(f"AUC {c}" for c in CLASSES), "accuracy", "macro-F1", "QWK", "slide macro-AUC",
            "slide QWK", "params (M)", "trainable (M)", "train time (s)"]
    keys = ["macro_auc", *(f"auc_{c}" for c in CLASSES), "accuracy", "macro_f1", "qwk", "slide_macro_auc", "slide_qwk"]

    def fmt(v) -> str:
        return "n/a" if v is None or v != v else f"{v:.3f}"

    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], *(fmt(r[k]) for k in keys), f"{r['parameters'] / 1e6:.2f}", f"{r['trainable'] / 1e6:.2f}",
                 f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
