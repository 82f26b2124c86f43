"""Tile datasets in memory: normalised tiles, per-tile targets and the slide/patient each came from.

A :class:`TileSet` is what every data source is turned into (synthetic slides
via DICOM, folder-per-class tiles, BCI, HER2-IHC-40x; see
:mod:`model_training.layouts`) and what training, evaluation and
explanations consume. Tiles are always the output of the shared preprocessing
(:mod:`her2_core.preprocessing` through :mod:`her2_analysis.tiles`): Macenko-normalised
uint8 RGB.

Targets
-------
``class_fractions`` (N, 4) is the share of the tile's tumour area in each of
the classes 0 / 1+ / 2+ / 3+ (one-hot for datasets labelled per tile);
``tumour_fraction`` (N,) is the share of the tile's area that is tumour, NaN
where unknown (the tumour head is then not trained on that tile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from her2_core.aggregate import CLASSES, SlideCall

#: Slide call -> 4-class index; "0 (ultralow)" is IHC 0 for the 4-class metrics.
CALL_CLASS: dict[SlideCall, int] = {
    SlideCall.ZERO: 0,
    SlideCall.ULTRALOW: 0,
    SlideCall.ONE: 1,
    SlideCall.TWO: 2,
    SlideCall.THREE: 3,
}


@dataclass(frozen=True)
class SlideInfo:
    """One slide of a tile set: identity and slide-level truth (``label`` -1 when unknown)."""

    slide_id: str
    patient_id: str
    centre: str
    label: int
    percentages: tuple[float, float, float, float] = (np.nan,) * 4


@dataclass
class TileSet:
    """Normalised tiles with targets; ``slide[i]`` indexes ``slides``."""

    tiles: np.ndarray
    class_fractions: np.ndarray
    tumour_fraction: np.ndarray
    slide: np.ndarray
    slides: list[SlideInfo]
    mpp: float
    membranes: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.tiles)
        for name in ("class_fractions", "tumour_fraction", "slide"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"TileSet.{name} has {len(getattr(self, name))} rows, tiles has {n}")
        if self.class_fractions.shape[1:] != (len(CLASSES),):
            raise ValueError(f"TileSet.class_fractions must be (N, {len(CLASSES)}), got {self.class_fractions.shape}")

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def tile_size(self) -> int:
        return int(self.tiles.shape[1])

    @property
    def labels(self) -> np.ndarray:
        """Majority tumour class per tile (argmax of ``class_fractions``)."""
        return self.class_fractions.argmax(axis=1)

    def take(self, index: np.ndarray) -> TileSet:
        """The tiles at ``index`` (slides kept, so ``slide`` stays valid)."""
        return TileSet(self.tiles[index], self.class_fractions[index], self.tumour_fraction[index],
                       self.slide[index], self.slides, self.mpp,
                       None if self.membranes is None else self.membranes[index])

    def of_patients(self, patients: set[str] | list[str]) -> TileSet:
        """The tiles of slides whose patient is in ``patients``."""
        wanted = np.array([s.patient_id in set(patients) for s in self.slides], dtype=bool)
        return self.take(np.flatnonzero(wanted[self.slide]) if len(self) else np.zeros(0, int))

    @staticmethod
    def concat(sets: list[TileSet]) -> TileSet:
        """One tile set from several (same mpp); slide indices are renumbered."""
        if not sets:
            raise ValueError("TileSet.concat needs at least one tile set")
        if len({s.mpp for s in sets}) != 1:
            raise ValueError(f"cannot concatenate tile sets of different mpp: {[s.mpp for s in sets]}")
        offsets = np.cumsum([0] + [len(s.slides) for s in sets[:-1]])
        membranes = [s.membranes for s in sets]
        return TileSet(
            tiles=np.concatenate([s.tiles for s in sets]),
            class_fractions=np.concatenate([s.class_fractions for s in sets]),
            tumour_fraction=np.concatenate([s.tumour_fraction for s in sets]),
            slide=np.concatenate([s.slide + o for s, o in zip(sets, offsets)]),
            slides=[info for s in sets for info in s.slides],
            mpp=sets[0].mpp,
            membranes=None if any(m is None for m in membranes) else np.concatenate(membranes),
        )

    def save(self, path: Path) -> None:
        """Write as an uncompressed ``.npz`` (tiles are already-normalised uint8)."""
        extra = {} if self.membranes is None else {"membranes": self.membranes}
        np.savez(path, tiles=self.tiles, class_fractions=self.class_fractions, tumour_fraction=self.tumour_fraction,
                 slide=self.slide, mpp=self.mpp,
                 slide_ids=np.array([s.slide_id for s in self.slides]),
                 patient_ids=np.array([s.patient_id for s in self.slides]),
                 centres=np.array([s.centre for s in self.slides]),
                 slide_labels=np.array([s.label for s in self.slides], dtype=int),
                 percentages=np.array([s.percentages for s in self.slides], dtype=float).reshape(-1, 4), **extra)

    @classmethod
    def load(cls, path: Path) -> TileSet:
        with np.load(path) as z:
            slides = [SlideInfo(str(i), str(p), str(c), int(lab), tuple(float(v) for v in pct))
                      for i, p, c, lab, pct in zip(z["slide_ids"], z["patient_ids"], z["centres"],
                                                   z["slide_labels"], z["percentages"])]
            return cls(z["tiles"], z["class_fractions"], z["tumour_fraction"], z["slide"], slides, float(z["mpp"]),
                       z["membranes"] if "membranes" in z.files else None)
