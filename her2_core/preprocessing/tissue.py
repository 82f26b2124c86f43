"""Tissue detection on a low-resolution pyramid level.

Otsu's threshold on the per-pixel optical density (sum over RGB), bounded
below so that empty glass (only sensor noise) never becomes "tissue" and above
so that pale stroma is never cut away from dense tumour, then a
small morphological clean-up.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_objects

from her2_core.preprocessing.stain import optical_density_sum

#: Pixel spacing (um) of the thumbnail on which tissue is found (stains are fitted on tiles: worker.tiles).
THUMBNAIL_MPP = 8.0
#: Optical density (sum over RGB) below which a pixel is glass whatever Otsu says.
MIN_TISSUE_OD = 0.25
#: Upper bound of the tissue threshold: pale stroma (OD sum ~0.35-0.5) must count as tissue.
MAX_TISSUE_THRESHOLD = 0.32
#: Grey levels around the background's median that count as glass in :func:`glass_colour` (its noise on a thumbnail
#: is about 1).
GLASS_PEAK = 4.0


def tissue_mask(thumbnail: np.ndarray, min_object_px: int = 16) -> np.ndarray:
    """Boolean tissue mask of an RGB uint8 thumbnail (H, W, 3)."""
    od = optical_density_sum(thumbnail)
    threshold = MIN_TISSUE_OD
    if float(od.max()) > MIN_TISSUE_OD:
        # Otsu separates glass from tissue, but on slides with dense tumour it may split tumour from
        # pale stroma instead: it is bounded above so that pale stroma stays tissue.
        threshold = float(np.clip(threshold_otsu(od), MIN_TISSUE_OD, MAX_TISSUE_THRESHOLD))
    mask = od > threshold
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3), bool))
    return remove_small_objects(mask, max_size=min_object_px)


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
    """
    background = thumbnail[~mask].astype(np.float32)
    if len(background) < min_pixels:
        return None
    median = np.median(background, axis=0)
    peak = background[(np.abs(background - median) <= GLASS_PEAK).all(axis=1)]
    red, green, blue = (float(v) for v in peak.mean(axis=0))
    return red, green, blue
