"""Deliver result objects to the PACS: an on-disk outbox drained by a C-STORE SCU or STOW-RS.

Results are first written to the outbox (``<outbox>/<source SeriesUID>/<SOPInstanceUID>.dcm``,
atomically), then sent to a :class:`Destination` (C-STORE, PS3.4 Annex B) or a
:class:`StowDestination` (STOW-RS, PS3.18 10.5, :mod:`dicom_io.dicomweb`); a
file leaves the outbox only when the destination answered Success or a Warning
(PS3.4 B.2.3; HTTP 200, or 202 without the instance among the failures). The outbox is therefore the
source of truth: if the PACS is down, nothing is lost and a later
:meth:`Outbox.flush` delivers it. A PACS that answers with a Failure status
(a permanent refusal, e.g. 0xA9xx or 0xCxxx; over STOW-RS a 4xx other than
401/403/404/408/429, or the instance listed as failed) would be refused again on every
retry, so such a file is parked under ``<outbox>/.rejected/`` with the status in
a ``.reason`` file beside it instead of being retried forever.

Because result SOP Instance UIDs are deterministic, sending a file twice
(a crash between the PACS's answer and the unlink) stores the same instance
again rather than a duplicate.
"""

from __future__ import annotations

import fcntl
import logging
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS, Status

from dicom_io.dicomweb import LATER, STORED, DicomWebServer, StowSession
from dicom_io.spool import checked_uid, encode, write_atomic
from dicom_io.tls import client_context

log = logging.getLogger(__name__)

REJECTED = ".rejected"
LOCK = ".lock"
#: C-STORE statuses after which the instance is stored (PS3.4 B.2.3): Success and the Storage Service Class's
#: Warnings (0xB000, 0xB006, 0xB007), as pynetdicom.status classifies them.
DELIVERED_STATUSES = frozenset({int(Status.SUCCESS)} | {
    code for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items() if category == STATUS_WARNING and code >= 0xB000})
#: What sending one file came to, besides a rejection reason: stored, or keep it and try again later.
DELIVERED, KEPT = "delivered", "kept"


class Link(Protocol):
    """A destination opened for one flush; ``broken`` says why it cannot take more now ("" while it can)."""

    @property
    def broken(self) -> str: ...

    def send(self, path: Path) -> str:
        """Send one outbox file: :data:`DELIVERED`, :data:`KEPT` or the reason the destination refused it."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class ClientTLS:
    """DICOM TLS of the C-STORE SCU (PS3.15 B.1): our optional certificate and key, the CA trusted for the
    destination (system store when None) and the name checked against its certificate ("" = its host)."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    server_hostname: str = ""


