"""Safe defaults for pyramid attributes other writers leave out, and how wsidicom is handed them.

Real converters write VL Whole Slide Microscopy Image instances (PS3.3
A.32.8) that lack attributes the standard makes Type 1 but whose value
follows from the rest of the instance (OrthancWSIDicomizer 1.1 writes no
Image Type, Dimension Organization Type or Frame of Reference UID; other
writers leave out the Total Pixel Matrix Origin). :func:`fill_defaults`
gives each a logged default where one is safe:

- Image Type (C.8.12.4.1.1): ORIGINAL\\PRIMARY\\VOLUME\\NONE for the largest
  level, DERIVED\\PRIMARY\\VOLUME\\RESAMPLED for the others;
- Dimension Organization Type (C.7.6.17.3): TILED_SPARSE when frames carry a
  Plane Position (Slide) each (C.8.12.6.1), TILED_FULL when the frame count
  is exactly the tiles of the Total Pixel Matrix in every focal plane and
  optical path; otherwise none (the reader then refuses, naming it);
- Total Pixel Matrix Origin (C.8.12.4.1.4): (0, 0) mm, and Image Orientation
  (Slide) (C.8.12.4.1.5) 0\\-1\\0\\-1\\0\\0, the usual scanner orientation;
- Frame of Reference UID (C.7.4.1): one derived from the Series Instance UID,
  the same for every instance of the series;
- Type 2 Patient and General Study attributes (C.7.1.1, C.7.2.1) left out
  entirely: present and empty, as Type 2 allows (result objects copy them);
- Specimen Description (C.7.6.22): one specimen, identified by the Container
  Identifier (UNKNOWN when that is missing too), with a UID derived from the
  Series Instance UID (the SR's specimen context needs one);
- a level whose Frame of Reference UID differs from the base level's (Google
  wsi2dcm writes one per level) is put in the base level's frame when its
  physical extent and origin agree with the base level's; otherwise it is
  left out of the pyramid, and the log says which.

wsidicom reads the headers from the files itself, so an instance whose
header was changed is handed to it as :class:`SplicedFile`: the changed
header, re-encoded, followed by the file's own Pixel Data (frame offsets
count from the first fragment, so they stay valid).
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

BASE_IMAGE_TYPE = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
RESAMPLED_IMAGE_TYPE = ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
DEFAULT_ORIENTATION = [0, -1, 0, -1, 0, 0]
#: Type 2 attributes of the Patient and General Study Modules that result objects copy from the slide.
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def _size(ds: Dataset) -> int:
    try:
        return int(ds.get("TotalPixelMatrixColumns", 0)) * int(ds.get("TotalPixelMatrixRows", 0))
    except (TypeError, ValueError):
        return 0


def _has_plane_positions(ds: Dataset) -> bool:
    """Whether the first frame's functional groups hold a Plane Position (Slide) (PS3.3 C.8.12.6.1)."""
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    return bool(frames) and "PlanePositionSlideSequence" in frames[0]


def organization(ds: Dataset) -> str | None:
    """The Dimension Organization Type ``ds``'s frames imply, or None when they imply none (PS3.3 C.7.6.17.3)."""
    if _has_plane_positions(ds):
        return "TILED_SPARSE"
    try:
        tiles = math.ceil(int(ds.TotalPixelMatrixColumns) / int(ds.Columns)) * \
            math.ceil(int(ds.TotalPixelMatrixRows) / int(ds.Rows))
        planes = int(ds.get("TotalPixelMatrixFocalPlanes", 1)) * int(ds.get("NumberOfOpticalPaths", 1))
        frames = int(ds.get("NumberOfFrames", 1))
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    return "TILED_FULL" if frames == tiles * planes else None


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    try:
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        return float(spacing[0]), float(spacing[1])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def _origin(ds: Dataset) -> tuple[float, float] | None:
    try:
        item = ds.TotalPixelMatrixOriginSequence[0]
        return float(item.XOffsetInSlideCoordinateSystem), float(item.YOffsetInSlideCoordinateSystem)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def same_geometry(level: Dataset, base: Dataset) -> bool:
    """Whether ``level`` covers the area ``base`` does: extent (mm) and origin within one of its pixels."""
    spacing, base_spacing = _spacing(level), _spacing(base)
    origin, base_origin = _origin(level), _origin(base)
    if spacing is None or base_spacing is None or origin is None or base_origin is None:
        return False
    tolerance = max(spacing) * 1.5  # a level's extent is rounded to its pixels; its origin may be a pixel centre
    extent = (int(level.TotalPixelMatrixRows) * spacing[0], int(level.TotalPixelMatrixColumns) * spacing[1])
    base_extent = (int(base.TotalPixelMatrixRows) * base_spacing[0], int(base.TotalPixelMatrixColumns) * base_spacing[1])
    return all(abs(a - b) <= tolerance for a, b in zip(extent + origin, base_extent + base_origin)) and \
        list(level.get("ImageOrientationSlide", [])) == list(base.get("ImageOrientationSlide", []))


