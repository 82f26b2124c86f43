"""Write a synthetic slide as a DICOM WSI series plus its ground-truth sidecar (``her2 synth``).

:func:`write_synthetic_annotations` also writes the ground truth as DICOM: a
Microscopy Bulk Simple Annotations object outlining the tumour of each HER2
class, the input ``--data dicom-annotated`` expects from real annotated slides.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from dicom_io.annotations import write_her2_annotations
from dicom_io.errors import AnnotationError
from dicom_io.wsi import open_slide
from dicom_io.wsi_writer import SlideIdentity, write_wsi
from her2_synthetic.regions import mask_outlines
from her2_synthetic.render import (
    CLASSES,
    SlideSpec,
    render_region,
    slide_truth,
    truth_grid,
)

TRUTH_FILE = "ground_truth.json"
#: Raster step (um) at which the generator's tumour classes are traced into outlines.
OUTLINE_STEP_UM = 4.0
#: Who drew the outlines of a synthetic slide (Algorithm Identification, PS3.3 C.37.1.2).
GENERATOR = hd.AlgorithmIdentificationSequence(name="her2-dicom-worker synthetic ground truth",
                                               family=codes.cid7162.ArtificialIntelligence, version="1")


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


def class_outlines(spec: SlideSpec, step_um: float = OUTLINE_STEP_UM) -> dict[str, list[np.ndarray]]:
    """The generator's tumour of each HER2 class as polygons (x, y) in um from the slide's top-left corner.

    The class map (:meth:`SlideSpec.layout`) is sampled every ``step_um`` and traced
    (:func:`her2_synthetic.regions.mask_outlines`); holes are keyholed in.
    """
    rows, cols = math.ceil(spec.height_um / step_um), math.ceil(spec.width_um / step_um)
    ys, xs = np.mgrid[0:rows, 0:cols].astype(np.float64)
    _, _, cls = spec.layout.labels((xs + 0.5) * step_um, (ys + 0.5) * step_um)
    return {c: [p * step_um for p in mask_outlines(cls == k)] for k, c in enumerate(CLASSES) if (cls == k).any()}


def write_synthetic_annotations(series_dir: Path, out_path: Path, coordinate_type: str = "2D",
                                step_um: float = OUTLINE_STEP_UM) -> Path:
    """Write the ground truth of the synthetic slide in ``series_dir`` as an ANN object at ``out_path``.

    One POLYGON group per HER2 class present (:func:`class_outlines` of the spec in
    ``ground_truth.json``), in the base level's Total Pixel Matrix (``"2D"``) or in slide
    coordinates (``"3D"``), in the slide's study. Keep ``out_path`` outside ``series_dir``:
    the worker reads a slide folder as one VL WSM series.
    """
    truth = json.loads((Path(series_dir) / TRUTH_FILE).read_text())
    spec = SlideSpec.from_dict(truth["spec"])
    with open_slide(series_dir) as slide:
        source = slide.level_dataset(0)
    polygons = {c: [p / truth["base_mpp"] for p in polys] for c, polys in class_outlines(spec, step_um).items()}
    if not polygons:
        raise AnnotationError(f"{series_dir}: the synthetic slide has no tumour to outline (an annotation object "
                              "needs at least one group)")
    write_her2_annotations(source, polygons, out_path, coordinate_type=coordinate_type, algorithm=GENERATOR,
                           description="Synthetic ground truth: tumour by HER2 IHC class")
    return Path(out_path)