@dataclass(frozen=True)
class Destination:
    """The C-STORE SCP that receives results (PS3.8 association parameters)."""

    host: str
    port: int
    ae_title: str
    calling_ae_title: str
    timeout: float
    #: ``(context, server_hostname)`` for DICOM TLS (PS3.15 B.1), or None for plain TCP.
    tls_args: tuple[ssl.SSLContext, str] | None = None

    @classmethod
    def with_tls(cls, host: str, port: int, ae_title: str, calling_ae_title: str, timeout: float,
                 tls: ClientTLS | None = None) -> Destination:
        """A destination reached over DICOM TLS when ``tls`` is given (its context is built now), else plain TCP."""
        tls_args = None
        if tls is not None:
            context = client_context(tls.cert_file, tls.key_file, tls.ca_file)
            tls_args = (context, tls.server_hostname or host)
        return cls(host, port, ae_title, calling_ae_title, timeout, tls_args)

    @property
    def name(self) -> str:
        """How job status names the destination: its AE title."""
        return self.ae_title

    def connect(self, headers: list[Dataset]) -> Link:
        """One association proposing the SOP classes and transfer syntaxes of ``headers`` (PS3.8 7.1)."""
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout
        for sop_class in sorted({h.SOPClassUID for h in headers}):
            syntaxes = {h.file_meta.TransferSyntaxUID for h in headers if h.SOPClassUID == sop_class}
            ae.add_requested_context(sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
        return _Association(ae.associate(self.host, self.port, ae_title=self.ae_title, tls_args=self.tls_args),
                            f"{self.ae_title} at {self.host}:{self.port}" + (" (TLS)" if self.tls_args else ""))


class _Association:
    """A C-STORE SCU association as a :class:`Link`."""

    def __init__(self, assoc, name: str) -> None:
        self.assoc = assoc
        self.opened = assoc.is_established
        self.broken = "" if self.opened else f"no association with {name}"

    def send(self, path: Path) -> str:
        ds = pydicom.dcmread(path)
        try:
            response = self.assoc.send_c_store(ds)
        except ValueError as exc:  # no presentation context accepted for this SOP class/transfer syntax
            return f"destination accepts no presentation context: {exc}"
        status = response.get("Status") if response else None
        if not self.assoc.is_established:
            self.broken = "association with the destination ended during delivery"
        if status is None:
            return KEPT
        if status in DELIVERED_STATUSES:
            log.info("delivered result %s (status 0x%04X)", ds.SOPInstanceUID, status)
            return DELIVERED
        return f"destination answered C-STORE status 0x{status:04X}"

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


@dataclass(frozen=True)
class StowDestination:
    """A DICOMweb server that receives results by STOW-RS (PS3.18 10.5), each under its own study."""

    server: DicomWebServer

    @property
    def name(self) -> str:
        """How job status names the destination: its URL (no credentials)."""
        return self.server.shown

    def connect(self, headers: list[Dataset]) -> Link:
        return _Stow(StowSession(self.server))


class _Stow:
    """A STOW-RS session as a :class:`Link`."""

    def __init__(self, session: StowSession) -> None:
        self.session = session

    @property
    def broken(self) -> str:
        return self.session.broken

    def send(self, path: Path) -> str:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        outcome = self.session.store(str(header.StudyInstanceUID), str(header.SOPInstanceUID), path.read_bytes())
        if outcome == STORED:
            log.info("delivered result %s (STOW-RS)", header.SOPInstanceUID)
            return DELIVERED
        return KEPT if outcome == LATER else outcome

    def close(self) -> None:
        self.session.close()


@dataclass
class FlushReport:
    """Per source series: instances delivered now, still waiting, and parked with a reason."""

    delivered: dict[str, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    unreachable: str = ""


#: ``on_series(source_series_uid, delivered_now, still_waiting, rejection_reason)``, called under the series lock.
SeriesCallback = Callable[[str, int, int, "str | None"], None]


@contextmanager
def _series_lock(folder: Path) -> Iterator[bool]:
    """Exclusive, non-blocking lock of one series' outbox: yields False when another flusher holds it."""
    try:
        fh = open(folder / LOCK, "a+b")
    except FileNotFoundError:  # the folder was emptied and removed meanwhile
        yield False
        return
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _header(path: Path) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:  # delivered by another flusher meanwhile
        return None


class Outbox:
    """Result files waiting for delivery, grouped by the source series they belong to."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def put(self, source_series_uid: str, datasets: list[Dataset]) -> list[Path]:
        """Write ``datasets`` atomically into the outbox of ``source_series_uid``."""
        folder = self.root / checked_uid(source_series_uid, "SeriesInstanceUID")
        paths = []
        for ds in datasets:
            path = folder / f"{checked_uid(ds.SOPInstanceUID, 'SOPInstanceUID')}.dcm"
            write_atomic(path, encode(ds))
            paths.append(path)
        return paths

    def pending(self, source_series_uid: str | None = None) -> dict[str, list[Path]]:
        """Files waiting, per source series (only ``source_series_uid`` when given)."""
        pattern = checked_uid(source_series_uid, "SeriesInstanceUID") if source_series_uid else "*"
        waiting: dict[str, list[Path]] = {}
        for folder in sorted(self.root.glob(pattern)):
            if folder.name != REJECTED and folder.is_dir():
                files = sorted(folder.glob("*.dcm"))
                if files:
                    waiting[folder.name] = files
        return waiting

    def flush(self, destination: Destination | StowDestination, source_series_uid: str | None = None,
              on_series: SeriesCallback | None = None) -> FlushReport:
        """Send what is waiting over one association (or STOW-RS session); keep whatever was not acknowledged.

        Each series is sent under an exclusive lock, so concurrent flushers
        (every worker runs one) never send the same file twice at once; a series
        locked by another flusher is skipped. ``on_series`` is told the outcome
        of each series sent, still under its lock, so job status is recorded in
        the order the deliveries really happened. An unreachable destination, an
        association that breaks off or a DICOMweb server that is down or refuses
        our credentials leaves the remaining files in place (``report.unreachable``
        says why); a Failure status parks that file under ``.rejected``.
        """
        report = FlushReport()
        waiting = self.pending(source_series_uid)
        headers = {p: h for files in waiting.values() for p in files if (h := _header(p)) is not None}
        if not headers:
            return report
        link = destination.connect(list(headers.values()))
        try:
            if not link.broken:
                for series, files in waiting.items():
                    self._flush_series(link, series, files, report, on_series)
                    if link.broken:
                        break
            if link.broken:
                report.unreachable = link.broken
                for series, files in waiting.items():
                    if series not in report.waiting and (left := sum(p.exists() for p in files)):
                        report.waiting[series] = left
                log.warning("outbox: %s; %d instance(s) wait", link.broken, sum(report.waiting.values()))
        finally:
            link.close()
        return report

    def _flush_series(self, link: Link, series: str, files: list[Path], report: FlushReport,
                      on_series: SeriesCallback | None) -> None:
        folder = self.root / series
        with _series_lock(folder) as mine:
            present = [p for p in files if p.exists()]
            if not mine or not present:
                return
            for path in present:
                if link.broken:
                    break
                outcome = self._send_one(link, path)
                if outcome == DELIVERED:
                    report.delivered[series] = report.delivered.get(series, 0) + 1
                elif outcome != KEPT:
                    report.rejected[series] = outcome
            left = len(list(folder.glob("*.dcm")))
            if left:
                report.waiting[series] = left
            if on_series is not None:
                on_series(series, report.delivered.get(series, 0), left, report.rejected.get(series))
            if not left:
                self._remove_empty(folder)

    @staticmethod
    def _remove_empty(folder: Path) -> None:
        try:
            (folder / LOCK).unlink()
            folder.rmdir()
        except OSError:  # a new result arrived meanwhile: keep the folder
            pass

    def _send_one(self, link: Link, path: Path) -> str:
        """Send one outbox file: :data:`DELIVERED` (file removed), :data:`KEPT` or the reason it was parked."""
        if not path.exists():
            return KEPT
        outcome = link.send(path)
        if outcome == DELIVERED:
            path.unlink()
        elif outcome != KEPT:
            self._reject(path, outcome)
        return outcome

    def _reject(self, path: Path, reason: str) -> str:
        target = self.root / REJECTED / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
        target.with_suffix(".reason").write_text(reason + "\n")
        log.error("result %s parked in %s: %s", path.stem, target.parent, reason)
        return reason