def _default(path: Path, ds: Dataset, keyword: str, value: object, why: str, changed: dict[Path, list[str]]) -> None:
    setattr(ds, keyword, value)
    changed.setdefault(path, []).append(keyword)
    shown = "one item" if isinstance(value, DicomSequence) else repr(value)
    log.warning("%s: no %s; %s assumed (%s)", path.name, keyword, shown, why)


def _origin_item(x: float, y: float) -> DicomSequence:
    item = Dataset()
    item.XOffsetInSlideCoordinateSystem, item.YOffsetInSlideCoordinateSystem = x, y
    return DicomSequence([item])


def _specimen(container: str, series: str) -> DicomSequence:
    item = Dataset()
    item.SpecimenIdentifier = container
    item.SpecimenUID = generate_uid(entropy_srcs=[series, "specimen"])
    item.IssuerOfTheSpecimenIdentifierSequence = DicomSequence([])
    item.SpecimenPreparationSequence = DicomSequence([])
    return DicomSequence([item])


def fill_defaults(headers: dict[Path, Dataset]) -> dict[Path, list[str]]:
    """Give the VL WSM instances in ``headers`` the defaults above, in place; return what each got.

    Instances of other SOP classes or flavours (label, overview) are left alone.
    """
    changed: dict[Path, list[str]] = {}
    volumes = {p: ds for p, ds in headers.items() if "ImageType" not in ds or "VOLUME" in ds.ImageType}
    if not volumes:
        return changed
    base_path = max(volumes, key=lambda p: _size(volumes[p]))
    series = str(volumes[base_path].get("SeriesInstanceUID", ""))
    frame_of_reference = generate_uid(entropy_srcs=[series, "frame-of-reference"])
    for path, ds in volumes.items():
        if "ImageType" not in ds:
            base = path == base_path
            _default(path, ds, "ImageType", BASE_IMAGE_TYPE if base else RESAMPLED_IMAGE_TYPE,
                     "the largest level" if base else "not the largest level", changed)
        if "DimensionOrganizationType" not in ds and (implied := organization(ds)) is not None:
            _default(path, ds, "DimensionOrganizationType", implied, "from its frames", changed)
        if "TotalPixelMatrixOriginSequence" not in ds:
            _default(path, ds, "TotalPixelMatrixOriginSequence", _origin_item(0.0, 0.0), "slide corner", changed)
        if "ImageOrientationSlide" not in ds:
            _default(path, ds, "ImageOrientationSlide", DEFAULT_ORIENTATION, "the usual scanner orientation", changed)
        if not ds.get("FrameOfReferenceUID"):
            _default(path, ds, "FrameOfReferenceUID", frame_of_reference, "derived from the Series Instance UID",
                     changed)
        for keyword in (k for k in TYPE_2 if k not in ds):
            _default(path, ds, keyword, "", "Type 2, empty", changed)
        if "ContainerIdentifier" not in ds:
            _default(path, ds, "ContainerIdentifier", "UNKNOWN", "not stated", changed)
        if not ds.get("SpecimenDescriptionSequence"):
            _default(path, ds, "SpecimenDescriptionSequence", _specimen(ds.ContainerIdentifier, series),
                     "one specimen in the container", changed)
    _join_frames_of_reference(volumes, base_path, changed)
    return changed


def _join_frames_of_reference(volumes: dict[Path, Dataset], base_path: Path, changed: dict[Path, list[str]]) -> None:
    """Put levels whose Frame of Reference UID differs from the base level's into its frame when they fit it."""
    base = volumes[base_path]
    for path, ds in volumes.items():
        if ds.FrameOfReferenceUID == base.FrameOfReferenceUID:
            continue
        if same_geometry(ds, base):
            log.warning("%s: Frame of Reference UID differs from the base level's but its extent and origin agree; "
                        "kept in the base level's frame", path.name)
            ds.FrameOfReferenceUID = base.FrameOfReferenceUID
            changed.setdefault(path, []).append("FrameOfReferenceUID")
        else:
            log.warning("%s: Frame of Reference UID differs from the base level's and its extent or origin does not "
                        "agree with it; level dropped from the pyramid", path.name)


class SplicedFile(io.RawIOBase):
    """A DICOM file read as a new header followed by the original file from its Pixel Data element on."""

    def __init__(self, path: Path, header: Dataset) -> None:
        super().__init__()
        with open(path, "rb") as fh:
            pydicom.dcmread(fh, stop_before_pixels=True)
            self._tail_start = fh.tell()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, header, enforce_file_format=True)
        self._head = buffer.getvalue()
        self._file = open(path, "rb")
        self._size = len(self._head) + self._file.seek(0, io.SEEK_END) - self._tail_start
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        if self._pos < len(self._head):
            part = self._head[self._pos : self._pos + len(view)]
            view[: len(part)] = part
            done = len(part)
        if done < len(view) and self._pos + done >= len(self._head):
            self._file.seek(self._tail_start + self._pos + done - len(self._head))
            done += self._file.readinto(view[done:]) or 0
        self._pos += done
        return done

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()
