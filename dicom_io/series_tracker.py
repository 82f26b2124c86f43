"""When is a received series complete? After a quiet period without new instances, its transfer ended.

A whole-slide image arrives as many instances, possibly over several
associations (PS3.4 Annex B: each C-STORE stands alone; DICOM has no
"end of series" message). Like Orthanc's ``StableAge``, a series is *stable*
once ``stable_seconds`` have passed since its last instance arrived, and no
association that stored into it is still open.

An association that ends without an A-RELEASE (an A-ABORT, a dropped
connection, PS3.8 7.3 and 7.4; or the listener killed, seen at the next start
through the series' ``.receiving`` marker) may have left its series
incomplete. Such a series is *held* until an association storing into it again
ends with a release, as a sender retrying the transfer does: scoring the part
that arrived would put a result for a partial slide into the PACS beside the
complete slide's (result UIDs derive from the scored instances, so the later
result cannot replace it). The tracker only keeps this state;
deciding whether a stable series becomes a job (one job per series content)
is :mod:`worker.jobs`'s business.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path

from dicom_io.spool import INCOMING, SpoolPathError, checked_uid, receiving_marker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StableSeries:
    """A spooled series that received no instance for the quiet period."""

    study_instance_uid: str
    series_instance_uid: str
    folder: Path


class SeriesTracker:
    """Thread-safe record of the last arrival per series; :meth:`pop_stable` hands out quiet, complete ones.

    ``clock`` is injectable so tests decide what time it is.
    """

    def __init__(self, stable_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stable_seconds = stable_seconds
        self._clock = clock
        self._last: dict[Path, tuple[float, StableSeries]] = {}
        self._open: dict[Hashable, set[Path]] = {}
        self._held: set[Path] = set()
        self._lock = threading.Lock()

    def note(self, study_uid: str, series_uid: str, folder: Path, association: Hashable | None = None) -> None:
        """An instance of this series was just spooled into ``folder``, over ``association`` if given."""
        with self._lock:
            self._last[folder] = (self._clock(), StableSeries(study_uid, series_uid, folder))
            if association is not None and folder not in self._open.setdefault(association, set()):
                self._open[association].add(folder)
                marker = receiving_marker(folder)
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()

    def association_ended(self, association: Hashable, released: bool) -> None:
        """``association`` ended, with an A-RELEASE (``released``) or not (aborted, connection lost)."""
        with self._lock:
            folders = self._open.pop(association, set())
            still_open = set().union(*self._open.values())
            for folder in folders:
                if not released:
                    self._held.add(folder)
                    log.warning("series %s: association ended without release; held until it is sent again",
                                folder.name)
                elif folder not in still_open:
                    self._held.discard(folder)
                    receiving_marker(folder).unlink(missing_ok=True)

    def pop_stable(self) -> list[StableSeries]:
        """Series quiet for at least ``stable_seconds`` and not being received or held, forgotten once returned."""
        now = self._clock()
        with self._lock:
            busy = self._held.union(*self._open.values())
            ready = [folder for folder, (t, _) in self._last.items()
                     if now - t >= self.stable_seconds and folder not in busy]
            return [self._last.pop(folder)[1] for folder in ready]

    def pending(self) -> int:
        """Number of series still inside their quiet period, being received or held."""
        with self._lock:
            return len(self._last)

    def held(self) -> list[str]:
        """SeriesInstanceUIDs held because their transfer was interrupted."""
        with self._lock:
            return sorted(folder.name for folder in self._held)

    def rescan(self, spool_dir: Path) -> int:
        """Track every series already in the spool (e.g. after a restart) as if it just arrived.

        A series whose ``.receiving`` marker is still there was being received
        when the previous listener stopped: it is held until sent again.
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
                    if receiving_marker(series).exists():
                        with self._lock:
                            self._held.add(series)
                    found += 1
        return found
