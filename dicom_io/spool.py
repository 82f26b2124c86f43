"""On-disk spool of received instances: ``<spool>/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``.

With ``slide_source = "dicomweb"`` only each instance's header is kept (the
data set up to Pixel Data, PS3.10 file): workers read the frames from the PACS
(:mod:`dicom_io.dicomweb`), so the spool needs no room for pixels and no
worker needs to see it.

Every file is written atomically (temporary file in the same folder, fsync,
rename, fsync of the folder), so a reader never sees a half-written instance,
whatever happens to the process or the disk in the middle. Path parts are
validated as DICOM UIDs (PS3.5 section 9: digits and dots, at most 64
characters), so nothing received from the network can name a path outside the
spool.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom import Dataset
from pydicom.filereader import read_file_meta_info

from dicom_io.uids import is_valid_uid

#: Bytes copied at a time when spooling a received file.
COPY_CHUNK = 8 * 1024 * 1024
#: Folder under the spool root holding partial files until their rename.
INCOMING = ".incoming"
#: Folder under the spool root with one marker per series an association is still storing into.
RECEIVING = ".receiving"


class SpoolPathError(ValueError):
    """A UID from the network is not a valid DICOM UID and cannot name a spool path."""


class SpoolConflictError(ValueError):
    """An instance names a series that is already spooled under another study: identities would mix."""


def checked_uid(value: object, what: str) -> str:
    """Return ``value`` as a string if it is a valid DICOM UID (PS3.5 9.1), else raise :class:`SpoolPathError`."""
    text = str(value or "")
    if not is_valid_uid(text):
        raise SpoolPathError(f"{what} {text[:80]!r} is not a valid DICOM UID")
    return text


def series_dir(spool_dir: Path, study_uid: str, series_uid: str) -> Path:
    """Folder of one series in the spool, after validating both UIDs."""
    return Path(spool_dir) / checked_uid(study_uid, "StudyInstanceUID") / checked_uid(series_uid, "SeriesInstanceUID")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, fill: Callable[[BinaryIO], object], tmp_dir: Path | None) -> None:
    tmp_dir = Path(tmp_dir or path.parent)
    for folder in (path.parent, tmp_dir):
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="incoming-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either nothing, the old file or all of ``data``.

    The temporary file lives in ``tmp_dir`` (default: beside ``path``; it must
    be on the same file system). On any error it is removed and the error
    propagates (typically :class:`OSError` for a full or read-only disk).
    """
    _write_atomic(path, lambda fh: fh.write(data), tmp_dir)


def copy_atomic(path: Path, source: Path, tmp_dir: Path | None = None) -> None:
    """Like :func:`write_atomic` with the content of the file ``source``, streamed (memory stays bounded)."""

    def fill(fh: BinaryIO) -> None:
        with open(source, "rb") as src:
            shutil.copyfileobj(src, fh, COPY_CHUNK)

    _write_atomic(path, fill, tmp_dir)


def encode(ds: Dataset) -> bytes:
    """A Part 10 file (preamble, File Meta Information) of ``ds``, as bytes."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def spool_instance(spool_dir: Path, study_uid: str, series_uid: str, sop_uid: str, source: Path,
                   header: Dataset | None = None) -> Path:
    """Store one received DICOM file (preamble, File Meta Information, data set) in the spool.

    With ``header`` (the file read up to its Pixel Data) only that is stored,
    as a Part 10 file of its own: the instance's metadata for a slide read over
    DICOMweb.

    Partial files live in ``<spool>/.incoming`` until renamed, so a series
    folder only ever holds complete instances. An instance whose series is
    already spooled under another Study Instance UID raises
    :class:`SpoolConflictError`: one series must never span two studies (the
    results of each part would carry the same UIDs in two patients' studies).
    """
    folder = series_dir(spool_dir, study_uid, series_uid)
    path = folder / f"{checked_uid(sop_uid, 'SOPInstanceUID')}.dcm"
    elsewhere = [p.parent.name for p in Path(spool_dir).glob(f"*/{series_uid}")
                 if p != folder and p.is_dir() and is_valid_uid(p.parent.name)]  # not .receiving markers
    if elsewhere:
        raise SpoolConflictError(f"series {series_uid} is already spooled under study {elsewhere[0]}, not "
                                 f"{study_uid}: refusing to mix studies in one series")
    if header is None:
        copy_atomic(path, source, Path(spool_dir) / INCOMING)
    else:
        write_atomic(path, encode(header), Path(spool_dir) / INCOMING)
    return path


def remove_partial_files(spool_dir: Path) -> int:
    """Delete what a process killed in the middle of a copy left in ``<spool>/.incoming``; returns how many.

    Only the listener writes there, so at its start every file there is a leftover.
    """
    leftovers = [p for p in (Path(spool_dir) / INCOMING).glob("*") if p.is_file()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


def receiving_marker(folder: Path) -> Path:
    """Marker of a series folder (``<spool>/<study>/<series>``) that an association is storing into.

    It outlives a killed listener, so a restarted one knows the series may be incomplete.
    """
    folder = Path(folder)
    return folder.parent.parent / RECEIVING / folder.name


def instance_uids(folder: Path) -> list[str]:
    """SOP Instance UIDs of the complete instances spooled in one series folder, sorted."""
    return sorted(p.stem for p in Path(folder).glob("*.dcm"))


def transfer_syntaxes(folder: Path) -> dict[str, str]:
    """SOP Instance UID -> Transfer Syntax UID (File Meta Information, PS3.10 7.1) of each instance in a series folder."""
    return {p.stem: str(read_file_meta_info(p).TransferSyntaxUID) for p in sorted(Path(folder).glob("*.dcm"))}
