"""HER2-labelled tumour outlines as a Microscopy Bulk Simple Annotations object (PS3.3 A.87, C.37.1).

Training data "DICOM WSI plus region annotations" is a VL WSM series plus, in
the same study, an ANN object whose annotation groups outline tumour regions
of one HER2 IHC class each. A group is read as HER2 class ``c`` when

* its Annotation Property Type is one of the LOINC answers of LL4396-9 used by
  the SR (LA6111-4 "0", LA11841-6 "1+", LA11842-4 "2+", LA11843-2 "3+"; the
  category is not checked, we write (85319-2, LN) "HER2 [Presence] in Breast
  cancer specimen by Immune stain"), or else
* its Annotation Group Label is the plain text ``0``, ``1+``, ``2+`` or ``3+``.

Other groups (nuclei points, tissue outlines) are ignored; an object with no
HER2 group is refused. HER2 groups must be closed shapes (Graphic Type
POLYGON or RECTANGLE). Both Annotation Coordinate Types highdicom reads are
supported: ``2D`` (column, row) in the Total Pixel Matrix of the referenced
image (Pixel Origin Interpretation VOLUME; any pyramid level, rescaled to the
base level) and ``3D`` (x, y, z) slide coordinates in mm (same Frame of
Reference as the slide; mapped with highdicom's ReferenceToImageTransformer).
Polygons come back in base-level pixel coordinates with (0, 0) at the
top-left corner of the first pixel, as highdicom's image transformers use.

:func:`find_annotated_slides` pairs the slide series under a folder with the
ANN objects that reference them; :func:`build_her2_annotations` writes such an
object (the synthetic generator's ground truth uses it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.ann import (
    AnnotationCoordinateTypeValues,
    AnnotationGroup,
    GraphicTypeValues,
    MicroscopyBulkSimpleAnnotations,
)
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    MicroscopyBulkSimpleAnnotationsStorage,
    VLWholeSlideMicroscopyImageStorage,
)

from dicom_io.codes import HER2_SCORE, HER2_SCORE_VALUES
from dicom_io.errors import AnnotationError
from dicom_io.uids import derived_uid
from her2_core.aggregate import CLASSES, SlideCall

#: HER2 class -> Annotation Property Type code (the SR's LOINC answers).
HER2_CLASS_CODES = {c: HER2_SCORE_VALUES[SlideCall(c)] for c in CLASSES}
#: Graphic types that outline an area.
REGION_GRAPHIC_TYPES = (GraphicTypeValues.POLYGON, GraphicTypeValues.RECTANGLE)
ANN_SERIES_NUMBER = 9003
ANN_CONTENT_LABEL = "HER2_REGIONS"

Polygons = dict[str, list[np.ndarray]]


@dataclass(frozen=True)
class AnnotatedSlide:
    """One slide series under a data folder and the ANN objects that reference it."""

    series_instance_uid: str
    slide_files: tuple[Path, ...]
    annotation_files: tuple[Path, ...]

    @property
    def name(self) -> str:
        """The folder holding the slide's files (for messages and slide ids)."""
        return self.slide_files[0].parent.name


def group_class(group: AnnotationGroup) -> str | None:
    """The HER2 class a group outlines (coded property type first, then a plain label), else None."""
    prop = group.annotated_property_type
    for name, code in HER2_CLASS_CODES.items():
        if (prop.value, prop.scheme_designator) == (code.value, code.scheme_designator):
            return name
    label = group.label.strip()
    return label if label in CLASSES else None


def _describe(group: AnnotationGroup) -> str:
    prop = group.annotated_property_type
    return (f"{group.number} {group.label!r} {group.graphic_type.value} "
            f"({prop.scheme_designator} {prop.value} {prop.meaning!r})")


