"""``her2`` commands on one slide: synth (a synthetic slide with known truth), score, demo.

Research use only - not for clinical use until validated on real slides.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from her2_analysis.options import Grader
from her2_core.aggregate import CLASSES
from her2_core.facts import MAGNIFICATION_MPP
from worker.settings import Settings, load_settings

if TYPE_CHECKING:  # the science is imported when a slide is scored, not for `her2 --help` or the service commands
    from her2_analysis.pipeline import ScoringResult


def scoring_settings(args: argparse.Namespace) -> Settings:
    """The settings of ``--config``, the environment and the ``--model`` / ``--device`` options."""
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


def print_summary(result: ScoringResult, out_dir: Path, files: list[Path]) -> None:
    score = result.score
    decided = {Grader.CNN: " (made by the CNN tile grader)", Grader.MEMBRANE: " (made by the membrane cell grader)"}
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
    print(f"results in {out_dir}: " + ", ".join(p.name for p in files))


def _score(series: Path, settings: Settings, out_dir: Path, quiet: bool) -> tuple[ScoringResult, list[Path]]:
    from tqdm import tqdm

    from her2_analysis.pipeline import score_slide
    from her2_cli.outputs import write_outputs

    with tqdm(unit="tile", desc="scoring", disable=quiet) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = score_slide(series, settings.scoring_options(), progress=progress)
    return result, write_outputs(result, Path(out_dir))


def cmd_score(args: argparse.Namespace) -> int:
    settings = scoring_settings(args)
    out_dir = args.out or settings.output_dir
    result, files = _score(args.series, settings, out_dir, args.quiet)
    print_summary(result, out_dir, files)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.size, args.tumour_fraction, args.centre, args.patient_id = (2048.0, 1536.0), 0.7, "A", "DEMO-0001"
    args.mix = {"0": 0.35, "1+": 0.35, "2+": 0.2, "3+": 0.1}
    args.magnification = 40  # both graders run: the membrane grader needs 0.5 um/px or finer
    slide_dir = args.out / "slide"
    args.out = slide_dir
    cmd_synth(args)
    settings = scoring_settings(args)
    result_dir = slide_dir.parent / "results"
    result, files = _score(slide_dir, settings, result_dir, args.quiet)
    truth = json.loads((slide_dir / "ground_truth.json").read_text())
    print_summary(result, result_dir, files)
    print(f"ground truth of this synthetic slide: {truth['call']} ("
          + ", ".join(f"{c}: {truth['percentages'][c]:.1f} %" for c in CLASSES) + ")")
    return 0


def register(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add synth, score and demo to the ``her2`` parser; ``common`` adds the settings and model options."""

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
