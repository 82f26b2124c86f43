"""Encode a :class:`~worker.aggregate.SlideScore` as DICOM result objects.

Two objects per scored slide, each in a series of its own, both in the
source's study and Frame of Reference:

* :func:`build_sr` -- a Comprehensive 3D SR (PS3.3 A.35.13) holding a TID 1500
  Measurement Report: the HER2 IHC score as a TID 1410 Planar ROI group whose
  region is an SCOORD3D polygon around the scored tiles (what Slim needs to
  show it), the same call as a slide-level TID 1501 group (what region-unaware
  readers look for), the per-class tumour-area percentages and the tumour area;
  optionally one TID 1410 group per grader (:class:`GraderResult`: the tile
  CNN, the membrane cell grader) with its own call and measurements, and
  references to the heatmap SEG and the cell ANN
  (:mod:`dicom_io.cell_annotations`) it summarises.
* :func:`build_heatmap` -- a FRACTIONAL / PROBABILITY Segmentation (PS3.3
  A.51, C.8.20) with one segment per tile class; one heatmap pixel is one tile.

Coded concepts (no DICOM context group exists for HER2 IHC; see the design
notes, "Codes for the HER2 score in SR"):

======================================  =========================================
HER2 score (concept name)               (85319-2, LN) HER2 [Presence] in Breast
                                        cancer specimen by Immune stain
HER2 score values (LOINC LL4396-9)      LA6111-4 "0", LA11841-6 "1+",
                                        LA11842-4 "2+", LA11843-2 "3+",
                                        LA11884-6 "Indeterminate" (not assessable)
HER2-ultralow                           (HER2CAT, 99HER2) "HER2 expression category"
                                        = (1381318009, SCT) "HER2-ultralow"; the
                                        score itself stays LA6111-4 "0"
Reflex ISH                              (REFLEXISH, 99HER2) "Reflex in situ
                                        hybridization indicated" = (373066001,
                                        SCT) Yes / (373067005, SCT) No; omitted
                                        when the slide is not assessable
Class percentages (NUM, UCUM "%")       (PCT0 / PCT1 / PCT2 / PCT3, 99HER2)
                                        "Tumor area with HER2 IHC <c> staining"
                                        (tile grader); (CPCT0..3, 99HER2) "Tumor
                                        cells with HER2 IHC <c> staining" (cell
                                        grader)
Cell counts (NUM, UCUM "{cells}")       (CCNT0..3, 99HER2) "Number of tumor cells
                                        with HER2 IHC <c> staining"
Membrane connectivity (NUM, UCUM "1")   (CONNECT, 99HER2) "HER2 membrane
                                        connectivity", 0 (no tumour cell has
                                        membrane staining) .. 1 (every one ringed
                                        completely by intense staining)
Which grader made the slide call        (DECIDES, 99HER2) "Grader made the slide
                                        call" = Yes / No, in each grader's group
Tumour area (NUM, UCUM "mm2")           (TUMORAREA, 99HER2) "Scored tumor area"
Flags (TEXT, in the TID 1501 group)     (FLAG, 99HER2) "Scoring flag"
Intended-use statement (TEXT)           (121106, DCM) "Comment"
Finding type / category                 (108369006, SCT) "Tumor" /
                                        (49755003, SCT) "Morphologically
                                        abnormal structure"
======================================  =========================================

``99HER2`` is a local coding scheme (the "99" prefix is reserved for local
schemes, PS3.3 8.2) declared in the Coding Scheme Identification Sequence of
the SR.

Research use only: every object says "not for clinical use" in its Series
Description, and the SR repeats it as a comment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from dicom_io.uids import ResultUIDs, derived_uid, result_uids
from worker.aggregate import CLASSES, SlideCall, SlideScore, TileGrid

#: Series numbers of the result series (the source is usually 1..n).
SR_SERIES_NUMBER = 9001
SEG_SERIES_NUMBER = 9002

NOT_FOR_CLINICAL_USE = "Research use only - not for clinical use"
SR_SERIES_DESCRIPTION = "HER2 IHC AI score - research use, not for clinical use"
SEG_SERIES_DESCRIPTION = "HER2 IHC AI heatmap - research use, not for clinical use"
INTENDED_USE_COMMENT = (
    "Automated HER2 IHC scoring (ASCO/CAP categories). Research use only - not for clinical use; "
    "not verified by a pathologist."
)
HEATMAP_CONTENT_LABEL = "HER2_HEATMAP"

LOCAL_SCHEME = "99HER2"


def _local_scheme_item() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification Sequence item (SOP Common Module, PS3.3 C.12.1) declaring ``99HER2``."""
    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="her2-dicom-worker local codes", responsible_organization="her2-dicom-worker",
    )


# --- coded concepts -------------------------------------------------------------------------------

