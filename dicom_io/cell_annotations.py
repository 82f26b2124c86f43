"""Classified tumour cells as a Microscopy Bulk Simple Annotations object (PS3.3 A.87, C.37.1).

The membrane cell grader's evidence: one POINT per tumour cell at its
centroid, one annotation group per HER2 membrane class present, so a
pathologist can toggle and colour the classes in a viewer and check the cell
percentages of the SR against the cells themselves.

Coordinates are **3D slide coordinates** (Annotation Coordinate Type "3D",
x, y, z in mm in the slide's Frame of Reference, PS3.3 C.37.1.2), stored in
double precision (Double Point Coordinates Data) with the shared z in Common
Z Coordinate Value. That is what dicom-microscopy-viewer / Slim have always
drawn: their "2D" (Total Pixel Matrix) support came later
(ImagingDataCommons/slim#163, fixed in 2024), and 3D points do not depend on
which pyramid level a viewer shows. The writer takes, and the reader gives
back, continuous image coordinates (column, row) of the scored level's Total
Pixel Matrix with (0, 0) at the top-left *corner* of the top-left pixel (the
convention of highdicom's ``ImageToReferenceTransformer`` and of
:mod:`dicom_io.annotations`): the centre of pixel (r, c) is (c + 0.5, r + 0.5),
so a centroid computed from pixel indices (e.g. scikit-image ``regionprops``)
needs 0.5 added before it comes here.

Coded concepts of each group (Annotation Group Sequence, PS3.3 C.37.1.2):

=====================================  =============================================
Annotated Property Category            (91723000, SCT) "Anatomical Structure"
                                       (CID 7150 Segmentation Property Categories)
Annotated Property Type                one local code per class, a tumour cell by its
                                       membrane pattern (:data:`dicom_io.codes.CELL_CLASS_CODES`):
                                       (HER2CELL0..3, 99HER2), e.g.
                                       (HER2CELL1, 99HER2) "Tumor cell with faint
                                       incomplete HER2 membrane staining" (CID 8135
                                       has only "Cell" and "Nucleus", and the
                                       Annotated Property Type Modifier Code Sequence
                                       is not in the IOD dciodvfy checks)
Annotation Group Label                 "HER2 <class> tumour cells" (not the bare
                                       class, so :func:`dicom_io.annotations.group_class`
                                       does not take cells for training regions)
Recommended Display CIELab Value       the class colour (:data:`dicom_io.codes.CLASS_COLOURS`,
                                       as in the PNG overlays and the heatmap SEG)
Per-cell measurements (optional)       see :data:`CELL_MEASUREMENTS`
=====================================  =============================================

``99HER2`` is the results' local scheme (:mod:`dicom_io.codes`), declared in the
object's Coding Scheme Identification Sequence.

Cell classes (``her2_core.aggregate.CLASSES``, ASCO/CAP membrane patterns):
"0" no staining, "1+" faint incomplete, "2+" weak-moderate complete, "3+"
intense complete. Only tumour cells are written.

Research use only: the Series Description says "not for clinical use".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.ann import (
    AnnotationCoordinateTypeValues,
    AnnotationGroup,
    GraphicTypeValues,
    Measurements,
    MicroscopyBulkSimpleAnnotations,
)
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import MicroscopyBulkSimpleAnnotationsStorage

from dicom_io.codes import (
    CELL_CLASS_CODES,
    CLASS_PATTERNS,
    LOCAL_SCHEME,
    NO_UNITS,
    display_colour,
    local_scheme_item,
)
from dicom_io.result_header import (
    NOT_FOR_CLINICAL_USE,
    AlgorithmInfo,
    check_sources,
    series_header,
    set_device_uid,
    source_result_uids,
)
from dicom_io.uids import derived_uid
from her2_core.aggregate import CLASSES

ANN_SERIES_NUMBER = 9003
ANN_SERIES_DESCRIPTION = f"HER2 IHC AI cells - {NOT_FOR_CLINICAL_USE}"  # LO: at most 64 characters
ANN_CONTENT_LABEL = "HER2_CELLS"

CELL_CATEGORY = CodedConcept.from_code(codes.SCT.AnatomicalStructure)


@dataclass(frozen=True)
class CellMeasurement:
    """A per-cell measurement the object can carry: its concept, unit and valid range."""

    concept: CodedConcept
    unit: CodedConcept
    low: float
    high: float


#: Per-cell measurements accepted by :func:`build_cell_annotations` (key -> concept, unit, range).
#:
#: * ``completeness``: share of the cell's boundary whose DAB optical density is above the
#:   membrane threshold, 0 (none) to 1 (closed ring); unit "1".
#: * ``intensity``: DAB optical density (natural log, as the project measures it) of the
#:   stained part of the boundary, 0 to 5; unit "1".
CELL_MEASUREMENTS: dict[str, CellMeasurement] = {
    "completeness": CellMeasurement(
        CodedConcept("MEMCOMPL", LOCAL_SCHEME, "Membrane staining completeness"), NO_UNITS, 0.0, 1.0),
    "intensity": CellMeasurement(
        CodedConcept("MEMDAB", LOCAL_SCHEME, "Membrane DAB optical density"), NO_UNITS, 0.0, 5.0),
}


def _group_label(name: str) -> str:
    return f"HER2 {name} tumour cells"


def _check_cells(scored_level: Dataset, centroids: np.ndarray, classes: np.ndarray,
                 measurements: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Refuse cells that do not fit the scored level or the class list; return float64 centroids, int classes."""
    for keyword in ("FrameOfReferenceUID", "TotalPixelMatrixOriginSequence", "ImageOrientationSlide",
                    "TotalPixelMatrixRows", "TotalPixelMatrixColumns"):
        if keyword not in scored_level:
            raise ValueError(f"scored level {scored_level.get('SOPInstanceUID', '?')} has no {keyword}")
    points = np.asarray(centroids, dtype=np.float64)
    labels = np.asarray(classes)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"centroids has shape {points.shape}, expected (N, 2) (column, row)")
    if labels.shape != (len(points),):
        raise ValueError(f"classes has shape {labels.shape}, expected ({len(points)},) like centroids")
    if len(points) == 0:
        raise ValueError("no cells: an annotation object needs at least one tumour cell")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"classes must be integers indexing {CLASSES}, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(f"classes must lie in 0..{len(CLASSES) - 1} (indices into {CLASSES}), "
                         f"got {int(labels.min())}..{int(labels.max())}")
    if not np.all(np.isfinite(points)):
        raise ValueError("centroids contain NaN or infinite values")
    width, height = int(scored_level.TotalPixelMatrixColumns), int(scored_level.TotalPixelMatrixRows)
    outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise ValueError(f"{int(outside.sum())} centroid(s) outside the scored level's Total Pixel Matrix "
                         f"({width} x {height} px), first #{i} at {points[i].tolist()}")
    for key, values in measurements.items():
        if key not in CELL_MEASUREMENTS:
            raise ValueError(f"unknown cell measurement {key!r}; known: {sorted(CELL_MEASUREMENTS)}")
        values = np.asarray(values, dtype=np.float64)
        spec = CELL_MEASUREMENTS[key]
        if values.shape != (len(points),):
            raise ValueError(f"measurement {key!r} has shape {values.shape}, expected ({len(points)},)")
        finite = values[np.isfinite(values)]
        if finite.size and (finite.min() < spec.low or finite.max() > spec.high):
            raise ValueError(f"measurement {key!r} ranges {finite.min()}..{finite.max()}, "
                             f"outside {spec.low}..{spec.high}")
    return points, labels.astype(np.int64)


