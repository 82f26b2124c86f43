"""Write a synthetic slide as a DICOM WSI series plus its ground-truth sidecar (``her2 synth``)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from dicom_io.wsi_writer import SlideIdentity, write_wsi
from model_training.synthetic import CLASSES, SlideSpec, render_region, slide_truth, truth_grid

TRUTH_FILE = "ground_truth.json"


def write_synthetic_slide(
    spec: SlideSpec,
    out_dir: Path,
    mpp: float = 1.0,
    truth_tile_px: int = 512,
    truth_mpp: float | None = None,
    identity: SlideIdentity | None = None,
    progress=None,
) -> tuple[list[Path], Path]:
    """Render ``spec`` at ``mpp`` um/px into ``out_dir`` as DICOM, with ``ground_truth.json``.

    The sidecar holds the slide's ground-truth percentages and call, and the
    per-tile class map on the grid of ``truth_tile_px`` tiles at ``truth_mpp``
    (default: the base level), which is the model's tile grid.
    """
    if identity is None:
        identity = SlideIdentity.synthetic(spec.seed, spec.patient_id)
        if spec.stain == "H&E":
            identity = replace(identity, stain="haematoxylin and eosin", series_description="H&E")
    width = math.ceil(spec.width_um / mpp)
    height = math.ceil(spec.height_um / mpp)

    def source(x: int, y: int, w: int, h: int):
        return render_region(spec, x * mpp, y * mpp, w, h, mpp).rgb

    files = write_wsi(source, width, height, mpp, identity, out_dir, progress=progress)
    tile_um = truth_tile_px * (truth_mpp or mpp)
    fractions, tumour = truth_grid(spec, tile_um)
    pct, call = slide_truth(spec)
    truth = {
        "spec": {
            "seed": spec.seed, "width_um": spec.width_um, "height_um": spec.height_um,
            "class_mix": spec.class_mix, "tumour_fraction": spec.tumour_fraction,
            "centre": spec.centre, "patient_id": spec.patient_id,
            "stain": spec.stain, "artefacts": list(spec.artefacts),
        },
        "base_mpp": mpp,
        "series_instance_uid": identity.series_instance_uid,
        "percentages": pct,
        "call": call.value,
        "tile_grid": {
            "tile_um": tile_um,
            "classes": list(CLASSES),
            "class_fractions": fractions.round(4).tolist(),
            "tumour_fraction": tumour.round(4).tolist(),
        },
    }
    truth_path = out_dir / TRUTH_FILE
    truth_path.write_text(json.dumps(truth, indent=1))
    return files, truth_path
