"""From an opened slide to batches of normalised tissue tiles: the path inference and training share.

``survey_slide`` finds tissue on a thumbnail at :data:`THUMBNAIL_MPP`,
``tile_slide`` lays the tile grid at the model's magnification and fits the
slide's stain normaliser on a sample of its tissue tiles there (stain vectors
of thumbnail pixels are biased: averaging intensities over 8 um mixes stains
non-linearly in optical density); ``tile_batches`` reads only tissue tiles and, in a
thread pool a bounded number of batches ahead of the consumer, decodes each,
drops it if it has too much white background and normalises it, so all of
that overlaps inference and memory does not grow with the slide. Training reads
synthetic slides through exactly this code (as DICOM files), so the model
never sees tiles prepared differently from the ones it grades.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from dicom_io.wsi import LevelInfo, Slide, TileRead, TileSource
from her2_analysis.quality import sharpness
from her2_core.aggregate import TileGrid
from her2_core.preprocessing import (
    THUMBNAIL_MPP,
    StainNormaliser,
    StainReference,
    candidate_tiles,
    fit_stains,
    glass_colour,
    grid_for_level,
    tissue_mask,
    white_fraction,
)

Position = tuple[int, int]
#: Tissue tiles, spread evenly over the slide, on which its stains are fitted.
STAIN_FIT_TILES = 16
#: Tissue tiles, spread evenly over the slide, whose sharpness blur QC measures (its median is what QC uses).
SHARPNESS_TILES = 32


@dataclass
class SlideSurvey:
    """The whole slide at low resolution: thumbnail, its spacing, tissue mask and glass RGB (None: no glass seen)."""

    thumbnail: np.ndarray
    thumbnail_mpp: float
    mask: np.ndarray
    glass: tuple[float, float, float] | None


@dataclass
class TiledSlide:
    """A slide ready for tiling: survey, tiles at the model's resolution, grid, tissue tiles and stain normaliser."""

    survey: SlideSurvey
    tiles: TileSource
    grid: TileGrid
    candidates: list[Position]
    normaliser: StainNormaliser
    #: Tiles the stain fit already decoded, each handed out once by :meth:`take` instead of being read again.
    decoded: dict[Position, np.ndarray] = field(default_factory=dict)

    @property
    def level(self) -> LevelInfo:
        """The scored level (a resampled one when the pyramid has none at the model's resolution)."""
        return self.tiles.level

    @property
    def read(self) -> TileRead:
        return self.tiles.read

    def take(self, pos: Position) -> np.ndarray | None:
        """The tile at ``pos``: the stain fit's decoded copy the first time, else read and decoded now; None when
        it cannot be decoded (thread-safe: ``dict.pop`` is atomic)."""
        tile = self.decoded.pop(pos, None)
        return self.tiles.decodable(*pos) if tile is None else tile


@dataclass
class TileBatch:
    """Kept tiles of one batch (normalised, uint8 NHWC), their positions, white fractions and sharpness.

    ``sharpness`` is NaN for tiles outside the sample given to :func:`tile_batches`.
    """

    positions: list[Position]
    tiles: np.ndarray
    white: np.ndarray
    sharpness: np.ndarray
    corrupt: int
    read: int


def survey_slide(slide: Slide) -> SlideSurvey:
    """Thumbnail at :data:`THUMBNAIL_MPP`, its tissue mask and the slide's glass (what "white" and optical
    density are relative to)."""
    thumbnail, thumbnail_mpp = slide.thumbnail(THUMBNAIL_MPP)
    mask = tissue_mask(thumbnail)
    return SlideSurvey(thumbnail, thumbnail_mpp, mask, glass_colour(thumbnail, mask))


def tile_slide(slide: Slide, survey: SlideSurvey, tile_size: int, mpp: float,
                  reference: StainReference, threads: int = 1) -> TiledSlide:
    """Tile grid at ``mpp`` um/px with the tissue tiles found by the survey, and the slide's stain normaliser.

    The tiles come from :meth:`dicom_io.wsi.Slide.tile_source`: the pyramid level at ``mpp``, or the
    nearest finer one resampled. The stain-fit tiles are read on ``threads`` threads.
    """
    tiles = slide.tile_source(mpp, tile_size)
    level = tiles.level
    grid = grid_for_level(level.width, level.height, tile_size, (level.mpp / 1000.0, level.mpp / 1000.0))
    candidates = candidate_tiles(survey.mask, grid)
    sample = stain_sample(tiles.decodable, candidates, threads)
    normaliser = fit_stains(list(sample.values()), reference)
    normaliser.expect(len(candidates) * tile_size**2)
    return TiledSlide(survey, tiles, grid, candidates, normaliser, sample)


def ungraded_tiling(slide: Slide, survey: SlideSurvey, tile_size: int) -> TiledSlide:
    """The finest level as it is, with no tissue tiles and no stain fit: for a slide quality control already
    refused (e.g. an H&E overview without a level at the model's resolution), so its "not assessable" SR has a
    level and grid to refer to."""
    level = slide.levels[0]
    tiles = TileSource(level, level, slide.tile_reader(level, tile_size))
    grid = grid_for_level(level.width, level.height, tile_size, (level.mpp / 1000.0, level.mpp / 1000.0))
    return TiledSlide(survey, tiles, grid, [], StainNormaliser.identity())


