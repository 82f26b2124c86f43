"""Tissue detection on a low-resolution pyramid level.

Otsu's threshold on the per-pixel optical density (sum over RGB) **relative
to the slide's glass**, bounded below so that empty glass (only sensor noise)
never becomes "tissue" and above so that pale stroma is never cut away from
dense tumour, then a small morphological clean-up. The glass is found first
(:func:`glass_od`): scanners white-balance their glass anywhere from about
(215, 215, 225) to (252, 250, 253), and with bounds fixed relative to 255 a
real core white-balanced to darker glass was tissue from edge to edge and to
brighter glass lost up to 42 % of its tissue.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

from her2_core.preprocessing.pixels import pixels_at
from her2_core.preprocessing.stain import optical_density_sum

T = TypeVar("T")

#: Pixel spacing (um) of the thumbnail on which tissue is found (stains are fitted on tiles: her2_analysis.tiles).
THUMBNAIL_MPP = 8.0
#: Glass RGB of the real HER2 cores (``tests/data/real_her2``) on their thumbnails, where the levels below were set
#: (as 0.25 and 0.32 OD relative to 255); a slide's own glass replaces it (:func:`glass_od`, :func:`glass_colour`).
REFERENCE_GLASS = (233.0, 232.0, 240.0)
#: Optical density (sum over RGB) above the glass's below which a pixel is glass whatever Otsu says: five times a
#: thumbnail's noise (1 grey level per channel: 0.0074), a quarter of pale stroma. (Relative to 255 it was 0.25, only
#: 0.006 above real glass, and Otsu on an empty real-glass thumbnail made half of it tissue.)
MIN_TISSUE_OD = 0.04
#: Upper bound of the tissue threshold (above the glass): pale stroma (OD sum ~0.1-0.25 above it) must count as tissue.
MAX_TISSUE_THRESHOLD = 0.076
#: Grey levels around the background's median that count as glass in :func:`glass_colour` (its noise on a thumbnail
#: is about 1).
GLASS_PEAK = 4.0
#: :func:`glass_od`: the glass is the optical density (sum over RGB) no darker than ``GLASS_OD_MAX`` (about
#: (212, 212, 212)) with the most pixels within a window ``GLASS_BIN_OD`` wide (slid in steps of an eighth of it),
#: refined to the median of the pixels within ``GLASS_BIN_OD`` of it; a thumbnail where that window holds under
#: ``GLASS_SHARE_MIN`` of the pixels shows no glass.
GLASS_BIN_OD = 0.02
GLASS_OD_MAX = 0.55
GLASS_SHARE_MIN = 0.02
#: At most this many row bands of a thumbnail are processed at once (numpy, scipy's labelling and histograms
#: release the GIL): a 24 x 16 mm section's 6.3 MP thumbnail took 0.24 s on one core.
MAX_BANDS = 4


def glass_od(od: np.ndarray, threads: int = 1) -> float:
    """The optical density (sum over RGB, relative to 255) of a thumbnail's glass, from its OD sums ``od``.

    Glass is the commonest pale colour of a slide: one sharp peak of the OD
    histogram, where tissue spreads. The commonest, not the palest: a
    reader's white beyond the image (a thumbnail's edge strip, 1-2 % of it
    on a small core) is paler than any glass. Without a peak paler than
    :data:`GLASS_OD_MAX` holding :data:`GLASS_SHARE_MIN` of the pixels (tissue
    to the edges) :data:`REFERENCE_GLASS` is used. The window slides: with
    fixed bins a glass peak cut in two by a bin edge lost to pale, even tissue
    (a synthetic HER2 0 core: 23 % of glass in two bins of 13 % and 10 %, its
    tissue 14 % in one), and the tissue was taken for the glass.

    ``od`` is read in row bands on ``threads`` threads (the result does not depend on them).
    """
    reference = float(optical_density_sum(np.asarray(REFERENCE_GLASS, np.uint8)))
    if od.size == 0:
        return reference
    steps = 8  # window positions per window width
    bins, bounds = round(steps * GLASS_OD_MAX / GLASS_BIN_OD), (0.0, GLASS_OD_MAX)
    counts, edges = _banded_histogram(od, bins, bounds, threads)
    window = np.convolve(counts, np.ones(steps + 1), mode="same")  # pixels within GLASS_BIN_OD / 2 of each bin
    if window.max() < GLASS_SHARE_MIN * od.size:
        return reference
    peak = 0.5 * (edges[window.argmax()] + edges[window.argmax() + 1])
    near = _in_bands(lambda rows: od[rows][np.abs(od[rows] - peak) <= GLASS_BIN_OD], len(od), threads)
    return float(np.median(np.concatenate(near)))


def tissue_mask(thumbnail: np.ndarray, min_object_px: int = 16, threads: int | None = None) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (H, W, 3).

    Computed in row bands on ``threads`` threads (default: one per core, at
    most :data:`MAX_BANDS`). The mask does not depend on their number: each
    step is per pixel, a histogram summed over the bands, or, for the small
    objects, a band read with a margin of ``min_object_px`` rows, which an
    object of at most that many pixels cannot span.
    """
    threads = max(1, min(threads or min(MAX_BANDS, os.cpu_count() or 1), len(thumbnail)))
    closed = closing_3x3(_above_threshold(thumbnail, threads))
    out = np.empty_like(closed)

    def clean(rows: slice) -> None:
        top, bottom = max(0, rows.start - min_object_px), min(len(closed), rows.stop + min_object_px)
        cleaned = remove_small_objects(closed[top:bottom], max_size=min_object_px)
        out[rows] = cleaned[rows.start - top : rows.stop - top]

    _in_bands(clean, len(out), threads)
    return out


