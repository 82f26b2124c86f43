"""Open a DICOM VL Whole Slide Microscopy Image series (PS3.3 A.32.8) for scoring.

:func:`open_slide` checks the input before wsidicom sees it, so bad input is
refused with one precise line (:class:`SlideError`): no such path, no DICOM
files, a truncated file, another SOP class (e.g. a CT slice), a transfer
syntax the reader does not decode, files from several series or patients
(Patient ID or Name, Study or Series Instance UID differ), two different
files claiming one SOP Instance UID, pyramid metadata missing that no safe
default replaces (:mod:`dicom_io.wsi_headers` fills Image Type, Dimension
Organization Type, origin, orientation and frame of reference where the
instance implies them, as files from OrthancWSIDicomizer need), or absurd
dimensions (a side over :data:`MAX_LEVEL_SIDE` pixels, or a TILED_FULL frame
count that does not match its Total Pixel Matrix). A file repeated under
another name (same SOP Instance UID, same size) is read once.

Tiles are read at any resolution through :meth:`Slide.tile_source`: from the
pyramid level at that resolution, or resampled from the nearest finer level
when the pyramid has none (e.g. 0.5, 2, 8 um/px and a 1 um/px model).

Reading stays memory-bounded: the thumbnail is refused, naming the missing
pyramid levels, when it would need more than :data:`MAX_THUMBNAIL_SOURCE_PIXELS`
pixels at once, and tiles that fail to decode raise :class:`CorruptTileError`
(the pipeline skips and counts them).
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import imagecodecs
import numpy as np
import pydicom
from PIL import Image, ImageCms
from pydicom import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage
from upath import UPath
from wsidicom import WsiDicom
from wsidicom.config import Settings as WsiSettings
from wsidicom.config import use_settings
from wsidicom.file import WsiDicomFileSource
from wsidicom.file.io import WsiDicomReadIO

from dicom_io.errors import CorruptTileError, SlideError, SourceError
from dicom_io.transfer_syntax import TRANSFER_SYNTAXES, describe
from dicom_io.wsi_headers import RESAMPLED_IMAGE_TYPE, SplicedFile, fill_defaults

log = logging.getLogger(__name__)

#: Sequence Delimitation Item (FFFE,E0DD) with zero length: how encapsulated Pixel Data ends.
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: wsidicom's frame caches default to 100 MB each and fill with every frame read, so memory grew with
#: slide size; tissue tiles are read once, so small fixed caches suffice (regions and thumbnails still
#: reuse the few decoded frames they straddle).
_READ_SETTINGS = WsiSettings(encoded_frame_cache_size=4 * 1024 * 1024, decoded_frame_cache_size=16 * 1024 * 1024)
#: Attributes that must agree across all instances of one slide.
_IDENTITY = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID")
#: Attributes without which an instance cannot be placed in the pyramid (PS3.3 C.8.12.4, C.7.6.17).
_PYRAMID = ("ImageType", "DimensionOrganizationType", "TotalPixelMatrixColumns", "TotalPixelMatrixRows", "Rows",
            "Columns")
#: Largest accepted Total Pixel Matrix side: 2^21 px is 524 mm at 40x (0.25 um/px), beyond any glass slide.
MAX_LEVEL_SIDE = 2**21
#: A level serves a wanted pixel spacing when its own is within this share of it (scanners round their spacing).
LEVEL_TOLERANCE = 0.15
#: Most pixels the thumbnail may read at once (about 800 MB as RGB); a series that would need more lacks
#: the lower-resolution pyramid levels.
MAX_THUMBNAIL_SOURCE_PIXELS = 2**28


@dataclass(frozen=True)
class SourceIdentity:
    """Who and what a slide belongs to; results must carry exactly this."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class LevelInfo:
    """One resolution of a slide: a pyramid level, or (index past the pyramid's) a resampled one."""

    index: int
    width: int
    height: int
    mpp: float
    tile_width: int
    tile_height: int