HER2_SCORE = CodedConcept("85319-2", "LN", "HER2 [Presence] in Breast cancer specimen by Immune stain")
HER2_SCORE_VALUES: dict[SlideCall, CodedConcept] = {
    SlideCall.ZERO: CodedConcept("LA6111-4", "LN", "0"),
    SlideCall.ULTRALOW: CodedConcept("LA6111-4", "LN", "0"),
    SlideCall.ONE: CodedConcept("LA11841-6", "LN", "1+"),
    SlideCall.TWO: CodedConcept("LA11842-4", "LN", "2+"),
    SlideCall.THREE: CodedConcept("LA11843-2", "LN", "3+"),
    SlideCall.NOT_ASSESSABLE: CodedConcept("LA11884-6", "LN", "Indeterminate"),
}
HER2_CATEGORY = CodedConcept("HER2CAT", LOCAL_SCHEME, "HER2 expression category")
HER2_ULTRALOW = CodedConcept("1381318009", "SCT", "HER2-ultralow")
REFLEX_ISH = CodedConcept("REFLEXISH", LOCAL_SCHEME, "Reflex in situ hybridization indicated")
YES = CodedConcept.from_code(codes.SCT.Yes)
NO = CodedConcept.from_code(codes.SCT.No)
CLASS_PERCENTAGE: dict[str, CodedConcept] = {
    c: CodedConcept(f"PCT{i}", LOCAL_SCHEME, f"Tumor area with HER2 IHC {c} staining")
    for i, c in enumerate(CLASSES)
}
TUMOUR_AREA = CodedConcept("TUMORAREA", LOCAL_SCHEME, "Scored tumor area")
SCORING_FLAG = CodedConcept("FLAG", LOCAL_SCHEME, "Scoring flag")
COMMENT = CodedConcept.from_code(codes.DCM.Comment)
TUMOR = CodedConcept.from_code(codes.SCT.Tumor)
ABNORMAL_STRUCTURE = CodedConcept("49755003", "SCT", "Morphologically abnormal structure")
WHOLE_SLIDE_IMAGING = CodedConcept.from_code(codes.DCM.WholeSlideImaging)
PERCENT = CodedConcept("%", "UCUM", "percent")
SQUARE_MM = CodedConcept("mm2", "UCUM", "square millimeter")
CELL_PERCENTAGE: dict[str, CodedConcept] = {
    c: CodedConcept(f"CPCT{i}", LOCAL_SCHEME, f"Tumor cells with HER2 IHC {c} staining")
    for i, c in enumerate(CLASSES)
}
CELL_COUNT: dict[str, CodedConcept] = {
    c: CodedConcept(f"CCNT{i}", LOCAL_SCHEME, f"Number of tumor cells with HER2 IHC {c} staining")
    for i, c in enumerate(CLASSES)
}
MEMBRANE_CONNECTIVITY = CodedConcept("CONNECT", LOCAL_SCHEME, "HER2 membrane connectivity")
SLIDE_CALL_GRADER = CodedConcept("DECIDES", LOCAL_SCHEME, "Grader made the slide call")
CELLS = CodedConcept("{cells}", "UCUM", "cells")
NO_UNITS = CodedConcept("1", "UCUM", "no units")


@dataclass(frozen=True, kw_only=True)
class AlgorithmInfo:
    """Identification of the scoring algorithm (TID 4019, IHE AI Results).

    Attributes
    ----------
    name: str
        Model name (Algorithm Name, Manufacturer's Model Name).
    version: str
        Model version (Algorithm Version); with ``name`` it determines the
        result UIDs and the Device UID.
    manufacturer: str
        Who made the algorithm.
    software_version: str
        Version of this worker software (Software Versions).

    """

    name: str
    version: str
    manufacturer: str = "her2-dicom-worker"
    software_version: str

    def identification(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification content items."""
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)

    def segment_identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Macro of each Segment Description (Segmentation Image Module, PS3.3 C.8.20.2)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, family=codes.cid7162.ArtificialIntelligence, version=self.version,
            source=self.manufacturer,
        )

    def equipment(self) -> dict[str, str]:
        """General Equipment Module arguments (PS3.3 C.7.5.1) of an object this algorithm made, for highdicom's SOP classes."""
        return {"manufacturer": self.manufacturer, "manufacturer_model_name": self.name,
                "software_versions": self.software_version, "device_serial_number": self.version}

    def contributing_equipment(self) -> hd.ContributingEquipment:
        """Contributing Equipment item for the model (IHE AI Results): name and version.

        The model's Device UID is not in this item but in the General
        Equipment Module of the object the model made (:func:`set_device_uid`):
        PS3.3 lists Device UID (0018,1002) in both places since a later
        correction, but dicom3tools' validator (2022) knows only General
        Equipment and makes every object with it in Contributing Equipment
        "Standard Extended".
        """
        return hd.ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.name,
            software_versions=[self.version, self.software_version],
            contribution_description=f"HER2 IHC scoring algorithm {self.name} {self.version}"[:1024],
        )


def set_device_uid(obj: Dataset, device_uid: str) -> None:
    """Device UID (0018,1002) of the model that made ``obj`` (General Equipment Module, PS3.3 C.7.5.1, Type 3).

    The result objects' General Equipment already describes the model
    (Manufacturer, Manufacturer's Model Name = model name, Device Serial
    Number = model version), so its per-version Device UID
    (:attr:`dicom_io.uids.ResultUIDs.device`) belongs there too; the SR also
    names it as Device Observer UID (TID 1004).
    """
    obj.DeviceUID = device_uid


#: Grader basis -> (group title, per-class percentage concepts).
GRADER_BASES: dict[str, tuple[str, dict[str, CodedConcept]]] = {
    "tumour area": ("HER2 tile grader", CLASS_PERCENTAGE),
    "tumour cells": ("HER2 membrane cell grader", CELL_PERCENTAGE),
}