def spread_indices(n: int, k: int) -> range:
    """Indices of at most ``k`` of ``n`` items, evenly spaced."""
    step = max(1, -(-n // k))
    return range(step // 2, n, step)


def stain_fit_indices(n: int) -> range:
    """Indices of the :data:`STAIN_FIT_TILES` of ``n`` tissue tiles the stain fit sees."""
    return spread_indices(n, STAIN_FIT_TILES)


def sharpness_sample(candidates: list[Position]) -> frozenset[Position]:
    """The :data:`SHARPNESS_TILES` tissue tiles, spread over the slide, whose sharpness QC measures."""
    return frozenset(candidates[i] for i in spread_indices(len(candidates), SHARPNESS_TILES))


def stain_sample(decodable: Callable[[int, int], np.ndarray | None], candidates: list[Position],
                 threads: int = 1) -> dict[Position, np.ndarray]:
    """The decodable tiles among :func:`stain_fit_indices` of ``candidates``, by position (in their order), read on
    ``threads`` threads (``decodable``: :meth:`dicom_io.wsi.TileSource.decodable`)."""
    positions = [candidates[i] for i in stain_fit_indices(len(candidates))]
    with ThreadPoolExecutor(max(1, threads)) as pool:
        tiles = list(pool.map(lambda pos: decodable(*pos), positions))
    return {pos: tile for pos, tile in zip(positions, tiles, strict=True) if tile is not None}


#: A tile as the pool hands it back: None if corrupt, else
#: (normalised tile or None if too white, white fraction, sharpness or NaN if not sampled).
PooledTile = tuple[np.ndarray | None, float, float] | None


def _read_tile(prepared: TiledSlide, pos: Position, white_fraction_max: float,
                  measure_sharpness: bool) -> PooledTile:
    """Read, decode, white-filter, normalise and maybe measure one tile (in a pool thread; numpy releases the GIL)."""
    tile = prepared.take(pos)
    if tile is None:
        return None
    white = float(white_fraction(tile, prepared.survey.glass))
    if white > white_fraction_max:
        return None, white, np.nan
    tile = prepared.normaliser(tile)
    return tile, white, float(sharpness(tile[None])[0]) if measure_sharpness else np.nan


def _read_ahead(prepare: Callable[[Position], PooledTile], positions: list[Position], batch_size: int,
                threads: int, ahead: int = 2) -> Iterator[tuple[list[Position], list[PooledTile]]]:
    """Yield batches of prepared tiles while at most ``ahead`` later batches are being prepared."""
    chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[tuple[list[Position], list[Future]]] = deque()
        for chunk in chunks:
            pending.append((chunk, [pool.submit(prepare, p) for p in chunk]))
            if len(pending) > ahead:
                done, futures = pending.popleft()
                yield done, [f.result() for f in futures]
        while pending:
            done, futures = pending.popleft()
            yield done, [f.result() for f in futures]


def tile_batches(prepared: TiledSlide, batch_size: int, threads: int, white_fraction_max: float,
                 sharpness_at: frozenset[Position] = frozenset()) -> Iterator[TileBatch]:
    """Normalised tissue tiles in full batches of ``batch_size`` (the last one shorter); tiles over
    ``white_fraction_max`` white are dropped.

    Batches are refilled across the dropped tiles, so the model sees at most
    two batch shapes: ONNX Runtime keeps a memory plan per input shape, and
    batches of every size from 1 to 16 grew a 212-tile slide's peak memory by
    about 100 MiB more than a 32-tile one's (measured). Each batch counts the
    candidates read (and found corrupt) since the previous one; the last batch
    may hold no tile. Kept tiles at positions in ``sharpness_at`` get their
    blur-QC sharpness measured in the pool too (e.g. :func:`sharpness_sample`).
    """

    def prepare(pos: Position) -> PooledTile:
        return _read_tile(prepared, pos, white_fraction_max, pos in sharpness_at)

    size = prepared.grid.tile_size
    kept: list[tuple[Position, np.ndarray, float, float]] = []
    corrupt = read = 0
    for positions, results in _read_ahead(prepare, prepared.candidates, batch_size, threads):
        read += len(positions)
        corrupt += sum(r is None for r in results)
        kept += [(p, r[0], r[1], r[2]) for p, r in zip(positions, results) if r is not None and r[0] is not None]
        while len(kept) >= batch_size:
            yield _batch(kept[:batch_size], size, corrupt, read)
            kept, corrupt, read = kept[batch_size:], 0, 0
    if kept or read:
        yield _batch(kept, size, corrupt, read)


def _batch(kept: list[tuple[Position, np.ndarray, float, float]], size: int, corrupt: int, read: int) -> TileBatch:
    return TileBatch(
        positions=[k[0] for k in kept],
        tiles=np.stack([k[1] for k in kept]) if kept else np.zeros((0, size, size, 3), np.uint8),
        white=np.array([k[2] for k in kept], dtype=np.float64),
        sharpness=np.array([k[3] for k in kept], dtype=np.float64),
        corrupt=corrupt,
        read=read,
    )