#: Reads tile (row, col) as RGB uint8 (T, T, 3); pixels beyond the image are white.
TileRead = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class TileSource:
    """Square tiles of ``level``, read from the pyramid level ``source_level``.

    ``level`` is ``source_level`` itself when the pyramid has the wanted
    resolution; otherwise it is a resampled level (index past the pyramid's
    levels) whose metadata :meth:`Slide.level_dataset` gives, and each tile
    is box-averaged from the region of ``source_level`` it covers.
    """

    level: LevelInfo
    source_level: LevelInfo
    read: TileRead

    @property
    def resampled(self) -> bool:
        return self.level.index != self.source_level.index

    def decodable(self, row: int, col: int) -> np.ndarray | None:
        """The tile at (``row``, ``col``), or None when its frame cannot be decoded (:class:`CorruptTileError`): a
        grader skips such a tile and counts it."""
        try:
            return self.read(row, col)
        except CorruptTileError:
            return None

    def summary(self) -> dict[str, float]:
        """Which pyramid level was read, its spacing, and whether tiles were resampled from it (summary.json)."""
        return {"level_read": self.source_level.index, "level_read_mpp": self.source_level.mpp,
                "level_resampled": int(self.resampled)}


def _dicom_files(path: Path | Sequence[Path]) -> list[Path]:
    if not isinstance(path, Path):
        candidates = list(path)
        for p in candidates:
            if not p.is_file():
                raise SlideError(f"{p}: no such file")
    elif not path.exists():
        raise SlideError(f"{path}: no such file or folder")
    else:
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = []
    for p in candidates:
        with open(p, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            files.append(p)
    if not files:
        raise SlideError(f"{path if isinstance(path, Path) else 'file list'}: no DICOM files found")
    return files


def _check_complete(path: Path, ds: Dataset) -> None:
    """Refuse a file whose Pixel Data stops before its end (truncated transfer or copy)."""
    size = os.path.getsize(path)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated:
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 64))
            tail = fh.read()
        if _SEQUENCE_DELIMITER not in tail:
            raise SlideError("truncated file (encapsulated Pixel Data has no end delimiter)")


