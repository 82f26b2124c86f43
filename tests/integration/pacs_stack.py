"""Real servers for the integration tests: Orthanc, redis-server, and our own processes.

Everything binds to 127.0.0.1 on free ports and lives in a pytest tmp dir.
A missing binary is a test failure, not a skip: CI installs orthanc,
redis-server and dcmtk with ``deploy/install.sh --services``.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, VLWholeSlideMicroscopyImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_io.listener import TRANSFER_SYNTAXES

REPO = Path(__file__).resolve().parents[2]
ROUTE_LUA = REPO / "deploy" / "orthanc" / "route_her2.lua"
LISTENER_AET = "HER2WORKER"
ORTHANC_AET = "ORTHANC"
TEST_AET = "TESTSCU"


def binary(name: str) -> str:
    """Path of a required server binary; fails the test (never skips) when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if not found:
        pytest.fail(f"{name} not found: install the services with `bash deploy/install.sh --services`")
    return found


#: Ports already handed out in this process: the kernel may offer a just-closed port again, and two of one
#: server's ports (Orthanc's DICOM and HTTP) once came out equal, so Orthanc could not bind its second one.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback TCP port that is free now and was not handed out before in this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _die_with_parent() -> None:
    """Linux PR_SET_PDEATHSIG: a server gets SIGTERM if the test process dies, so none is left behind."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Server:
    """A subprocess with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO) -> None:
        self.name, self.argv, self.log_path, self.env, self.cwd = name, argv, log_path, env, cwd
        self.proc: subprocess.Popen | None = None
        #: Port of our processes' /metrics and /health endpoint (set by the stack that starts them).
        self.metrics_port: int | None = None

    def start(self) -> Server:
        with open(self.log_path, "ab") as log:
            # preexec_fn runs before exec in the child; the servers are started from the test's main thread.
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                                         start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Redis(Server):
    """redis-server on loopback; ``appendonly`` keeps every acknowledged write across a restart, and
    ``password`` makes it require AUTH (``--requirepass``), both as production needs."""

    def __init__(self, root: Path, appendonly: bool = False, password: str = "") -> None:
        self.port, self.password = free_port(), password
        root.mkdir(parents=True, exist_ok=True)
        auth = ["--requirepass", password] if password else []
        super().__init__("redis-server", [binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "yes" if appendonly else "no",
                                          "--dir", str(root), *auth],
                         root / "redis.log")

    def url(self, db: int, password: str | None = None) -> str:
        """URL of database ``db``, with this server's password unless another one is given."""
        secret = self.password if password is None else password
        return f"redis://{f':{secret}@' if secret else ''}127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0):
        import redis as redis_client

        return redis_client.Redis.from_url(self.url(db), decode_responses=True)

    def start(self) -> Redis:
        super().start()
        wait_until(lambda: port_open(self.port), 20, "redis-server to accept connections")
        return self


class Orthanc(Server):
    """Orthanc with a generated config: our listener as modality ``her2``, HER2 routing Lua, StableAge 2 s.

    ``listener_tls`` makes Orthanc route to the listener over DICOM TLS; ``extra_config`` adds or
    replaces top-level options (e.g. ``DicomTlsEnabled`` and the certificate files). ``http_user``
    (name, password) turns on HTTP basic authentication, which our REST calls then use; with
    ``https_ca`` (the CA of ``SslCertificate``) they go over HTTPS.
    """

    def __init__(self, root: Path, listener_port: int, stable_age: int = 2, listener_tls: bool = False,
                 http_user: tuple[str, str] | None = None, https_ca: Path | None = None, **extra_config) -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        self.http_user, self.https_ca = http_user, https_ca
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "her2-test-pacs",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [],
            "StableAge": stable_age,
            "LuaScripts": [str(ROUTE_LUA)],
            "DicomModalities": {"her2": {"AET": LISTENER_AET, "Host": "127.0.0.1", "Port": listener_port,
                                         "UseDicomTls": listener_tls}},
            "DicomScuTimeout": 30,
            **({"AuthenticationEnabled": True, "RegisteredUsers": dict([http_user])} if http_user else {}),
            **extra_config,
        }
        config_path = root / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=1))
        super().__init__("Orthanc", [binary("Orthanc"), str(config_path)], root / "orthanc.log")

    def start(self) -> Orthanc:
        super().start()
        wait_until(lambda: self._alive(), 30, "Orthanc REST API")
        wait_until(lambda: port_open(self.dicom_port), 10, "Orthanc DICOM port")
        return self

    def _alive(self) -> bool:
        self.check_alive()
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"{'https' if self.https_ca else 'http'}://127.0.0.1:{self.http_port}"

    def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method)
        if self.http_user:
            request.add_header("Authorization", "Basic " + base64.b64encode(":".join(self.http_user).encode()).decode())
        context = ssl.create_default_context(cafile=str(self.https_ca)) if self.https_ca else None
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return response.read()

    def get(self, path: str):
        return json.loads(self._request("GET", path))

    def post(self, path: str, body: bytes | str):
        data = body.encode() if isinstance(body, str) else body
        return json.loads(self._request("POST", path, data) or b"null")

    def upload(self, files: list[Path]) -> list[str]:
        """Store files through the REST API; returns the Orthanc instance IDs."""
        return [self.post("/instances", p.read_bytes())["ID"] for p in files]

    def find(self, level: str, query: dict[str, str]) -> list[dict]:
        return self.post("/tools/find", json.dumps({"Level": level, "Query": query, "Expand": True}))

    def instance(self, orthanc_id: str) -> Dataset:
        import io

        return pydicom.dcmread(io.BytesIO(self._request("GET", f"/instances/{orthanc_id}/file")))


