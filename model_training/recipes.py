"""Seeded, reproducible experiments: the synthetic cohort, a training run with its reports, the bundled default.

The synthetic cohort has a training centre "A" (split by patient into train /
validation, stratified) and an independent test centre "B" (other stain
colour, scanner blur and tissue layout; never seen in training), so every
test metric is an external-centre metric.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from her2_core.facts import MAGNIFICATION_MPP, WHITE_FRACTION_MAX
from model_training.annotated import annotated_datasets
from model_training.evaluate import evaluate
from model_training.export import export_onnx, model_card, onnx_parity, write_card
from model_training.layouts import layout_datasets
from model_training.models import TileClassifier
from model_training.splits import patient_labels, patient_split
from model_training.synthetic_data import DEFAULT_CACHE, cohort_tileset, synthetic_cohort
from model_training.tileset import TileSet
from model_training.train import (
    TrainConfig,
    TrainResult,
    calibrate_temperature,
    fit,
    load_checkpoint,
    save_checkpoint,
)

DEFAULT_MODEL_NAME = "her2-tiny-cnn"
DEFAULT_MODEL_VERSION = "1.0.0"
TILE_SIZE = 512


@dataclass(frozen=True)
class SyntheticCohort:
    """Patients per centre, slide size and split of the synthetic cohort (seeded)."""

    train_patients: int = 40
    test_patients: int = 24
    slide_um: float = 2048.0
    val_share: float = 0.2
    seed: int = 0
    #: Centre A tiles rendered uncompressed, so training can add any writer's codec (see synthetic_data).
    lossless_train: bool = True

    def datasets(self, mpp: float, tile_size: int = TILE_SIZE, cache: Path = DEFAULT_CACHE, workers: int = 2,
                 membranes: bool = False, normalise: bool = True, progress: bool = True,
                 test_mpp: float | None = None) -> dict[str, TileSet]:
        """``train`` / ``val`` (centre A, split by patient) and ``test`` (centre B) tile sets.

        Training centre at ``mpp`` um/px, test centre at ``test_mpp`` (default: the same; another
        value gives a cross-magnification test).
        """
        size = (self.slide_um, self.slide_um)
        a = cohort_tileset(synthetic_cohort(self.train_patients, "A", self.seed, size), cache, mpp, tile_size,
                           workers, membranes, normalise, progress, lossless=self.lossless_train)
        b = cohort_tileset(synthetic_cohort(self.test_patients, "B", self.seed + 1, size), cache, test_mpp or mpp,
                           tile_size, workers, membranes, normalise, progress)
        split = patient_split(patient_labels(a), {"train": 1 - self.val_share, "val": self.val_share}, self.seed)
        return {"train": a.of_patients(split["train"]), "val": a.of_patients(split["val"]), "test": b}

    def describe(self, mpp: float) -> str:
        return (f"synthetic HER2 IHC cohort (her2_synthetic.render, seed {self.seed}): centre A "
                f"{self.train_patients} patients split {1 - self.val_share:.0%}/{self.val_share:.0%} train/val by "
                f"patient (stratified by slide call), centre B {self.test_patients} patients as independent test "
                f"centre; {self.slide_um:.0f} um square slides written as DICOM at {mpp} um/px and tiled by the "
                f"worker's own path (tissue mask, >{WHITE_FRACTION_MAX:.0%} white dropped, Macenko absolute-DAB)"
                + ("; centre A tiles re-rendered uncompressed and re-encoded in training as a random writer's "
                   "codec (lossless, JPEG 4:4:4 / 4:2:2 / 4:2:0), centre B as the worker reads them"
                   if self.lossless_train else ""))


def load_datasets(args, membranes: bool = False) -> dict[str, TileSet]:
    """The ``train`` / ``val`` / ``test`` tile sets named by the CLI's data options (``membranes``: synthetic only)."""
    if args.data == "synthetic":
        cohort = SyntheticCohort(args.patients, args.test_patients, args.slide_um, seed=args.seed)
        mpp = MAGNIFICATION_MPP[args.magnification]
        test_mpp = MAGNIFICATION_MPP[args.test_magnification] if args.test_magnification else None
        return cohort.datasets(mpp, args.tile_size, args.cache, args.workers, membranes,
                               normalise=not args.no_stain_normalisation, progress=not args.quiet, test_mpp=test_mpp)
    if args.data_dir is None:
        raise ValueError(f"--data {args.data} needs --data-dir")
    if args.data == "dicom-annotated":
        return annotated_datasets(args.data_dir, args.test_dir, args.tile_size, args.seed,
                                  MAGNIFICATION_MPP[args.magnification], normalise=not args.no_stain_normalisation,
                                  progress=not args.quiet)
    return layout_datasets(args.data, args.data_dir, args.test_dir, args.tile_size, args.seed,
                           MAGNIFICATION_MPP[args.magnification], args.data_mpp)


