"""Security of the service against the real processes: DICOM TLS, Redis with a password, secrets in logs.

A certificate authority is made inside each test (``certs.TestCA``); a second,
unrelated CA issues the certificates that must be refused.
"""

from __future__ import annotations

import secrets
import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from certs import KeyPair, TestCA
from pacs_stack import LISTENER_AET, Redis, associate, binary, her2, tiny_dataset, tiny_wsi, wait_until
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from test_routing import check_results, synth, wait_for_results

from dicom_io.sender import Destination, Outbox
from dicom_io.tls import client_context, server_context
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec
from worker.settings import load_settings

pytestmark = pytest.mark.integration


class PKI:
    """Our CA with the listener's and an allowed caller's certificates, and a foreign CA's caller."""

    def __init__(self, root: Path) -> None:
        self.ca = TestCA(root / "ca")
        self.listener = self.ca.issue("her2 listener")
        self.caller = self.ca.issue("pacs caller")
        self.foreign_ca = TestCA(root / "foreign", "foreign CA")
        self.foreign_caller = self.foreign_ca.issue("foreign caller")

    def listener_env(self) -> dict[str, str]:
        return {"HER2_LISTEN_TLS": "true", "HER2_TLS_CERT_FILE": str(self.listener.cert),
                "HER2_TLS_KEY_FILE": str(self.listener.key), "HER2_TLS_CA_FILE": str(self.ca.bundle)}

    def tls_args(self, pair: KeyPair | None, trust: Path | None = None) -> tuple[ssl.SSLContext, str]:
        """A caller's TLS arguments: it trusts our CA (or ``trust``) and presents ``pair`` (or nothing)."""
        ctx = client_context(pair and pair.cert, pair and pair.key, trust or self.ca.bundle)
        return ctx, "127.0.0.1"


@pytest.fixture
def pki(tmp_path) -> PKI:
    return PKI(tmp_path / "pki")


