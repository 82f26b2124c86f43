"""Synthetic cohorts (patients, slides, centres) turned into :class:`TileSet` s through the DICOM path.

Every slide is written as a DICOM WSI and read back by
:func:`model_training.slide_tiles.synthetic_slide_tiles` - the worker's own
tile path - so training tiles come from the same thumbnail, stain fit, white
filter and normalisation as the tiles the worker grades. Our writer stores
JPEG 4:2:0 tiles; other writers send 4:4:4, 4:2:2 or lossless tiles, and a
model that only saw 4:2:0 chroma grades those differently. With
``lossless`` the kept tiles' pixels are therefore rendered again without
compression (same positions, same fitted normaliser), and training adds the
codec of a random writer (:class:`model_training.augment.Augment`); without
it (test centres) the tiles are exactly the worker's. Slides are cached as
``.npz`` keyed by their spec, magnification, tile size and these options, so
re-running a recipe does not re-render.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from her2_core.aggregate import CLASSES
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import Rendered, SlideSpec, random_spec, render_region, slide_truth
from model_training.slide_tiles import synthetic_slide_tiles
from model_training.tileset import CALL_CLASS, SlideInfo, TileSet

#: Bump when the way slides become tiles changes, so stale caches are not reused.
CACHE_VERSION = 5
DEFAULT_CACHE = Path("out") / "training-cache"


def slide_label(spec: SlideSpec) -> tuple[int, tuple[float, ...]]:
    """4-class ground-truth slide call (ultralow counts as 0) and the true class percentages."""
    pct, call = slide_truth(spec)
    return CALL_CLASS[call], tuple(pct[c] for c in CLASSES)


def mixed_spec(rng: np.random.Generator, centre: str, patient_id: str, size_um: tuple[float, float],
               top_class: int) -> SlideSpec:
    """A slide whose tumour mixes classes 0..``top_class`` in Dirichlet proportions (heterogeneous HER2)."""
    shares = rng.dirichlet(np.full(top_class + 1, 0.8))
    mix = {c: (float(shares[k]) if k <= top_class else 0.0) for k, c in enumerate(CLASSES)}
    return SlideSpec(seed=int(rng.integers(2**31)), width_um=size_um[0], height_um=size_um[1], class_mix=mix,
                     tumour_fraction=float(rng.uniform(0.4, 0.9)), centre=centre, patient_id=patient_id)


def synthetic_cohort(n_patients: int, centre: str, seed: int, size_um: tuple[float, float] = (2048.0, 2048.0),
                     second_slide_share: float = 0.25, mixed_share: float = 0.5) -> list[SlideSpec]:
    """Slides of ``n_patients`` patients of one centre, balanced over the four slide calls.

    Patients cycle through the target calls 0, 1+, 2+, 3+. A ``mixed_share``
    of them get a heterogeneous slide (:func:`mixed_spec`: all classes up to
    the target in random proportions), the others a slide from
    :func:`her2_synthetic.render.random_spec` (one dominant class, maybe one
    minority); either is redrawn until its ground-truth call is the target.
    A ``second_slide_share`` of patients get a second slide (another block of
    the same tumour: same class mix, new seed), so patient-level splitting
    matters. Patient ids are ``{centre}-P{number:04d}``.
    """
    rng = np.random.default_rng([seed, ord(centre)])
    specs: list[SlideSpec] = []
    for p in range(n_patients):
        patient = f"{centre}-P{p:04d}"
        target = p % len(CLASSES)
        mixed = rng.random() < mixed_share
        while True:
            spec = mixed_spec(rng, centre, patient, size_um, target) if mixed else random_spec(rng, centre, patient,
                                                                                                 size_um)
            if slide_label(spec)[0] == target:
                break
        specs.append(spec)
        if rng.random() < second_slide_share:
            specs.append(replace(spec, seed=int(rng.integers(2**31))))
    return specs


def _cache_key(spec: SlideSpec, mpp: float, tile_size: int, membranes: bool, normalise: bool, lossless: bool) -> str:
    record = {"spec": asdict(spec), "mpp": mpp, "tile_size": tile_size, "membranes": membranes, "v": CACHE_VERSION}
    if not normalise:
        record["normalise"] = False
    if lossless:
        record["lossless"] = True
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _render_tiles(spec: SlideSpec, positions: list[tuple[int, int]], tile_size: int, mpp: float) -> list[Rendered]:
    """The tiles at grid ``positions`` as the generator draws them, padded white beyond the slide as the reader pads."""
    tile_um = tile_size * mpp
    width, height = math.ceil(spec.width_um / mpp), math.ceil(spec.height_um / mpp)
    out = []
    for r, c in positions:
        tile = render_region(spec, c * tile_um, r * tile_um, tile_size, tile_size, mpp)
        tile.rgb[max(0, height - r * tile_size):] = 255
        tile.rgb[:, max(0, width - c * tile_size):] = 255
        out.append(tile)
    return out


def slide_tileset(spec: SlideSpec, cache: Path, mpp: float = 1.0, tile_size: int = 512,
                  membranes: bool = False, normalise: bool = True, lossless: bool = False) -> TileSet:
    """The kept tiles of one synthetic slide (cached).

    ``membranes`` adds exact membrane masks; ``normalise=False`` skips stain normalisation (ablation);
    ``lossless`` replaces the decoded JPEG pixels by uncompressed renders of the same tiles (see the module).
    """
    path = Path(cache) / f"{_cache_key(spec, mpp, tile_size, membranes, normalise, lossless)}.npz"
    if path.is_file():
        return TileSet.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=path.parent, prefix="slide-"))
    try:
        write_synthetic_slide(spec, work, mpp=mpp, truth_tile_px=tile_size)
        st = synthetic_slide_tiles(work, tile_size=tile_size, mpp=mpp, threads=1, normalise=normalise)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    label, pct = slide_label(spec)
    info = SlideInfo(f"{spec.patient_id}-S{spec.seed}", spec.patient_id, spec.centre, label, pct)
    rendered = _render_tiles(spec, st.positions, tile_size, mpp) if membranes or lossless else []
    pixels = st.normaliser(np.stack([t.rgb for t in rendered])) if lossless and rendered else st.tiles
    masks = (np.stack([t.membrane for t in rendered]) if rendered else np.zeros((0, tile_size, tile_size), bool))
    tiles = TileSet(pixels, st.class_fractions, st.tumour_fraction, np.zeros(len(st.tiles), int), [info], mpp,
                    masks if membranes else None)
    tmp = path.with_suffix(".tmp.npz")
    tiles.save(tmp)
    tmp.replace(path)
    return tiles


def _slide_tileset_args(args: tuple) -> TileSet:
    return slide_tileset(*args)


def cohort_tileset(specs: Sequence[SlideSpec], cache: Path = DEFAULT_CACHE, mpp: float = 1.0, tile_size: int = 512,
                   workers: int = 2, membranes: bool = False, normalise: bool = True,
                   progress: bool = True, lossless: bool = False) -> TileSet:
    """All slides of ``specs`` as one tile set, rendered in ``workers`` processes (cached per slide)."""
    jobs = [(spec, Path(cache), mpp, tile_size, membranes, normalise, lossless) for spec in specs]
    bar = tqdm(total=len(jobs), unit="slide", desc=f"slides @ {mpp} um/px", disable=not progress)
    with bar:
        if workers <= 1:
            sets = []
            for job in jobs:
                sets.append(_slide_tileset_args(job))
                bar.update()
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                sets = []
                for tiles in pool.map(_slide_tileset_args, jobs):
                    sets.append(tiles)
                    bar.update()
    return TileSet.concat(sets)
