"""Open a DICOM VL Whole Slide Microscopy Image series (PS3.3 A.32.8) for scoring.

:func:`open_slide` checks the input before wsidicom sees it, so bad input is
refused with one precise line (:class:`SlideError`): no such path, no DICOM
files, a truncated file, another SOP class (e.g. a CT slice), files from
several series, conflicting patient identity, or pyramid metadata wsidicom
needs (Image Type, Dimension Organization Type) missing.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import VLWholeSlideMicroscopyImageStorage
from wsidicom import WsiDicom
from wsidicom.config import Settings as WsiSettings

from dicom_io.errors import CorruptTileError, SlideError

#: Sequence Delimitation Item (FFFE,E0DD) with zero length: how encapsulated Pixel Data ends.
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: wsidicom's frame caches default to 100 MB each and fill with every frame read, so memory grew with
#: slide size; tissue tiles are read once, so small fixed caches suffice (regions and thumbnails still
#: reuse the few decoded frames they straddle).
_READ_SETTINGS = WsiSettings(encoded_frame_cache_size=4 * 1024 * 1024, decoded_frame_cache_size=16 * 1024 * 1024)
#: Attributes that must agree across all instances of one slide.
_IDENTITY = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID")


@dataclass(frozen=True)
class SourceIdentity:
    """Who and what a slide belongs to; results must carry exactly this."""

    patient_id: str
    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class LevelInfo:
    index: int
    width: int
    height: int
    mpp: float
    tile_width: int
    tile_height: int


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
            raise SlideError(f"{path.name}: truncated file (encapsulated Pixel Data has no end delimiter)")


def _read_header(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise SlideError(f"{path.name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    return ds


def _validate(headers: dict[Path, Dataset]) -> None:
    for path, ds in headers.items():
        sop = ds.get("SOPClassUID", "")
        if sop != VLWholeSlideMicroscopyImageStorage:
            name = getattr(sop, "name", "") or "unknown SOP class"
            raise SlideError(f"{path.name}: {name} ({sop or 'no SOP Class UID'}), not a VL Whole Slide Microscopy Image")
    for key in _IDENTITY:
        values = {str(ds.get(key, "")) for ds in headers.values()}
        if len(values) > 1:
            raise SlideError(f"instances disagree on {key} ({len(values)} different values): refusing to mix slides")
    for path, ds in headers.items():
        missing = [k for k in ("ImageType", "DimensionOrganizationType", "TotalPixelMatrixColumns") if k not in ds]
        if missing:
            raise SlideError(f"{path.name}: VL WSM instance lacks {', '.join(missing)} (needed to place it in the pyramid)")
        _check_complete(path, ds)


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

    def close(self) -> None:
        self._wsi.close()

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def source_datasets(self) -> list[Dataset]:
        """Metadata of every VL WSM instance of the series (no pixel data)."""
        return list(self.headers.values())

    def level_dataset(self, level: int) -> Dataset:
        """Metadata of the instance holding ``level`` (matched on Total Pixel Matrix size)."""
        info = self.levels[level]
        for ds in self.headers.values():
            if (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (info.width, info.height):
                return ds
        raise SlideError(f"no instance found for pyramid level {level}")

    def level_for_mpp(self, mpp: float, tolerance: float = 0.15) -> LevelInfo:
        """The level whose pixel spacing is within ``tolerance`` of ``mpp``."""
        for info in self.levels:
            if abs(info.mpp - mpp) <= tolerance * mpp:
                return info
        have = ", ".join(f"{lvl.mpp:.3g}" for lvl in self.levels)
        raise SlideError(f"slide has no pyramid level at {mpp} um/px (levels: {have} um/px)")

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at ``mpp`` um/px and that spacing.

        Read from the coarsest level at least that fine and box-resampled; a
        slide with no level that fine gets its finest level as it is (never
        upsampled), with that level's spacing returned.
        """
        fine_enough = [lvl for lvl in self.levels if lvl.mpp <= mpp * 1.001]
        info = fine_enough[-1] if fine_enough else self.levels[0]
        region = self._wsi.read_region((0, 0), info.index, (info.width, info.height)).convert("RGB")
        if not fine_enough:
            return np.asarray(region), info.mpp
        size = (max(1, round(info.width * info.mpp / mpp)), max(1, round(info.height * info.mpp / mpp)))
        if size != region.size:
            region = region.resize(size, Image.Resampling.BOX)
        return np.asarray(region), mpp

    def tile_reader(self, level: LevelInfo, tile_size: int):
        """A function (row, col) -> RGB uint8 (tile_size, tile_size, 3) for ``level``.

        When the file's tiles are the model's tiles, the encoded frame is read
        and decoded directly (fast path, safe to call from threads); otherwise
        the region is assembled by wsidicom. Pixels beyond the image are white.
        """
        if (level.tile_width, level.tile_height) == (tile_size, tile_size):

            def read(row: int, col: int) -> np.ndarray:
                data = self._wsi.read_encoded_tile(level.index, (col, row), crop_to_image_boundary=False)
                return _decode(data, tile_size)

            return read

        def read_region(row: int, col: int) -> np.ndarray:
            x, y = col * tile_size, row * tile_size
            w, h = min(tile_size, level.width - x), min(tile_size, level.height - y)
            out = np.full((tile_size, tile_size, 3), 255, np.uint8)
            out[:h, :w] = np.asarray(self._wsi.read_region((x, y), level.index, (w, h)).convert("RGB"))
            return out

        return read_region


def _decode(data: bytes, tile_size: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode errors surface here; an RGB frame is then used without a converted copy
            arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptTileError(f"tile could not be decoded: {exc}") from exc
    if arr.shape[:2] != (tile_size, tile_size):
        raise CorruptTileError(f"tile decoded to {arr.shape[:2]}, expected {(tile_size, tile_size)}")
    return arr


def open_slide(path: Path | Sequence[Path]) -> Slide:
    """Open the VL WSM series in ``path`` (a folder, one file or a list of files), or raise :class:`SlideError`."""
    path = Path(path) if isinstance(path, (str, Path)) else [Path(p) for p in path]
    where = path if isinstance(path, Path) else f"{len(path)} files in {path[0].parent if path else '.'}"
    headers = {p: _read_header(p) for p in _dicom_files(path)}
    _validate(headers)
    try:
        wsi = WsiDicom.open(list(headers), settings=_READ_SETTINGS)
    except Exception as exc:  # wsidicom raises several unrelated types for bad pyramids
        raise SlideError(f"{where}: wsidicom could not open the slide ({type(exc).__name__}: {exc})") from exc
    return Slide(wsi, headers)
