"""Look at a scored slide in dicom-microscopy-viewer: its page (page/index.html) and a proxy of Orthanc's DICOMweb.

``her2 view SLIDE_DIR RESULTS_DIR`` (:func:`view`) starts a private Orthanc (Debian ``orthanc`` with
``orthanc-dicomweb``, loopback only, storage in a temporary folder), stores the slide and its
results in it, and serves her2_viewer/page/index.html with :class:`ViewerServer`; the browser test
(tests/integration/test_viewer.py) uses the same server. Research use only.

Page and DICOMweb share one origin (the page at /, Orthanc's DICOMweb proxied at /dicom-web):
Orthanc sends no CORS headers, so a page served from elsewhere cannot read its DICOMweb answers; and
its metadata names BulkData by absolute URLs with Orthanc's own host and port, which this proxy
rewrites to its own origin. Orthanc 1.10's DICOMweb plugin also writes a binary OD / OF / OL value
nested in a sequence (the point coordinates and measurements of a Microscopy Bulk Simple Annotations
object) as a JSON "Value" holding only its first number; the proxy replaces such values with a
BulkDataURI to Orthanc's own ``/bulk/<tag path>`` route (sequence items counted from 1, as in the
URIs Orthanc writes itself), which returns them whole. :class:`ViewerServer` keeps every proxied
request's path and status in ``requests``.
"""

from __future__ import annotations

import json
import mimetypes
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pydicom

DICOMWEB = "/dicom-web"
#: The page and the npm packages it loads: package data, so an installed wheel serves it as a checkout does.
PAGE_DIR = Path(__file__).resolve().parent / "page"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
#: Binary value representations that PS3.18 F.2.7 sends as BulkDataURI or InlineBinary, never as "Value".
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}


def bulk_references(metadata: list[dict], base_url: str) -> list[dict]:
    """``metadata`` (DICOM JSON of instances) with every binary "Value" replaced by a BulkDataURI of its tag path."""
    def walk(element: dict, instance_url: str, path: str) -> None:
        for tag, attribute in element.items():
            here = f"{path}/{tag}" if path else tag
            if attribute.get("vr") in BINARY_VRS and "Value" in attribute:
                attribute.pop("Value")
                attribute["BulkDataURI"] = f"{instance_url}/bulk/{here}"
            elif attribute.get("vr") == "SQ":
                for number, item in enumerate(attribute.get("Value", []), start=1):  # Orthanc counts items from 1
                    walk(item, instance_url, f"{here}/{number}")

    for instance in metadata:
        uids = [instance.get(tag, {}).get("Value", [""])[0] for tag in ("0020000D", "0020000E", "00080018")]
        walk(instance, f"{base_url}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}", "")
    return metadata


class ViewerServer:
    """Serve ``root`` (viewer/) and proxy ``/dicom-web`` to Orthanc on ``orthanc_http_port``, on 127.0.0.1."""

    def __init__(self, root: Path, orthanc_http_port: int, port: int = 0) -> None:
        self.root = root.resolve()
        self.upstream = f"http://127.0.0.1:{orthanc_http_port}"
        self.requests: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((path, status))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet: the test reads server.requests
                pass

            def do_GET(self) -> None:
                if self.path.startswith(DICOMWEB + "/"):
                    self._proxy()
                else:
                    self._file()

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _proxy(self) -> None:
                request = urllib.request.Request(server.upstream + self.path,
                                                 headers={"Accept": self.headers.get("Accept", "*/*")})
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        status, body = response.status, response.read()
                        content_type = response.headers.get("Content-Type", "application/octet-stream")
                except urllib.error.HTTPError as exc:
                    status, body, content_type = exc.code, exc.read(), exc.headers.get("Content-Type", "text/plain")
                if "json" in content_type:  # BulkDataURI values name Orthanc's own origin
                    body = body.replace(server.upstream.encode() + DICOMWEB.encode(),
                                        server.url.encode() + DICOMWEB.encode())
                    if status == 200 and self.path.split("?", 1)[0].endswith("/metadata"):
                        body = json.dumps(bulk_references(json.loads(body), server.url + DICOMWEB)).encode()
                server._record(self.path, status)
                self._send(status, body, content_type)

            def _file(self) -> None:
                relative = self.path.split("?", 1)[0].lstrip("/") or "index.html"
                path = (server.root / relative).resolve()
                if not path.is_relative_to(server.root) or not path.is_file():
                    self._send(404, b"not found", "text/plain")
                    return
                content_type = {".wasm": "application/wasm", ".mjs": "text/javascript",
                                ".js": "text/javascript"}.get(path.suffix) or \
                    mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                self._send(200, path.read_bytes(), content_type)

        return Handler