def read_annotations(path: Path) -> MicroscopyBulkSimpleAnnotations:
    """Read an ANN object, or raise :class:`AnnotationError` saying why it is not one."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise AnnotationError(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    sop = ds.get("SOPClassUID", "")
    if sop != MicroscopyBulkSimpleAnnotationsStorage:
        name = getattr(sop, "name", "") or "unknown SOP class"
        raise AnnotationError(f"{path.name}: {name} ({sop or 'no SOP Class UID'}), not a Microscopy Bulk Simple "
                              "Annotations object")
    try:
        return MicroscopyBulkSimpleAnnotations.from_dataset(ds, copy=False)
    except (AttributeError, ValueError, TypeError) as exc:
        raise AnnotationError(f"{path.name}: malformed Microscopy Bulk Simple Annotations ({exc})") from exc


def _base_level(slide: Sequence[Dataset]) -> Dataset:
    return max(slide, key=lambda ds: int(ds.TotalPixelMatrixColumns))


def _to_base_pixels(ann: MicroscopyBulkSimpleAnnotations, slide: Sequence[Dataset], where: str):
    """A function mapping the object's coordinates to the slide's base-level (column, row) pixels."""
    base = _base_level(slide)
    kind = ann.annotation_coordinate_type
    if kind == AnnotationCoordinateTypeValues.SCOORD3D:
        if str(ann.get("FrameOfReferenceUID", "")) != str(base.FrameOfReferenceUID):
            raise AnnotationError(f"{where}: 3D annotations in Frame of Reference "
                                  f"{ann.get('FrameOfReferenceUID', '(none)')}, slide in {base.FrameOfReferenceUID}")
        transform = hd.spatial.ReferenceToImageTransformer.for_image(base, for_total_pixel_matrix=True)
        return lambda xyz: transform(np.asarray(xyz, np.float64))[:, :2]
    origin = str(ann.get("PixelOriginInterpretation", "VOLUME"))
    if origin != "VOLUME":
        raise AnnotationError(f"{where}: 2D coordinates relative to one frame (Pixel Origin Interpretation "
                              f"{origin}) are not supported; need VOLUME (Total Pixel Matrix)")
    refs = [str(item.ReferencedSOPInstanceUID) for item in ann.get("ReferencedImageSequence", [])]
    images = [ds for ds in slide if str(ds.SOPInstanceUID) in refs]
    if not images:
        raise AnnotationError(f"{where}: 2D annotations reference image {refs or '(none)'}, which is not an "
                              "instance of the slide")
    ref = images[0]
    scale = np.array([int(base.TotalPixelMatrixColumns) / int(ref.TotalPixelMatrixColumns),
                      int(base.TotalPixelMatrixRows) / int(ref.TotalPixelMatrixRows)])
    return lambda xy: np.asarray(xy, np.float64)[:, :2] * scale


def her2_regions(ann: MicroscopyBulkSimpleAnnotations, slide: Sequence[Dataset], where: str = "") -> Polygons:
    """HER2 class -> polygons (N, 2) in the slide's base-level pixels, from the object's HER2 groups.

    ``slide``: the VL WSM instances (headers) of the annotated slide. Raises
    :class:`AnnotationError` if no group carries a HER2 class or a HER2 group is not a closed shape.
    """
    where = where or f"ANN {ann.SOPInstanceUID}"
    groups = list(ann.AnnotationGroupSequence)
    labelled = [(g, group_class(g)) for g in groups]
    if not any(c for _, c in labelled):
        found = "; ".join(_describe(g) for g in groups) or "none"
        raise AnnotationError(f"{where}: no annotation group is labelled with a HER2 class (property type "
                              f"LOINC LA6111-4/LA11841-6/LA11842-4/LA11843-2 or label 0/1+/2+/3+); groups: {found}")
    to_pixels = _to_base_pixels(ann, slide, where)
    out: Polygons = defaultdict(list)
    for group, name in labelled:
        if name is None:
            continue
        if group.graphic_type not in REGION_GRAPHIC_TYPES:
            raise AnnotationError(f"{where}: HER2 group {_describe(group)} is not a closed shape "
                                  "(need POLYGON or RECTANGLE)")
        out[name].extend(to_pixels(p) for p in group.get_graphic_data(ann.annotation_coordinate_type))
    return dict(out)


def _header(path: Path) -> Dataset | None:
    with open(path, "rb") as fh:
        if fh.read(132)[128:132] != b"DICM":
            return None
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise AnnotationError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def _referenced_series(ann: Dataset, series_of_instance: Mapping[str, str]) -> set[str]:
    """Series an ANN object references (Common Instance Reference, PS3.3 C.12.2, and Referenced Image Sequence)."""
    series = {str(item.SeriesInstanceUID) for item in ann.get("ReferencedSeriesSequence", [])}
    for item in ann.get("ReferencedImageSequence", []):
        uid = series_of_instance.get(str(item.ReferencedSOPInstanceUID))
        if uid:
            series.add(uid)
    return series


def find_annotated_slides(root: Path) -> list[AnnotatedSlide]:
    """Every VL WSM series under ``root`` with the ANN objects of its study that reference it.

    Files of other SOP classes (SR, SEG) are ignored. Raises :class:`AnnotationError` if an ANN
    object references no slide under ``root``, or a slide has no ANN object.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"{root}: no such folder")
    slides: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    anns: list[tuple[Path, Dataset]] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        ds = _header(path)
        if ds is None:
            continue
        sop = ds.get("SOPClassUID", "")
        if sop == VLWholeSlideMicroscopyImageStorage:
            slides[str(ds.SeriesInstanceUID)].append((path, ds))
        elif sop == MicroscopyBulkSimpleAnnotationsStorage:
            anns.append((path, ds))
    if not slides:
        raise AnnotationError(f"{root}: no VL Whole Slide Microscopy Image series found")
    series_of_instance = {str(ds.SOPInstanceUID): uid for uid, items in slides.items() for _, ds in items}
    study_of_series = {uid: str(items[0][1].StudyInstanceUID) for uid, items in slides.items()}
    annotations: dict[str, list[Path]] = defaultdict(list)
    for path, ds in anns:
        matched = {uid for uid in _referenced_series(ds, series_of_instance)
                   if study_of_series.get(uid) == str(ds.StudyInstanceUID)}
        if not matched:
            raise AnnotationError(f"{path}: annotation object references no slide series of its study under {root}")
        for uid in matched:
            annotations[uid].append(path)
    out = []
    for uid, items in sorted(slides.items(), key=lambda kv: str(kv[1][0][0])):
        if not annotations[uid]:
            raise AnnotationError(f"{items[0][0].parent}: slide series {uid} has no Microscopy Bulk Simple "
                                  f"Annotations object under {root} that references it")
        out.append(AnnotatedSlide(uid, tuple(p for p, _ in items), tuple(annotations[uid])))
    return out


