"""Storage SCP for whole-slide images: receive, spool, hand off (``her2 listen``).

A pynetdicom Application Entity that accepts, as SCP only:

- VL Whole Slide Microscopy Image Storage (1.2.840.10008.5.1.4.1.1.77.1.6),
  PS3.4 Annex B Storage Service Class, in the transfer syntaxes the slide
  reader decodes (:data:`dicom_io.transfer_syntax.TRANSFER_SYNTAXES`; a
  context proposing only others, e.g. RLE or Deflate, is refused with result
  "transfer syntaxes not supported");
- Verification (1.2.840.10008.1.1), PS3.4 Annex A (C-ECHO).

Any other SOP class (a CT image, say) is not negotiated: its presentation
context is refused with result "abstract syntax not supported" (PS3.8 9.3.3.2)
and the refusal is logged. With ``listen_tls`` the SCP speaks DICOM TLS only
(PS3.15 B.1, :mod:`dicom_io.tls`): callers without TLS or without a trusted
certificate are dropped at the handshake. Associations from a calling AE title outside
``allowed_calling_aets`` are rejected with A-ASSOCIATE-RJ (rejected-permanent,
service-user, "calling AE title not recognized"; PS3.8 7.1.1.9), and so are
calls addressed to another called AE title than ours.

Event handlers only hand off: pynetdicom streams each data set to a temporary
file (memory stays bounded whatever the slide's size), the C-STORE handler
copies it atomically into the spool (or, for slides that workers read over
DICOMweb, only its header) and tells a callback; nothing is decoded beyond the
header and no patient attribute is ever logged.
"""

from __future__ import annotations

import logging
import ssl
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu import A_RELEASE_RQ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.status import Status
from pynetdicom.transport import ThreadedAssociationServer

from dicom_io.spool import SpoolConflictError, SpoolPathError, spool_instance
from dicom_io.tls import server_context
from dicom_io.transfer_syntax import TRANSFER_SYNTAXES

log = logging.getLogger(__name__)

# C-STORE response statuses (PS3.4 B.2.3, PS3.7 Annex C): Success from pynetdicom.status; the three
# failures we answer are the first codes of their ranges in pynetdicom.status.STORAGE_SERVICE_CLASS_STATUS.
SUCCESS = int(Status.SUCCESS)
OUT_OF_RESOURCES = 0xA700  # "Refused: Out of Resources" (0xA7xx)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # "Data Set Does Not Match SOP Class" (0xA9xx)
CANNOT_UNDERSTAND = 0xC000  # "Cannot Understand" (0xCxxx)

#: ``on_spooled(study_uid, series_uid, series_folder, association)``, called after each instance is safely on disk.
SpooledCallback = Callable[[str, str, Path, Hashable], None]
#: ``on_ended(association, released)``: the association's connection closed, after an A-RELEASE or not.
EndedCallback = Callable[[Hashable, bool], None]

#: Presentation context results (PS3.8 9.3.3.2) that explain a refusal in the log.
_CONTEXT_RESULTS = {
    0x01: "user rejection",
    0x02: "no reason",
    0x03: "abstract syntax (SOP class) not supported",
    0x04: "none of the proposed transfer syntaxes supported",
}


