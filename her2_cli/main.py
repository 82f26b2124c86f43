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
from her2_cli import service, slides, training
from her2_core.facts import INTENDED_USE
from her2_core.model_card import ModelCardError
from her2_viewer.server import ViewError, view
from worker.preflight import PreflightError
from worker.settings import REDIS_URL_KEYS, Settings, redact_url

EPILOG = f"{INTENDED_USE}. Configuration: --config FILE (JSON/TOML) or HER2_<KEY> env vars; see `her2 config`."


def cmd_config(args: argparse.Namespace) -> int:
    settings = slides.scoring_settings(args)
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

    slides.register(sub, common)

    p = sub.add_parser("view", help="look at a slide and its results in dicom-microscopy-viewer (local Orthanc)",
                       description="Store the slide and its SR/SEG/ANN in a private Orthanc (loopback, temporary "
                       "storage) and serve the viewer page over its DICOMweb; prints the address, Ctrl-C stops. "
                       "Needs Debian's orthanc and orthanc-dicomweb (`deploy/install.sh --services`).")
    p.add_argument("paths", type=Path, nargs="+", help="the slide's folder, then result folders or files")
    p.add_argument("--port", type=int, default=8000, help="local port of the page (default 8000; 0: any free)")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("config", help="print the effective settings and what each key means")
    common(p)
    p.set_defaults(func=cmd_config)
    service.register(sub)
    training.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (SlideError, AnnotationError, ModelCardError, ValidationError, FileNotFoundError, PreflightError,
            ViewError) as exc:
        print(f"her2: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