def build_cell_annotations(
    source_instances: Sequence[Dataset],
    scored_level: Dataset,
    centroids: np.ndarray,
    classes: np.ndarray,
    algorithm: AlgorithmInfo,
    measurements: Mapping[str, np.ndarray] | None = None,
) -> MicroscopyBulkSimpleAnnotations:
    """Build the classified tumour cells as a Microscopy Bulk Simple Annotations object.

    One POINT annotation group per HER2 class present, in ``CLASSES`` order
    (Annotation Group Number 1.. in that order), each cell at its centroid in
    3D slide coordinates (mm) of the source's Frame of Reference; coding as in
    the module docstring. The group is AUTOMATIC with the grader's Algorithm
    Identification (PS3.3 C.37.1.2, Algorithm Identification Macro), and the
    object carries the grader as Contributing Equipment and its Device UID in
    General Equipment (IHE AI Results; :func:`dicom_io.result_header.set_device_uid`).
    Patient, study and specimen identity are copied from ``scored_level``;
    the object references ``scored_level`` (Referenced Image Sequence,
    Common Instance Reference). Series and SOP Instance UIDs
    are :attr:`dicom_io.uids.ResultUIDs.ann_series` / ``ann`` of this
    algorithm on exactly these source instances, so a retried job writes the
    same object.

    Parameters
    ----------
    source_instances: Sequence[pydicom.Dataset]
        Metadata of every instance of the source VL WSM series (their UIDs name the object).
    scored_level: pydicom.Dataset
        The level the cells were found on (one of ``source_instances``; it may
        be finer than the tile grader's level).
    centroids: numpy.ndarray
        (N, 2) float (column, row) = (x, y) in continuous image coordinates of
        ``scored_level``'s Total Pixel Matrix, (0, 0) at the top-left corner of
        the top-left pixel; every point within [0, columns] x [0, rows].
    classes: numpy.ndarray
        (N,) integers, index into ``CLASSES`` ("0", "1+", "2+", "3+") per cell.
    algorithm: AlgorithmInfo
        The cell grader (name and version name the UIDs and the Device UID).
    measurements: Mapping[str, numpy.ndarray] | None
        Optional per-cell values keyed by :data:`CELL_MEASUREMENTS` names
        (``"completeness"`` in 0..1, ``"intensity"`` DAB OD in 0..5), each
        (N,) float in the order of ``centroids``; NaN where a cell has no value.

    Returns
    -------
    highdicom.ann.MicroscopyBulkSimpleAnnotations
        The object (Explicit VR Little Endian), in the source's study, in a series of its own.

    Raises
    ------
    ValueError
        When the sources are empty or from several series, the scored level is
        not among them or lacks spatial attributes, there are no cells, a
        centroid is outside the level, a class index is out of range, or a
        measurement is unknown, misshapen or out of its range.

    """
    measurements = dict(measurements or {})
    check_sources(source_instances, scored_level)
    points, labels = _check_cells(scored_level, centroids, classes, measurements)
    uids = source_result_uids(source_instances, algorithm)
    to_slide = hd.spatial.ImageToReferenceTransformer.for_image(scored_level, for_total_pixel_matrix=True)
    slide_points = to_slide(points)  # (N, 3) float64, mm
    groups: list[AnnotationGroup] = []
    for k, name in enumerate(CLASSES):
        members = np.flatnonzero(labels == k)
        if members.size == 0:
            continue
        group_measurements = [
            Measurements(name=CELL_MEASUREMENTS[key].concept, unit=CELL_MEASUREMENTS[key].unit,
                         values=np.asarray(values, dtype=np.float64)[members])
            for key, values in measurements.items()
        ] or None
        group = AnnotationGroup(
            number=len(groups) + 1,
            uid=derived_uid("annotation-group", uids.ann, name),
            label=_group_label(name),
            annotated_property_category=CELL_CATEGORY,
            annotated_property_type=CELL_CLASS_CODES[name],
            graphic_type=GraphicTypeValues.POINT,
            graphic_data=[p[np.newaxis] for p in slide_points[members]],
            algorithm_type="AUTOMATIC",
            algorithm_identification=algorithm.segment_identification(),
            measurements=group_measurements,
            description=f"tumour cells with {CLASS_PATTERNS[name]} (HER2 IHC {name} pattern)",
            display_color=display_colour(name),
        )
        groups.append(group)
    ann = MicroscopyBulkSimpleAnnotations(
        source_images=[scored_level],
        annotation_coordinate_type=AnnotationCoordinateTypeValues.SCOORD3D,
        annotation_groups=groups,
        **series_header(uids.ann_series, uids.ann, ANN_SERIES_NUMBER, ANN_SERIES_DESCRIPTION, [algorithm]),
        content_label=ANN_CONTENT_LABEL,
        content_description=f"HER2 IHC cell classes - {NOT_FOR_CLINICAL_USE}",  # 64 characters (LO)
        coding_schemes=[local_scheme_item()],
    )
    set_device_uid(ann, uids.device)
    return ann


