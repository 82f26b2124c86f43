"""Workers without shared storage: slides read from Orthanc over DICOMweb, results stored by STOW-RS (issue 15).

Real Orthanc with the Debian DICOMweb plugin (HTTP basic authentication on),
redis-server and Celery workers. Orthanc routes each stable HER2 series to the
listener (deploy/orthanc/route_her2.lua); with ``slide_source = "dicomweb"`` the
listener keeps only the instances' headers, and each worker, in a working
directory of its own, reads the frames it grades over WADO-RS and stores its
results by STOW-RS into the source study.

The slide is rendered at 0.5 um/px (three levels: 0.5, 1 and 2 um/px), so the
CNN's level (1 um/px) and the thumbnail's (2 um/px, the coarsest) are not the
largest one.
The membrane grader is off here: on a slide this small its 0.5 um/px fields
would cover all the tissue of the largest level, which says nothing about what
a worker fetches from a real 40x slide.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from certs import TestCA
from pacs_stack import free_port, her2, tiny_wsi, wait_until
from test_faults import copy_slide, header, wait_done
from test_routing import check_results, results_in_study, wait_for_results

from dicom_io.dicomweb import (
    DicomWebAuthError,
    DicomWebError,
    DicomWebServer,
    TransferCount,
    check_access,
    open_web_slide,
)
from dicom_io.errors import SlideError
from dicom_io.sender import Outbox, StowDestination
from dicom_io.uids import result_uids
from her2_analysis.options import BUNDLED_MODEL
from her2_core.model_card import load_model_card
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec

pytestmark = pytest.mark.integration

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "her2", "dicomweb-test-password"
FETCHED = re.compile(r"series (\S+): (\d+) bytes fetched over DICOMweb in (\d+) requests")
#: Metadata of the three instances (with their ICC profiles) is about 40 kB; allow for it and multipart framing.
METADATA_ALLOWANCE = 128 * 1024


def dicomweb_config(**extra) -> dict:
    if not PLUGIN.exists():
        pytest.fail(f"{PLUGIN} missing: install orthanc-dicomweb with `bash deploy/install.sh --services`")
    return {"Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **extra}


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[list[Path], dict]:
    files, truth = write_synthetic_slide(SlideSpec(seed=71, width_um=1024, height_um=1024, class_mix={"3+": 1.0},
                                                   patient_id="WEB"), tmp_path_factory.mktemp("slide"), mpp=0.5)
    return files, json.loads(truth.read_text())


@pytest.fixture
def web_stack(make_stack):
    return make_stack(http_user=(USER, PASSWORD), **dicomweb_config())


def private(stack, name: str, password: str = PASSWORD, **extra: str) -> dict[str, str]:
    """Settings of one process with its own spool, outbox and state under ``<root>/<name>``, reading DICOMweb."""
    home = stack.root / name
    return {"HER2_SPOOL_DIR": str(home / "spool"), "HER2_OUTBOX_DIR": str(home / "outbox"),
            "HER2_STATE_DIR": str(home / "state"), "HER2_SLIDE_SOURCE": "dicomweb", "HER2_RESULT_DELIVERY": "stow",
            "HER2_DICOMWEB_URL": f"{stack.orthanc.url}/dicom-web", "HER2_DICOMWEB_USERNAME": USER,
            "HER2_DICOMWEB_PASSWORD": password, "HER2_MEMBRANE_GRADER": "false", **extra}


def fetched(stack) -> dict[str, list[tuple[str, int]]]:
    """Per source series: (worker log, bytes fetched) of every time a worker read it."""
    found: dict[str, list[tuple[str, int]]] = {}
    for server in stack.servers:
        for series, count, _ in FETCHED.findall(server.log()):
            found.setdefault(series, []).append((server.name, int(count)))
    return found


def assert_results_once(stack, files: list[Path], truth: dict) -> None:
    """The study holds the source slide and exactly one SR and one SEG, with the UIDs derived for it."""
    source = header(files)
    results = results_in_study(stack.orthanc, source.StudyInstanceUID)
    check_results(stack.orthanc, results, files, truth)
    card = load_model_card(Path(os.environ.get("HER2_MODEL_PATH", BUNDLED_MODEL)))
    sources = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    uids = result_uids(source.SeriesInstanceUID, sources, card.name, card.version)
    instances = {i["MainDicomTags"]["SOPInstanceUID"]
                 for i in stack.orthanc.find("Instance", {"StudyInstanceUID": source.StudyInstanceUID})}
    assert instances == {uids.sr, uids.seg, *sources}


def test_two_workers_without_shared_storage_score_slides_read_over_dicomweb(web_stack, slide, tmp_path):
    stack = web_stack
    slides = {p: copy_slide(slide[0], tmp_path / p, p) for p in ("WEB-A", "WEB-B")}
    stack.start_listener(**private(stack, "listener"))
    for i in (1, 2):
        stack.start_worker(index=i, **private(stack, f"worker-{i}"))
    for files in slides.values():
        stack.orthanc.upload(files)
    for files in slides.values():
        wait_for_results(stack, files)
        wait_done(stack, header(files).SeriesInstanceUID)
        assert_results_once(stack, files, slide[1])

    sizes = {p.name: p.stat().st_size for p in slide[0]}  # level-0, -1, -2: 0.5, 1, 2 um/px
    reads = fetched(stack)
    assert sorted(reads) == sorted(header(files).SeriesInstanceUID for files in slides.values())
    assert all(len(r) == 1 for r in reads.values())  # each slide read once, by one worker
    assert {name for ((name, _),) in reads.values()} == {"her2 worker-1", "her2 worker-2"}
    for ((_, count),) in reads.values():
        # Only the CNN's level (1 um/px) and the thumbnail's (2 um/px) frames, never the 0.5 um/px level's.
        assert sizes["level-2.dcm"] < count <= sizes["level-1.dcm"] + sizes["level-2.dcm"] + METADATA_ALLOWANCE
        assert count < sum(sizes.values()) / 3  # a 40x slide's CNN level is 1/16 of its base: far less there
    print(f"bytes fetched per slide: {[c for ((_, c),) in reads.values()]} of {sum(sizes.values())} "
          f"({', '.join(f'{k} {v}' for k, v in sizes.items())})")

    # No process holds pixel data: the listener kept headers, the workers nothing once results were stored.
    spooled = list((stack.root / "listener" / "spool").rglob("*.dcm"))
    assert len(spooled) == sum(len(files) for files in slides.values())
    assert all("PixelData" not in pydicom.dcmread(p) and p.stat().st_size < 64 * 1024 for p in spooled)
    for i in (1, 2):
        assert list((stack.root / f"worker-{i}").rglob("*.dcm")) == []
    logs = stack.logs()
    assert PASSWORD not in logs and "WEB-A" not in logs and "WEB-B" not in logs


def test_stow_delivery_survives_orthanc_stopped_and_restarted(web_stack, slide, tmp_path):
    stack = web_stack
    files = copy_slide(slide[0], tmp_path / "slide", "WEB-DOWN")
    series = header(files).SeriesInstanceUID
    outbox = stack.root / "worker" / "outbox" / series
    stack.start_listener(**private(stack, "listener"))
    worker = stack.start_worker(**private(stack, "worker", HER2_BATCH_SIZE="1"))
    stack.orthanc.upload(files)

    def all_tiles_read() -> bool:
        job = stack.job(series)
        if job.get("state") in ("done", "delivering", "failed", "parked"):
            pytest.fail(f"job went {job['state']} before the PACS could be stopped: {job.get('reason')}")
        done = re.fullmatch(r"scoring: (\d+) of (\d+) tissue tiles read", job.get("reason", ""))
        return bool(done) and done[1] == done[2]

    wait_until(all_tiles_read, 180, "the worker to have read every tile", interval=0.02)
    worker.proc.send_signal(signal.SIGSTOP)  # hold it before delivery while the PACS goes away
    stack.orthanc.stop()
    worker.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: stack.job_state(series) == "delivering" and len(list(outbox.glob("*.dcm"))) == 2, 60,
               "both results waiting in the worker's outbox")
    kept = tmp_path / "kept"
    shutil.copytree(outbox, kept, ignore=shutil.ignore_patterns(".lock"))
    wait_until(lambda: "unreachable while storing results" in worker.log(), 30, "a failed STOW-RS retry")

    stack.orthanc.start()
    wait_done(stack, series)
    assert_results_once(stack, files, slide[1])
    assert list(outbox.glob("*.dcm")) == []

    # The same results sent again (a crash between Orthanc's answer and the unlink): stored again, not duplicated.
    outbox.mkdir()  # removed once emptied
    for path in kept.glob("*.dcm"):
        shutil.copy(path, outbox / path.name)
    wait_until(lambda: not list(outbox.glob("*.dcm")), 30, "the re-sent results to be delivered")
    assert_results_once(stack, files, slide[1])
    assert stack.orthanc.get("/statistics")["CountInstances"] == len(files) + 2
    assert PASSWORD not in stack.logs()


def test_wrong_dicomweb_password_gives_one_line(web_stack, tmp_path):
    stack = web_stack
    url, wrong = f"{stack.orthanc.url}/dicom-web", "not-the-password"
    run = subprocess.run(her2("worker"), env=stack.env(**private(stack, "worker", password=wrong)),
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (f"her2: error: DICOMweb at {url} refused our credentials "
                                                   "(HTTP 401 Unauthorized) while checking access")
    assert "Traceback" not in run.stderr + run.stdout and wrong not in run.stderr + run.stdout

    # STOW-RS with the wrong password: the outbox keeps the file and says why in one line; the right one delivers.
    ds = tiny_wsi("WEB-PW")
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(ds.SeriesInstanceUID, [ds])
    refused = outbox.flush(StowDestination(DicomWebServer(url, USER, wrong)))
    assert refused.unreachable == (f"DICOMweb at {url} refused our credentials (HTTP 401 Unauthorized) while "
                                   "storing results")
    assert refused.waiting == {ds.SeriesInstanceUID: 1} and refused.delivered == {}
    delivered = outbox.flush(StowDestination(DicomWebServer(url, USER, PASSWORD)))
    assert delivered.delivered == {ds.SeriesInstanceUID: 1} and outbox.pending() == {}
    stored = stack.orthanc.find("Instance", {"SOPInstanceUID": ds.SOPInstanceUID})
    assert [i["MainDicomTags"]["SOPInstanceUID"] for i in stored] == [ds.SOPInstanceUID]


class _QidoAuth(http.server.BaseHTTPRequestHandler):
    """Answers QIDO-RS with an empty result for USER/PASSWORD, 401 otherwise."""

    def do_GET(self) -> None:
        good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        ok = self.headers.get("Authorization") == good
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args: object) -> None:
        pass


def test_dicomweb_over_https_trusts_only_the_configured_ca(tmp_path):
    """HTTPS with a CA file. Debian's Orthanc 1.10.1 crashes on its own HTTPS (SslEnabled), so the server here is
    Python's HTTP server behind a real TLS handshake with a certificate from a test CA."""
    ca = TestCA(tmp_path / "tls")
    pair = ca.issue("dicomweb")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _QidoAuth)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    try:
        check_access(DicomWebServer(url, USER, PASSWORD, ca_file=ca.bundle))  # trusted, accepted: no error
        with pytest.raises(DicomWebAuthError) as untrusted:
            check_access(DicomWebServer(url, USER, PASSWORD))  # the system store does not know the test CA
        assert str(untrusted.value) == (f"TLS certificate of DICOMweb at {url} not trusted or handshake failed "
                                        "while checking access (check dicomweb_ca_file)")
        with pytest.raises(DicomWebAuthError, match=r"refused our credentials \(HTTP 401 Unauthorized\)"):
            check_access(DicomWebServer(url, USER, "wrong", ca_file=ca.bundle))
        with pytest.raises(DicomWebAuthError, match=r"^dicomweb_ca_file .*missing.pem not found$"):
            check_access(DicomWebServer(url, USER, PASSWORD, ca_file=tmp_path / "missing.pem"))
    finally:
        server.shutdown()


def test_pacs_gone_mid_slide_is_a_fault_to_retry_not_a_corrupt_tile(web_stack, slide, tmp_path):
    stack = web_stack
    files = copy_slide(slide[0], tmp_path / "slide", "WEB-GONE")
    stack.orthanc.upload(files)
    source = header(files)
    instances = {(h := pydicom.dcmread(f, stop_before_pixels=True)).SOPInstanceUID: h.file_meta.TransferSyntaxUID
                 for f in files}
    count = TransferCount()
    url = f"{stack.orthanc.url}/dicom-web"
    with open_web_slide(DicomWebServer(url, USER, PASSWORD), source.StudyInstanceUID, source.SeriesInstanceUID,
                        instances, count) as opened:
        level = opened.level_for_mpp(1.0)
        read = opened.tile_reader(level, 512)
        assert read(0, 0).shape == (512, 512, 3) and count.bytes > 0
        stack.orthanc.stop()
        with pytest.raises(DicomWebError, match=rf"^DICOMweb at {re.escape(url)} unreachable while reading frames"):
            read(0, 1)
        with pytest.raises(DicomWebError):
            opened.thumbnail(8.0)
    assert not isinstance(DicomWebError("x"), SlideError)  # run_job lets it propagate: retried, then parked
