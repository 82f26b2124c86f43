"""DICOMweb client (PS3.18): read a slide's frames with WADO-RS, store results with STOW-RS.

A worker that reads a slide over DICOMweb needs no copy of it on disk:

- :func:`open_web_slide` fetches the series' metadata once (WADO-RS Retrieve
  Series Metadata, PS3.18 10.4.1.1.2, plus the BulkDataURI values it names,
  e.g. an ICC profile), checks it like a spooled series
  (:func:`dicom_io.wsi.validate_headers`) and opens it with wsidicom's
  DICOMweb source, which then retrieves only the frames that are read
  (WADO-RS Retrieve Frames, PS3.18 10.4.1.1.3): the tissue tiles of the graded
  level(s) and the thumbnail level.
- :class:`StowSession` stores one Part 10 file per request (STOW-RS Store
  Instances, PS3.18 10.5) under the study it belongs to, and tells stored,
  refused (a Failure the server will repeat) and not-now (server down,
  credentials refused) apart for the outbox (:mod:`dicom_io.sender`).

Authentication is HTTP basic or a bearer token (PS3.18 8.2.1 leaves it to HTTP);
HTTPS servers are verified against ``ca_file`` (the system trust store when
unset). Secrets never appear in messages: URLs are shown without user info and
errors name the HTTP status only. Every response body is counted
(:class:`TransferCount`), so a job reports the bytes it fetched.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import UID, VLWholeSlideMicroscopyImageStorage
from requests.adapters import HTTPAdapter
from wsidicom import WsiDicom
from wsidicom.web import WsiDicomWebClient

from dicom_io.errors import SlideError, SourceError
from dicom_io.wsi import _READ_SETTINGS, Slide, validate_headers

log = logging.getLogger(__name__)

#: HTTP statuses that mean "these credentials are not accepted here" (RFC 9110 15.5.2, 15.5.4).
AUTH_STATUSES = {401, 403}


@dataclass(frozen=True)
class DicomWebServer:
    """A DICOMweb origin server (its service root URL, PS3.18 8.2) and how to authenticate to it."""

    url: str
    username: str = ""
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)
    ca_file: Path | None = None
    timeout: float = 60.0

    @property
    def shown(self) -> str:
        """The URL without user info or query, for messages and logs."""
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="")).rstrip("/")


class DicomWebError(SourceError):
    """The DICOMweb server could not be used now (unreachable, server error); one line, no secrets."""


class DicomWebAuthError(DicomWebError):
    """The server refused our credentials, its TLS certificate is not trusted, or the CA file is missing: a
    setting to fix."""


def describe(exc: requests.RequestException, server: DicomWebServer, doing: str) -> DicomWebError:
    """One line for a failed request, never naming credentials (requests' messages may carry full URLs)."""
    response = getattr(exc, "response", None)
    if response is not None and response.status_code in AUTH_STATUSES:
        return DicomWebAuthError(f"DICOMweb at {server.shown} refused our credentials "
                                 f"(HTTP {response.status_code} {response.reason}) while {doing}")
    if isinstance(exc, requests.exceptions.SSLError):
        return DicomWebAuthError(f"TLS certificate of DICOMweb at {server.shown} not trusted or handshake failed "
                                 f"while {doing} (check dicomweb_ca_file)")
    if response is not None:
        return DicomWebError(f"DICOMweb at {server.shown} answered HTTP {response.status_code} {response.reason} "
                             f"while {doing}")
    return DicomWebError(f"DICOMweb at {server.shown} unreachable while {doing} ({type(exc).__name__})")


class TransferCount:
    """Bytes of HTTP response bodies and responses received through a session (thread-safe)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.responses = 0
        self._lock = threading.Lock()

    def hook(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        """A requests response hook: count the body as it is read, streamed or not."""
        with self._lock:
            self.responses += 1
        read = response.iter_content

        def counted(*a: Any, **k: Any) -> Iterator[bytes]:
            for chunk in read(*a, **k):
                with self._lock:
                    self.bytes += len(chunk)
                yield chunk

        response.iter_content = counted  # type: ignore[method-assign]  # Response.content reads through it too

    def stats(self) -> dict[str, float]:
        """For a job's stats: ``bytes_fetched`` (response bodies) and ``http_requests``."""
        return {"bytes_fetched": self.bytes, "http_requests": self.responses}


class _ServerAdapter(HTTPAdapter):
    """Gives every request our timeout (dicomweb-client sets none) and, when set, our CA file.

    The CA is applied here because requests lets ``REQUESTS_CA_BUNDLE`` or
    ``CURL_CA_BUNDLE`` in the environment override a session's ``verify``.
    """

    def __init__(self, timeout: float, ca_file: Path | None) -> None:
        super().__init__()
        self.timeout = timeout
        self.ca_file = ca_file

    def send(self, request, **kwargs):  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        if self.ca_file is not None:
            kwargs["verify"] = str(self.ca_file)
        return super().send(request, **kwargs)


def session(server: DicomWebServer, count: TransferCount | None = None) -> requests.Session:
    """A requests session for ``server``: its credentials, CA file, timeout, and ``count`` of what it fetches."""
    if server.ca_file is not None and not Path(server.ca_file).is_file():
        raise DicomWebAuthError(f"dicomweb_ca_file {server.ca_file} not found")
    s = requests.Session()
    if server.token:
        s.headers["Authorization"] = f"Bearer {server.token}"
    elif server.username:
        s.auth = requests.auth.HTTPBasicAuth(server.username, server.password)
    adapter = _ServerAdapter(server.timeout, server.ca_file)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    if count is not None:
        s.hooks["response"].append(count.hook)
    return s


def check_access(server: DicomWebServer) -> None:
    """One QIDO-RS query (PS3.18 10.6) for at most one study: raises :class:`DicomWebError` if it fails."""
    with session(server) as s:
        try:
            s.get(f"{server.url.rstrip('/')}/studies", params={"limit": "1"},
                  headers={"Accept": "application/dicom+json"}).raise_for_status()
        except requests.RequestException as exc:
            raise describe(exc, server, "checking access") from None


class _SeriesClient(WsiDicomWebClient):
    """wsidicom's DICOMweb client limited to the instances of one job, with their metadata fetched once.

    wsidicom would otherwise search the study (QIDO-RS), fetch each instance's
    metadata again and probe transfer syntaxes by retrieving a frame in each.
    """

    def __init__(self, client: DICOMwebClient, server: DicomWebServer, headers: Mapping[str, Dataset]) -> None:
        super().__init__(client)
        self._server = server
        self._headers = headers

    def get_wsi_instances(self, study_uid: UID, series_uids: Iterable[UID]):
        return ((UID(ds.SeriesInstanceUID), UID(sop), {ds.file_meta.TransferSyntaxUID})
                for sop, ds in self._headers.items())

    def get_annotation_instances(self, study_uid: UID, series_uids: Iterable[UID]):
        return iter(())

    def get_instance(self, study_uid: UID, series_uid: UID, instance_uid: UID) -> Dataset:
        return self._headers[str(instance_uid)]

    def get_frames(self, study_uid: UID, series_uid: UID, instance_uid: UID, frame_indices: list[int],
                   transfer_syntax: UID) -> Iterator[bytes]:
        try:
            yield from super().get_frames(study_uid, series_uid, instance_uid, frame_indices, transfer_syntax)
        except requests.RequestException as exc:
            raise describe(exc, self._server, f"reading frames of instance {instance_uid}") from None


def series_metadata(client: DICOMwebClient, server: DicomWebServer, study_uid: str, series_uid: str) -> list[Dataset]:
    """WADO-RS metadata of every instance of a series, BulkDataURI values (e.g. ICC profiles) retrieved.

    A BulkDataURI is fetched from our server's scheme and host whatever host it
    names: servers build it from the request's Host header, which proxies and
    dicomweb-client (it drops the port) change.
    """
    base = urlsplit(server.url)

    def bulk(tag: str, vr: str, uri: str) -> bytes:
        at = urlunsplit(urlsplit(uri)._replace(scheme=base.scheme, netloc=base.netloc))
        return b"".join(client.retrieve_bulkdata(at, media_types=("application/octet-stream",)))

    try:
        found = client.retrieve_series_metadata(study_uid, series_uid)
        return [Dataset.from_json(item, bulk_data_uri_handler=bulk) for item in found]
    except requests.RequestException as exc:
        if exc.response is not None and exc.response.status_code == 404:
            return []
        raise describe(exc, server, f"reading the metadata of series {series_uid}") from None


def open_web_slide(server: DicomWebServer, study_uid: str, series_uid: str, instances: Mapping[str, str],
                   count: TransferCount) -> Slide:
    """Open the VL WSM instances ``instances`` (SOP Instance UID -> Transfer Syntax UID) of a series over DICOMweb.

    ``instances`` are those the listener received, so the slide scored is exactly
    the one its job was claimed for; frames are requested in the transfer syntax
    each was received in (no transcoding). An instance the server does not hold
    (yet) raises :class:`DicomWebError` (retried); metadata the reader refuses
    raises :class:`SlideError` like a spooled series would.
    """
    client = DICOMwebClient(server.url.rstrip("/"), session=session(server, count))
    # dicomweb-client retries a failed request for about 30 s (5 attempts); a few seconds ride out a PACS
    # restart, and longer outages are the job's retries' business (with backoff, then parked).
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)
    wanted = dict(instances)
    headers: dict[str, Dataset] = {}
    for ds in series_metadata(client, server, study_uid, series_uid):
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop in wanted:
            if ds.get("SOPClassUID") != VLWholeSlideMicroscopyImageStorage or ds.get("StudyInstanceUID") != study_uid:
                raise SlideError(f"instance {sop} at {server.shown} is not a VL WSM instance of study {study_uid}")
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = UID(wanted[sop])
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, UID(sop)
            headers[sop] = ds
    if len(headers) < len(wanted):
        raise DicomWebError(f"DICOMweb at {server.shown} holds {len(headers)} of the {len(wanted)} instances of "
                            f"series {series_uid} that were received")
    named = {Path(sop): ds for sop, ds in headers.items()}
    changed = validate_headers(named)
    if changed:
        log.info("series %s: defaults given to %d instance(s) read over DICOMweb", series_uid, len(changed))
    try:
        wsi = WsiDicom.open_web(_SeriesClient(client, server, headers), study_uid, series_uid,
                                settings=_READ_SETTINGS)
    except SourceError:
        raise
    except Exception as exc:  # wsidicom raises several unrelated types for bad pyramids
        raise SlideError(f"series {series_uid} at {server.shown}: wsidicom could not open the slide "
                         f"({type(exc).__name__}: {exc})") from exc
    try:
        return Slide(wsi, named)
    except BaseException as exc:
        wsi.close()
        if isinstance(exc, (SlideError, SourceError, MemoryError)) or not isinstance(exc, Exception):
            raise
        raise SlideError(f"series {series_uid}: malformed pyramid metadata ({type(exc).__name__}: {exc})") from exc