@dataclass(frozen=True, kw_only=True)
class GraderResult:
    """One grader's own result on the slide, for its measurement group in the SR.

    Attributes
    ----------
    algorithm: AlgorithmInfo
        The grader (TID 4019 Algorithm Identification of its group).
    call: SlideCall
        The grader's own slide call (ASCO/CAP on its percentages).
    percentages: dict[str, float]
        Per class of ``CLASSES``, in 0..100.
    basis: str
        What the percentages are of: ``"tumour area"`` (tile grader) or
        ``"tumour cells"`` (cell grader); see :data:`GRADER_BASES`.
    cell_counts: dict[str, int] | None
        Tumour cells per class (``"tumour cells"`` basis only).
    connectivity: float | None
        Slide membrane connectivity in [0, 1]: 0 when no tumour cell has any
        membrane staining, 1 when every one is ringed completely by intense
        staining (the cell grader's mean of completeness x relative intensity).

    Raises
    ------
    ValueError
        On an unknown basis, missing or out-of-range values, or cell counts
        on a tumour-area basis.

    """

    algorithm: AlgorithmInfo
    call: SlideCall
    percentages: dict[str, float]
    basis: str
    cell_counts: dict[str, int] | None = None
    connectivity: float | None = None

    def __post_init__(self) -> None:
        if self.basis not in GRADER_BASES:
            raise ValueError(f"grader basis {self.basis!r} is not one of {sorted(GRADER_BASES)}")
        for name, values in (("percentages", self.percentages), ("cell_counts", self.cell_counts)):
            if values is not None and sorted(values) != sorted(CLASSES):
                raise ValueError(f"{self.algorithm.name}: {name} has classes {sorted(values)}, expected {CLASSES}")
        if not all(np.isfinite(v) and 0.0 <= v <= 100.0 for v in self.percentages.values()):
            raise ValueError(f"{self.algorithm.name}: percentages {self.percentages} not all in 0..100")
        if self.cell_counts is not None:
            if self.basis != "tumour cells":
                raise ValueError(f"{self.algorithm.name}: cell counts given for a {self.basis!r} grader")
            if not all(int(v) == v and v >= 0 for v in self.cell_counts.values()):
                raise ValueError(f"{self.algorithm.name}: cell counts {self.cell_counts} are not all counts")
        if self.connectivity is not None and not 0.0 <= self.connectivity <= 1.0:
            raise ValueError(f"{self.algorithm.name}: connectivity {self.connectivity} is outside [0, 1]")


# --- geometry -------------------------------------------------------------------------------------

def _level_spacing(level: Dataset) -> tuple[float, float]:
    """(row, column) Pixel Spacing in mm of a WSM level (Shared Functional Groups, PS3.3 C.7.6.16.2.1)."""
    try:
        spacing = level.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    except (AttributeError, IndexError) as exc:
        raise ValueError(
            f"scored level {level.get('SOPInstanceUID', '?')} has no "
            "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing"
        ) from exc
    return float(spacing[0]), float(spacing[1])


def _check_inputs(scored_level: Dataset, score: SlideScore) -> TileGrid:
    """Refuse a score whose arrays or grid do not fit ``scored_level``; return the grid."""
    grid = score.grid
    for keyword in ("FrameOfReferenceUID", "TotalPixelMatrixOriginSequence", "ImageOrientationSlide",
                    "TotalPixelMatrixRows", "TotalPixelMatrixColumns"):
        if keyword not in scored_level:
            raise ValueError(f"scored level {scored_level.get('SOPInstanceUID', '?')} has no {keyword}")
    if grid.rows < 1 or grid.cols < 1 or grid.tile_size < 1:
        raise ValueError(f"tile grid is empty: {grid}")
    if score.probabilities.shape != (grid.rows, grid.cols, len(CLASSES)):
        raise ValueError(
            f"score.probabilities has shape {score.probabilities.shape}, "
            f"expected {(grid.rows, grid.cols, len(CLASSES))} from the tile grid"
        )
    missing = [c for c in CLASSES if c not in score.percentages]
    if missing:
        raise ValueError(f"score.percentages has no value for class(es) {missing}")
    for name in ("scored", "tumour_fraction"):
        if getattr(score, name).shape != (grid.rows, grid.cols):
            raise ValueError(f"score.{name} has shape {getattr(score, name).shape}, expected {(grid.rows, grid.cols)}")
    level_spacing = _level_spacing(scored_level)
    if not np.allclose(level_spacing, grid.pixel_spacing_mm, rtol=0.01):
        raise ValueError(
            f"tile grid pixel spacing {grid.pixel_spacing_mm} mm does not match the scored level's "
            f"PixelSpacing {level_spacing} mm: the grid was not made on this level"
        )
    if (grid.rows - 1) * grid.tile_size >= scored_level.TotalPixelMatrixRows or \
            (grid.cols - 1) * grid.tile_size >= scored_level.TotalPixelMatrixColumns:
        raise ValueError(
            f"tile grid {grid.rows}x{grid.cols} of {grid.tile_size} px extends beyond the scored level's "
            f"Total Pixel Matrix ({scored_level.TotalPixelMatrixRows}x{scored_level.TotalPixelMatrixColumns})"
        )
    return grid


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull (Andrew's monotone chain) of (n, 2) points, collinear points dropped."""
    pts = sorted({(float(x), float(y)) for x, y in points})
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def scored_region_outline(scored_level: Dataset, score: SlideScore) -> np.ndarray:
    """Closed polygon (n, 3) in slide coordinates (mm) around the scored tiles.

    The outline is the convex hull of the corners of the scored tiles, clipped
    to the Total Pixel Matrix; with no scored tile it is the whole level.
    Image coordinates are continuous (column, row) with (0, 0) at the top-left
    corner of the top-left pixel; :class:`highdicom.spatial.ImageToReferenceTransformer`
    maps them into the slide coordinate system using the level's Total Pixel
    Matrix Origin and Image Orientation (Slide) (Whole Slide Microscopy Image
    Module, PS3.3 C.8.12.4).

    Parameters
    ----------
    scored_level: pydicom.Dataset
        The graded VL Whole Slide Microscopy Image instance.
    score: SlideScore
        Its score; ``score.scored`` marks the graded tiles.

    Returns
    -------
    numpy.ndarray
        (n, 3) float array, first point repeated at the end (SCOORD3D POLYGON).

    """
    grid = score.grid
    width, height = int(scored_level.TotalPixelMatrixColumns), int(scored_level.TotalPixelMatrixRows)
    rows, cols = np.nonzero(score.scored)
    if rows.size == 0:
        corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], float)
    else:
        t = grid.tile_size
        corners = np.concatenate([
            np.stack([(cols + dc) * t, (rows + dr) * t], axis=1) for dr in (0, 1) for dc in (0, 1)
        ]).astype(float)
        corners[:, 0] = corners[:, 0].clip(0, width)
        corners[:, 1] = corners[:, 1].clip(0, height)
    hull = _convex_hull(corners)
    if len(hull) < 3:  # tiles clipped to a line: fall back to the level outline
        hull = np.array([[0, 0], [width, 0], [width, height], [0, height]], float)
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(scored_level, for_total_pixel_matrix=True)
    polygon = to_slide(hull)
    return np.vstack([polygon, polygon[:1]])