class ViewError(RuntimeError):
    """The viewer cannot be started (missing Orthanc, plugin, npm packages or input files)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_orthanc(storage: Path) -> Iterator[int]:
    """A loopback-only Orthanc with DICOMweb, storing in ``storage``; yields its HTTP port, stops it after."""
    binary = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if binary is None or not DICOMWEB_PLUGIN.exists():
        raise ViewError("Orthanc with its DICOMweb plugin is needed: `bash deploy/install.sh --services` "
                        "(Debian orthanc, orthanc-dicomweb)")
    port = _free_port()
    config = storage / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "her2-view", "HttpPort": port, "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": DICOMWEB + "/"},
    }))
    with open(storage / "orthanc.log", "wb") as log:
        process = subprocess.Popen([binary, str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/system", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise ViewError(f"Orthanc did not start; its log: {storage / 'orthanc.log'}") from None
                time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def view_url(server_url: str, datasets: Sequence[pydicom.Dataset]) -> str:
    """The page's address showing the slide of ``datasets`` with the SEG and ANN among them."""
    slides = [ds for ds in datasets if ds.Modality == "SM"]
    if not slides:
        raise ViewError("no VL Whole Slide Microscopy instance (Modality SM) among the files")
    query = {"study": slides[0].StudyInstanceUID, "series": slides[0].SeriesInstanceUID}
    for ds in datasets:
        if ds.Modality in ("SEG", "ANN") and ds.StudyInstanceUID == query["study"]:
            query[ds.Modality.lower()] = ds.SeriesInstanceUID
    return f"{server_url}/index.html?{urllib.parse.urlencode(query)}&cells=1"


def view(paths: Sequence[Path], port: int = 0, ready: Callable[[str], object] = print) -> None:
    """Serve the slide and results under ``paths`` (folders or files of DICOM) in the viewer until interrupted.

    ``ready(url)`` is called with the page's address once everything is stored and served.
    """
    if not (PAGE_DIR / "node_modules" / "dicom-microscopy-viewer").is_dir():
        raise ViewError(f"the viewer page's JavaScript libraries are missing from {PAGE_DIR}: install from a checkout "
                        "in which `npm ci` ran in her2_viewer/page (deploy/install.sh --services does both)")
    files = [f for p in paths for f in (sorted(p.rglob("*.dcm")) if p.is_dir() else [p])]
    if not files:
        raise ViewError(f"no .dcm files under {', '.join(map(str, paths))}")
    datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    with tempfile.TemporaryDirectory(prefix="her2-view-") as storage, private_orthanc(Path(storage)) as orthanc_port:
        for f in files:
            request = urllib.request.Request(f"http://127.0.0.1:{orthanc_port}/instances", data=f.read_bytes(),
                                             method="POST")
            urllib.request.urlopen(request, timeout=60).close()
        with ViewerServer(PAGE_DIR, orthanc_port, port) as server, _stopped_by_signals():
            ready(view_url(server.url, datasets))
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT (Ctrl-C) and SIGTERM raise KeyboardInterrupt in the main thread while the block runs.

    Set explicitly: a process started in the background by a non-interactive shell (``cmd &``, nohup, some
    CI runners) inherits SIGINT *ignored*, and Python then installs no Ctrl-C handler, so the viewer would
    never stop; a service manager stops with SIGTERM.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

