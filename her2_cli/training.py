"""``her2`` training commands: train, evaluate, export, train-default, real-tissue, explain, benchmark.

Each command imports :mod:`model_training` (and with it torch) only when it runs, so ``her2 --help`` and the
other commands need no ``[train]`` extra.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from her2_core.facts import MAGNIFICATION_MPP
from model_training import ARCHITECTURES

#: The training commands and their one-line help.
TRAINING_COMMANDS = {
    "train": "train a tile classifier (needs the [train] extra)",
    "evaluate": "evaluate a checkpoint: tile/slide/patient metrics with bootstrap CIs",
    "export": "export a checkpoint to ONNX + model card for the worker",
    "train-default": "reproduce the bundled default model (seeded, a few minutes on CPU)",
    "real-tissue": "score real cores with a model (CNN only) and record them in its card",
    "explain": "Grad-CAM / Score-CAM overlays with MAP and EC",
    "benchmark": "train + evaluate variants on the synthetic cohort; Markdown table",
}

DATA_SOURCES = ("synthetic", "folder", "bci", "her2-ihc-40x", "dicom-annotated")
#: The magnifications training offers, with their pixel spacing.
MAGNIFICATIONS = {m: MAGNIFICATION_MPP[m] for m in (10, 40)}


def _data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=DATA_SOURCES, default="synthetic",
                   help="synthetic cohort (default), or data a user brings: folder-per-class, BCI, HER2-IHC-40x, "
                   "DICOM slides with HER2 region annotations (layouts: docs/training.md)")
    g.add_argument("--data-dir", type=Path, help="root of a folder / bci / her2-ihc-40x / dicom-annotated dataset")
    g.add_argument("--test-dir", type=Path, help="independent test centre in the same layout as --data-dir")
    g.add_argument("--magnification", type=int, choices=sorted(MAGNIFICATIONS), default=10,
                   help="training magnification: 10x (1.0 um/px) or 40x (0.25 um/px); user images are resampled")
    g.add_argument("--data-mpp", type=float,
                   help="pixel spacing (um) of user images (default: folder 1.0, bci 0.5, her2-ihc-40x 0.25)")
    g.add_argument("--test-magnification", type=int, choices=sorted(MAGNIFICATIONS),
                   help="evaluate at another magnification (cross-magnification); synthetic data only")
    g.add_argument("--patients", type=int, default=40, help="synthetic centre-A patients (train + val)")
    g.add_argument("--test-patients", type=int, default=24, help="synthetic centre-B (test centre) patients")
    g.add_argument("--slide-um", type=float, default=2048.0, help="synthetic slide side length (um)")
    g.add_argument("--tile-size", type=int, default=512, help="tile size in pixels (the worker uses 512)")
    g.add_argument("--no-stain-normalisation", action="store_true",
                   help="skip Macenko normalisation (ablation: shows what normalisation buys on centre B)")
    g.add_argument("--cache", type=Path, default=Path("out") / "training-cache", help="tile cache folder")
    g.add_argument("--workers", type=int, default=2, help="processes rendering synthetic slides")
    g.add_argument("--seed", type=int, default=0, help="seed of cohort, split and training")


def _train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and training")
    g.add_argument("--arch", choices=ARCHITECTURES, default="tiny", help="architecture (default tiny)")
    g.add_argument("--classes", type=int, choices=[3, 4], default=4,
                   help="4: 0/1+/2+/3+ (ASCO/CAP, deployable); 3: 1+/2+/3+ as in the dual-centre study")
    g.add_argument("--input-size", type=int, help="network input size (default: native; inception_v3 299)")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--unfreeze", choices=["full", "head", "hybrid"], default="full",
                   help="full fine-tuning, head only, or hybrid: head first, then the last blocks progressively")
    g.add_argument("--hybrid-blocks", type=int, default=2, help="blocks the hybrid schedule unfreezes (one per stage)")
    g.add_argument("--imagenet-weights", type=Path,
                   help="local torchvision ImageNet state_dict file for --arch (nothing is ever downloaded)")
    g.add_argument("--no-augment", action="store_true", help="no flips/rotations/colour/HED/blur augmentation")
    g.add_argument("--class-balance", action="store_true", help="weight the class loss inversely to class frequency")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for 95 %% intervals (0: none)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def cmd_train(args: argparse.Namespace) -> int:
    from model_training.recipes import load_datasets, run_training, train_config

    data = load_datasets(args)
    _, metrics = run_training(data, train_config(args), args.out, args.bootstrap, not args.quiet)
    _print_metrics(metrics)
    print(f"checkpoint, metrics.json and plots in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from model_training.evaluate import evaluate
    from model_training.recipes import load_datasets
    from model_training.train import load_checkpoint

    model, ckpt = load_checkpoint(args.checkpoint)
    args.tile_size = ckpt["tile_size"]
    data = load_datasets(args)
    metrics = {name: evaluate(model, data[name], args.out / name, title=name, n_boot=args.bootstrap,
                              progress=not args.quiet) for name in args.splits}
    _print_metrics(metrics)
    print(f"metrics.json and plots in {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from model_training.recipes import export_checkpoint

    card = export_checkpoint(args.checkpoint, args.out, args.name, args.version)
    print(f"wrote {args.out} and its card ({card['name']} {card['version']})")
    return 0


def cmd_train_default(args: argparse.Namespace) -> int:
    from model_training.recipes import train_default

    model_path = args.out / "her2_default.onnx"
    card = train_default(model_path, args.report_dir, args.cache, args.workers, args.bootstrap, not args.quiet)
    test = card["metrics"]["test"]["slide"]
    print(f"wrote {model_path} (+ .json card); centre B slide-level macro-AUC {test['macro_auc']:.3f}, "
          f"QWK {test['qwk']:.3f}; reports in {args.report_dir}")
    return 0


def _core(item: str) -> tuple[str, Path]:
    """``LABEL=SERIES_FOLDER`` -> (label, folder), for argparse."""
    label, sep, folder = item.partition("=")
    if not sep or not label or not folder:
        raise argparse.ArgumentTypeError(f"expected LABEL=SERIES_FOLDER, got {item!r}")
    return label, Path(folder)


def cmd_real_tissue(args: argparse.Namespace) -> int:
    from model_training.export import add_real_tissue
    from model_training.real_tissue import score_real_cores

    figures = score_real_cores(args.model, dict(args.core))
    add_real_tissue(args.model, figures, args.data)
    for f in figures:
        pct = " / ".join(f"{f.percentages[c]:.1f}" for c in f.percentages)
        print(f"{f.label}: CNN call {f.call}, 0/1+/2+/3+ {pct} %, score {f.expected_score:.2f}")
    print(f"wrote the real_tissue block of {args.model.with_suffix('.json')}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from model_training.explain import dab_membrane_mask, explanation_report
    from model_training.recipes import load_datasets
    from model_training.train import load_checkpoint

    model, ckpt = load_checkpoint(args.checkpoint)
    args.tile_size = ckpt["tile_size"]
    tiles = load_datasets(args, membranes=args.data == "synthetic")[args.split]
    tiles = tiles.take(np.random.default_rng(args.seed).permutation(len(tiles))[: args.tiles])
    membranes = tiles.membranes if tiles.membranes is not None else dab_membrane_mask(tiles.tiles)
    report = explanation_report(model, tiles.tiles, membranes, args.out, tuple(args.methods), args.dilate_px)
    if args.data == "synthetic":
        report["cross_magnification"] = _cross_magnification(args, model, ckpt["mpp"])
        (args.out / "explanations.json").write_text(json.dumps(report, indent=1, default=float))
    for method in args.methods:
        print(f"{method}: MAP {report[method]['map_mean']:.3f} (uniform baseline {report['uniform_baseline_map']:.3f}), "
              f"EC under flips/rotations {report[method]['ec_transforms_mean']:.3f}"
              + (f", EC 10x vs 40x {report['cross_magnification'][method]:.3f}" if "cross_magnification" in report
                 else ""))
    print(f"explanations.json and overlays in {args.out}")
    return 0


def _cross_magnification(args: argparse.Namespace, model, mpp: float) -> dict[str, float]:
    """Mean EC between 10x and 40x explanations on two test-centre slides (``--cross-checkpoint``: other model)."""
    from model_training.explain import cross_magnification_consistency
    from model_training.synthetic_data import synthetic_cohort
    from model_training.train import load_checkpoint

    other = load_checkpoint(args.cross_checkpoint)[0] if args.cross_checkpoint else model
    low, high = (model, other) if mpp >= MAGNIFICATIONS[10] else (other, model)
    specs = synthetic_cohort(args.test_patients, "B", args.seed + 1, (args.slide_um, args.slide_um))[:2]
    return {method: float(np.nanmean(np.concatenate([cross_magnification_consistency(
                low, high, spec, method, MAGNIFICATIONS[10], MAGNIFICATIONS[40], args.tile_size, regions=2)
                for spec in specs]))) for method in args.methods}


def cmd_benchmark(args: argparse.Namespace) -> int:
    from model_training.benchmark import markdown_table, run_study
    from model_training.recipes import SyntheticCohort, train_config

    cohort = SyntheticCohort(args.patients, args.test_patients, args.slide_um, seed=args.seed)
    base = train_config(args)
    tables = []
    for study in args.studies:
        rows = run_study(study, cohort, base, args.report_dir, args.cache, tuple(args.archs), args.tile_size,
                         args.workers, args.bootstrap, not args.quiet)
        tables.append(markdown_table(rows, f"{study} (test centre B; {base.epochs} epochs)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(tables))
    print("\n".join(tables))
    return 0


def _print_metrics(metrics: dict) -> None:
    for split, m in metrics.items():
        for level in ("tile", "slide", "patient"):
            x = m[level]
            print(f"{split:>6} {level:>7}: n={x['n']:4d}  macro-AUC {x['macro_auc']:.3f}  accuracy {x['accuracy']:.3f}  "
                  f"macro-F1 {x['macro_f1']:.3f}  QWK {x['qwk']:.3f}")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the training subcommands to the ``her2`` parser's subparsers."""
    p = sub.add_parser("train", help=TRAINING_COMMANDS["train"],
                       description="Train on a dataset split by patient (stratified); evaluate on the validation "
                       "split and the independent test centre; write model.pt, summary.json and per-split "
                       "metrics.json + ROC/confusion PNGs.")
    _data_options(p)
    _train_options(p)
    _common(p)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help=TRAINING_COMMANDS["evaluate"],
                       description="Macro and per-class AUC, accuracy, macro F1, QWK and confusion matrix with "
                       "bootstrap 95 %% intervals at tile, slide and patient level, as JSON and PNG plots.")
    p.add_argument("checkpoint", type=Path, help="model.pt written by `her2 train`")
    _data_options(p)
    _common(p)
    p.add_argument("--splits", nargs="+", choices=["train", "val", "test"], default=["test"],
                   help="splits to evaluate (default: the test centre)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help=TRAINING_COMMANDS["export"],
                       description="ONNX (dynamic batch, input `tiles` = RGB/255, outputs `probabilities` and "
                       "`tumour_fraction`), checked against torch with ONNX Runtime; card beside it.")
    p.add_argument("checkpoint", type=Path, help="model.pt written by `her2 train`")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write (card: same name, .json)")
    p.add_argument("--name", default="her2-tile-classifier", help="model name in the card")
    p.add_argument("--version", default="0.1.0", help="model version in the card")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train-default", help=TRAINING_COMMANDS["train-default"],
                       description="Render the seeded synthetic cohort, train the tiny CNN at 10x, evaluate it on "
                       "the held-out centre B, and write her2_default.onnx + her2_default.json into --out.")
    p.add_argument("--out", type=Path, default=Path("her2_analysis") / "models", help="model folder (default her2_analysis/models)")
    p.add_argument("--report-dir", type=Path, default=Path("out") / "default-model",
                   help="checkpoint, metrics and plots (default out/default-model)")
    p.add_argument("--cache", type=Path, default=Path("out") / "training-cache", help="tile cache folder")
    p.add_argument("--workers", type=int, default=2, help="processes rendering synthetic slides")
    _common(p)
    p.set_defaults(func=cmd_train_default)

    p = sub.add_parser("real-tissue", help=TRAINING_COMMANDS["real-tissue"],
                       description="Score DICOM WSI series of real cores with the model's CNN (membrane grader "
                       "off) and write each core's call, tumour-area percentages and 0*p0+1*p1+2*p2+3*p3 into the "
                       "card's real_tissue block. Scoring only: nothing is fitted on the cores.")
    p.add_argument("model", type=Path, help="ONNX model (its card is the .json beside it)")
    p.add_argument("--core", action="append", required=True, type=_core, metavar="LABEL=SERIES_FOLDER",
                   help="a core's pathologists' label and its DICOM series folder (repeat per core)")
    p.add_argument("--data", required=True, help="what the cores are (source, scores, converter), for the card")
    p.set_defaults(func=cmd_real_tissue)

    p = sub.add_parser("explain", help=TRAINING_COMMANDS["explain"],
                       description="Explain tiles of a split with Grad-CAM and Score-CAM; report Membrane Activation "
                       "Precision (exact membranes for synthetic data, DAB deconvolution otherwise) and Explanation "
                       "Consistency under flips/rotations; write explanations.json and overlay PNGs.")
    p.add_argument("checkpoint", type=Path, help="model.pt written by `her2 train`")
    _data_options(p)
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--tiles", type=int, default=8, help="tiles to explain (Score-CAM: one pass per channel each)")
    p.add_argument("--methods", nargs="+", choices=["gradcam", "scorecam"], default=["gradcam", "scorecam"])
    p.add_argument("--dilate-px", type=int, default=2, help="membrane mask dilation for MAP (CAMs are coarse)")
    p.add_argument("--cross-checkpoint", type=Path,
                   help="model at the other magnification for the 10x-vs-40x EC (default: the same model)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("benchmark", help=TRAINING_COMMANDS["benchmark"],
                       description="Studies: architectures (all six + tiny), unfreezing (full / hybrid / head), "
                       "stain (with / without Macenko), magnification (10x / 40x, crossed). Metrics on centre B.")
    _data_options(p)
    _train_options(p)
    _common(p)
    p.add_argument("--studies", nargs="+", choices=["architectures", "unfreezing", "stain", "magnification"],
                   default=["architectures"])
    p.add_argument("--archs", nargs="+", choices=ARCHITECTURES, default=list(ARCHITECTURES))
    p.add_argument("--report-dir", type=Path, default=Path("out") / "benchmark", help="per-run reports")
    p.add_argument("--out", type=Path, default=Path("out") / "benchmark" / "benchmark.md", help="Markdown table")
    p.set_defaults(func=cmd_benchmark)

