"""One typed settings object for every process of the worker.

Values come, in increasing priority, from the defaults below, a JSON or TOML
file named by ``HER2_CONFIG`` (or ``--config`` on the command line), and
environment variables ``HER2_<KEY>`` (for example ``HER2_LISTEN_PORT=11112``).
``her2 config`` prints the effective values; every field's description is its
documentation.
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import fields, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from her2_analysis.options import Grader, MembraneThresholds, QualityThresholds, ScoringOptions

if TYPE_CHECKING:
    from dicom_io.dicomweb import DicomWebServer
    from dicom_io.listener import ListenerConfig
    from dicom_io.sender import Destination

#: The analysis' own defaults (her2_analysis.options), which the settings below take as theirs.
_SCORING = ScoringOptions()
_QC = QualityThresholds()


class Settings(BaseSettings):
    """Configuration of listener, workers and the scoring pipeline."""

    model_config = SettingsConfigDict(env_prefix="HER2_", extra="forbid")

    # --- model and pipeline -------------------------------------------------
    model_path: Path = Field(_SCORING.model_path, description="ONNX model; its model card is the .json beside it.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        _SCORING.device, description="ONNX Runtime provider: auto = CUDA when available, else CPU."
    )
    precision: Literal["float32", "float16"] = Field(
        _SCORING.precision, description="Model arithmetic: float16 converts the model to half precision at load (for CUDA "
        "tensor cores; slower on CPU; grades differ in the third decimal, so validate it like a new model; needs "
        "the [gpu] extra).")
    batch_size: int = Field(_SCORING.batch_size, ge=1, description="Tiles per inference batch.")
    decode_threads: int = Field(_SCORING.decode_threads, ge=1, description="Threads decoding JPEG tiles ahead of inference.")
    intra_op_threads: int = Field(_SCORING.intra_op_threads, ge=0, description="ONNX Runtime intra-op threads (0 = library default).")
    white_fraction_max: float = Field(
        _SCORING.white_fraction_max, gt=0, lt=1, description="Tiles with more than this fraction of white background are dropped "
        "(must be the model card's value: training dropped the same tiles)."
    )
    evidence_floor_percent: float = Field(
        _SCORING.evidence_floor_percent,
        ge=0,
        le=10,
        description="Classes holding no more than this percentage of the tumour (area for the CNN, cells for the "
        "membrane grader) are treated as absent when applying the ASCO/CAP rules (guards the call against isolated "
        "misgraded tiles or cells; not part of ASCO/CAP).",
    )
    output_dir: Path = Field(Path("out"), description="Where the CLI writes result DICOM files and overlays.")

    # --- membrane (cell) grader (see her2_analysis/membrane/field.py and her2_analysis/membrane/slide.py) ----
    grader: Grader = Field(
        _SCORING.grader, description="Which grader makes the slide call: the cell-level membrane grader (ASCO/CAP's "
        "per-tumour-cell definition; it grades at 0.5 um/px, so it needs a level that fine, else the CNN decides) or "
        "the CNN tile grader. Both run and both are reported.")
    membrane_grader: bool = Field(
        _SCORING.membrane_grader, description="Run the membrane grader (off: the CNN alone, no fine-level reads).")
    membrane_max_fields: int = Field(
        _SCORING.membrane_max_fields, ge=1, description="At most this many 1024 px fields (256 um at 0.25 um/px) spread over the tissue are "
        "graded cell by cell: bounds the grader's time on large sections.")
    membrane_cutoffs: dict[str, float] = Field(
        default_factory=dict, description="Overrides of the membrane grader's cut-offs (her2_analysis.options."
        "MembraneThresholds: optical density and um; what each is and how it was set: docs/membrane-calibration.md), e.g. "
        "{\"moderate_min\": 0.3}; as an environment variable, JSON.")
    qc_min_tumour_cells: int = Field(
        _QC.min_tumour_cells, ge=1, description="Fewer tumour cells graded by the membrane grader than this is not assessable (our "
        "choice: ASCO/CAP sets no minimum).")

    # --- quality control (see her2_analysis/quality.py for how each is measured) ----
    qc_eosin_share_max: float = Field(
        _QC.eosin_share_max, gt=0, lt=1, description="Eosin share of tissue stain above which the slide is not HER2 IHC (not assessable)."
    )
    qc_min_tumour_mm2: float = Field(_QC.min_tumour_mm2, gt=0, description="Less graded tumour area than this is not assessable.")
    qc_pen_share_max: float = Field(_QC.pen_share_max, gt=0, lt=1, description="Share of tissue under marker ink that is flagged.")
    qc_fold_share_max: float = Field(_QC.fold_share_max, gt=0, lt=1, description="Share of tissue in folds (OD > 2) that is flagged.")
    qc_sharpness_min: float = Field(_QC.sharpness_min, ge=0, description="Median tile sharpness (mean |LoG|) below which blur is flagged.")
    qc_h_scale_min: float = Field(
        _QC.h_scale_min, gt=0, description="Haematoxylin scale (reference / slide 99th percentile) below which the stain is flagged "
        "as outside the training distribution (over twice the reference strength).")
    qc_h_scale_max: float = Field(
        _QC.h_scale_max, gt=0, description="Haematoxylin scale above which the stain is flagged as outside the training "
        "distribution (under half the reference strength).")

    # --- DICOM network --------------------------------------------------------
    ae_title: str = Field("HER2WORKER", max_length=16, description="Our AE title (listener and SCU).")
    listen_host: str = Field("127.0.0.1", description="Address the Storage SCP binds to.")
    listen_port: int = Field(11112, ge=0, le=65535, description="Port the Storage SCP binds to.")
    allowed_calling_aets: list[str] = Field(
        default_factory=list,
        description="Calling AE titles allowed to associate; empty list = accept any caller.",
    )
    spool_dir: Path = Field(Path("spool"), description="Received instances, one folder per series.")
    max_associations: int = Field(25, ge=1, description="Concurrent associations the listener accepts.")
    stable_seconds: float = Field(
        10.0, gt=0, description="A series is complete when no instance arrived for this long (like Orthanc StableAge)."
    )
    destination_host: str = Field("127.0.0.1", description="PACS that receives results (C-STORE SCP).")
    destination_port: int = Field(4242, ge=1, le=65535, description="Port of the result destination.")
    destination_aet: str = Field("ORTHANC", max_length=16, description="AE title of the result destination.")
    outbox_dir: Path = Field(Path("outbox"), description="Results waiting for delivery when the PACS is down.")
    outbox_retry_seconds: float = Field(
        30.0, gt=0, description="How often workers retry delivering the outbox to the destination PACS."
    )
    dicom_timeout_seconds: float = Field(
        30.0, gt=0, description="ACSE, DIMSE and network timeout of our DICOM associations (PS3.8)."
    )

    # --- DICOM TLS (PS3.15 B.1; see dicom_io/tls.py) ----------------------------
    listen_tls: bool = Field(False, description="Storage SCP accepts TLS connections only (needs tls_cert_file/key).")
    destination_tls: bool = Field(False, description="Send results to the destination PACS over TLS.")
    tls_cert_file: Path | None = Field(
        None, description="Our certificate (PEM, chain allowed): presented by the listener and, if set, by the sender."
    )
    tls_key_file: Path | None = Field(None, description="Private key (PEM) of tls_cert_file.")
    tls_ca_file: Path | None = Field(
        None,
        description="CA bundle (PEM) trusted for peers: callers' client certificates and the destination's "
        "server certificate (system trust store for the destination when unset).",
    )
    tls_require_client_cert: bool = Field(
        True, description="With listen_tls, admit only callers with a certificate signed by tls_ca_file."
    )
    destination_tls_hostname: str = Field(
        "", description="Name checked against the destination's certificate (default: destination_host)."
    )

    # --- DICOMweb: slides read and results stored without shared storage (PS3.18; dicom_io/dicomweb.py) ---
    slide_source: Literal["spool", "dicomweb"] = Field(
        "spool", description="What the listener keeps and where workers read slides: spool = whole instances in "
        "spool_dir, shared with the workers; dicomweb = headers only (no Pixel Data), workers read the frames they "
        "grade from dicomweb_url (WADO-RS), so they need no shared volume. Jobs carry their source: a worker reads "
        "each job from where its listener said.")
    result_delivery: Literal["cstore", "stow"] = Field(
        "cstore", description="How results reach the PACS: cstore = C-STORE to destination_host/port/aet; stow = "
        "STOW-RS to dicomweb_url, into the source study. Same outbox either way.")
    dicomweb_url: str = Field(
        "", description="DICOMweb service root of the PACS, e.g. http://orthanc:8042/dicom-web (https:// with "
        "dicomweb_ca_file for TLS). Needed by slide_source dicomweb and result_delivery stow; credentials go in the "
        "settings below, not in the URL.")
    dicomweb_username: str = Field("", description="HTTP basic authentication user for dicomweb_url.")
    dicomweb_password: SecretStr = Field(
        SecretStr(""), description="HTTP basic authentication password (set it as HER2_DICOMWEB_PASSWORD; never "
        "printed).")
    dicomweb_token: SecretStr = Field(
        SecretStr(""), description="Bearer token for dicomweb_url instead of user and password (HER2_DICOMWEB_TOKEN; "
        "never printed).")
    dicomweb_ca_file: Path | None = Field(
        None, description="CA bundle (PEM) that signs the DICOMweb server's HTTPS certificate (system trust store "
        "when unset).")
    dicomweb_timeout_seconds: float = Field(60.0, gt=0, description="Connect and read timeout of DICOMweb requests.")

    # --- queue ----------------------------------------------------------------
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis).")
    result_backend: str = Field("redis://127.0.0.1:6379/1", description="Celery result backend (Redis).")
    task_soft_time_limit: int = Field(1800, ge=1, description="Seconds before a slide job is asked to stop.")
    task_time_limit: int = Field(2100, ge=1, description="Seconds before a slide job is killed.")
    task_max_retries: int = Field(5, ge=0, description="Retries before a job is parked with its reason.")
    task_retry_backoff_max: int = Field(600, ge=1, description="Upper bound in seconds of the exponential retry backoff.")
    broker_visibility_timeout: int | None = Field(
        None,
        ge=1,
        description="Seconds after which Redis hands a job whose worker died (never acknowledged) to another "
        "worker. Unset = max(task_time_limit, task_retry_backoff_max) + 60: shorter would hand a slide that is "
        "still being scored, or a retry still waiting for its backoff, to a second worker.",
    )
    state_redis_url: str = Field(
        "redis://127.0.0.1:6379/2", description="Redis holding job status and the one-job-per-series claims."
    )
    state_dir: Path = Field(
        Path("state"), description="Job status and claims in embedded mode (`her2 serve --embedded`, no Redis)."
    )

    # --- job leases, metrics and health (docs/operations.md; worker/lease.py, worker/metrics.py) ---------
    job_lease_seconds: float = Field(
        30.0, gt=0, description="A running job holds a lease in Redis for this long, renewed by its worker; once it "
        "expires (worker killed, host lost) any worker or the listener queues the job again (a failed attempt).")
    job_lease_renew_seconds: float = Field(
        10.0, gt=0, description="How often a worker renews its job's lease, and how often workers and the listener "
        "look for expired leases; at most half of job_lease_seconds.")
    metrics_enabled: bool = Field(True, description="Serve Prometheus /metrics and /health from listener and workers.")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics and health endpoint binds to.")
    listener_metrics_port: int = Field(9464, ge=0, le=65535, description="Metrics/health port of `her2 listen`.")
    worker_metrics_port: int = Field(
        9465, ge=0, le=65535, description="Metrics/health port of `her2 worker` (one per worker process on a host).")

    @model_validator(mode="after")
    def _renew_within_lease(self) -> Settings:
        if self.job_lease_renew_seconds > self.job_lease_seconds / 2:
            raise ValueError(f"job_lease_renew_seconds ({self.job_lease_renew_seconds:g}) must be at most half of "
                             f"job_lease_seconds ({self.job_lease_seconds:g}): one late renewal must not lose the lease")
        return self

    def scoring_options(self) -> ScoringOptions:
        """What :func:`her2_analysis.pipeline.score_slide` is told: the model, pipeline and grader settings."""
        return ScoringOptions(
            model_path=Path(self.model_path), device=self.device, precision=self.precision,
            intra_op_threads=self.intra_op_threads, batch_size=self.batch_size, decode_threads=self.decode_threads,
            white_fraction_max=self.white_fraction_max, evidence_floor_percent=self.evidence_floor_percent,
            grader=self.grader, membrane_grader=self.membrane_grader, membrane_max_fields=self.membrane_max_fields,
            membrane=self.membrane_thresholds(), quality=self.quality_thresholds())

    def membrane_thresholds(self) -> MembraneThresholds:
        """The membrane grader's cut-offs: its documented defaults with ``membrane_cutoffs`` applied."""
        return replace(MembraneThresholds(), **self.membrane_cutoffs)

    def quality_thresholds(self) -> QualityThresholds:
        """The ``qc_*`` thresholds, for :mod:`her2_analysis.quality`."""
        return QualityThresholds(
            eosin_share_max=self.qc_eosin_share_max, pen_share_max=self.qc_pen_share_max,
            fold_share_max=self.qc_fold_share_max, sharpness_min=self.qc_sharpness_min,
            h_scale_min=self.qc_h_scale_min, h_scale_max=self.qc_h_scale_max,
            min_tumour_cells=self.qc_min_tumour_cells, min_tumour_mm2=self.qc_min_tumour_mm2)

    def listener_config(self) -> ListenerConfig:
        """What the Storage SCP needs (:mod:`dicom_io.listener`): AE, address, timeouts, spool and TLS keys."""
        from dicom_io.listener import ListenerConfig, ListenerTLS

        tls = None
        if self.listen_tls:
            tls = ListenerTLS(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.tls_require_client_cert)
        return ListenerConfig(self.ae_title, self.listen_host, self.listen_port, tuple(self.allowed_calling_aets),
                              self.dicom_timeout_seconds, self.max_associations, self.spool_dir,
                              keep_pixels=self.slide_source == "spool", tls=tls)

    def destination(self) -> Destination:
        """The C-STORE SCP that receives results (:mod:`dicom_io.sender`); its TLS context is built now."""
        from dicom_io.sender import ClientTLS, Destination

        tls = None
        if self.destination_tls:
            tls = ClientTLS(self.tls_cert_file, self.tls_key_file, self.tls_ca_file, self.destination_tls_hostname)
        return Destination.with_tls(self.destination_host, self.destination_port, self.destination_aet,
                                    self.ae_title, self.dicom_timeout_seconds, tls)

    def dicomweb_server(self) -> DicomWebServer:
        """The DICOMweb server of ``dicomweb_url`` with its credentials, for :mod:`dicom_io.dicomweb`."""
        from dicom_io.dicomweb import DicomWebServer

        if not self.dicomweb_url:
            raise ValueError("dicomweb_url is not set (needed by slide_source dicomweb and result_delivery stow)")
        return DicomWebServer(self.dicomweb_url, self.dicomweb_username, self.dicomweb_password.get_secret_value(),
                              self.dicomweb_token.get_secret_value(), self.dicomweb_ca_file,
                              self.dicomweb_timeout_seconds)

    @field_validator("membrane_cutoffs")
    @classmethod
    def _known_cutoffs(cls, value: dict[str, float]) -> dict[str, float]:
        known = {f.name for f in fields(MembraneThresholds) if f.type in ("float", "int")}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown membrane cut-off(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return value

    @property
    def visibility_timeout(self) -> int:
        """Effective ``broker_visibility_timeout`` (see its description)."""
        if self.broker_visibility_timeout is not None:
            return self.broker_visibility_timeout
        return max(self.task_time_limit, self.task_retry_backoff_max) + 60


#: Settings holding Redis URLs, which may carry a password (``redis://:<password>@host:port/db``).
REDIS_URL_KEYS = ("broker_url", "result_backend", "state_redis_url")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (like Celery's banner), for logs and ``her2 config``."""
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostport}"))


def _read_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    return json.loads(text)


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, a config file, the environment and explicit overrides.

    Environment variables win over the file; explicit ``overrides`` (from the
    command line) win over both.
    """
    config_file = config_file or os.environ.get("HER2_CONFIG")
    file_values = _read_file(Path(config_file)) if config_file else {}
    env_values = Settings().model_dump(exclude_unset=True)
    return Settings(**{**file_values, **env_values, **overrides})


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings (file named by HER2_CONFIG plus environment)."""
    return load_settings()
