"""Start-up checks of ``her2 listen`` and ``her2 worker``: a wrong setting fails at once, in one line.

A wrong Redis or DICOMweb password or an unloadable TLS certificate would otherwise show
up only later, as a retry loop or a traceback per association. Redis that is
merely down at start is not an error (the listener re-queues, Celery
reconnects): it is logged and the process starts. Nothing printed here
contains a password: URLs are shown with :func:`worker.settings.redact_url`.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from dicom_io.tls import TLSConfigError
from worker.settings import REDIS_URL_KEYS, Settings, redact_url

log = logging.getLogger(__name__)


class PreflightError(RuntimeError):
    """A setting that makes the process unable to work; the message is one line without secrets."""


def check_redis(settings: Settings) -> None:
    """PING every Redis the process uses; raise :class:`PreflightError` when one refuses our credentials."""
    import redis
    from redis.exceptions import AuthenticationError, ResponseError

    for key in REDIS_URL_KEYS:
        url = getattr(settings, key)
        if urlsplit(url).scheme not in ("redis", "rediss"):
            continue
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        try:
            client.ping()
        except (AuthenticationError, ResponseError) as exc:  # WRONGPASS, NOAUTH, AUTH without a server password
            raise PreflightError(f"Redis at {redact_url(url)} ({key}) refused our credentials: {exc}") from None
        except redis.RedisError as exc:
            log.warning("Redis at %s (%s) not reachable yet (%s); will keep trying", redact_url(url), key,
                        type(exc).__name__)
        finally:
            client.close()


def check_tls(settings: Settings) -> None:
    """Build the TLS contexts the settings ask for, so a missing or bad certificate fails at start."""
    from dicom_io.listener import listener_tls_context

    try:
        listener_tls_context(settings.listener_config())
        settings.destination()
    except TLSConfigError as exc:
        raise PreflightError(str(exc)) from None


def check_dicomweb(settings: Settings) -> None:
    """With a ``dicomweb_url``: one QIDO-RS query; refused credentials or an untrusted certificate stop the process.

    A server that is merely down is logged; jobs and the outbox retry it.
    """
    from dicom_io.dicomweb import DicomWebAuthError, DicomWebError, check_access

    if not settings.dicomweb_url:
        if settings.slide_source == "dicomweb" or settings.result_delivery == "stow":
            raise PreflightError(f"slide_source {settings.slide_source} / result_delivery {settings.result_delivery} "
                                 "need dicomweb_url (the PACS's DICOMweb service root)")
        return
    try:
        check_access(settings.dicomweb_server())
    except DicomWebAuthError as exc:
        raise PreflightError(str(exc)) from None
    except DicomWebError as exc:
        log.warning("%s; will keep trying", exc)


def preflight(settings: Settings) -> None:
    """All start-up checks of a service process."""
    check_tls(settings)
    check_redis(settings)
    check_dicomweb(settings)
