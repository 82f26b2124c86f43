"""Shared fixtures: synthetic slides written as DICOM once per test session, real cores converted by wsidicomizer."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec

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


#: The four real HER2 IHC cores (tests/data/real_her2, see its README) and their labels.
REAL_HER2 = REPO / "tests" / "data" / "real_her2"
#: Their assumed pixel size (nuclei and core size fit 40x) and the pyramid written for them: 0.25 ... 8 um/px.
REAL_CORE_MPP = 0.25
REAL_CORE_DOWNSAMPLES = (1, 2, 4, 8, 16, 32)
REAL_CORE_TILE = 512
#: Converted cores are kept here across test runs (gitignored), keyed by source hash and converter version.
CACHE = REPO / ".cache" / "real_cores"


def real_core_label(score: str, ish: str) -> str:
    """"0", "1+", "2+ISH-", "2+ISH+" from labels.csv's IHC score and ISH status (ISH only told apart for 2+)."""
    return f"{score}ISH{'+' if ish == 'positive' else '-'}" if score == "2+" else score


def real_core_jpegs() -> dict[str, Path]:
    """The four real cores' JPEG files by label ("0", "1+", "2+ISH-", "2+ISH+"), from labels.csv."""
    with open(REAL_HER2 / "labels.csv", newline="") as fh:
        return {real_core_label(row["ihc_score"], row["ish_status"]): REAL_HER2 / row["filename"]
                for row in csv.DictReader(fh)}


def real_core_rgb(label: str) -> np.ndarray:
    """One real core's pixels as an RGB uint8 array (H, W, 3)."""
    return np.asarray(Image.open(real_core_jpegs()[label]).convert("RGB"))


def _convert_core(jpeg: Path, label: str, key: str) -> Path:
    """The DICOM series of one core, converted by wsidicomizer once and cached under :data:`CACHE`."""
    from pydicom.uid import generate_uid

    from tests.third_party import wsidicomize

    final = CACHE / key / label.replace("+", "p")
    if final.is_dir():
        return final
    work = CACHE / key / f".tmp-{os.getpid()}-{final.name}"
    shutil.rmtree(work, ignore_errors=True)
    rgb = np.asarray(Image.open(jpeg).convert("RGB"))
    wsidicomize(rgb, REAL_CORE_MPP, work, tile_size=REAL_CORE_TILE, downsamples=REAL_CORE_DOWNSAMPLES,
                patient_id=f"REAL-{label}", patient_name=f"REAL^CORE^{label}",
                study_uid=generate_uid(entropy_srcs=[key, label, "study"]),
                series_uid=generate_uid(entropy_srcs=[key, label, "series"]))
    try:
        work.rename(final)  # atomic: another session converting the same core at once keeps its own copy
    except OSError:
        shutil.rmtree(work, ignore_errors=True)
    return final


@pytest.fixture(scope="session")
def real_cores() -> dict[str, Path]:
    """The four real HER2 IHC cores as DICOM VL WSM series written by wsidicomizer: label -> series folder.

    Labels "0", "1+", "2+ISH-", "2+ISH+" (tests/data/real_her2/labels.csv).
    Each 5468 x 5468 px core is taken as 0.25 um/px and written as a
    pyramid of 0.25, 0.5, 1, 2, 4 and 8 um/px in 512 px JPEG tiles (edge
    tiles padded black by wsidicomizer), cached in ``.cache/real_cores``.
    Skipped when the wsidicomizer environment is missing.
    """
    from tests.third_party import CONVERT_PYTHON, wsidicomizer_version

    if not CONVERT_PYTHON.exists():
        pytest.skip(f"no wsidicomizer environment at {CONVERT_PYTHON} (bash deploy/install.sh --dev)")
    converter = wsidicomizer_version()
    cores = {}
    for label, jpeg in real_core_jpegs().items():
        digest = hashlib.sha256(jpeg.read_bytes()).hexdigest()[:16]
        key = f"{digest}-wsidicomizer{converter}-{REAL_CORE_MPP}-{REAL_CORE_TILE}-{len(REAL_CORE_DOWNSAMPLES)}"
        cores[label] = _convert_core(jpeg, label, key)
    return cores
