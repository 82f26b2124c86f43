"""DICOM TLS (PS3.15 Annex B.1, "Basic TLS Secure Transport Connection Profile") for our associations.

Two :class:`ssl.SSLContext` factories, from PEM files named in the settings:

- :func:`server_context` for the Storage SCP (``listen_tls``): presents our
  certificate and, with ``tls_require_client_cert``, admits only callers whose
  certificate chains to ``tls_ca_file`` (mutual TLS). A caller that does not
  speak TLS, or whose certificate is not trusted, fails the handshake: its TCP
  connection is closed before any DICOM PDU is read, and one log line names the
  peer address and the reason.
- :func:`client_context` for the result SCU (``destination_tls``): verifies the
  PACS certificate against ``tls_ca_file`` (the system trust store when unset)
  and its host name, and presents our certificate when one is configured.

TLS 1.2 is the lowest version offered (PS3.15 B.1 allows TLS 1.2 and 1.3).
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

log = logging.getLogger(__name__)


class TLSConfigError(ValueError):
    """The TLS settings are incomplete or name files that cannot be loaded."""


class _ServerContext(ssl.SSLContext):
    """A server context whose handshake has a time limit and whose failures are logged.

    pynetdicom wraps each accepted socket in its accept loop
    (``AssociationServer.get_request``), so the handshake runs there: a bounded
    handshake keeps a silent peer from holding the loop, and the log line is the
    only trace of a refused caller (socketserver drops the error silently).
    """

    handshake_timeout: float = 30.0

    def wrap_socket(self, sock: socket.socket, *args, **kwargs) -> ssl.SSLSocket:  # type: ignore[override]
        peer = _peer(sock)
        previous = sock.gettimeout()
        sock.settimeout(self.handshake_timeout)
        try:
            wrapped = super().wrap_socket(sock, *args, **kwargs)
        except (OSError, ValueError) as exc:
            log.warning("TLS handshake with %s failed, connection refused: %s", peer, _reason(exc))
            sock.close()
            raise
        wrapped.settimeout(previous)
        return wrapped


def _peer(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "unknown peer"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _load(ctx: ssl.SSLContext, cert_file: Path | None, key_file: Path | None, ca_file: Path | None) -> None:
    try:
        if cert_file is not None:
            ctx.load_cert_chain(cert_file, key_file)
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load TLS certificate/key/CA ({_reason(exc)})") from exc


def server_context(cert_file: Path | None, key_file: Path | None, ca_file: Path | None,
                   require_client_cert: bool, handshake_timeout: float) -> ssl.SSLContext:
    """TLS context of the Storage SCP; raises :class:`TLSConfigError` on missing or unreadable files."""
    if cert_file is None or key_file is None:
        raise TLSConfigError("listen_tls needs tls_cert_file and tls_key_file")
    if require_client_cert and ca_file is None:
        raise TLSConfigError("tls_require_client_cert needs tls_ca_file (the CA that signs callers' certificates)")
    ctx = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.handshake_timeout = handshake_timeout
    _load(ctx, cert_file, key_file, ca_file)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def client_context(cert_file: Path | None, key_file: Path | None, ca_file: Path | None) -> ssl.SSLContext:
    """TLS context of the result SCU: peer certificate and host name verified; our certificate if configured."""
    if (cert_file is None) != (key_file is None):
        raise TLSConfigError("tls_cert_file and tls_key_file must be set together")
    try:
        ctx = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load TLS CA file ({_reason(exc)})") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, cert_file, key_file, None)
    return ctx