def build_her2_annotations(source: Dataset, polygons: Mapping[str, Sequence[np.ndarray]],
                           coordinate_type: str = "2D",
                           algorithm: hd.AlgorithmIdentificationSequence | None = None,
                           manufacturer: str = "her2-dicom-worker", software_version: str = "0.1.0",
                           description: str = "HER2 IHC class of tumour regions") -> MicroscopyBulkSimpleAnnotations:
    """An ANN object with one POLYGON group per HER2 class in ``polygons``.

    Parameters
    ----------
    source:
        The slide's base-level VL WSM instance (headers suffice); the object joins its study.
    polygons:
        HER2 class -> polygons (N, 2) of (column, row) in ``source``'s Total Pixel Matrix,
        (0, 0) at the top-left corner of the first pixel; first and last point distinct.
    coordinate_type:
        ``"2D"`` (Total Pixel Matrix, Pixel Origin Interpretation VOLUME) or ``"3D"`` (slide
        coordinates in mm, via highdicom's ImageToReferenceTransformer).
    algorithm:
        Who drew the outlines (groups AUTOMATIC); None: MANUAL.

    UIDs are derived from the source series and the coordinate type, so rewriting gives the same object.
    """
    kind = AnnotationCoordinateTypeValues(coordinate_type)
    if kind == AnnotationCoordinateTypeValues.SCOORD3D:
        transform = hd.spatial.ImageToReferenceTransformer.for_image(source, for_total_pixel_matrix=True)
        convert = lambda p: transform(np.asarray(p, np.float64))
    else:
        convert = lambda p: np.asarray(p, np.float32)
    unknown = set(polygons) - set(CLASSES)
    if unknown:
        raise ValueError(f"polygons has keys {sorted(unknown)}, not HER2 classes {CLASSES}")
    series_uid = derived_uid(str(source.SeriesInstanceUID), "her2-regions", kind.value)
    groups: list[AnnotationGroup] = []
    for name in [c for c in CLASSES if len(polygons.get(c, ()))]:
        groups.append(AnnotationGroup(
            number=len(groups) + 1,
            uid=derived_uid(series_uid, "group", name),
            label=name,
            annotated_property_category=HER2_SCORE,
            annotated_property_type=HER2_CLASS_CODES[name],
            graphic_type=GraphicTypeValues.POLYGON,
            graphic_data=[convert(p) for p in polygons[name]],
            algorithm_type="AUTOMATIC" if algorithm is not None else "MANUAL",
            algorithm_identification=algorithm,
            description=f"tumour with HER2 IHC {name} membrane staining",
        ))
    if not groups:
        raise ValueError("no polygons to write")
    return MicroscopyBulkSimpleAnnotations(
        source_images=[source],
        annotation_coordinate_type=kind,
        annotation_groups=groups,
        series_instance_uid=series_uid,
        series_number=ANN_SERIES_NUMBER,
        sop_instance_uid=derived_uid(series_uid, "instance"),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="her2-dicom-worker annotations",
        software_versions=software_version,
        device_serial_number="0",
        content_description=description,
        content_label=ANN_CONTENT_LABEL,
    )


def write_her2_annotations(source: Dataset, polygons: Mapping[str, Sequence[np.ndarray]], path: Path,
                           **options) -> MicroscopyBulkSimpleAnnotations:
    """:func:`build_her2_annotations` saved to ``path`` in DICOM File Format (PS3.10); returns the object."""
    ann = build_her2_annotations(source, polygons, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ann.save_as(path, enforce_file_format=True)
    return ann