def read_cell_annotations(ds: Dataset, level: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Cell centroids and classes from an object written by :func:`build_cell_annotations`.

    Parameters
    ----------
    ds: pydicom.Dataset
        The Microscopy Bulk Simple Annotations object (a plain dataset read with
        :func:`pydicom.dcmread` is enough).
    level: pydicom.Dataset
        A level of the annotated slide (normally the scored level, which the
        object references first in its Referenced Image Sequence): 3D slide
        coordinates are mapped into its Total Pixel Matrix.

    Returns
    -------
    centroids: numpy.ndarray
        (N, 2) float64 (column, row) in ``level``'s Total Pixel Matrix, (0, 0)
        at the top-left corner of the top-left pixel, groups in Annotation
        Group Number order and cells in stored order within a group.
    classes: numpy.ndarray
        (N,) int8 index into ``CLASSES`` per cell.

    Raises
    ------
    ValueError
        When ``ds`` is not a Microscopy Bulk Simple Annotations object, its
        coordinates are not 3D in ``level``'s Frame of Reference, or a group is
        not a POINT group of a HER2 tumour-cell class.

    """
    if ds.get("SOPClassUID") != MicroscopyBulkSimpleAnnotationsStorage:
        raise ValueError(f"{ds.get('SOPInstanceUID', '?')} is not a Microscopy Bulk Simple Annotations object "
                         f"(SOP Class {ds.get('SOPClassUID', 'missing')})")
    ann = MicroscopyBulkSimpleAnnotations.from_dataset(ds)
    if ann.annotation_coordinate_type != AnnotationCoordinateTypeValues.SCOORD3D:
        raise ValueError(f"ANN {ds.SOPInstanceUID}: Annotation Coordinate Type "
                         f"{ann.annotation_coordinate_type.value}, expected 3D slide coordinates")
    if str(ds.get("FrameOfReferenceUID", "")) != str(level.FrameOfReferenceUID):
        raise ValueError(f"ANN {ds.SOPInstanceUID} is in Frame of Reference {ds.get('FrameOfReferenceUID')}, "
                         f"level {level.SOPInstanceUID} in {level.FrameOfReferenceUID}")
    types = {(c.value, c.scheme_designator): k for k, c in enumerate(CELL_CLASS_CODES.values())}
    to_pixels = hd.spatial.ReferenceToImageTransformer.for_image(level, for_total_pixel_matrix=True)
    all_points, all_classes = [], []
    for group in ann.get_annotation_groups():
        prop = group.annotated_property_type
        k = types.get((prop.value, prop.scheme_designator))
        if k is None:
            raise ValueError(f"ANN {ds.SOPInstanceUID}: group {group.number} {group.label!r} has Annotated Property "
                             f"Type ({prop.scheme_designator} {prop.value} {prop.meaning!r}), not a HER2 tumour-cell "
                             "class (HER2CELL0..3, 99HER2)")
        if group.graphic_type != GraphicTypeValues.POINT:
            raise ValueError(f"ANN {ds.SOPInstanceUID}: group {group.number} is {group.graphic_type.value}, "
                             "expected POINT")
        xyz = np.concatenate(group.get_graphic_data(AnnotationCoordinateTypeValues.SCOORD3D)).astype(np.float64)
        all_points.append(to_pixels(xyz)[:, :2])
        all_classes.append(np.full(len(xyz), k, np.int8))
    if not all_points:
        return np.empty((0, 2), np.float64), np.empty((0,), np.int8)
    return np.concatenate(all_points), np.concatenate(all_classes)