def _above_threshold(thumbnail: np.ndarray, threads: int) -> np.ndarray:
    """Pixels whose optical density above the glass exceeds Otsu's threshold, bounded (the mask before clean-up)."""
    od = np.empty(thumbnail.shape[:2], np.float32)
    _in_bands(lambda rows: optical_density_sum(thumbnail[rows], out=od[rows]), len(od), threads)
    glass = np.float32(glass_od(od, threads))
    extremes = _in_bands(lambda rows: _subtract_extremes(od[rows], glass), len(od), threads)
    low, high = min(e[0] for e in extremes), max(e[1] for e in extremes)
    threshold = MIN_TISSUE_OD
    if high > MIN_TISSUE_OD:
        # Otsu separates glass from tissue, but on slides with dense tumour it may split tumour from
        # pale stroma instead: it is bounded above so that pale stroma stays tissue.
        threshold = float(np.clip(_otsu(od, low, high, threads), MIN_TISSUE_OD, MAX_TISSUE_THRESHOLD))
    return od > threshold


def _subtract_extremes(od: np.ndarray, glass: np.float32) -> tuple[float, float]:
    """``od -= glass`` in place; the band's minimum and maximum after it."""
    od -= glass
    return (float(od.min()), float(od.max())) if od.size else (np.inf, -np.inf)


def _otsu(od: np.ndarray, low: float, high: float, threads: int) -> float:
    """``skimage.filters.threshold_otsu(od)`` (256 bins over the image's range), from band histograms.

    ``low`` and ``high`` are the minimum and maximum of ``od``: Otsu's bins
    are those of ``np.histogram(od, 256)`` (float32 edges), counted per band.
    """
    if low == high:
        return low
    counts, edges = _banded_histogram(od, 256, (low, high), threads)  # float32 edges, as for od.min(), od.max()
    return float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2.0)))


def _banded_histogram(values: np.ndarray, bins: int, bounds: tuple[float, float], threads: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(values, bins, range=bounds)`` (uniform bins), counted in row bands on ``threads`` threads."""
    parts = _in_bands(lambda rows: np.histogram(values[rows], bins=bins, range=bounds), len(values), threads)
    return np.sum([counts for counts, _ in parts], axis=0), parts[0][1]


def _in_bands(work: Callable[[slice], T], rows: int, threads: int) -> list[T]:
    """``work`` on each of ``threads`` bands of ``rows`` rows (row slices), on that many threads; results in order."""
    bounds = np.linspace(0, rows, threads + 1).round().astype(int)
    bands = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
    if threads == 1:
        return [work(band) for band in bands]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, bands))


def closing_3x3(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_closing(mask, np.ones((3, 3)))``, exactly (outside the image counts as
    background for both steps, so the closing clears a one-pixel rim), ten times faster: each step is a
    maximum (minimum) over three rows, then over three columns, of the padded mask."""
    dilated = _rows_then_cols(np.pad(mask, 1), np.logical_or)
    return _rows_then_cols(np.pad(dilated, 1), np.logical_and)


def _rows_then_cols(padded: np.ndarray, combine: np.ufunc) -> np.ndarray:
    """``combine`` over each pixel's 3 x 3 neighbourhood in ``padded`` (one pixel of padding all round)."""
    rows = combine(combine(padded[:-2], padded[1:-1]), padded[2:])
    return combine(combine(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def glass_colour(thumbnail: np.ndarray, mask: np.ndarray, min_pixels: int = 64) -> tuple[float, float, float] | None:
    """The slide's background (glass) RGB: the median of the thumbnail's non-tissue pixels, or None if too few.

    Real glass scans at about (233, 232, 240), not white; optical density
    relative to 255 gives every pixel, glass included, about 0.09 of false
    stain per channel (measured on the real HER2 cores, ``tests/data/real_her2``).
    The median ignores the few dark specks (debris) the mask leaves out; the
    result is the mean of the pixels within :data:`GLASS_PEAK` grey levels of
    it, a fraction of a grey level precise: stain thresholds near glass
    (the membrane grader's tissue, 0.04 OD) move by 0.003 OD per grey level
    the glass is off, and the rounded median made the counterstain gain of a
    real core white-balanced to bluish glass differ by 8 %.

    Computed on the uint8 values, exactly: a float32 mean of the 750 000 glass
    pixels of a 12 x 8 mm slide's thumbnail was 1.6 grey levels off.
    """
    background = pixels_at(thumbnail, ~mask)
    if len(background) < min_pixels:
        return None
    channels = [np.ascontiguousarray(background[:, c]) for c in range(3)]
    peak = np.ones(len(background), bool)
    for values in channels:
        median = _median_uint8(values)
        peak &= values >= max(0, int(np.ceil(median - GLASS_PEAK)))
        peak &= values <= min(255, int(np.floor(median + GLASS_PEAK)))
    n = int(peak.sum())
    red, green, blue = (int(values[peak].sum(dtype=np.int64)) / n for values in channels)
    return red, green, blue


def _median_uint8(values: np.ndarray) -> float:
    """``np.median`` of uint8 values, from their histogram (the mean of the two middle values when even)."""
    cumulative = np.cumsum(np.bincount(values, minlength=256))
    middle = np.searchsorted(cumulative, [(len(values) - 1) // 2, len(values) // 2], side="right")
    return float(middle.mean())
