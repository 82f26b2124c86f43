"""The fast application of a fitted stain normaliser (:class:`~her2_core.preprocessing.stain.StainNormaliser`).

Estimation (:mod:`her2_core.preprocessing.stain`) yields a frozen fit: the slide's stain matrix and
haematoxylin scale. Applying it to millions of pixels is this module's job, in float32 without a per-pixel
log: each channel's contribution to each concentration is a 256-entry table (optical density times the column
of the pseudo-inverse), so a pixel's H and DAB concentrations are three lookups and two additions, then
re-expression on the reference stains. As a uint8 pixel's output depends only on its colour, once a
normaliser has normalised :data:`LUT_AFTER_PX` pixels it computes all 2**24 colours at once (the colour
table, 48 MiB) and from then on a call is one lookup per pixel; both paths give the same bytes.

:class:`NormalisationTable` holds that working state, declared: the pixels normalised so far and the colour
table, both behind the table's own lock (pool threads normalise the tiles of one slide together).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

#: Light intensity of the illuminant for the Beer-Lambert conversion.
I0 = 255.0
#: Optical density of each of the 256 uint8 intensities: a lookup replaces a log per pixel (bit-identical).
OD_TABLE = -np.log((np.arange(256, dtype=np.float32) + 1.0) / (I0 + 1.0))
#: Pixels normalised per step of the direct path: temporaries stay in the CPU cache, memory flat.
_CHUNK_PX = 1 << 16
#: A normaliser builds its colour table once it has normalised this many pixels directly (48 tiles of
#: 512 px), or up front when told it will normalise more (:meth:`NormalisationTable.expect`): building costs
#: about the CPU the table then saves on 45 tiles (0.17 s; direct path 5.0 ms, lookup 1.4 ms per tile,
#: measured on a 2-core AMD EPYC), so a slide with fewer tissue tiles never pays for it.
LUT_AFTER_PX = 48 * 512 * 512
#: At most this many threads build a colour table (about 0.2 s of CPU).
_LUT_BUILD_THREADS = 4


class NormalisationTable:
    """Applies one stain fit to uint8 RGB tiles: the direct path, then the colour table.

    Parameters
    ----------
    source_matrix: numpy.ndarray
        The slide's stain matrix (2, 3), rows haematoxylin and DAB.
    h_scale: float
        Haematoxylin concentration scale of the slide.
    reference_matrix: numpy.ndarray
        Reference stain matrix (2, 3) the concentrations are re-expressed on.

    The cache is declared here: ``_direct_px`` (pixels normalised by the direct path) and ``_lut`` (the
    colour table, None until built), read and written under ``_lock`` only; ``_build_lock`` lets one thread
    build the table while the others go on normalising directly.
    """

    def __init__(self, source_matrix: np.ndarray, h_scale: float, reference_matrix: np.ndarray) -> None:
        pinv = np.linalg.pinv(source_matrix).astype(np.float32)  # (3, 2)
        #: Per-channel concentration tables (stain, channel, 256).
        self.tables = np.stack([[OD_TABLE * pinv[c, j] for c in range(3)] for j in range(2)]).astype(np.float32)
        #: The negated reference matrix (2, 3).
        self.out_coef = (-np.asarray(reference_matrix)).astype(np.float32)
        self.h_scale = np.float32(h_scale)
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._direct_px = 0
        self._lut: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its lock and cache (another process builds its own)."""
        return {"tables": self.tables, "out_coef": self.out_coef, "h_scale": self.h_scale}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._build_lock, self._direct_px, self._lut = threading.Lock(), threading.Lock(), 0, None

    @property
    def built(self) -> bool:
        """Whether the colour table is built."""
        with self._lock:
            return self._lut is not None

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """Normalised uint8 RGB tiles (..., 3), same shape: by the colour table once built, else directly."""
        pixels = tiles.size // 3
        with self._lock:
            lut = self._lut
            direct = lut is None and self._direct_px + pixels <= LUT_AFTER_PX
            if direct:
                self._direct_px += pixels
        if direct:
            return self.direct(np.ascontiguousarray(tiles).reshape(-1, 3)).reshape(tiles.shape)
        if lut is None:
            lut = self.lookup_table()
        return lut.take(colour_codes(tiles), mode="clip").view(np.uint8).reshape(tiles.shape)

    def expect(self, pixels: int) -> bool:
        """Build the colour table now if this fit will normalise more than :data:`LUT_AFTER_PX` pixels.

        It would build it after that many anyway; building it up front spares
        the first tiles the direct path (4x slower). True if the table is built.
        """
        if pixels <= LUT_AFTER_PX:
            return False
        self.lookup_table()
        return True

    def lookup_table(self) -> np.ndarray:
        """The normalised colour of each of the 2**24 uint8 colours, indexed by :func:`colour_codes` (3-byte items).

        Built once (thread-safe) with the arithmetic of the direct path, a plane of 65 536 colours (one blue
        value) at a time, on up to :data:`_LUT_BUILD_THREADS` threads (about 0.25 s of CPU).
        """
        with self._build_lock:
            with self._lock:
                lut = self._lut
            if lut is None:
                lut = self._build_lookup_table()
                with self._lock:
                    self._lut = lut
            return lut

    def direct(self, flat: np.ndarray) -> np.ndarray:
        """Normalised uint8 pixels (N, 3) computed pixel by pixel (the arithmetic the colour table holds)."""
        tables, out_coef = self.tables, self.out_coef
        out = np.empty_like(flat)
        n = min(len(flat), _CHUNK_PX)
        hh, dd, tt, oo = (np.empty(n, np.float32) for _ in range(4))
        for start in range(0, len(flat), _CHUNK_PX):
            px = flat[start : start + _CHUNK_PX]
            m = len(px)
            for conc, table in ((hh[:m], tables[0]), (dd[:m], tables[1])):
                np.take(table[0], px[:, 0], out=conc)
                np.take(table[1], px[:, 1], out=tt[:m])
                conc += tt[:m]
                np.take(table[2], px[:, 2], out=tt[:m])
                conc += tt[:m]
            _reexpress(hh[:m], dd[:m], self.h_scale, out_coef, out[start : start + m], tt[:m], oo[:m])
        return out

    def _build_lookup_table(self) -> np.ndarray:
        tables, out_coef = self.tables, self.out_coef
        red_green = [(t[0][None, :] + t[1][:, None]).reshape(-1) for t in tables]  # T[r] + T[g], green-major
        lut = np.empty((256, 256 * 256, 3), np.uint8)  # (blue, green * 256 + red, channel)

        def planes(blues: range) -> None:
            hh, dd, tt, oo = (np.empty(256 * 256, np.float32) for _ in range(4))
            for blue in blues:
                for conc, j in ((hh, 0), (dd, 1)):
                    np.add(red_green[j], tables[j][2][blue], out=conc)
                _reexpress(hh, dd, self.h_scale, out_coef, lut[blue], tt, oo)

        workers = max(1, min(_LUT_BUILD_THREADS, os.cpu_count() or 1))  # numpy releases the GIL: planes in parallel
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(planes, [range(i, 256, workers) for i in range(workers)]))
        return lut.reshape(-1).view("V3")