def tile_centre_position(scored_level: Dataset, tile_size: int, row: int = 0, col: int = 0) -> np.ndarray:
    """Slide coordinates (x, y, z) in mm of the centre of tile (``row``, ``col``).

    Tile (r, c) covers image coordinates [c*T, (c+1)*T) x [r*T, (r+1)*T) of the
    level's Total Pixel Matrix, so its centre is at image coordinate
    ((c + 1/2) T, (r + 1/2) T), where (0, 0) is the top-left corner of the
    top-left pixel. The Total Pixel Matrix Origin Sequence is read, as highdicom
    reads it, as the position of the *centre* of the top-left pixel -- the
    convention of Image Position (Patient) (PS3.3 C.7.6.2.1.1), which also
    holds for every Plane Position (Slide) item highdicom writes.

    Parameters
    ----------
    scored_level: pydicom.Dataset
        A tiled VL Whole Slide Microscopy Image instance.
    tile_size: int
        Tile edge in pixels of that level.
    row, col: int
        Tile indices.

    Returns
    -------
    numpy.ndarray
        (3,) float array.

    """
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(scored_level, for_total_pixel_matrix=True)
    return to_slide(np.array([[(col + 0.5) * tile_size, (row + 0.5) * tile_size]], float))[0]


# --- SR -------------------------------------------------------------------------------------------

def _her2_evaluations(call: SlideCall) -> list[hd.sr.QualitativeEvaluation]:
    """HER2 score, HER2-ultralow category and reflex-ISH evaluations for ``call``."""
    evaluations = [hd.sr.QualitativeEvaluation(HER2_SCORE, HER2_SCORE_VALUES[call])]
    if call is SlideCall.ULTRALOW:
        evaluations.append(hd.sr.QualitativeEvaluation(HER2_CATEGORY, HER2_ULTRALOW))
    if call is not SlideCall.NOT_ASSESSABLE:
        evaluations.append(hd.sr.QualitativeEvaluation(REFLEX_ISH, YES if call.reflex_ish else NO))
    return evaluations


def _percentages(percentages: dict[str, float], concepts: dict[str, CodedConcept],
                 algorithm_id: hd.sr.AlgorithmIdentification, seg: Dataset | None) -> list[hd.sr.Measurement]:
    """Per-class percentages (%) as TID 300 items; each INFERRED FROM its segment of ``seg`` when given.

    The heatmap's segment k+1 holds the probabilities of ``CLASSES[k]``
    (:func:`build_heatmap`), which the tile grader's percentages weigh by
    tumour fraction: TID 320 "Source of Measurement" (121112, DCM) IMAGE with
    Referenced Segment Number (PS3.3 C.18.3.1, Image Reference Macro).
    """
    items = []
    for k, c in enumerate(CLASSES):
        sources = None
        if seg is not None:
            source = hd.sr.SourceImageForMeasurement(seg.SOPClassUID, seg.SOPInstanceUID)
            source.ReferencedSOPSequence[0].ReferencedSegmentNumber = k + 1
            sources = [source]
        items.append(hd.sr.Measurement(name=concepts[c], value=float(percentages[c]), unit=PERCENT,
                                       algorithm_id=algorithm_id, referenced_images=sources))
    return items


def _measurements(score: SlideScore, algorithm_id: hd.sr.AlgorithmIdentification,
                  seg: Dataset | None = None) -> list[hd.sr.Measurement]:
    """Per-class tumour-area percentages (%) and the scored tumour area (mm2) as TID 300 items."""
    items = _percentages(score.percentages, CLASS_PERCENTAGE, algorithm_id, seg)
    items.append(hd.sr.Measurement(name=TUMOUR_AREA, value=float(score.tumour_area_mm2), unit=SQUARE_MM,
                                   algorithm_id=algorithm_id))
    return items


def _heatmap_of(algorithm: AlgorithmInfo, references: Sequence[Dataset]) -> Dataset | None:
    """The Segmentation among ``references`` made by ``algorithm`` (its segments' algorithm name), if any."""
    for ds in references:
        segments = ds.get("SegmentSequence", []) if ds.get("SOPClassUID") == SegmentationStorage else []
        if len(segments) == len(CLASSES) and all(s.get("SegmentAlgorithmName") == algorithm.name for s in segments):
            return ds
    return None


