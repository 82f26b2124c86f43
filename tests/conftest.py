"""Shared fixtures: synthetic slides written as DICOM once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_training.synthetic import SlideSpec
from model_training.synthetic_dicom import write_synthetic_slide

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "real_dicom"


def _slide(root: Path, name: str, spec: SlideSpec, mpp: float = 1.0) -> Path:
    out = root / name
    write_synthetic_slide(spec, out, mpp=mpp)
    return out


@pytest.fixture(scope="session")
def slides(tmp_path_factory) -> dict[str, Path]:
    """Small 10x synthetic slides: pure 0, pure 3+, and a mixed slide (patients P0, P3, PM)."""
    root = tmp_path_factory.mktemp("slides")
    return {
        "0": _slide(root, "pure0", SlideSpec(seed=11, width_um=2048, height_um=2048, class_mix={"0": 1.0},
                                             patient_id="P0")),
        "3+": _slide(root, "pure3", SlideSpec(seed=12, width_um=2048, height_um=2048, class_mix={"3+": 1.0},
                                              patient_id="P3")),
        "mixed": _slide(root, "mixed", SlideSpec(seed=13, width_um=4096, height_um=3072,
                                                 class_mix={"0": 0.4, "1+": 0.3, "2+": 0.2, "3+": 0.1},
                                                 patient_id="PM")),
    }
