"""What the analysis of one slide can be told: the records its steps take, each default given once, here.

:class:`ScoringOptions` is everything :func:`her2_analysis.pipeline.score_slide` needs; its parts are the records
the steps take (:class:`QualityThresholds` for :mod:`her2_analysis.quality`, :class:`MembraneThresholds` for
:mod:`her2_analysis.membrane`). Whoever configures a job (the service's settings, the command line, a benchmark, a
test) builds one and passes it down; the service's settings default to the values here. This module imports
nothing heavy, so that a process that only configures (the listener) does not load the science.

Research use only: not for clinical use until validated on real slides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from her2_core.facts import WHITE_FRACTION_MAX

#: The bundled tile model (its model card is the .json beside it).
BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "her2_default.onnx"


class Grader(str, Enum):
    """The graders that can make a slide's call."""

    #: The cell-level membrane grader (:mod:`her2_analysis.membrane`): ASCO/CAP's per-tumour-cell definition.
    MEMBRANE = "membrane"
    #: The deep tile model (:mod:`her2_analysis.cnn`): class shares of tumour area.
    CNN = "cnn"


@dataclass(frozen=True)
class QualityThresholds:
    """Quality-control thresholds (how each is measured and calibrated: :mod:`her2_analysis.quality`).

    ``eosin_share_max``: eosin share of tissue stain above which the slide is not HER2 IHC (not assessable).
    ``pen_share_max`` / ``fold_share_max``: share of tissue under marker ink / in folds that is flagged.
    ``sharpness_min``: median tile sharpness (mean absolute LoG) below which blur is flagged.
    ``h_scale_min`` / ``h_scale_max``: haematoxylin scale (reference / the slide's 99th percentile) outside which
    the stain is flagged as outside the training distribution (over twice / under half the reference strength).
    ``min_tumour_cells``: fewer tumour cells graded by the membrane grader is not assessable (our choice: ASCO/CAP
    sets no minimum). ``min_tumour_mm2``: less tumour area graded by the CNN is not assessable.
    """

    eosin_share_max: float = 0.15
    pen_share_max: float = 0.01
    fold_share_max: float = 0.02
    sharpness_min: float = 3.0
    h_scale_min: float = 0.5
    h_scale_max: float = 2.0
    min_tumour_cells: int = 200
    min_tumour_mm2: float = 0.2


@dataclass(frozen=True)
class MembraneThresholds:
    """Cut-offs of the membrane grader: natural-log optical density (as :mod:`her2_core.preprocessing.stain`), um.

    What each one tests and the measurements that set it: docs/membrane-calibration.md. In short: membrane pixels
    (``membrane_min``, ``dab_min``, ``brown_ratio``, ``min_run_um``, ``opening_um``, ``dab_sigma_um``), a cell's
    stain class (``stained_min``, ``faint_min``, ``moderate_min``, ``intense_min``, ``complete_min``,
    ``cluster_min``), tumour-like nuclei (``nucleus_area_um2``, ``lymphocyte_*``, ``fibroblast_*``,
    ``nucleus_brown_max``, ``brown_dark``, ``nucleus_contrast``), epithelium (``cytoplasm_h_min``,
    ``cytoplasm_sigma_um``) and crowding (``crowd_radius_um``, ``crowd_min``), nucleus segmentation
    (``nucleus_sigma_um``, ``local_*``, ``h_floor``, ``reach_um``), tissue (``tissue_od_min``) and the
    counterstain's strength (``h_reference``, ``h_gain_max``).
    """

    membrane_min: float = 0.03
    dab_min: float = 0.04
    brown_ratio: float = 1.0
    min_run_um: float = 5.0
    stained_min: float = 0.08
    faint_min: float = 0.04
    moderate_min: float = 0.17
    intense_min: float = 0.45
    complete_min: float = 0.85
    nucleus_area_um2: tuple[float, float] = (12.0, 200.0)
    lymphocyte_area_um2: float = 30.0
    lymphocyte_dark: float = 1.35
    fibroblast_minor_um: float = 3.5
    fibroblast_ratio: float = 2.0
    nucleus_brown_max: float = 0.5
    brown_dark: float = 1.35
    cytoplasm_h_min: float = 0.10
    cytoplasm_sigma_um: float = 4.0
    crowd_radius_um: float = 20.0
    crowd_min: int = 4
    cluster_min: int = 3
    nucleus_contrast: float = 1.5
    nucleus_sigma_um: float = 0.75
    local_sigma_um: float = 5.0
    local_offset: float = 0.1
    local_floor: float = 0.6
    h_floor: float = 0.08
    reach_um: float = 6.0
    opening_um: float = 4.0
    dab_sigma_um: float = 0.6
    tissue_od_min: float = 0.04
    h_reference: float = 0.25
    h_gain_max: float = 2.0


@dataclass(frozen=True)
class ScoringOptions:
    """Everything one slide's scoring is told (:func:`her2_analysis.pipeline.score_slide`).

    The tile model: ``model_path`` (ONNX; its card beside it), ``device`` ("auto": CUDA when available),
    ``precision`` ("float16" converts the model at load), ``intra_op_threads`` (0: ONNX Runtime's default),
    ``batch_size`` tiles per inference batch, ``decode_threads`` decoding tiles and fields ahead, and
    ``white_fraction_max`` (tiles whiter than this are dropped; must be the model card's value).
    The call: ``grader`` makes it; ``membrane_grader`` off runs the CNN alone; the membrane grader grades at most
    ``membrane_max_fields`` fields spread over the tissue; ``evidence_floor_percent``: a class held by no more than
    this percentage of the tumour counts as absent when ASCO/CAP is applied (not part of ASCO/CAP).
    """

    model_path: Path = BUNDLED_MODEL
    device: str = "auto"
    precision: str = "float32"
    intra_op_threads: int = 0
    batch_size: int = 16
    decode_threads: int = 2
    white_fraction_max: float = WHITE_FRACTION_MAX
    evidence_floor_percent: float = 2.0
    grader: Grader = Grader.MEMBRANE
    membrane_grader: bool = True
    membrane_max_fields: int = 200
    membrane: MembraneThresholds = field(default_factory=MembraneThresholds)
    quality: QualityThresholds = field(default_factory=QualityThresholds)