def _grader_group(grader: GraderResult, deciding: bool, region: hd.sr.ImageRegion3D, scored_level: Dataset,
                  sr_uid: str, references: Sequence[Dataset]) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one grader: its own call, percentages, cell counts, connectivity, decider flag."""
    title, concepts = GRADER_BASES[grader.basis]
    algorithm_id = grader.algorithm.identification()
    measurements = _percentages(grader.percentages, concepts, algorithm_id,
                                _heatmap_of(grader.algorithm, references))
    if grader.cell_counts is not None:
        measurements += [hd.sr.Measurement(name=CELL_COUNT[c], value=int(grader.cell_counts[c]), unit=CELLS,
                                           algorithm_id=algorithm_id) for c in CLASSES]
    if grader.connectivity is not None:
        measurements.append(hd.sr.Measurement(name=MEMBRANE_CONNECTIVITY, value=float(grader.connectivity),
                                              unit=NO_UNITS, algorithm_id=algorithm_id))
    evaluations = _her2_evaluations(grader.call)
    evaluations.append(hd.sr.QualitativeEvaluation(SLIDE_CALL_GRADER, YES if deciding else NO))
    name = f"{grader.algorithm.name} {grader.algorithm.version}"
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", sr_uid, "grader", grader.algorithm.name, grader.algorithm.version),
            identifier=f"{title} ({grader.basis}): {name}"),
        referenced_region=region,
        finding_type=TUMOR,
        finding_category=ABNORMAL_STRUCTURE,
        finding_sites=_finding_sites(scored_level),
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def _text(name: CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _subject_context(scored_level: Dataset) -> hd.sr.SubjectContext:
    """TID 1006 Subject Context with Subject Class Specimen (121027, DCM) and TID 1009 Specimen context."""
    try:
        specimen = scored_level.SpecimenDescriptionSequence[0]
        specimen_uid = specimen.SpecimenUID
    except (AttributeError, IndexError) as exc:
        raise ValueError(
            f"scored level {scored_level.get('SOPInstanceUID', '?')} has no "
            "SpecimenDescriptionSequence[0].SpecimenUID (PS3.3 C.7.6.22 Specimen Module)"
        ) from exc
    specimen_type = None
    if specimen.get("SpecimenTypeCodeSequence"):
        specimen_type = CodedConcept.from_dataset(specimen.SpecimenTypeCodeSequence[0])
    return hd.sr.SubjectContext(
        subject_class=codes.DCM.Specimen,
        subject_class_specific_context=hd.sr.SubjectContextSpecimen(
            uid=specimen_uid,
            identifier=specimen.get("SpecimenIdentifier") or None,
            container_identifier=scored_level.get("ContainerIdentifier") or None,
            specimen_type=specimen_type,
        ),
    )


def _finding_sites(scored_level: Dataset) -> list[hd.sr.FindingSite] | None:
    """Finding site from the specimen's Primary Anatomic Structure (e.g. breast), when the source has one."""
    try:
        structure = scored_level.SpecimenDescriptionSequence[0].PrimaryAnatomicStructureSequence[0]
    except (AttributeError, IndexError):
        return None
    return [hd.sr.FindingSite(anatomic_location=CodedConcept.from_dataset(structure))]


def _check_sources(source_instances: Sequence[Dataset], scored_level: Dataset) -> None:
    if not source_instances:
        raise ValueError("source_instances is empty: results need the source slide's instances (evidence and UIDs)")
    series = {ds.SeriesInstanceUID for ds in source_instances}
    if len(series) != 1:
        raise ValueError(f"source_instances come from {len(series)} series ({sorted(series)}); expected one")
    if scored_level.SOPInstanceUID not in {ds.SOPInstanceUID for ds in source_instances}:
        raise ValueError(f"scored level {scored_level.SOPInstanceUID} is not one of source_instances")


def _result_uids(source_instances: Sequence[Dataset], algorithm: AlgorithmInfo,
                 co_algorithms: Sequence[AlgorithmInfo] = ()) -> ResultUIDs:
    """Result UIDs of this model version on exactly these source instances (:func:`dicom_io.uids.result_uids`).

    ``co_algorithms``: further graders whose results the SR carries (they change the SR's UIDs only).
    """
    return result_uids(source_instances[0].SeriesInstanceUID, (ds.SOPInstanceUID for ds in source_instances),
                       algorithm.name, algorithm.version, [(a.name, a.version) for a in co_algorithms])


def _check_graders(score: SlideScore, graders: Sequence[GraderResult], deciding: int | None) -> None:
    if deciding is not None and not 0 <= deciding < len(graders):
        raise ValueError(f"deciding grader index {deciding} is not one of the {len(graders)} graders")
    names = [(g.algorithm.name, g.algorithm.version) for g in graders]
    if len(set(names)) != len(names):
        raise ValueError(f"graders {names} repeat an algorithm version: each grader needs its own")
    if deciding is not None and score.call is not SlideCall.NOT_ASSESSABLE \
            and graders[deciding].call is not score.call:
        raise ValueError(f"slide call {score.call.value!r} is not the deciding grader's call "
                         f"{graders[deciding].call.value!r} ({graders[deciding].algorithm.name})")


def _check_references(source_instances: Sequence[Dataset], references: Sequence[Dataset]) -> None:
    study = source_instances[0].StudyInstanceUID
    for ds in references:
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise ValueError("a reference has no SOPClassUID / SOPInstanceUID")
        if ds.get("StudyInstanceUID") != study:
            raise ValueError(f"reference {ds.SOPInstanceUID} is in study {ds.get('StudyInstanceUID')}, "
                             f"not the slide's study {study}")


