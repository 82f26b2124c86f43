"""``her2``: the one command-line entry point.

Research use only - not for clinical use until validated on real slides.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from dicom_io.errors import AnnotationError, SlideError
from her2_core.aggregate import CLASSES
from her2_core.facts import INTENDED_USE, MAGNIFICATION_MPP
from her2_core.model_card import ModelCardError
from worker import service_cli
from worker.preflight import PreflightError
from worker.settings import REDIS_URL_KEYS, Settings, load_settings, redact_url
from worker.viewer import ViewError, view

#: The training commands (``model_training.cli``) and their one-line help, listed by ``her2 --help`` without
#: importing training code.
TRAINING_COMMANDS = {
    "train": "train a tile classifier (needs the [train] extra)",
    "evaluate": "evaluate a checkpoint: tile/slide/patient metrics with bootstrap CIs",
    "export": "export a checkpoint to ONNX + model card for the worker",
    "train-default": "reproduce the bundled default model (seeded, a few minutes on CPU)",
    "real-tissue": "score real cores with a model (CNN only) and record them in its card",
    "explain": "Grad-CAM / Score-CAM overlays with MAP and EC",
    "benchmark": "train + evaluate variants on the synthetic cohort; Markdown table",
}

EPILOG = f"{INTENDED_USE}. Configuration: --config FILE (JSON/TOML) or HER2_<KEY> env vars; see `her2 config`."


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in {"model_path": getattr(args, "model", None),
                                     "device": getattr(args, "device", None)}.items() if v is not None}
    return load_settings(getattr(args, "config", None), **overrides)


def _parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, value = part.partition(":")
        if name.strip() not in CLASSES or not value:
            raise argparse.ArgumentTypeError(f"bad class mix {text!r}: use e.g. '0:0.5,3+:0.5' with classes {CLASSES}")
        mix[name.strip()] = float(value)
    return mix


def _parse_size(text: str) -> tuple[float, float]:
    try:
        w, h = (float(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use WIDTHxHEIGHT in micrometres, e.g. 4096x3072") from None
    return w, h


def cmd_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from her2_synthetic.dicom import write_synthetic_slide
    from her2_synthetic.render import SlideSpec

    mix = args.mix or {args.grade: 1.0}
    spec = SlideSpec(seed=args.seed, width_um=args.size[0], height_um=args.size[1], class_mix=mix,
                     tumour_fraction=args.tumour_fraction, centre=args.centre, patient_id=args.patient_id)
    mpp = MAGNIFICATION_MPP[args.magnification]
    rows = -(-int(spec.height_um / mpp) // 512)
    cols = -(-int(spec.width_um / mpp) // 512)
    with tqdm(total=rows * cols, unit="tile", desc="rendering", disable=args.quiet) as bar:
        files, truth = write_synthetic_slide(spec, args.out, mpp=mpp, progress=bar.update)
    t = json.loads(truth.read_text())
    print(f"wrote {len(files)} pyramid levels to {args.out} (ground truth: {t['call']}, "
          + ", ".join(f"{c} {t['percentages'][c]:.1f} %" for c in CLASSES) + ")")
    if getattr(args, "annotations", None):
        from her2_synthetic.dicom import write_synthetic_annotations

        write_synthetic_annotations(args.out, args.annotations)
        print(f"wrote its HER2 tumour outlines (Microscopy Bulk Simple Annotations) to {args.annotations}")
    return 0


def print_summary(result, out_dir: Path | None) -> None:
    score = result.score
    decided = {"cnn": " (made by the CNN tile grader)", "membrane": " (made by the membrane cell grader)"}
    print(f"HER2 IHC slide call: {score.call.value}{decided.get(result.decided_by, '')}")
    if result.cells is not None:
        s = result.cells.summary
        print(f"membrane cell grader: {result.cells.call.value}; tumour cells: "
              + ", ".join(f"{c}: {s.percentages[c]:.1f} % ({s.counts[c]})" for c in CLASSES)
              + f"; membrane connectivity {s.connectivity:.3f}")
    print(f"CNN tile grader: {result.cnn_call.value}; tumour area: "
          + ", ".join(f"{c}: {score.percentages[c]:.1f} %" for c in CLASSES))
    print(f"reflex ISH: {'YES (2+ equivocal)' if score.reflex_ish else 'no'}")
    print(f"tumour area: {score.tumour_area_mm2:.2f} mm2 in {int(score.scored.sum())} tiles "
          f"({result.stats['seconds']:.1f} s)")
    for flag in score.flags:
        print(f"note: {flag}")
    if out_dir is not None:
        print(f"results in {out_dir}: " + ", ".join(p.name for p in result.files))


def _score(series: Path, settings: Settings, out_dir: Path, quiet: bool):
    from tqdm import tqdm

    from worker.pipeline import score_slide

    with tqdm(unit="tile", desc="scoring", disable=quiet) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return score_slide(series, settings, out_dir, progress=progress)


def cmd_score(args: argparse.Namespace) -> int:
    settings = _settings(args)
    out_dir = args.out or settings.output_dir
    result = _score(args.series, settings, out_dir, args.quiet)
    print_summary(result, out_dir)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.size, args.tumour_fraction, args.centre, args.patient_id = (2048.0, 1536.0), 0.7, "A", "DEMO-0001"
    args.mix = {"0": 0.35, "1+": 0.35, "2+": 0.2, "3+": 0.1}
    args.magnification = 40  # both graders run: the membrane grader needs 0.5 um/px or finer
    slide_dir = args.out / "slide"
    args.out = slide_dir
    cmd_synth(args)
    settings = _settings(args)
    result_dir = slide_dir.parent / "results"
    result = _score(slide_dir, settings, result_dir, args.quiet)
    truth = json.loads((slide_dir / "ground_truth.json").read_text())
    print_summary(result, result_dir)
    print(f"ground truth of this synthetic slide: {truth['call']} ("
          + ", ".join(f"{c}: {truth['percentages'][c]:.1f} %" for c in CLASSES) + ")")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    for name, info in Settings.model_fields.items():
        value = getattr(settings, name)
        if name in REDIS_URL_KEYS:
            value = redact_url(value)
        print(f"{name} = {json.dumps(value, default=str)}\n    HER2_{name.upper()}: {info.description}")
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    try:
        view(args.paths, args.port, ready=lambda url: print(f"open {url}   (Ctrl-C stops)", flush=True))
    except OSError as exc:  # e.g. the port is taken, Orthanc refused a file
        raise ViewError(f"viewer: {exc}") from exc
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="her2", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (never patient data)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="settings file (JSON or TOML); env HER2_<KEY> overrides it")
        p.add_argument("--model", type=Path, help="ONNX model (its card .json must sit beside it)")
        p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="ONNX Runtime provider")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    def synth_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=1, help="random seed: same seed, same slide and UIDs")

    p = sub.add_parser("synth", help="write a synthetic HER2 IHC slide as DICOM WSI + ground truth",
                       description="Render a synthetic HER2 IHC slide (tumour nests with ASCO/CAP membrane staining "
                       "patterns, stroma, glass) and write it as a DICOM VL Whole Slide Microscopy series "
                       "(JPEG TILED_FULL pyramid) plus ground_truth.json.")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    synth_options(p)
    p.add_argument("--grade", choices=CLASSES, default="3+", help="single HER2 class of all tumour (default 3+)")
    p.add_argument("--mix", type=_parse_mix, help="class mix of the tumour area, e.g. '0:0.6,1+:0.3,3+:0.1'")
    p.add_argument("--tumour-fraction", type=float, default=0.7, help="share of tissue that is tumour (0-1]")
    p.add_argument("--size", type=_parse_size, default=(4096.0, 3072.0), help="slide size WxH in um")
    p.add_argument("--magnification", type=int, choices=[10, 40], default=10,
                   help="base level: 10x (1.0 um/px) or 40x (0.25 um/px)")
    p.add_argument("--centre", choices=["A", "B"], default="A", help="synthetic lab (B: other stain colour, blur)")
    p.add_argument("--patient-id", default="SYNTH-0001", help="PatientID written into the slide")
    p.add_argument("--annotations", type=Path, help="also write the ground truth as a DICOM Microscopy Bulk Simple "
                   "Annotations file (HER2 tumour outlines; input of `her2 train --data dicom-annotated`); keep it "
                   "outside --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("score", help="score a DICOM WSI folder; write SR, SEG heatmap, overlay PNG",
                       description="Score one slide (a folder holding the DICOM files of one VL WSM series) with "
                       "the ONNX model and write a TID 1500 SR, a SEG heatmap, an overlay PNG and summary.json.")
    p.add_argument("series", type=Path, help="folder (or file) with the slide's DICOM instances")
    p.add_argument("--out", type=Path, help="output folder (default: settings output_dir)")
    common(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("demo", help="generate a sample slide and score it with the bundled model",
                       description="The bundled default job: synthesise a mixed HER2 slide as DICOM and score it "
                       "in-process (no Redis or PACS needed).")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    common(p)
    synth_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("view", help="look at a slide and its results in dicom-microscopy-viewer (local Orthanc)",
                       description="Store the slide and its SR/SEG/ANN in a private Orthanc (loopback, temporary "
                       "storage) and serve viewer/index.html over its DICOMweb; prints the address, Ctrl-C stops. "
                       "Needs `deploy/install.sh --services` (orthanc-dicomweb, npm packages of viewer/).")
    p.add_argument("paths", type=Path, nargs="+", help="the slide's folder, then result folders or files")
    p.add_argument("--port", type=int, default=8000, help="local port of the page (default 8000; 0: any free)")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("config", help="print the effective settings and what each key means")
    common(p)
    p.set_defaults(func=cmd_config)
    service_cli.register(sub)
    for name, help_text in TRAINING_COMMANDS.items():
        # Registered lazily: model_training (and torch) is imported only when one of these runs, by
        # run_training_command, which parses the command's own options with model_training.cli's parser.
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=run_training_command)
    return parser


def run_training_command(args: argparse.Namespace, extra: list[str]) -> int:
    """Parse and run a training command with the parser of :mod:`model_training.cli` (imported only now)."""
    from model_training import cli as training_cli

    parser = argparse.ArgumentParser(prog="her2", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    training_cli.register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    training_args = parser.parse_args([args.command, *extra])
    return training_args.func(training_args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.func is not run_training_command and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")  # what parse_args says
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.func is run_training_command:
            return run_training_command(args, extra)
        return args.func(args)
    except (SlideError, AnnotationError, ModelCardError, ValidationError, FileNotFoundError, PreflightError,
            ViewError) as exc:
        print(f"her2: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