def _reexpress(hh: np.ndarray, dd: np.ndarray, h_scale: np.float32, out_coef: np.ndarray, out: np.ndarray,
               tt: np.ndarray, oo: np.ndarray) -> None:
    """Unclipped H and DAB concentrations (float32, in place) -> uint8 RGB ``out`` (N, 3) on the reference stains."""
    np.maximum(hh, 0.0, out=hh)
    np.maximum(dd, 0.0, out=dd)
    hh *= h_scale
    for k in range(3):
        np.multiply(hh, out_coef[0, k], out=oo)
        np.multiply(dd, out_coef[1, k], out=tt)
        oo += tt
        np.exp(oo, out=oo)
        oo *= np.float32(I0 + 1.0)
        oo -= np.float32(1.0)
        np.rint(oo, out=oo)
        np.clip(oo, 0.0, 255.0, out=oo)
        out[:, k] = oo


def colour_codes(tiles: np.ndarray) -> np.ndarray:
    """Each pixel's 24-bit colour code ``r + 256 g + 65536 b`` (int64, flat) of uint8 RGB (..., 3).

    Read without arithmetic per channel: an 8-byte little-endian view at a
    3-byte stride starts at each pixel's red byte, masked to 24 bits (the
    last two pixels, whose view would run past the buffer, are read apart).
    """
    flat = np.ascontiguousarray(tiles, dtype=np.uint8).reshape(-1)
    n = flat.size // 3
    codes = np.empty(n, np.int64)
    head = max(0, n - 2)
    if head:
        view = np.ndarray((head,), dtype="<i8", buffer=flat, strides=(3,))
        np.bitwise_and(view, 0xFFFFFF, out=codes[:head])
    tail = flat[3 * head :].reshape(-1, 3).astype(np.int64)
    codes[head:] = tail[:, 0] | tail[:, 1] << 8 | tail[:, 2] << 16
    return codes
