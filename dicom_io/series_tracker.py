"""When is a received series complete? After a quiet period without new instances.

A whole-slide image arrives as many instances, possibly over several
associations (PS3.4 Annex B: each C-STORE stands alone; DICOM has no
"end of series" message). Like Orthanc's ``StableAge``, a series is *stable*
once ``stable_seconds`` have passed since its last instance arrived. The
tracker only keeps arrival times; deciding whether a stable series becomes a
job (one job per series content) is :mod:`worker.jobs`'s business.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_io.spool import INCOMING, SpoolPathError, checked_uid


@dataclass(frozen=True)
class StableSeries:
    """A spooled series that received no instance for the quiet period."""

    study_instance_uid: str
    series_instance_uid: str
    folder: Path


class SeriesTracker:
    """Thread-safe record of the last arrival per series; :meth:`pop_stable` hands out quiet ones.

    ``clock`` is injectable so tests decide what time it is.
    """

    def __init__(self, stable_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stable_seconds = stable_seconds
        self._clock = clock
        self._last: dict[Path, tuple[float, StableSeries]] = {}
        self._lock = threading.Lock()

    def note(self, study_uid: str, series_uid: str, folder: Path) -> None:
        """An instance of this series was just spooled into ``folder``."""
        with self._lock:
            self._last[folder] = (self._clock(), StableSeries(study_uid, series_uid, folder))

    def pop_stable(self) -> list[StableSeries]:
        """Series quiet for at least ``stable_seconds``, forgotten once returned."""
        now = self._clock()
        with self._lock:
            ready = [folder for folder, (t, _) in self._last.items() if now - t >= self.stable_seconds]
            return [self._last.pop(folder)[1] for folder in ready]

    def pending(self) -> int:
        """Number of series still inside their quiet period."""
        with self._lock:
            return len(self._last)

    def rescan(self, spool_dir: Path) -> int:
        """Track every series already in the spool (e.g. after a restart) as if it just arrived.

        Returns how many series were found. Claims in :mod:`worker.jobs` make
        sure a series that already had its job does not get a second one.
        """
        found = 0
        for study in Path(spool_dir).glob("*"):
            if study.name == INCOMING or not study.is_dir():
                continue
            for series in study.glob("*"):
                try:
                    checked_uid(study.name, "StudyInstanceUID")
                    checked_uid(series.name, "SeriesInstanceUID")
                except SpoolPathError:
                    continue
                if any(series.glob("*.dcm")):
                    self.note(study.name, series.name, series)
                    found += 1
        return found