def train_config(args) -> TrainConfig:
    """The :class:`TrainConfig` named by the CLI's model and training options."""
    return TrainConfig(arch=args.arch, n_classes=args.classes, input_size=args.input_size, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, unfreeze=args.unfreeze,
                       hybrid_blocks=args.hybrid_blocks, augment=not args.no_augment,
                       class_balance=args.class_balance, seed=args.seed,
                       imagenet_weights=str(args.imagenet_weights) if args.imagenet_weights else None)


def run_training(data: dict[str, TileSet], config: TrainConfig, out_dir: Path, n_boot: int = 500,
                 progress: bool = True) -> tuple[TrainResult, dict]:
    """Train on ``data["train"]``, evaluate on every other split; write ``model.pt`` and per-split reports."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = fit(data["train"], config, progress)
    if "val" in data:
        result.temperature = calibrate_temperature(result.model, data["val"])
    metrics = {name: evaluate(result.model, tiles, out_dir / name, title=name, n_boot=n_boot, progress=progress)
               for name, tiles in data.items() if name != "train" and len(tiles)}
    train = data["train"]
    save_checkpoint(result, out_dir / "model.pt", train.tile_size, train.mpp, {"metrics": metrics})
    summary = {"config": asdict(config), "temperature": result.temperature, "train_seconds": result.seconds,
               "total_parameters": result.total_parameters,
               "max_trainable_parameters": result.max_trainable_parameters, "history": result.history,
               "tiles": {name: len(tiles) for name, tiles in data.items()}, "metrics": metrics}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    return result, metrics


def card_metrics(metrics: dict) -> dict:
    """The metrics block of a model card: scalars, per-class AUC and 95 % intervals per split and level."""
    keep = ("n", "macro_auc", "per_class_auc", "accuracy", "macro_f1", "qwk", "confusion", "ci95")
    return {split: {level: {k: m[level][k] for k in keep} for level in ("tile", "slide", "patient")}
            | {"tumour_fraction_mae": m.get("tumour_fraction_mae")}
            for split, m in metrics.items()}


#: The bundled default: tiny CNN at 10x, 4 classes, seeded.
DEFAULT_CONFIG = TrainConfig(arch="tiny", n_classes=4, epochs=30, batch_size=16, lr=3e-3, seed=0)
DEFAULT_COHORT = SyntheticCohort()
DEFAULT_MPP = 1.0


def train_default(model_path: Path, report_dir: Path, cache: Path = DEFAULT_CACHE, workers: int = 2,
                  n_boot: int = 500, progress: bool = True) -> dict:
    """Reproduce the bundled default model: data, training, evaluation on centre B, ONNX + card.

    Returns the card written beside ``model_path``.
    """
    data = DEFAULT_COHORT.datasets(DEFAULT_MPP, TILE_SIZE, cache, workers, progress=progress)
    result, metrics = run_training(data, DEFAULT_CONFIG, report_dir, n_boot, progress)
    return deploy(result.model, metrics, model_path, data["test"].tiles[:8], DEFAULT_MPP, {
        "data": DEFAULT_COHORT.describe(DEFAULT_MPP),
        "tiles": {name: len(tiles) for name, tiles in data.items()},
        "config": asdict(DEFAULT_CONFIG),
        "parameters": result.total_parameters,
        "train_seconds": round(result.seconds, 1),
        "temperature": result.temperature,
        "reproduce": "her2 train-default --out her2_analysis/models/",
    }, DEFAULT_MODEL_NAME, DEFAULT_MODEL_VERSION)


def export_checkpoint(checkpoint: Path, model_path: Path, name: str, version: str) -> dict:
    """Export a ``her2 train`` checkpoint; its recorded metrics and config go into the card."""
    model, ckpt = load_checkpoint(checkpoint)
    check = np.random.default_rng(0).integers(0, 256, (4, ckpt["tile_size"], ckpt["tile_size"], 3), dtype=np.uint8)
    training = {"config": ckpt["config"], "parameters": ckpt["total_parameters"],
                "train_seconds": round(ckpt["seconds"], 1), "checkpoint": str(checkpoint)}
    return deploy(model, ckpt.get("metrics", {}), model_path, check, ckpt["mpp"], training, name, version)


def deploy(model: TileClassifier, metrics: dict, model_path: Path, check_tiles: np.ndarray, mpp: float,
           training: dict, name: str, version: str) -> dict:
    """Export ``model`` to ONNX, check ONNX/torch parity on ``check_tiles``, write the card; return the card."""
    tile_size = check_tiles.shape[1]
    export_onnx(model, model_path, tile_size)
    parity = onnx_parity(model, model_path, check_tiles)
    if parity > 1e-4:
        raise RuntimeError(f"ONNX Runtime differs from torch by {parity:.2e} on {model_path}")
    card = model_card(name, version, tile_size, mpp, WHITE_FRACTION_MAX,
                      training | {"onnx_torch_max_abs_diff": parity}, card_metrics(metrics))
    write_card(card, model_path)
    return card

