"""Where a worker's metric values live: prometheus-client's multiprocess store, chosen before it is imported.

prometheus-client decides when it is imported whether values live in memory
or in memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` (multiprocess
mode), and its documentation asks for that directory to be empty when the
process tree starts. This module does not import prometheus-client, so the
worker's main process can call :func:`use_private_store` first (Celery's
``import_modules`` signal, sent before the worker imports the task modules
and before the prefork pool forks its children); why workers need
multiprocess mode is told in :mod:`worker.metrics`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

#: prometheus-client's switch to multiprocess mode (a directory; read when prometheus_client is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The store :func:`use_private_store` prepared in this process, and whether it made the directory itself.
_prepared: Path | None = None
_made_here = False


def use_private_store() -> Path:
    """Give this process and the children it forks an empty multiprocess store; returns its directory.

    A directory named by ``PROMETHEUS_MULTIPROC_DIR`` is emptied of its
    ``*.db`` files (values of a previous run); without one, a private
    temporary directory is made. Calling it again returns the same directory.
    Raises RuntimeError when prometheus_client was already imported: its
    values would then stay in memory, and a pool child's counts would never
    reach ``/metrics``.
    """
    global _prepared, _made_here
    if _prepared is not None:  # Celery may import the task modules more than once
        return _prepared
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the worker chose its metric store; "
                           "pool children's metrics would be lost")
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        _prepared = Path(named)
        _prepared.mkdir(parents=True, exist_ok=True)
        for stale in _prepared.glob("*.db"):
            stale.unlink()
    else:
        _prepared, _made_here = Path(tempfile.mkdtemp(prefix="her2-metrics-")), True
        os.environ[MULTIPROC_ENV] = str(_prepared)
    return _prepared


def remove_private_store() -> None:
    """Remove the directory :func:`use_private_store` made (a directory named by the operator stays)."""
    if _prepared is not None and _made_here:
        shutil.rmtree(_prepared, ignore_errors=True)