def test_tls_listener_admits_only_callers_with_a_certificate_from_its_ca(stack, pki, tmp_path):
    stack.start_listener(**pki.listener_env())
    port = stack.listener_port
    files, _ = write_synthetic_slide(SlideSpec(seed=51, width_um=1024, height_um=1024, class_mix={"3+": 1.0},
                                               patient_id="TLS-1"), tmp_path / "slide")
    slide = [pydicom.dcmread(p) for p in files]

    assoc = associate(port, tls_args=pki.tls_args(pki.caller))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assert [assoc.send_c_store(ds).Status for ds in slide] == [0x0000] * len(slide)
    assoc.release()
    series_dir = stack.root / "spool" / slide[0].StudyInstanceUID / slide[0].SeriesInstanceUID
    assert sorted(p.stem for p in series_dir.glob("*.dcm")) == sorted(ds.SOPInstanceUID for ds in slide)
    wait_until(lambda: stack.job_state(slide[0].SeriesInstanceUID) == "queued", 15, "the TLS-received series queued")

    refused = {
        "plain TCP": associate(port),
        "certificate from a foreign CA": associate(port, tls_args=pki.tls_args(pki.foreign_caller)),
        "no client certificate": associate(port, tls_args=pki.tls_args(None)),
    }
    assert {what: a.is_established for what, a in refused.items()} == dict.fromkeys(refused, False)
    # One line per refused caller, with OpenSSL's reason (the port probe at start-up adds an EOF one).
    reasons = ["WRONG_VERSION_NUMBER", "CERTIFICATE_VERIFY_FAILED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"]
    wait_until(lambda: all(f"connection refused: {r}" in stack.logs() for r in reasons), 15, "refusals logged")
    assert "listening as HER2WORKER" in stack.logs() and "TLS, client certificate required" in stack.logs()
    # A caller that does not trust the listener's CA gives up on its own side.
    assert not associate(port, tls_args=pki.tls_args(pki.caller, trust=pki.foreign_ca.bundle)).is_established

    # dcmtk as a third-party TLS client: trusted certificate accepted, plain TCP refused.
    echoscu = [binary("echoscu"), "-aet", "ECHOSCU", "-aec", LISTENER_AET]
    tls = ["+tls", str(pki.caller.key), str(pki.caller.cert), "+cf", str(pki.ca.bundle)]
    run = subprocess.run([*echoscu, *tls, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30,
                         check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    plain = subprocess.run([*echoscu, "127.0.0.1", str(port)], capture_output=True, timeout=30, check=False)
    assert plain.returncode != 0

    again = associate(port, tls_args=pki.tls_args(pki.caller))  # the listener still serves trusted callers
    assert again.is_established and again.send_c_echo().Status == 0x0000
    assert again.send_c_store(tiny_wsi("TLS-2")).Status == 0x0000
    again.release()
    assert "TLS-1" not in stack.logs() and "TLS-2" not in stack.logs()


class TLSStorageSCP:
    """A pynetdicom Storage SCP speaking mutual TLS, standing in for a PACS; records what it received."""

    def __init__(self, pair: KeyPair, ca_bundle: Path) -> None:
        self.received: list[tuple[str, str]] = []  # (SOPInstanceUID, caller's certificate common name)
        ae = AE(ae_title="TLSPACS")
        ae.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(Verification, ExplicitVRLittleEndian)
        ctx = server_context(pair.cert, pair.key, ca_bundle, require_client_cert=True, handshake_timeout=10)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=ctx,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        peer = event.assoc.dul.socket.socket.getpeercert()
        common_name = dict(item[0] for item in peer["subject"])["commonName"]
        self.received.append((event.request.AffectedSOPInstanceUID, common_name))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def tls_destination(pki: PKI, port: int, trust: Path | None = None, client: KeyPair | None = None) -> Destination:
    settings = load_settings(destination_tls=True, destination_port=port, destination_aet="TLSPACS",
                             tls_cert_file=(client or pki.caller).cert, tls_key_file=(client or pki.caller).key,
                             tls_ca_file=trust or pki.ca.bundle, dicom_timeout_seconds=10)
    return settings.destination()


def test_sender_delivers_over_tls_and_keeps_results_for_an_untrusted_or_plain_peer(pki, tmp_path):
    results = [tiny_dataset(SecondaryCaptureImageStorage, "TLS-OUT", generate_uid(), generate_uid(), "OT")
               for _ in range(2)]
    source_series = generate_uid()
    outbox = Outbox(tmp_path / "outbox")
    outbox.put(source_series, results)
    pacs = TLSStorageSCP(pki.listener, pki.ca.bundle)
    try:
        # The PACS certificate is checked against a CA we do not trust: nothing is sent, nothing lost.
        report = outbox.flush(tls_destination(pki, pacs.port, trust=pki.foreign_ca.bundle))
        assert report.unreachable.endswith("(TLS)") and report.waiting == {source_series: 2}
        # Our certificate is not one the PACS trusts: refused at its side, results still waiting.
        report = outbox.flush(tls_destination(pki, pacs.port, client=pki.foreign_caller))
        assert report.delivered == {} and len(outbox.pending(source_series)[source_series]) == 2
        assert pacs.received == []

        report = outbox.flush(tls_destination(pki, pacs.port))
        assert report.delivered == {source_series: 2} and outbox.pending() == {}
        assert sorted(pacs.received) == sorted((ds.SOPInstanceUID, "pacs caller") for ds in results)
    finally:
        pacs.stop()


def test_slide_routed_scored_and_returned_over_dicom_tls_with_orthanc(make_stack, pki, tmp_path):
    """Orthanc (DicomTlsEnabled) -> TLS -> listener -> Celery worker -> TLS -> Orthanc, mutual TLS both ways."""
    orthanc = pki.ca.issue("orthanc")
    stack = make_stack(listener_tls=True, DicomTlsEnabled=True, DicomTlsCertificate=str(orthanc.cert),
                       DicomTlsPrivateKey=str(orthanc.key), DicomTlsTrustedCertificates=str(pki.ca.bundle),
                       DicomTlsRemoteCertificateRequired=True)
    stack.start_listener(**pki.listener_env())
    stack.start_worker(HER2_DESTINATION_TLS="true", HER2_TLS_CERT_FILE=str(pki.caller.cert),
                       HER2_TLS_KEY_FILE=str(pki.caller.key), HER2_TLS_CA_FILE=str(pki.ca.bundle))
    files, truth = synth(tmp_path, seed=52, patient_id="TLS-E2E", grade="3+", size_um=1024)
    stack.orthanc.upload(files)
    check_results(stack.orthanc, wait_for_results(stack, files), files, truth)
    logs = stack.logs()
    assert "TLS, client certificate required" in logs
    assert [line for line in logs.splitlines() if "TLS handshake" in line and "UNEXPECTED_EOF" not in line] == []
    assert "TLS-E2E" not in logs


@pytest.fixture
def redis_with_password(tmp_path):
    server = Redis(tmp_path / "redis-auth", password=secrets.token_hex(16)).start()
    yield server
    server.stop()


def test_redis_with_password_end_to_end_and_never_in_a_log(make_stack, redis_with_password, tmp_path):
    redis = redis_with_password
    stack = make_stack(redis=redis)
    assert f":{redis.password}@" in stack.env()["HER2_BROKER_URL"]
    stack.start_listener()
    stack.start_worker()
    files, truth = synth(tmp_path, seed=53, patient_id="AUTH-1", grade="0", size_um=1024)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    stack.orthanc.upload(files)
    check_results(stack.orthanc, wait_for_results(stack, files), files, truth)
    wait_until(lambda: stack.job_state(series_uid) == "done", 30, "job state done")
    status = subprocess.run(her2("status", series_uid), env=stack.env(), capture_output=True, text=True, timeout=60,
                            check=False)
    assert status.stdout.startswith(f"{series_uid}: done")
    config = subprocess.run(her2("config"), env=stack.env(), capture_output=True, text=True, timeout=60, check=False)
    assert f'broker_url = "redis://:***@127.0.0.1:{redis.port}/0"' in config.stdout

    logs = stack.logs() + status.stdout + status.stderr + config.stdout + config.stderr
    assert "redis://:**@127.0.0.1" in logs  # Celery's banner, masked
    assert redis.password not in logs and "AUTH-1" not in logs


@pytest.mark.parametrize("command", ["listen", "worker"])
def test_wrong_redis_password_is_one_clear_line_without_the_password(stack, redis_with_password, command):
    redis, wrong = redis_with_password, secrets.token_hex(16)
    env = stack.env(**{f"HER2_{key.upper()}": redis.url(db, password=wrong)
                       for db, key in enumerate(("broker_url", "result_backend", "state_redis_url"))})
    run = subprocess.run(her2(command), env=env, capture_output=True, text=True, timeout=120, check=False)
    output = (run.stdout + run.stderr).strip()
    assert run.returncode == 2
    assert output == (f"her2: error: Redis at redis://:***@127.0.0.1:{redis.port}/0 (broker_url) refused our "
                      "credentials: invalid username-password pair or user is disabled.")
    assert wrong not in output and redis.password not in output and "Traceback" not in output