def service_env(redis: Redis, spool_root: Path, listener_port: int, destination_port: int, **extra: str) -> dict:
    """Environment for `her2 listen` / `her2 worker`: HER2_* settings pointing at the test servers."""
    # The model is the only setting taken from the caller (HER2_MODEL_PATH), so a test run can use another one.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HER2_") or k == "HER2_MODEL_PATH"}
    env.update({
        "HER2_LISTEN_PORT": str(listener_port),
        "HER2_AE_TITLE": LISTENER_AET,
        "HER2_ALLOWED_CALLING_AETS": json.dumps([ORTHANC_AET, TEST_AET, "STORESCU", "ECHOSCU"]),
        "HER2_SPOOL_DIR": str(spool_root / "spool"),
        "HER2_OUTBOX_DIR": str(spool_root / "outbox"),
        "HER2_STATE_DIR": str(spool_root / "state"),
        "HER2_STABLE_SECONDS": "2",
        "HER2_DESTINATION_PORT": str(destination_port),
        "HER2_DESTINATION_AET": ORTHANC_AET,
        "HER2_BROKER_URL": redis.url(0),
        "HER2_RESULT_BACKEND": redis.url(1),
        "HER2_STATE_REDIS_URL": redis.url(2),
        "HER2_OUTBOX_RETRY_SECONDS": "1",
        "HER2_DICOM_TIMEOUT_SECONDS": "10",
        "HER2_TASK_MAX_RETRIES": "2",
        "HER2_TASK_RETRY_BACKOFF_MAX": "2",
        "HER2_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def associate(port: int, calling: str = TEST_AET, contexts=(VLWholeSlideMicroscopyImageStorage, Verification),
              handlers=(), tls_args=None):
    """A pynetdicom SCU association with the listener (``tls_args`` = (SSLContext, hostname) for DICOM TLS)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for sop_class in contexts:  # one context per transfer syntax: a JPEG slide is sent as it is
        for syntax in TRANSFER_SYNTAXES if sop_class == VLWholeSlideMicroscopyImageStorage else [ExplicitVRLittleEndian]:
            ae.add_requested_context(sop_class, syntax)
    return ae.associate("127.0.0.1", port, ae_title=LISTENER_AET, evt_handlers=list(handlers), tls_args=tls_args)


def scrape(port: int) -> dict[str, float]:
    """Samples of one of our /metrics endpoints, keyed ``name`` or ``name{label="value",...}`` (labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def health(port: int) -> tuple[int, dict]:
    """HTTP status and JSON body of one of our /health endpoints."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def her2(*args: str) -> list[str]:
    return [sys.executable, "-m", "her2_cli.main", "-v", *args]


def tiny_dataset(sop_class: str, patient_id: str, study_uid: str, series_uid: str,
                 modality: str, description: str = "") -> Dataset:
    """A small valid uncompressed instance (8x8 RGB) of ``sop_class``; enough for transport tests."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName = patient_id, "TEST^PATIENT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.SeriesDescription = modality, description
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.SeriesNumber, ds.InstanceNumber = \
        "20260101", "120000", "1", "", 1, 1
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(192))
    return ds


def tiny_wsi(patient_id: str = "TINY", series_uid: str | None = None, study_uid: str | None = None) -> Dataset:
    return tiny_dataset(VLWholeSlideMicroscopyImageStorage, patient_id, study_uid or generate_uid(),
                        series_uid or generate_uid(), "SM", "HER2 IHC")


def tiny_ct(patient_id: str = "CTPAT") -> Dataset:
    return tiny_dataset(CTImageStorage, patient_id, generate_uid(), generate_uid(), "CT", "CHEST")
