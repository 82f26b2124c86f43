"""Where a worker's metric values live: prometheus-client's multiprocess store, chosen before it is imported.

prometheus-client decides when it is imported whether values live in memory
or in memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` (multiprocess
mode), and its documentation asks for that directory to be empty when the
process tree starts. This module does not import prometheus-client, so the
worker's main process can call :func:`use_private_store` first (Celery's
``celeryd_init`` signal, before task modules are imported and before the
prefork pool forks its children); why workers need multiprocess mode is told
in :mod:`worker.metrics`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

#: prometheus-client's switch to multiprocess mode (a directory; read when prometheus_client is imported).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: The directory :func:`use_private_store` made in this process (removed at shutdown), if any.
_owned: Path | None = None


def use_private_store() -> Path:
    """Give this process and the children it forks an empty multiprocess store; returns its directory.

    A directory named by ``PROMETHEUS_MULTIPROC_DIR`` is emptied of its
    ``*.db`` files (values of a previous run); without one, a private
    temporary directory is made. Raises RuntimeError when prometheus_client
    was already imported: its values would then stay in memory, and a pool
    child's counts would never reach ``/metrics``.
    """
    if "prometheus_client" in sys.modules:
        raise RuntimeError("prometheus_client was imported before the worker chose its metric store; "
                           "pool children's metrics would be lost")
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        folder = Path(named)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        return folder
    global _owned
    _owned = Path(tempfile.mkdtemp(prefix="her2-metrics-"))
    os.environ[MULTIPROC_ENV] = str(_owned)
    return _owned


def remove_private_store() -> None:
    """Remove the directory :func:`use_private_store` made (a directory named by the operator stays)."""
    if _owned is not None:
        shutil.rmtree(_owned, ignore_errors=True)