def _read_header(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except MemoryError:
        raise
    except Exception as exc:  # damaged files make pydicom raise anything: struct.error, zlib.error, EOFError, ...
        raise SlideError(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    return ds


def _unique(headers: dict[Path, Dataset]) -> dict[Path, Dataset]:
    """Drop repeated copies of one instance (same SOP Instance UID, same size); refuse different ones."""
    seen: dict[str, Path] = {}
    unique = {}
    for path, ds in headers.items():
        uid = str(ds.SOPInstanceUID)
        first = seen.setdefault(uid, path)
        if first is path:
            unique[path] = ds
        elif os.path.getsize(first) != os.path.getsize(path):
            raise SlideError(f"{first.name} and {path.name} are different files with the same SOPInstanceUID: "
                             "refusing an ambiguous series")
        else:
            log.info("%s repeats instance %s of %s; read once", path.name, uid, first.name)
    return unique


def _count(ds: Dataset, key: str, default: int | None = None) -> int:
    """A positive integer attribute, or :class:`SlideError` naming it."""
    value = ds.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise SlideError(f"{key} {str(value)[:40]!r} is not a number") from None
    if number < 1:
        raise SlideError(f"{key} is {number}, must be at least 1")
    return number


def _check_dimensions(ds: Dataset) -> None:
    """Refuse absurd Total Pixel Matrix sizes and TILED_FULL frame counts that do not add up (PS3.3 C.8.12.4)."""
    width, height = _count(ds, "TotalPixelMatrixColumns"), _count(ds, "TotalPixelMatrixRows")
    tile_w, tile_h = _count(ds, "Columns"), _count(ds, "Rows")
    if max(width, height, tile_w, tile_h) > MAX_LEVEL_SIDE:
        raise SlideError(f"absurd dimensions {width} x {height} px in {tile_w} x {tile_h} tiles "
                         f"(more than {MAX_LEVEL_SIDE} px a side)")
    if ds.DimensionOrganizationType == "TILED_FULL":
        planes = _count(ds, "TotalPixelMatrixFocalPlanes", 1) * _count(ds, "NumberOfOpticalPaths", 1)
        needed = math.ceil(width / tile_w) * math.ceil(height / tile_h) * planes
        frames = _count(ds, "NumberOfFrames", 1)
        single = frames == planes and "VOLUME" not in ds.ImageType  # a label or overview: one tile
        if frames != needed and not single and "ConcatenationUID" not in ds:
            raise SlideError(f"TILED_FULL {width} x {height} px in {tile_w} x {tile_h} tiles needs {needed} "
                             f"frames, the file has {frames}")


@contextmanager
def _about(path: Path) -> Iterator[None]:
    """Name ``path`` in a :class:`SlideError`, and turn malformed element values into one."""
    try:
        yield
    except SlideError as exc:
        raise SlideError(f"{path.name}: {exc}") from None
    except MemoryError:
        raise
    except Exception as exc:  # pydicom converts values lazily: ValueError, NotImplementedError (unknown VR), ...
        raise SlideError(f"{path.name}: malformed header ({type(exc).__name__}: {exc})") from exc


def _check_sop_class(ds: Dataset) -> None:
    sop = ds.get("SOPClassUID", "")
    if sop != VLWholeSlideMicroscopyImageStorage:
        name = getattr(sop, "name", "") or "unknown SOP class"
        raise SlideError(f"{name} ({sop or 'no SOP Class UID'}), not a VL Whole Slide Microscopy Image")


def _validate_instance(path: Path, ds: Dataset) -> None:
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax not in TRANSFER_SYNTAXES:
        raise SlideError(f"transfer syntax {describe(syntax)} is not supported (uncompressed, JPEG, JPEG-LS, "
                         "JPEG 2000 or HTJ2K)")
    missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    missing += [k for k in _PYRAMID if k not in ds]
    if missing:
        raise SlideError(f"VL WSM instance lacks {', '.join(missing)} (needed to place it in the pyramid)")
    _check_dimensions(ds)


def _validate_series(headers: dict[Path, Dataset]) -> None:
    """Refuse other SOP classes and instances of several slides."""
    for path, ds in headers.items():
        with _about(path):
            _check_sop_class(ds)
    for key in _IDENTITY:
        values = set()
        for path, ds in headers.items():
            with _about(path):
                values.add(str(ds.get(key, "")))
        if len(values) > 1:
            raise SlideError(f"instances disagree on {key} ({len(values)} different values): refusing to mix slides")


def validate_headers(headers: dict[Path, Dataset]) -> dict[Path, list[str]]:
    """Refuse bad input; give missing attributes their defaults first. Returns the defaults given per instance.

    Keys name the instances in messages: file paths, or for a slide read over
    DICOMweb (:mod:`dicom_io.dicomweb`) ``Path(SOPInstanceUID)``.
    """
    _validate_series(headers)
    try:
        changed = fill_defaults(headers)
    except Exception as exc:  # pydicom converts values lazily: ValueError, NotImplementedError (unknown VR), ...
        raise SlideError(f"malformed header ({type(exc).__name__}: {exc})") from exc
    for path, ds in headers.items():
        with _about(path):
            _validate_instance(path, ds)
    return changed


class Slide:
    """An opened slide: pyramid levels, tile reads and the source instances' metadata."""

    def __init__(self, wsi: WsiDicom, headers: dict[Path, Dataset]) -> None:
        self._wsi = wsi
        self.headers = headers
        first = next(iter(headers.values()))
        self.identity = SourceIdentity(
            patient_id=str(first.get("PatientID", "")),
            study_instance_uid=str(first.StudyInstanceUID),
            series_instance_uid=str(first.SeriesInstanceUID),
        )
        self.levels = [
            LevelInfo(
                index=i,
                width=lvl.size.width,
                height=lvl.size.height,
                mpp=float(lvl.mpp.width),
                tile_width=lvl.tile_size.width,
                tile_height=lvl.tile_size.height,
            )
            for i, lvl in enumerate(wsi.levels)
        ]
        #: Resampled levels made by :meth:`tile_source`, by index (past the pyramid's), with their metadata.
        self._resampled: dict[int, tuple[LevelInfo, Dataset]] = {}
        #: wsidicom's number of each level (log2 of its downscale, e.g. 0, 2, 4 for 4x steps), which its reads take.
        self._pyramid_level = [lvl.level for lvl in wsi.levels]
        #: Focal plane (um) and optical path read on each level: the central plane, the brightfield path.
        self._plane = {i: central_plane(lvl.focal_planes) for i, lvl in enumerate(wsi.levels)}
        self._path = brightfield_path(headers.values())
        self._to_srgb = srgb_transform(headers.values(), self._path)

    def close(self) -> None:
        self._wsi.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def source_datasets(self) -> list[Dataset]:
        """Metadata of every VL WSM instance of the series (no pixel data)."""
        return list(self.headers.values())

    def level_dataset(self, level: int) -> Dataset:
        """Metadata of the instance holding ``level`` (matched on Total Pixel Matrix size).

        For a resampled level (see :meth:`tile_source`) this is the metadata
        of the instance it was read from, with the resampled level's size,
        Pixel Spacing and Total Pixel Matrix Origin, so results built on it
        sit where the tiles were read.
        """
        if level in self._resampled:
            return self._resampled[level][1]
        info = self.levels[level]
        for ds in self.headers.values():
            if (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (info.width, info.height):
                return ds
        raise SlideError(f"no instance found for pyramid level {level}")

    def level_for_mpp(self, mpp: float, tolerance: float = LEVEL_TOLERANCE) -> LevelInfo:
        """The level whose pixel spacing is within ``tolerance`` of ``mpp``."""
        for info in self.levels:
            if abs(info.mpp - mpp) <= tolerance * mpp:
                return info
        have = ", ".join(f"{lvl.mpp:.3g}" for lvl in self.levels)
        raise SlideError(f"missing pyramid level: none within {tolerance:.0%} of {mpp:g} um/px, the model's "
                         f"magnification (the slide has {have} um/px)")

    def tile_source(self, mpp: float, tile_size: int, tolerance: float = LEVEL_TOLERANCE,
                    source: LevelInfo | None = None) -> TileSource:
        """Tiles of ``tile_size`` px at ``mpp`` um/px.

        From the pyramid level within ``tolerance`` of ``mpp`` when there is
        one (:meth:`level_for_mpp`); otherwise box-resampled from the nearest
        finer level, reading only the region each tile covers. A slide with
        no level that fine is refused. A given ``source`` level (finer than
        ``mpp``, or within ``tolerance`` of it) is read instead, resampled
        unless it is within ``tolerance``.
        """
        if source is not None and abs(source.mpp - mpp) <= tolerance * mpp:
            return TileSource(source, source, self.tile_reader(source, tile_size))
        if source is None:
            try:
                level = self.level_for_mpp(mpp, tolerance)
                return TileSource(level, level, self.tile_reader(level, tile_size))
            except SlideError as missing:
                finer = [lvl for lvl in self.levels if lvl.mpp < mpp]
                if not finer:
                    raise SlideError(f"{missing}; none is finer to resample from") from None
            source = max(finer, key=lambda lvl: lvl.mpp)
        elif source.mpp > mpp:
            raise ValueError(f"level {source.index} ({source.mpp:g} um/px) is coarser than {mpp:g} um/px")
        level = self._resampled_level(source, mpp, tile_size)
        log.info("tiles at %g um/px box-resampled from level %d (%.3g um/px)", mpp, source.index, source.mpp)
        return TileSource(level, source, lambda row, col: self._resample_tile(source, level, row, col))

    def _resampled_level(self, source: LevelInfo, mpp: float, tile_size: int) -> LevelInfo:
        """A level at ``mpp`` um/px over the area of ``source``, registered with its metadata."""
        factor = mpp / source.mpp
        level = LevelInfo(index=len(self.levels) + len(self._resampled),
                          width=max(1, round(source.width / factor)), height=max(1, round(source.height / factor)),
                          mpp=mpp, tile_width=tile_size, tile_height=tile_size)
        self._resampled[level.index] = (level, resampled_dataset(self.level_dataset(source.index), level, factor))
        return level

    def _resample_tile(self, source: LevelInfo, level: LevelInfo, row: int, col: int) -> np.ndarray:
        """Tile (row, col) of the resampled ``level``: the area of ``source`` it covers, box-averaged."""
        factor, size = level.mpp / source.mpp, level.tile_width
        x0, y0 = col * size * factor, row * size * factor
        x1, y1 = x0 + size * factor, y0 + size * factor
        left, top = math.floor(x0), math.floor(y0)
        region = np.full((math.ceil(y1) - top, math.ceil(x1) - left, 3), 255, np.uint8)
        w, h = min(source.width, math.ceil(x1)) - left, min(source.height, math.ceil(y1)) - top
        if w > 0 and h > 0:
            try:
                region[:h, :w] = np.asarray(self.read_region(source, left, top, w, h))
            except SlideError as exc:
                raise CorruptTileError(str(exc)) from exc
        tile = Image.fromarray(region).resize((size, size), Image.Resampling.BOX,
                                              box=(x0 - left, y0 - top, x1 - left, y1 - top))
        return whiten_outside(np.array(tile), level, row, col)

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at ``mpp`` um/px and that spacing.

        Read from the coarsest level at least that fine and box-resampled; a
        slide with no level that fine gets its finest level as it is (never
        upsampled), with that level's spacing returned. A level of more than
        :data:`MAX_THUMBNAIL_SOURCE_PIXELS` is not read whole: the slide is
        refused for missing its lower-resolution levels.
        """
        fine_enough = [lvl for lvl in self.levels if lvl.mpp <= mpp * 1.001]
        info = fine_enough[-1] if fine_enough else self.levels[0]
        if info.width * info.height > MAX_THUMBNAIL_SOURCE_PIXELS:
            which = f"coarsest level at least as fine as {mpp} um/px" if fine_enough else "finest level"
            raise SlideError(f"missing pyramid levels: the {which} is {info.width} x {info.height} px at "
                             f"{info.mpp:.3g} um/px, more than {MAX_THUMBNAIL_SOURCE_PIXELS // 2**20} Mpx to read "
                             "whole; the series needs lower-resolution levels")
        region = self.read_region(info, 0, 0, info.width, info.height)
        if not fine_enough:
            return np.asarray(region), info.mpp
        size = (max(1, round(info.width * info.mpp / mpp)), max(1, round(info.height * info.mpp / mpp)))
        if size != region.size:
            region = region.resize(size, Image.Resampling.BOX)
        return np.asarray(region), mpp

    def read_region(self, level: LevelInfo, x: int, y: int, w: int, h: int) -> Image.Image:
        """RGB region of ``level``; pixel data that cannot be decoded raises :class:`SlideError`."""
        try:
            region = self._wsi.read_region((x, y), self._pyramid_level[level.index], (w, h),
                                           z=self._plane[level.index], path=self._path).convert("RGB")
            if self._to_srgb is None:
                return region
            converted = ImageCms.applyTransform(region, self._to_srgb)
            assert converted is not None  # no inPlace: a new image
            return converted
        except (MemoryError, SourceError):  # out of memory, or the PACS unreachable: faults, not bad pixels
            raise
        except Exception as exc:  # wsidicom and its decoders (Pillow, imagecodecs, pydicom) raise many types
            raise SlideError(f"pyramid level {level.index} could not be decoded at ({x}, {y}) "
                             f"({type(exc).__name__}: {exc})") from exc

    def tile_reader(self, level: LevelInfo, tile_size: int):
        """A function (row, col) -> RGB uint8 (tile_size, tile_size, 3) for ``level``.

        When the file's tiles are the model's tiles in JPEG baseline, the
        encoded frame is read and decoded directly (fast path, safe to call
        from threads); otherwise wsidicom decodes them. Pixels beyond the
        image (Total Pixel Matrix Columns/Rows) are white on both paths,
        whatever the writer padded edge frames with (:func:`whiten_outside`).
        A tile that cannot be decoded raises :class:`CorruptTileError`.
        """
        syntax = self.level_dataset(level.index).file_meta.TransferSyntaxUID
        if (level.tile_width, level.tile_height) == (tile_size, tile_size) and syntax == JPEGBaseline8Bit:

            def read(row: int, col: int) -> np.ndarray:
                try:
                    data = self._wsi.read_encoded_tile(self._pyramid_level[level.index], (col, row),
                                                       z=self._plane[level.index],
                                                       path=self._path, crop_to_image_boundary=False)
                except (MemoryError, SourceError):
                    raise
                except Exception as exc:  # a damaged frame index or offset table, as wsidicom finds it
                    raise CorruptTileError(f"tile ({col}, {row}) of level {level.index} could not be read "
                                           f"({type(exc).__name__}: {exc})") from exc
                tile = _decode(data, tile_size)
                if self._to_srgb is not None:
                    tile = np.asarray(ImageCms.applyTransform(Image.fromarray(tile), self._to_srgb))
                return whiten_outside(tile, level, row, col)

            return read

        def read_decoded(row: int, col: int) -> np.ndarray:
            x, y = col * tile_size, row * tile_size
            w, h = min(tile_size, level.width - x), min(tile_size, level.height - y)
            out = np.full((tile_size, tile_size, 3), 255, np.uint8)
            try:
                out[:h, :w] = np.asarray(self.read_region(level, x, y, w, h))
            except SlideError as exc:
                raise CorruptTileError(str(exc)) from exc
            return out

        return read_decoded


def central_plane(planes: Sequence[float]) -> float:
    """The middle one of a level's focal planes (um), the plane a scanner focused on (PS3.3 C.8.12.4.1.8)."""
    return sorted(planes)[len(planes) // 2]


#: The colour space tiles are analysed in (:func:`srgb_transform`).
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
#: Illumination Type (PS3.3 C.8.12.5, CID 8123) of brightfield microscopy.
BRIGHTFIELD = "111744"


def brightfield_path(headers: Iterable[Dataset]) -> str | None:
    """Identifier of the brightfield optical path; None when the slide has one path or says no illumination.

    A slide whose optical paths are all of another illumination (fluorescence) is refused: a HER2 IHC/DAB
    stain is read in transmitted white light.
    """
    paths: dict[str, set[str]] = {}
    for ds in headers:
        for item in ds.get("OpticalPathSequence", []):
            codes = {str(c.get("CodeValue", "")) for c in item.get("IlluminationTypeCodeSequence", [])}
            paths.setdefault(str(item.get("OpticalPathIdentifier", "")), set()).update(codes)
    if len(paths) < 2:
        return None
    brightfield = sorted(p for p, codes in paths.items() if BRIGHTFIELD in codes or not codes)
    if not brightfield:
        raise SlideError(f"no brightfield optical path among {len(paths)} ({', '.join(sorted(paths))}): "
                         "HER2 IHC is read in brightfield")
    return brightfield[0]


def srgb_transform(headers: Iterable[Dataset], path: str | None) -> ImageCms.ImageCmsTransform | None:
    """The colour transform from the slide's ICC Profile (PS3.3 C.8.12.5, optical path ``path``) to sRGB.

    Stain vectors, the white filter and QC thresholds are set on sRGB pixels
    (our writer's frames), so frames in another colour space are converted
    before any colour analysis. None when there is no profile (sRGB is then
    assumed), when it describes itself as sRGB (converting would only round),
    or when it cannot be parsed (logged: pixels are used as they are).
    """
    profile = next((item.ICCProfile for ds in headers for item in ds.get("OpticalPathSequence", [])
                    if "ICCProfile" in item and (path is None or str(item.get("OpticalPathIdentifier")) == path)), None)
    if not profile:
        return None
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(bytes(profile)))
        description = ImageCms.getProfileDescription(source).strip()
        if "srgb" in description.lower():
            return None
        transform = ImageCms.buildTransform(source, _SRGB, "RGB", "RGB", ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, TypeError, ValueError) as exc:
        log.warning("ICC profile of the slide could not be read (%s); pixels are taken as sRGB", exc)
        return None
    log.info("frames converted from ICC profile %r to sRGB", description)
    return transform


def resampled_dataset(source: Dataset, level: LevelInfo, factor: float) -> Dataset:
    """Metadata of ``level``, resampled by ``factor`` from the level ``source`` describes.

    A copy of ``source`` (same SOP Instance UID: the instance whose pixels
    were read) with the new Total Pixel Matrix size, TILED_FULL in tiles of
    ``level``'s size, Pixel Spacing times ``factor`` (PS3.3 C.8.12.4) and the
    Total Pixel Matrix Origin moved to the centre of the new top-left pixel
    (origins are pixel centres, as highdicom reads them: see
    :func:`dicom_io.geometry.tile_centre_position`).
    """
    ds = Dataset()
    ds.file_meta = source.file_meta
    for element in source:  # copies: setting a value below must not change the source's
        if element.keyword not in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            ds.add(copy.copy(element))
    centre = hd.spatial.ImageToReferenceTransformer.for_image(source, for_total_pixel_matrix=True)(
        np.array([[factor / 2, factor / 2]]))[0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem, origin.YOffsetInSlideCoordinateSystem = float(centre[0]), float(centre[1])
    ds.TotalPixelMatrixOriginSequence = DicomSequence([origin])
    shared = Dataset()
    for element in source.SharedFunctionalGroupsSequence[0]:
        if element.keyword != "PixelMeasuresSequence":
            shared.add(copy.copy(element))
    measures = Dataset()
    old = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.PixelSpacing = [float(v) * factor for v in old.PixelSpacing]
    if "SliceThickness" in old:
        measures.SliceThickness = old.SliceThickness
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = level.width, level.height
    ds.Columns, ds.Rows = level.tile_width, level.tile_height
    ds.NumberOfFrames = math.ceil(level.width / level.tile_width) * math.ceil(level.height / level.tile_height)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.ImageType = RESAMPLED_IMAGE_TYPE
    ds.TotalPixelMatrixFocalPlanes = 1
    return ds


def whiten_outside(tile: np.ndarray, level: LevelInfo, row: int, col: int) -> np.ndarray:
    """``tile`` (row, col) of ``level`` with its pixels beyond the Total Pixel Matrix set to white (255).

    Edge frames of a tiled image hold pixels beyond Total Pixel Matrix
    Columns/Rows whose values the standard leaves to the writer (PS3.3
    C.8.12.4.1.1): our writer and OrthancWSIDicomizer pad white, wsidicomizer
    black. White is what glass looks like, so the tissue grid, white filter,
    stain fit, QC and heatmap treat them as background whatever was written.
    """
    size_y, size_x = tile.shape[:2]
    inside_x, inside_y = level.width - col * size_x, level.height - row * size_y
    if inside_x >= size_x and inside_y >= size_y:
        return tile
    tile = tile.copy() if not tile.flags.writeable else tile
    tile[max(0, inside_y):] = 255
    tile[:, max(0, inside_x):] = 255
    return tile


#: JPEG end-of-image marker: libjpeg-turbo (through imagecodecs) decodes a truncated frame without an error.
_JPEG_EOI = b"\xff\xd9"


def _decode(data: bytes, tile_size: int) -> np.ndarray:
    """RGB pixels of one JPEG baseline frame, or :class:`CorruptTileError`.

    Pillow parses the header (size, colour mode) without decoding; an RGB
    frame then decodes straight into an array with imagecodecs'
    libjpeg-turbo (about 40 % less time than Pillow's decode plus copy, identical
    pixels). A frame must end with the end-of-image marker (after at most the
    one pad byte of an encapsulated fragment, DICOM PS3.5 A.4).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (tile_size, tile_size):  # checked before decoding: a damaged header may claim any size
                raise CorruptTileError(f"tile is {im.size[0]} x {im.size[1]} px, expected {tile_size} x {tile_size}")
            if im.mode != "RGB":
                im.load()
                return np.asarray(im.convert("RGB"))
        if not (data.endswith(_JPEG_EOI) or data[-3:] == _JPEG_EOI + b"\0"):
            raise CorruptTileError("tile could not be decoded: JPEG frame is truncated (no end-of-image marker)")
        return imagecodecs.jpeg8_decode(data)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, imagecodecs.Jpeg8Error) as exc:
        raise CorruptTileError(f"tile could not be decoded: {exc}") from exc


def open_slide(path: Path | Sequence[Path]) -> Slide:
    """Open the VL WSM series in ``path`` (a folder, one file or a list of files), or raise :class:`SlideError`."""
    path = Path(path) if isinstance(path, (str, Path)) else [Path(p) for p in path]
    where = path if isinstance(path, Path) else f"{len(path)} files in {path[0].parent if path else '.'}"
    headers = {p: _read_header(p) for p in _dicom_files(path)}
    changed = validate_headers(headers)
    for file, ds in headers.items():
        with _about(file):
            _check_complete(file, ds)
    headers = _unique(headers)
    try:
        wsi = _open_wsidicom(headers, changed)
    except Exception as exc:  # wsidicom raises several unrelated types for bad pyramids
        raise SlideError(f"{where}: wsidicom could not open the slide ({type(exc).__name__}: {exc})") from exc
    try:
        return Slide(wsi, headers)
    except BaseException as exc:
        wsi.close()
        if isinstance(exc, (SlideError, MemoryError)) or not isinstance(exc, Exception):
            raise
        raise SlideError(f"{where}: malformed pyramid metadata ({type(exc).__name__}: {exc})") from exc


def _open_wsidicom(headers: dict[Path, Dataset], changed: dict[Path, list[str]]) -> WsiDicom:
    """wsidicom over the files, those given defaults read with their changed headers (:class:`SplicedFile`)."""
    if not changed.keys() & headers.keys():
        return WsiDicom.open(list(headers), settings=_READ_SETTINGS)
    streams = []
    try:
        for path, ds in headers.items():
            if path in changed:
                stream: io.BufferedReader = io.BufferedReader(SplicedFile(path, ds))
                where = UPath(path.with_name(f"{path.name} (with defaults)"))  # not a file: wsidicom keeps this stream
            else:
                stream, where = open(path, "rb"), UPath(path)
            streams.append(WsiDicomReadIO(stream, where))
        with use_settings(_READ_SETTINGS):
            return WsiDicom(WsiDicomFileSource(streams), True, settings=_READ_SETTINGS)
    except BaseException:
        for stream in streams:
            stream.close()
        raise
