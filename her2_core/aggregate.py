"""Tile grades to a slide call following ASCO/CAP HER2 IHC scoring (2018, 2023 update).

The rules are applied top-down over the whole invasive tumour area of the
slide (not per field), with ">10 %" strict:

* 3+  intense complete membrane staining in >10 % of tumour cells;
* 2+  weak-to-moderate complete staining in >10 %, or intense complete
  staining in <=10 % (equivocal: reflex in-situ hybridisation);
* 1+  faint/barely perceptible incomplete staining in >10 %;
* 0   otherwise; "0 with membrane staining" (HER2-ultralow) when faint
  incomplete staining is present in >0 % and <=10 %.

Weak complete staining in <=10 % (not named by the guideline) is counted
with faint incomplete staining for the 1+ / ultralow thresholds.

Tile classes map onto the staining patterns: class "3+" = intense complete,
"2+" = weak-moderate complete, "1+" = faint incomplete, "0" = none.
Percentages are tumour-area weighted: each tile contributes
``tumour_fraction x probability`` to each class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

CLASSES: tuple[str, ...] = ("0", "1+", "2+", "3+")


class SlideCall(str, Enum):
    """Slide-level HER2 IHC category."""

    ZERO = "0"
    ULTRALOW = "0 (ultralow)"
    ONE = "1+"
    TWO = "2+"
    THREE = "3+"
    NOT_ASSESSABLE = "not assessable"

    @property
    def reflex_ish(self) -> bool:
        """2+ (equivocal) requires reflex ISH testing."""
        return self is SlideCall.TWO

    @property
    def her2_low(self) -> bool:
        """HER2-low (1+, or 2+ pending a negative ISH): eligibility-relevant."""
        return self in (SlideCall.ONE, SlideCall.TWO)


@dataclass(frozen=True)
class TileGrid:
    """Non-overlapping tiles on one pyramid level.

    ``rows x cols`` tiles of ``tile_size`` pixels starting at pixel (0, 0) of
    the level whose pixel spacing is ``pixel_spacing_mm`` (row, column).
    """

    rows: int
    cols: int
    tile_size: int
    pixel_spacing_mm: tuple[float, float]


@dataclass
class SlideScore:
    """Everything the pipeline concludes about one slide.

    ``probabilities`` is (rows, cols, 4) per-class tile probabilities (NaN for
    tiles not scored), ``tumour_fraction`` is (rows, cols) in [0, 1] (0 for
    tiles not scored), ``scored`` marks tiles that were graded.
    """

    call: SlideCall
    percentages: dict[str, float]
    grid: TileGrid
    probabilities: np.ndarray
    tumour_fraction: np.ndarray
    scored: np.ndarray
    flags: list[str] = field(default_factory=list)

    @property
    def reflex_ish(self) -> bool:
        return self.call.reflex_ish

    @property
    def tumour_area_mm2(self) -> float:
        area_px = float(self.tumour_fraction[self.scored].sum()) * self.grid.tile_size**2
        return area_px * self.grid.pixel_spacing_mm[0] * self.grid.pixel_spacing_mm[1]


def class_percentages(probabilities: np.ndarray, tumour_fraction: np.ndarray) -> dict[str, float]:
    """Tumour-area percentage of each class, from per-tile probabilities.

    ``probabilities`` is (n, 4), ``tumour_fraction`` (n,). Returns zeros when
    there is no tumour at all. Every percentage is within 0..100 exactly: the
    total is the sum of the per-class sums (in float64), never less than any
    of them. (Summed separately in float32, a slide graded 3+ everywhere read
    100.0000085 % 3+, and its SR was refused as out of range.)
    """
    per_class = (np.asarray(probabilities, np.float64) * np.asarray(tumour_fraction, np.float64)[:, None]).sum(axis=0)
    total = float(per_class.sum())
    if total <= 0:
        return {c: 0.0 for c in CLASSES}
    return {c: 100.0 * float(per_class[i]) / total for i, c in enumerate(CLASSES)}


def asco_cap_call(percentages: dict[str, float], evidence_floor: float = 0.0) -> SlideCall:
    """Apply the ASCO/CAP categories top-down to tumour-area percentages.

    Percentages at or below ``evidence_floor`` count as absent (a guard against
    isolated misgraded tiles; ``0`` applies the rules literally).
    """
    p = {c: (v if v > evidence_floor else 0.0) for c, v in percentages.items()}
    if p["3+"] > 10:
        return SlideCall.THREE
    if p["2+"] > 10 or p["3+"] > 0:
        return SlideCall.TWO
    # Weak complete staining in <=10 % is at least faint staining: it counts
    # towards the 1+ / ultralow thresholds together with faint incomplete.
    stained = p["1+"] + p["2+"]
    if stained > 10:
        return SlideCall.ONE
    if stained > 0:
        return SlideCall.ULTRALOW
    return SlideCall.ZERO


#: Order of the assessable calls for comparing graders: 0 and ultralow are one IHC category (score 0).
_CATEGORY_RANK = {SlideCall.ZERO: 0, SlideCall.ULTRALOW: 0, SlideCall.ONE: 1, SlideCall.TWO: 2, SlideCall.THREE: 3}


def category_distance(a: SlideCall, b: SlideCall) -> int:
    """How many IHC categories apart two calls are (0 if either is not assessable)."""
    if a not in _CATEGORY_RANK or b not in _CATEGORY_RANK:
        return 0
    return abs(_CATEGORY_RANK[a] - _CATEGORY_RANK[b])