class StorageHandlers:
    """pynetdicom event handlers of the listener; they spool and hand off, nothing more."""

    def __init__(self, spool_dir: Path, on_spooled: SpooledCallback, on_ended: EndedCallback,
                 keep_pixels: bool = True) -> None:
        self.spool_dir = Path(spool_dir)
        #: False: spool each instance's header only (workers read its frames from the PACS over DICOMweb).
        self.keep_pixels = keep_pixels
        self.on_spooled = on_spooled
        self.on_ended = on_ended
        self._release_requested: weakref.WeakSet = weakref.WeakSet()

    def handle_echo(self, event: Event) -> int:
        """C-ECHO (PS3.4 A.4): always Success."""
        return SUCCESS

    def handle_store(self, event: Event) -> int:
        """C-STORE (PS3.4 B.2.2): spool the instance atomically, notify, return a PS3.4 B.2.3 status.

        pynetdicom has already streamed the data set to a temporary Part 10
        file (``event.dataset_path``); only its header is parsed here.
        """
        request = cast(C_STORE, event.request)
        try:
            ds = dcmread(event.dataset_path, stop_before_pixels=True)
            study_uid, series_uid = ds.StudyInstanceUID, ds.SeriesInstanceUID
            sop_class, sop_uid = ds.SOPClassUID, ds.SOPInstanceUID
        except Exception as exc:  # any decoding problem of peer data: refuse this instance, keep serving
            log.warning("C-STORE %s refused (cannot understand): %s", request.AffectedSOPInstanceUID,
                        type(exc).__name__)
            return CANNOT_UNDERSTAND
        if sop_class != request.AffectedSOPClassUID or sop_uid != request.AffectedSOPInstanceUID:
            log.warning("C-STORE %s refused: data set SOP class/instance differ from the request",
                        request.AffectedSOPInstanceUID)
            return DATASET_DOES_NOT_MATCH_SOP_CLASS
        try:
            path = spool_instance(self.spool_dir, study_uid, series_uid, sop_uid, event.dataset_path,
                                  None if self.keep_pixels else ds)
        except (SpoolPathError, SpoolConflictError) as exc:
            log.warning("C-STORE refused (cannot understand): %s", exc)
            return CANNOT_UNDERSTAND
        except OSError as exc:
            log.error("C-STORE %s refused (out of resources): spool write failed: %s", sop_uid, exc.strerror or exc)
            return OUT_OF_RESOURCES
        log.info("spooled instance %s of series %s from %s", sop_uid, series_uid,
                 event.assoc.requestor.ae_title)
        self.on_spooled(study_uid, series_uid, path.parent, event.assoc)
        return SUCCESS

    def handle_pdu(self, event: Event) -> None:
        """Note an A-RELEASE-RQ (PS3.8 9.3.6) as it is read, in the thread that later sees the connection close.

        ``assoc.is_released`` alone cannot tell: pynetdicom sets it in the association's own
        thread after answering A-RELEASE-RP, and under load the caller may already have
        closed the connection, and the close been handled, by then.
        """
        if isinstance(event.pdu, A_RELEASE_RQ):
            self._release_requested.add(event.assoc)

    def handle_closed(self, event: Event) -> None:
        """Connection closed: tell whether the association was released (PS3.8 7.2) or aborted/lost."""
        self.on_ended(event.assoc, event.assoc.is_released or event.assoc in self._release_requested)

    def handle_accepted(self, event: Event) -> None:
        """Log the refused presentation contexts with their reasons (e.g. a CT image: SOP class not supported)."""
        refused = sorted({f"{cx.abstract_syntax} ({_CONTEXT_RESULTS.get(cx.result or 0, f'result {cx.result}')})"
                          for cx in event.assoc.rejected_contexts})
        if refused:
            log.warning("association from %s: presentation context refused for %s", event.assoc.requestor.ae_title,
                        ", ".join(refused))

    def handle_rejected(self, event: Event) -> None:
        """Log why an association was rejected: the A-ASSOCIATE-RJ result, source and reason (PS3.8 7.1.1.9)."""
        rj = event.assoc.acceptor.primitive
        why = ("unknown", "unknown", "unknown") if rj is None else (rj.result_str, rj.source_str, rj.reason_str)
        log.warning("association from %s at %s rejected (%s, %s): %s", event.assoc.requestor.ae_title,
                    event.assoc.requestor.address, *why)

    def bindings(self) -> list[tuple]:
        return [
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_PDU_RECV, self.handle_pdu),
            (evt.EVT_CONN_CLOSE, self.handle_closed),
        ]


def build_ae(ae_title: str, allowed_calling_aets: list[str], timeout: float, max_associations: int) -> AE:
    """The listener's Application Entity: SCP of WSI storage and verification only (PS3.8 association rules)."""
    # Received data sets are streamed to a temporary file instead of memory: slides are large and
    # several may arrive at once. (A process-wide pynetdicom switch; the listener is its only SCP.)
    _config.STORE_RECV_CHUNKED_DATASET = True
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(VLWholeSlideMicroscopyImageStorage, TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.require_calling_aet = list(allowed_calling_aets)
    ae.require_called_aet = True
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.maximum_associations = max_associations
    return ae


@dataclass(frozen=True)
class ListenerTLS:
    """DICOM TLS of the Storage SCP (PS3.15 B.1): our certificate and key, the CA trusted for callers."""

    cert_file: Path | None
    key_file: Path | None
    ca_file: Path | None
    require_client_cert: bool = True


@dataclass(frozen=True)
class ListenerConfig:
    """What the Storage SCP needs: its AE and address (PS3.8 association parameters), TLS and spool.

    ``keep_pixels`` False spools headers only (workers read the frames over DICOMweb); ``tls`` None is
    plain TCP. The worker builds it from its settings (:meth:`worker.settings.Settings.listener_config`).
    """

    ae_title: str
    host: str
    port: int
    allowed_calling_aets: tuple[str, ...]
    timeout: float
    max_associations: int
    spool_dir: Path
    keep_pixels: bool = True
    tls: ListenerTLS | None = None


def listener_tls_context(config: ListenerConfig) -> ssl.SSLContext | None:
    """The Storage SCP's TLS context when ``config.tls`` is set (PS3.15 B.1), else None (plain TCP)."""
    if config.tls is None:
        return None
    tls = config.tls
    return server_context(tls.cert_file, tls.key_file, tls.ca_file, tls.require_client_cert, config.timeout)


def start_listener(config: ListenerConfig, on_spooled: SpooledCallback, on_ended: EndedCallback
                   ) -> ThreadedAssociationServer:
    """Start the Storage SCP in background threads; ``server.shutdown()`` stops it."""
    handlers = StorageHandlers(config.spool_dir, on_spooled, on_ended, keep_pixels=config.keep_pixels)
    ae = build_ae(config.ae_title, list(config.allowed_calling_aets), config.timeout, config.max_associations)
    tls = listener_tls_context(config)
    server = ae.start_server((config.host, config.port), block=False,
                             evt_handlers=handlers.bindings(), ssl_context=tls)
    assert server is not None  # block=False returns the running server
    mode = "plain TCP" if config.tls is None else \
        f"TLS, client certificate {'required' if config.tls.require_client_cert else 'not required'}"
    log.info("listening as %s on %s:%d (%s; spool %s%s)", config.ae_title, *server.server_address[:2], mode,
             config.spool_dir, "" if handlers.keep_pixels else ", headers only: workers read frames over DICOMweb")
    return server