def build_sr(
    source_instances: Sequence[Dataset],
    scored_level: Dataset,
    score: SlideScore,
    algorithm: AlgorithmInfo,
    graders: Sequence[GraderResult] = (),
    deciding: int | None = None,
    references: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the HER2 result as a Comprehensive 3D SR with a TID 1500 Measurement Report.

    Content tree (PS3.16 TID 1500):

    * TID 1001 observation context: device observer (``algorithm``, its Device
      UID) and TID 1006/1009 subject context Specimen (121027, DCM) with the
      source's Specimen UID, Specimen Identifier and Container Identifier;
    * procedure reported (112703, DCM, "Whole Slide Imaging");
    * TID 1600 image library listing every source instance;
    * Imaging Measurements with

      - a TID 1410 Planar ROI group whose Image Region is an SCOORD3D POLYGON
        (slide coordinates, the source's Frame of Reference) around the scored
        tiles: the **slide call** (HER2 score, HER2-ultralow category, reflex
        ISH), the tile grader's tumour-area percentages, tumour area,
        algorithm identification (TID 4019), finding type Tumor and the
        specimen's anatomic site;
      - a TID 1501 slide-level group with the same evaluations, the scoring
        flags and the intended-use comment as TEXT items, referencing the
        scored level as source image;
      - one TID 1410 group per grader in ``graders`` (same region: the
        graders grade the same tissue; Slim shows only TID 1410 groups with an
        SCOORD3D region), tracking identifier "HER2 tile grader (tumour
        area): <name> <version>" or "HER2 membrane cell grader (tumour cells):
        ...": the grader's TID 4019 algorithm identification, its own call
        (same HER2 score codes), (DECIDES, 99HER2) "Grader made the slide
        call" Yes/No, its per-class percentages named by their basis
        ("Tumor area with ..." or "Tumor cells with HER2 IHC <c> staining"),
        per-class cell counts (UCUM "{cells}") and the membrane connectivity
        (UCUM "1", range 0..1) when given.

    References (issue 14: a viewer can link score and evidence): every
    dataset in ``references`` (the heatmap SEG, the cell ANN) is listed in the
    Current Requested Procedure Evidence Sequence (SR Document General
    Module, PS3.3 C.17.2: the instances created for this procedure), and the
    percentages of the grader that made a heatmap (the SEG whose segments
    name its algorithm) are each INFERRED FROM their class's segment
    (TID 300 / TID 320 "Source of Measurement", Referenced Segment Number).
    PS3.16 has no TID 1500 content item for a Microscopy Bulk Simple
    Annotations reference, so the ANN is linked through the evidence only.

    Patient, study and specimen identity are copied from the source
    (highdicom copies them from ``source_instances[0]``); Series and SOP
    Instance UIDs come from :func:`dicom_io.uids.result_uids` (source series,
    its scored instances, ``algorithm`` and every grader's version as
    co-models) so that a retried job produces the same instance and a new
    version of any grader a new one.

    Parameters
    ----------
    source_instances: Sequence[pydicom.Dataset]
        Metadata of every instance of the source VL WSM series (pixel data not needed).
    scored_level: pydicom.Dataset
        The instance whose tiles were graded (one of ``source_instances``).
    score: SlideScore
        The slide's score (its call is the slide call); ``score.grid`` lies on ``scored_level``.
    algorithm: AlgorithmInfo
        The model that produced ``score`` (device observer; names the SR).
    graders: Sequence[GraderResult]
        Each grader's own result (e.g. the tile CNN and the membrane cell
        grader); none: the SR as before, with no grader groups.
    deciding: int | None
        Index into ``graders`` of the grader that made the slide call, whose
        call must then be ``score.call`` (unless quality control made the slide
        not assessable); None: no grader made it.
    references: Sequence[pydicom.Dataset]
        Result objects of the same study this SR summarises (metadata
        suffices): the heatmap SEG and the cell ANN, built before the SR.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The SR document (Explicit VR Little Endian).

    Raises
    ------
    ValueError
        When the sources are empty or from several series, the scored level is
        not among them, lacks specimen or spatial attributes, the score does
        not fit its grid, ``deciding`` is out of range or disagrees with the
        slide call, two graders share an algorithm version, or a reference is
        of another study.

    """
    _check_sources(source_instances, scored_level)
    _check_inputs(scored_level, score)
    _check_graders(score, graders, deciding)
    _check_references(source_instances, references)
    uids = _result_uids(source_instances, algorithm, [g.algorithm for g in graders])
    algorithm_id = algorithm.identification()

    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=uids.device, name=algorithm.name, manufacturer_name=algorithm.manufacturer,
                model_name=f"{algorithm.name} {algorithm.version}"[:64],
            ),
        ),
        subject_context=_subject_context(scored_level),
    )
    outline = scored_region_outline(scored_level, score)

    def region() -> hd.sr.ImageRegion3D:
        return hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POLYGON, graphic_data=outline,
                                   frame_of_reference_uid=scored_level.FrameOfReferenceUID)

    roi_group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", uids.sr, "scored-region"), identifier="HER2 scored tissue region"),
        referenced_region=region(),
        finding_type=TUMOR,
        finding_category=ABNORMAL_STRUCTURE,
        finding_sites=_finding_sites(scored_level),
        algorithm_id=algorithm_id,
        measurements=_measurements(score, algorithm_id, _heatmap_of(algorithm, references)),
        qualitative_evaluations=_her2_evaluations(score.call),
    )
    slide_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid("tracking", uids.sr, "slide"), identifier="HER2 slide-level call"),
        finding_type=TUMOR,
        finding_category=ABNORMAL_STRUCTURE,
        finding_sites=_finding_sites(scored_level),
        algorithm_id=algorithm_id,
        qualitative_evaluations=_her2_evaluations(score.call),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(scored_level)],
    )
    # TID 1501 allows TEXT qualitative evaluations; highdicom's constructor has no slot for them.
    slide_group[0].ContentSequence.extend(
        [_text(SCORING_FLAG, flag) for flag in score.flags] + [_text(COMMENT, INTENDED_USE_COMMENT)]
    )
    grader_groups = [_grader_group(g, i == deciding, region(), scored_level, uids.sr, references)
                     for i, g in enumerate(graders)]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=WHOLE_SLIDE_IMAGING,
        imaging_measurements=[roi_group, slide_group, *grader_groups],
        referenced_images=list(source_instances),
    )
    equipment = {(a.name, a.version): a for a in [algorithm, *(g.algorithm for g in graders)]}
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*source_instances, *references],
        content=report[0],
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr,
        instance_number=1,
        **algorithm.equipment(),
        series_description=SR_SERIES_DESCRIPTION,
        is_complete=True,
        is_final=False,
        contributing_equipment=[a.contributing_equipment() for a in equipment.values()],
        coding_schemes=[_local_scheme_item()],
    )
    set_device_uid(sr, uids.device)
    return sr


def read_sr_call(sr: Dataset) -> str:
    """The slide's HER2 score (Code Meaning of the (85319-2, LN) value) found in an SR.

    Walks the content tree outside the graders' own groups (those holding a
    "Grader made the slide call" item, whose calls may differ: see
    :func:`read_sr_graders`); every slide HER2 score item must agree.

    Parameters
    ----------
    sr: pydicom.Dataset
        An SR written by :func:`build_sr` (a plain dataset read with
        :func:`pydicom.dcmread` is enough).

    Returns
    -------
    str
        ``"0"``, ``"1+"``, ``"2+"``, ``"3+"`` or ``"Indeterminate"`` (an
        ultralow slide reads ``"0"``; see :func:`read_sr_ultralow`).

    Raises
    ------
    ValueError
        When the SR holds no HER2 score, or HER2 scores that disagree.

    """
    found = {item.ConceptCodeSequence[0].CodeMeaning for item in _code_items(sr, HER2_SCORE)}
    if not found:
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')} holds no HER2 score (85319-2, LN)")
    if len(found) > 1:
        raise ValueError(f"SR {sr.get('SOPInstanceUID', '?')} holds conflicting HER2 scores: {sorted(found)}")
    return found.pop()


def read_sr_ultralow(sr: Dataset) -> bool:
    """Whether the SR flags the slide HER2-ultralow ((1381318009, SCT) as HER2 expression category)."""
    return any(_is(item.ConceptCodeSequence[0], HER2_ULTRALOW) for item in _code_items(sr, HER2_CATEGORY))


def read_sr_graders(sr: Dataset) -> list[dict]:
    """Each grader's own result from its measurement group, in document order.

    Parameters
    ----------
    sr: pydicom.Dataset
        An SR written by :func:`build_sr` (a plain dataset is enough).

    Returns
    -------
    list[dict]
        Per grader: ``name``, ``version`` (TID 4019), ``basis`` (``"tumour
        area"`` / ``"tumour cells"``, from the percentages' concepts),
        ``call`` (Code Meaning, as :func:`read_sr_call`), ``ultralow``
        (bool), ``deciding`` (bool), ``percentages`` (class -> %),
        ``cell_counts`` (class -> int, or None), ``connectivity`` (float or
        None) and ``references`` (SOP Instance UIDs its measurements are
        inferred from, e.g. the heatmap SEG). Empty for an SR without graders.

    """
    out = []
    for group in _grader_groups(sr):
        items = group.ContentSequence
        texts = {i.ConceptNameCodeSequence[0].CodeValue: i.TextValue for i in items if i.ValueType == "TEXT"}
        coded = {i.ConceptNameCodeSequence[0].CodeValue: i.ConceptCodeSequence[0] for i in items
                 if i.ValueType == "CODE"}
        basis = next(b for b, (_, concepts) in GRADER_BASES.items() if _num(items, concepts[CLASSES[0]]) is not None)
        counts = {c: _num(items, CELL_COUNT[c]) for c in CLASSES}
        out.append({
            "name": texts.get("111001"), "version": texts.get("111003"), "basis": basis,
            "call": coded[HER2_SCORE.value].CodeMeaning,
            "ultralow": HER2_CATEGORY.value in coded and _is(coded[HER2_CATEGORY.value], HER2_ULTRALOW),
            "deciding": _is(coded[SLIDE_CALL_GRADER.value], YES),
            "percentages": {c: _num(items, GRADER_BASES[basis][1][c]) for c in CLASSES},
            "cell_counts": None if None in counts.values() else {c: int(v) for c, v in counts.items()},
            "connectivity": _num(items, MEMBRANE_CONNECTIVITY),
            "references": sorted({ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                                  for i in items if i.ValueType == "NUM" for ref in i.get("ContentSequence", [])
                                  if ref.ValueType == "IMAGE"}),
        })
    return out


def _num(items: Sequence[Dataset], concept: CodedConcept) -> float | None:
    """Value of the NUM item named ``concept`` among ``items`` (not below them), None if there is none."""
    for item in items:
        if item.ValueType == "NUM" and _is(item.ConceptNameCodeSequence[0], concept):
            return float(item.MeasuredValueSequence[0].NumericValue)
    return None


def read_sr_evidence(sr: Dataset) -> set[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of every instance in the SR's Current Requested Procedure Evidence."""
    return {
        (str(inst.ReferencedSOPClassUID), str(inst.ReferencedSOPInstanceUID))
        for study in sr.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }


def _is(code: Dataset, concept: CodedConcept) -> bool:
    return code.CodeValue == concept.value and code.CodingSchemeDesignator == concept.scheme_designator


def _is_grader_group(item: Dataset) -> bool:
    """A measurement group holding "Grader made the slide call": one grader's own result."""
    return item.get("ValueType") == "CONTAINER" and any(
        child.get("ValueType") == "CODE" and _is(child.ConceptNameCodeSequence[0], SLIDE_CALL_GRADER)
        for child in item.get("ContentSequence", []))


def _grader_groups(node: Dataset) -> list[Dataset]:
    found = []
    for item in node.get("ContentSequence", []):
        found.extend([item] if _is_grader_group(item) else _grader_groups(item))
    return found


def _code_items(node: Dataset, name: CodedConcept) -> list[Dataset]:
    """All CODE content items named ``name`` below ``node`` (depth first), outside graders' groups."""
    found = []
    for item in node.get("ContentSequence", []):
        if _is_grader_group(item):
            continue
        concept = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "CODE" and concept and _is(concept[0], name):
            found.append(item)
        found.extend(_code_items(item, name))
    return found


# --- heatmap SEG ----------------------------------------------------------------------------------

def heatmap_array(score: SlideScore) -> np.ndarray:
    """(1, rows, cols, 4) float32 probabilities in [0, 1]; unscored tiles and NaN are 0."""
    probabilities = np.nan_to_num(score.probabilities.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    probabilities = probabilities.clip(0.0, 1.0)
    probabilities[~score.scored.astype(bool)] = 0.0
    return probabilities[np.newaxis]


def build_heatmap(
    source_instances: Sequence[Dataset], scored_level: Dataset, score: SlideScore, algorithm: AlgorithmInfo
) -> hd.seg.Segmentation:
    """Build the per-tile class-probability heatmap as a FRACTIONAL Segmentation.

    One segment per tile class (segment k+1 = ``CLASSES[k]``, labelled
    "HER2 IHC <class>"), fractional type PROBABILITY, 8-bit (1/255 steps),
    Explicit VR Little Endian (PS3.3 C.8.20 Segmentation Image Module,
    C.8.20.2 Segment Description). The heatmap is one Total Pixel Matrix of
    ``grid.rows x grid.cols`` pixels, tiled by highdicom (TILED_FULL, PS3.3
    C.7.6.17.3) in square frames of at most 512 pixels, in which **one
    heatmap pixel is one tile**:

    * Pixel Spacing = ``tile_size`` x the scored level's Pixel Spacing;
    * orientation = the source's Image Orientation (Slide);
    * the Plane Position (Slide) of heatmap pixel (0, 0) is the slide position
      of the *centre* of tile (0, 0) (see :func:`tile_centre_position`).

    highdicom reads and writes slide positions as the centre of the top-left
    pixel, for the source's Total Pixel Matrix Origin as for the heatmap's
    plane positions. Under that one convention, a heatmap pixel centred on
    its tile's centre with a tile-sized spacing covers exactly that tile, and
    heatmap pixel (r, c) lands at the centre of tile (r, c) for every r, c.

    Parameters
    ----------
    source_instances: Sequence[pydicom.Dataset]
        Metadata of every instance of the source VL WSM series (their UIDs name the results).
    scored_level: pydicom.Dataset
        The graded VL Whole Slide Microscopy Image instance (metadata only), one of ``source_instances``.
    score: SlideScore
        Its score; ``score.probabilities`` is (rows, cols, 4), NaN for unscored tiles.
    algorithm: AlgorithmInfo
        The model that produced the probabilities.

    Returns
    -------
    highdicom.seg.Segmentation
        The heatmap, in the source's study and Frame of Reference, in a series of its own.

    Raises
    ------
    ValueError
        When the sources are empty or from several series, the scored level is
        not among them or lacks spatial attributes, or the score does not fit its grid.

    """
    _check_sources(source_instances, scored_level)
    grid = _check_inputs(scored_level, score)
    uids = _result_uids(source_instances, algorithm)
    row_spacing, col_spacing = _level_spacing(scored_level)
    measures = scored_level.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    thickness = measures.get("SliceThickness")
    # Square frames no larger than the heatmap (a 3x4 heatmap is one 4x4 frame, not a padded 512x512 one).
    frame_side = min(512, max(grid.rows, grid.cols))
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=f"HER2 IHC {c}",
            segmented_property_category=ABNORMAL_STRUCTURE,
            segmented_property_type=TUMOR,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm.segment_identification(),
            tracking_uid=derived_uid("tracking", uids.seg, f"segment-{c}"),
            tracking_id=f"HER2 IHC {c} tile probability",
        )
        for k, c in enumerate(CLASSES)
    ]
    seg = hd.seg.Segmentation(
        source_images=[scored_level],
        pixel_array=heatmap_array(score),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=segments,
        series_instance_uid=uids.seg_series,
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids.seg,
        instance_number=1,
        **algorithm.equipment(),
        content_label=HEATMAP_CONTENT_LABEL,
        content_description=f"HER2 heatmap - {NOT_FOR_CLINICAL_USE}",  # LO: at most 64 characters
        series_description=SEG_SERIES_DESCRIPTION,
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=(grid.tile_size * row_spacing, grid.tile_size * col_spacing),
            slice_thickness=float(thickness) if thickness is not None else None,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_orientation=[float(v) for v in scored_level.ImageOrientationSlide],
        ),
        plane_positions=[hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.SLIDE,
            image_position=tile_centre_position(scored_level, grid.tile_size),
            pixel_matrix_position=(1, 1),
        )],
        tile_pixel_array=True,
        tile_size=(frame_side, frame_side),
        omit_empty_frames=False,
        contributing_equipment=[algorithm.contributing_equipment()],
    )
    set_device_uid(seg, uids.device)
    if "PatientOrientation" not in seg:
        # General Image Module (PS3.3 C.7.6.1): Type 2C, required (may be empty) when there is no
        # Image Orientation (Patient), as in the slide coordinate system; highdicom leaves it out.
        seg.PatientOrientation = ""
    return seg
