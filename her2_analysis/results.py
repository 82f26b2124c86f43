"""The DICOM result objects of one scored slide: TID 1500 SR, SEG heatmap and the cells' Bulk Simple Annotations.

The builders (:mod:`dicom_io.sr`, :mod:`dicom_io.seg`, :mod:`dicom_io.cell_annotations`) take plain records;
this module hands them the slide's conclusion and each grader's evidence, identified by algorithm (TID 4019).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pydicom import Dataset

from dicom_io.cell_annotations import build_cell_annotations
from dicom_io.result_header import AlgorithmInfo
from dicom_io.seg import build_heatmap
from dicom_io.sr import GraderResult, build_sr
from dicom_io.wsi import LevelInfo, Slide
from her2_analysis.membrane.slide import MEMBRANE_GRADER, CellGrading, membrane_grader_version
from her2_analysis.options import Grader, MembraneThresholds
from her2_core.aggregate import SlideCall, SlideScore
from her2_core.model_card import ModelCard


def software_version() -> str:
    """This package's version (Software Versions of every result object)."""
    try:
        return version("her2-dicom-worker")
    except PackageNotFoundError:
        return "0+unknown"


def result_objects(slide: Slide, level: LevelInfo, score: SlideScore, cnn: SlideScore, cells: CellGrading | None,
                   decided_by: Grader | None, card: ModelCard, membrane: MembraneThresholds) -> list[Dataset]:
    """SR, SEG heatmap (tiles graded) and cell ANN (cells graded): the SR lists both graders and references the rest.

    ``score`` is the slide's conclusion, ``cnn`` the CNN's own tile result, ``cells`` the membrane grader's (None:
    it did not run), ``decided_by`` the grader whose call is the slide call (None: not assessable).
    """
    level_ds = slide.level_dataset(level.index)
    cnn_algorithm = AlgorithmInfo(name=card.name, version=card.version, software_version=software_version())
    graders = [GraderResult(algorithm=cnn_algorithm, call=cnn.call, percentages=cnn.percentages, basis="tumour area")]
    evidence: list[Dataset] = []
    if score.scored.any():
        evidence.append(build_heatmap(slide.source_datasets, level_ds, score, cnn_algorithm))
    if cells is not None:
        membrane_algorithm = AlgorithmInfo(name=MEMBRANE_GRADER, version=membrane_grader_version(membrane),
                                           software_version=software_version())
        s = cells.summary
        graders.append(GraderResult(algorithm=membrane_algorithm, call=cells.call, percentages=s.percentages,
                                    basis="tumour cells", cell_counts=s.counts, connectivity=s.connectivity))
        tumour = cells.tumour
        if len(tumour):  # centroids are pixel indices; the annotation's (0, 0) is the first pixel's corner
            evidence.append(build_cell_annotations(
                slide.source_datasets, slide.level_dataset(cells.level.index), tumour.centroids + 0.5,
                tumour.cell_class, membrane_algorithm,
                measurements={"completeness": tumour.completeness, "intensity": tumour.intensity}))
    if cnn.call is SlideCall.NOT_ASSESSABLE:  # quality control stopped the slide before any grading
        graders = []
    deciding = {Grader.CNN: 0, Grader.MEMBRANE: 1}.get(decided_by) if graders else None
    sr = build_sr(slide.source_datasets, level_ds, score, cnn_algorithm, graders, deciding, evidence)
    return [sr, *evidence]