#: Outcomes of one STOW-RS request (besides a refusal reason): stored, or try again later.
STORED, LATER = "stored", "later"


class StowSession:
    """STOW-RS (PS3.18 10.5) of Part 10 files, one request per instance, to the study each belongs to.

    :meth:`store` returns :data:`STORED` (200, or 202 without this instance
    among the failures), :data:`LATER` (server unreachable, 5xx, credentials
    refused: ``broken`` then says why, and the caller stops for this round),
    or a refusal reason (a 4xx or a Failed SOP, PS3.18 10.5.3: sending the same
    bytes again would be refused again).
    """

    def __init__(self, server: DicomWebServer) -> None:
        self.server = server
        self.broken = ""
        self._session = session(server)

    def store(self, study_uid: str, sop_uid: str, part10: bytes) -> str:
        boundary = uuid.uuid4().hex
        body = b"".join((f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), part10,
                         f"\r\n--{boundary}--\r\n".encode()))
        headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                   "Accept": "application/dicom+json"}
        try:
            response = self._session.post(f"{self.server.url.rstrip('/')}/studies/{study_uid}", data=body,
                                          headers=headers)
        except requests.RequestException as exc:
            self.broken = str(describe(exc, self.server, "storing results"))
            return LATER
        status = response.status_code
        if status == 200:
            return STORED
        if status == 202 and sop_uid not in _failed_sops(response):
            return STORED
        if status in AUTH_STATUSES or status == 404 or status in (408, 429) or status >= 500:
            self.broken = str(describe(requests.HTTPError(response=response), self.server, "storing results"))
            return LATER
        reason = _failed_sops(response).get(sop_uid, "")
        return f"STOW-RS answered HTTP {status} {response.reason}" + (f" ({reason})" if reason else "")

    def close(self) -> None:
        self._session.close()


def _failed_sops(response: requests.Response) -> dict[str, str]:
    """SOP Instance UID -> Failure Reason of the response's Failed SOP Sequence (0008,1198), PS3.18 10.5.3."""
    try:
        ds = Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):  # no body, or not DICOM JSON: nothing to read
        return {}
    return {str(item.get("ReferencedSOPInstanceUID", "")): f"Failure Reason 0x{int(item.get('FailureReason', 0)):04X}"
            for item in ds.get("FailedSOPSequence", [])}
