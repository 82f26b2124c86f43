"""One origin for the viewer page: the files of viewer/ and a proxy of Orthanc's DICOMweb at /dicom-web.

Orthanc sends no CORS headers, so a page served from elsewhere cannot read its DICOMweb answers; and
its metadata names BulkData by absolute URLs with Orthanc's own host and port, which this proxy
rewrites to its own origin. Orthanc 1.10's DICOMweb plugin also writes a binary OD / OF / OL value
nested in a sequence (the point coordinates and measurements of a Microscopy Bulk Simple Annotations
object) as a JSON "Value" holding only its first number; the proxy replaces such values with a
BulkDataURI to Orthanc's own ``/bulk/<tag path>`` route (sequence items counted from 1, as in the
URIs Orthanc writes itself), which returns them whole. Every proxied
request's path and status is kept in :attr:`requests`.
"""

from __future__ import annotations

import json
import mimetypes
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

DICOMWEB = "/dicom-web"
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

    def __init__(self, root: Path, orthanc_http_port: int) -> None:
        self.root = root.resolve()
        self.upstream = f"http://127.0.0.1:{orthanc_http_port}"
        self.requests: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
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
