"""Security of the service against the real processes: DICOM TLS, Redis with a password, secrets in logs.

A certificate authority is made inside each test (``certs.TestCA``); a second,
unrelated CA issues the certificates that must be refused.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pydicom
import pytest
from certs import KeyPair, TestCA
from pacs_stack import associate, tiny_wsi, wait_until
from pydicom.uid import VLWholeSlideMicroscopyImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from dicom_io.listener import TRANSFER_SYNTAXES
from dicom_io.sender import Destination, Outbox
from dicom_io.tls import client_context, server_context
from model_training.synthetic import SlideSpec
from model_training.synthetic_dicom import write_synthetic_slide
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

    again = associate(port, tls_args=pki.tls_args(pki.caller))  # the listener still serves trusted callers
    assert again.is_established and again.send_c_echo().Status == 0x0000
    assert again.send_c_store(tiny_wsi("TLS-2")).Status == 0x0000
    again.release()
    assert "TLS-1" not in stack.logs() and "TLS-2" not in stack.logs()
