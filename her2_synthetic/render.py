"""Synthetic HER2 IHC slides with known ground truth (numpy only, no torch).

A slide is described by a :class:`SlideSpec` and rendered on demand, in
physical units (micrometres), at any pixel spacing, so the same slide can be
written as a DICOM pyramid at 10x or 40x and rendered tile by tile in bounded
memory.

What is drawn
-------------
* **Layout.** Tissue is a smooth random blob on glass; inside it, tumour nests
  (a second smooth field, thresholded so that ``tumour_fraction`` of the tissue
  is tumour) alternate with stroma. Tumour areas are split into Voronoi regions
  of one HER2 class each, assigned so that class areas follow ``class_mix``.
* **Tumour cells** sit on a jittered lattice (~13 um apart, 60 nuclei per
  0.01 mm2); every pixel belongs to its nearest cell. Haematoxylin nuclei are
  ellipses around the cell centres (axes ~7.5 x 4.6 um) with chromatin
  texture; the cell membrane is the Voronoi boundary between cells. With
  ``textured`` (off by default until the bundled CNN is retrained on it),
  cytoplasm and stroma are granular (2 um value noise), fibres thinner and
  every cell boundary carries a faint haematoxylin outline, in every class, so
  that fine detail (what QC's sharpness measures) does not come from DAB
  membranes alone and a sharp slide reads as sharp as the real cores.
* **DAB membrane staining** follows ASCO/CAP patterns per class
  (:data:`STAINING`): 0 none, 1+ faint and incomplete (30-60 % of the
  circumference, in two runs of ~6-12 um), 2+ weak-to-moderate and complete,
  3+ intense and complete; membrane FWHM 1.7-2.1 um; a cytoplasmic DAB blush
  in 1+ to 3+ cells. The membrane profile is a Gaussian across the boundary
  whose integral equals the membrane width, so the DAB amount per micrometre
  of membrane is the same at every magnification. Grey-brown false hits (red
  cells, pigment) lie in the tissue of every class, 0 included.
* **Colour** follows Beer-Lambert relative to the slide's glass: RGB =
  (glass + 1) exp(-OD) - 1 + sensor noise, OD = c_H * v_H + c_DAB * v_DAB plus
  a grey residual. Centre "A" uses the reference stain vectors; centre "B"
  (the second lab) uses other stain vectors, stronger haematoxylin, scanner
  blur, other glass and a more fragmented, stroma-rich layout. Glass colour,
  haematoxylin strength and noise vary per slide around the centre's values;
  glass-like gaps (tears, oedema) open in the stroma.

Physical quantities are calibrated on the four real HER2 cores
(``tests/data/real_her2``; figures in ``docs/training.md``, "Synthetic tissue
calibrated on real cores"), in OD relative to the glass at 0.25 um/px: glass
~(233, 232, 240) with noise SD ~2 / 2 / 3.3; nucleus H 0.25-0.35 with
chromatin CV ~0.3, non-nuclear tumour H 0.01-0.07 and stroma 0.04-0.07;
real membrane DAB 2+ ISH- median 0.22 (p90 0.37), 2+ ISH+ 0.47 (p90 0.96);
cytoplasmic blush 0.01-0.13; red cells DAB ~0.25 under more H. Only
physical quantities come from the cores; their scores are never used here.

Ground truth is exact: :func:`truth_grid` gives per-tile tumour fraction and
class fractions, :func:`slide_truth` the slide percentages and ASCO/CAP call,
and :class:`Rendered` carries the exact membrane mask of every rendered pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from scipy import ndimage

from her2_core.aggregate import CLASSES, SlideCall, asco_cap_call
from her2_core.preprocessing.stain import EOSIN_OD, REFERENCE
from her2_core.preprocessing.tissue import THUMBNAIL_MPP

#: Coarse grid (um) on which the smooth layout fields are defined.
FIELD_STEP_UM = 32.0
#: Distance between neighbouring tumour cell centres (um).
CELL_SPACING_UM = 13.0
#: Spacing of the stromal fibroblast lattice (um).
STROMA_SPACING_UM = 30.0

#: Spacing (um) of the lattice of brown false hits (red cells, pigment), and the share of its points drawn.
FALSE_HIT_SPACING_UM = 40.0
FALSE_HIT_SHARE = 0.3
#: Lattice step (um) of the chromatin texture inside nuclei.
CHROMATIN_STEP_UM = 0.8
#: Granular texture of cytoplasm and stroma: value-noise step (um) and relative amplitude (+-).
GRAIN_STEP_UM = 2.0
GRAIN_AMPLITUDE = 1.0
#: Haematoxylin cell outline at every tumour-cell boundary: peak OD and Gaussian SD (um), faded out within
#: ``OUTLINE_FADE_UM`` of where three cells meet: full outlines met there in nucleus-like blobs (H 0.24-0.30 after the
#: grader's smoothing, 13-44 um2) that the membrane grader took for tumour nuclei (nucleus precision 0.62-0.74); the
#: real HER2 0 core shows no haematoxylin cell outlines at all (the outline stands in for fine detail, see the docs).
OUTLINE_H = 0.17
OUTLINE_SIGMA_UM = 0.5
OUTLINE_FADE_UM = 1.5
#: A nucleolus in every textured tumour nucleus (as in the real cores): H added and radius range (um); it keeps the
#: QC sharpness of a textured HER2 0 slide where the faded outlines lost some.
NUCLEOLUS_H = 0.25
NUCLEOLUS_RADIUS_UM = (0.5, 0.8)
#: Exponent that narrows the stromal fibres (1: a plain sine; higher: thin fibres with pale gaps between them).
FIBRE_SHARPNESS = 4.0


@dataclass(frozen=True)
class Staining:
    """DAB of one HER2 class, per cell: membrane peak OD range, stained share of the circumference,
    membrane FWHM (um), number of separate stained runs, cytoplasmic blush OD range."""

    dab: tuple[float, float]
    fraction: tuple[float, float]
    width_um: float
    runs: int
    blush: tuple[float, float]


#: Per-class staining. Membrane peaks: real 2+ ISH- median 0.22 (p90 0.37) and 2+ ISH+ 0.47 (p90 0.96), real
#: faint 1+ membranes broken into 8-9 um runs, FWHM 1.7-2.1 um, blush 0.01-0.13 (docs/training.md). 2+ starts at
#: 0.25 and 3+ at 0.80 so that centre B's scanner blur keeps them apart from 1+ / 2+ (ASCO/CAP classes stay distinct).
STAINING: dict[str, Staining] = {
    "0": Staining((0.0, 0.0), (0.0, 0.0), 1.7, 1, (0.0, 0.0)),
    "1+": Staining((0.16, 0.26), (0.30, 0.60), 1.7, 2, (0.01, 0.06)),
    "2+": Staining((0.25, 0.42), (1.00, 1.00), 1.9, 1, (0.03, 0.10)),
    "3+": Staining((0.80, 1.10), (1.00, 1.00), 2.1, 1, (0.03, 0.08)),
}


#: "H&E" replaces DAB by eosin in cytoplasm and stroma: a real-world wrong-stain input for QC.
STAINS = ("HER2-DAB", "H&E")
#: Artefacts for quality-control cases: green marker ink, a tissue fold, an out-of-focus scan.
ARTEFACTS = ("pen", "fold", "blur")
PEN_INK = (0.80, 0.15, 0.60)


@dataclass(frozen=True)
class Centre:
    """Lab/scanner characteristics of a synthetic centre."""

    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    h_gain: float
    blur_um: float
    tissue_scale_um: float
    nest_scale_um: float
    glass: tuple[float, float, float]
    noise_sd: tuple[float, float, float]


CENTRES: dict[str, Centre] = {
    "A": Centre(REFERENCE.stain_matrix, h_gain=1.0, blur_um=0.0, tissue_scale_um=320.0, nest_scale_um=110.0,
                glass=(233.0, 232.0, 240.0), noise_sd=(2.0, 2.0, 3.3)),
    "B": Centre(
        ((0.560, 0.760, 0.330), (0.281, 0.581, 0.764)),
        h_gain=1.2,
        blur_um=0.25,
        tissue_scale_um=220.0,
        nest_scale_um=80.0,
        glass=(228.0, 229.0, 236.0),
        noise_sd=(2.5, 2.5, 3.6),
    ),
}
#: Per-slide variation around the centre: glass shift (grey levels, common and per channel), haematoxylin gain, noise.
GLASS_SHIFT = 5.0
GLASS_TINT = 2.0
H_GAIN_SPREAD = 0.12
NOISE_SPREAD = 0.2


@dataclass(frozen=True)
class SlideSpec:
    """One synthetic slide: deterministic given its fields."""

    seed: int
    width_um: float = 4096.0
    height_um: float = 3072.0
    class_mix: dict[str, float] = field(default_factory=lambda: {"0": 0.0, "1+": 0.0, "2+": 0.0, "3+": 1.0})
    tumour_fraction: float = 0.7
    centre: str = "A"
    patient_id: str = "SYNTH-0001"
    stain: str = "HER2-DAB"
    artefacts: tuple[str, ...] = ()
    #: Real-like fine texture (granular cytoplasm and stroma, cell outlines): see the module docstring.
    textured: bool = False

    def __post_init__(self) -> None:
        if set(self.class_mix) - set(CLASSES):
            raise ValueError(f"class_mix keys must be among {CLASSES}, got {sorted(self.class_mix)}")
        total = sum(self.class_mix.values())
        if total <= 0 or any(v < 0 for v in self.class_mix.values()):
            raise ValueError(f"class_mix must be non-negative and not all zero, got {self.class_mix}")
        if not 0.0 < self.tumour_fraction <= 1.0:
            raise ValueError(f"tumour_fraction must be in (0, 1], got {self.tumour_fraction}")
        if self.centre not in CENTRES:
            raise ValueError(f"centre must be one of {sorted(CENTRES)}, got {self.centre!r}")
        if self.stain not in STAINS:
            raise ValueError(f"stain must be one of {STAINS}, got {self.stain!r}")
        if set(self.artefacts) - set(ARTEFACTS):
            raise ValueError(f"artefacts must be among {ARTEFACTS}, got {self.artefacts}")

    def __hash__(self) -> int:  # dict field: hash on the frozen content
        return hash((self.seed, self.width_um, self.height_um, tuple(sorted(self.class_mix.items())),
                     self.tumour_fraction, self.centre, self.patient_id, self.stain, self.artefacts, self.textured))

    @classmethod
    def from_dict(cls, d: dict) -> SlideSpec:
        """Inverse of the ``spec`` block of ground_truth.json."""
        return cls(**{**d, "artefacts": tuple(d.get("artefacts", ()))})

    @cached_property
    def layout(self) -> _Layout:
        return _Layout(self)


@dataclass
class Rendered:
    """A rendered region: RGB pixels, the exact DAB membrane mask and per-pixel tumour class."""

    rgb: np.ndarray
    membrane: np.ndarray
    tumour_class: np.ndarray


def _hash01(seed: int, i: np.ndarray, j: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per integer lattice point (splitmix64 mixing)."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             + i.astype(np.int64).astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             + j.astype(np.int64).astype(np.uint64) * np.uint64(0x94D049BB133111EB)
             + np.uint64(salt) * np.uint64(0xD6E8FEB86659FD93))
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class _Layout:
    """Smooth tissue / tumour fields and the class regions of one slide."""

    def __init__(self, spec: SlideSpec) -> None:
        centre = CENTRES[spec.centre]
        rng = np.random.default_rng(spec.seed)
        gh = int(np.ceil(spec.height_um / FIELD_STEP_UM)) + 2
        gw = int(np.ceil(spec.width_um / FIELD_STEP_UM)) + 2
        yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
        # Tissue: smooth noise times an elliptical envelope, so slide edges are glass.
        noise = ndimage.gaussian_filter(rng.normal(size=(gh, gw)), centre.tissue_scale_um / FIELD_STEP_UM)
        noise /= noise.std() + 1e-9
        ey = (yy - gh / 2) / (gh / 2)
        ex = (xx - gw / 2) / (gw / 2)
        envelope = 1.0 - (ex**2 + ey**2)
        self.tissue_field = envelope * 2.0 + 0.35 * noise
        self.tissue_threshold = 0.45
        tissue = self.tissue_field > self.tissue_threshold
        # Tumour nests inside tissue.
        nests = ndimage.gaussian_filter(rng.normal(size=(gh, gw)), centre.nest_scale_um / FIELD_STEP_UM)
        self.nest_field = nests / (nests.std() + 1e-9)
        inside = self.nest_field[tissue]
        self.nest_threshold = float(np.quantile(inside, 1.0 - spec.tumour_fraction)) if inside.size else 0.0
        if spec.tumour_fraction >= 1.0:
            self.nest_threshold = -np.inf
        tumour = tissue & (self.nest_field > self.nest_threshold)
        # Class regions: Voronoi seeds assigned to classes by area deficit.
        mix = {c: spec.class_mix.get(c, 0.0) / sum(spec.class_mix.values()) for c in CLASSES}
        n_seeds = 1 if max(mix.values()) >= 1.0 else 12
        self.seeds = np.column_stack([rng.uniform(0, spec.width_um, n_seeds), rng.uniform(0, spec.height_um, n_seeds)])
        owner = self._nearest_seed((xx - 1) * FIELD_STEP_UM, (yy - 1) * FIELD_STEP_UM)
        area = np.array([(tumour & (owner == k)).sum() for k in range(n_seeds)], dtype=float)
        self.seed_class = np.zeros(n_seeds, dtype=np.int8)
        target = np.array([mix[c] for c in CLASSES]) * area.sum()
        got = np.zeros(len(CLASSES))
        for k in np.argsort(-area):
            cls = int(np.argmax(target - got))
            self.seed_class[k] = cls
            got[cls] += area[k]
        # The slide's own look around its centre's (a second generator: the layout above stays as it was).
        look = np.random.default_rng([spec.seed, 7])
        self.glass = (np.asarray(centre.glass) + GLASS_SHIFT * look.uniform(-1, 1)
                      + GLASS_TINT * look.uniform(-1, 1, 3))
        self.h_gain = centre.h_gain * (1.0 + H_GAIN_SPREAD * look.uniform(-1, 1))
        self.noise_sd = np.asarray(centre.noise_sd) * (1.0 + NOISE_SPREAD * look.uniform(-1, 1))
        # Glass-like gaps in the stroma (tears, oedema), ~50 um across: 18-58 % of the stroma, so that with pale
        # stroma about a fifth of the tissue area reads white, as on the real cores (19-29 %).
        gaps = ndimage.gaussian_filter(look.normal(size=(gh, gw)), 1.5)
        self.gap_field = gaps / (gaps.std() + 1e-9)
        self.gap_threshold = float(look.uniform(-0.2, 0.9))

    def _nearest_seed(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = (x[..., None] - self.seeds[:, 0]) ** 2 + (y[..., None] - self.seeds[:, 1]) ** 2
        return np.argmin(d, axis=-1)

    def _sample(self, grid: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        coords = np.stack([y / FIELD_STEP_UM + 1, x / FIELD_STEP_UM + 1])
        return ndimage.map_coordinates(grid, coords, order=1, mode="nearest")

    def labels(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tissue mask (glass-like gaps in the stroma left out), tumour mask and class index (-1 outside tumour)
        at points (um)."""
        tissue = self._sample(self.tissue_field, x, y) > self.tissue_threshold
        tumour = tissue & (self._sample(self.nest_field, x, y) > self.nest_threshold)
        tissue &= tumour | (self._sample(self.gap_field, x, y) <= self.gap_threshold)
        cls = np.where(tumour, self.seed_class[self._nearest_seed(x, y)], -1).astype(np.int8)
        return tissue, tumour, cls


def _nearest(seed: int, x: np.ndarray, y: np.ndarray, spacing: float, salt: int):
    """Nearest jittered lattice point and the distances to the nearest three: (i, j, dx, dy, d1, d2, d3)."""
    gi = np.floor(x / spacing).astype(np.int64)
    gj = np.floor(y / spacing).astype(np.int64)
    best = [np.full(x.shape, np.inf) for _ in range(3)]
    bi = np.zeros(x.shape, np.int64)
    bj = np.zeros(x.shape, np.int64)
    bdx = np.zeros(x.shape)
    bdy = np.zeros(x.shape)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            i, j = gi + di, gj + dj
            cx = (i + 0.15 + 0.7 * _hash01(seed, i, j, salt)) * spacing
            cy = (j + 0.15 + 0.7 * _hash01(seed, i, j, salt + 1)) * spacing
            dx, dy = x - cx, y - cy
            d = np.hypot(dx, dy)
            closer = d < best[0]
            best[2] = np.where(d < best[1], best[1], np.minimum(best[2], d))
            best[1] = np.where(closer, best[0], np.minimum(best[1], d))
            best[0] = np.where(closer, d, best[0])
            bi = np.where(closer, i, bi)
            bj = np.where(closer, j, bj)
            bdx = np.where(closer, dx, bdx)
            bdy = np.where(closer, dy, bdy)
    return bi, bj, bdx, bdy, best[0], best[1], best[2]


def _value_noise(seed: int, x: np.ndarray, y: np.ndarray, step: float, salt: int) -> np.ndarray:
    """Smooth deterministic noise in [0, 1): lattice values every ``step`` um, smoothstep-interpolated."""
    gx, gy = x / step, y / step
    i, j = np.floor(gx), np.floor(gy)
    fx, fy = gx - i, gy - j
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    v = [[_hash01(seed, i + a, j + b, salt) for b in (0, 1)] for a in (0, 1)]
    return ((v[0][0] * (1 - fx) + v[1][0] * fx) * (1 - fy)) + ((v[0][1] * (1 - fx) + v[1][1] * fx) * fy)


def _soft_edge(signed_um: np.ndarray, mpp: float) -> np.ndarray:
    """Anti-aliased inside indicator for a signed distance (negative inside)."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_um / max(0.25 * mpp, 0.1), -50, 50)))


def render_region(spec: SlideSpec, x_um: float, y_um: float, width_px: int, height_px: int, mpp: float) -> Rendered:
    """Render ``width_px x height_px`` pixels of spacing ``mpp`` um whose top-left corner is at (x_um, y_um)."""
    centre = CENTRES[spec.centre]
    layout = spec.layout
    ys, xs = np.mgrid[0:height_px, 0:width_px].astype(np.float64)
    x = x_um + (xs + 0.5) * mpp
    y = y_um + (ys + 0.5) * mpp
    tissue, tumour, cls = layout.labels(x, y)

    # Tumour cells: Voronoi of a jittered lattice.
    ci, cj, dx, dy, d1, d2, d3 = _nearest(spec.seed, x, y, CELL_SPACING_UM, salt=11)
    gap = (d2 - d1) / 2.0  # approximate distance to the cell boundary
    rnd = lambda salt: _hash01(spec.seed, ci, cj, salt)
    # Semi-axes nuc_r / (1 -+ 0.23): 2.1-2.6 x 3.4-4.2 um (real median axes ~7.5 x 4.6 um).
    nuc_r = 2.6 + 0.6 * rnd(21)
    angle = np.arctan2(dy, dx)
    nucleus = _soft_edge(d1 * (1.0 + 0.23 * np.cos(2 * (angle - 6.283 * rnd(22)))) - nuc_r, mpp)
    membrane_conc = np.zeros_like(x)
    membrane_width = np.zeros_like(x)
    blush = np.zeros_like(x)
    stained_arc = np.zeros(x.shape, bool)
    for k, name in enumerate(CLASSES):
        st = STAINING[name]
        here = cls == k
        if not here.any() or st.dab[1] == 0.0:
            continue
        conc = st.dab[0] + (st.dab[1] - st.dab[0]) * rnd(31)
        frac = st.fraction[0] + (st.fraction[1] - st.fraction[0]) * rnd(32)
        phase = 6.283185 * rnd(33)
        arc = np.mod((angle - phase) * st.runs / 6.283185, 1.0) < frac
        membrane_conc = np.where(here, conc, membrane_conc)
        membrane_width = np.where(here, st.width_um, membrane_width)
        blush = np.where(here, st.blush[0] + (st.blush[1] - st.blush[0]) * rnd(34), blush)
        stained_arc |= here & arc
    sigma = np.sqrt((membrane_width / 2.355) ** 2 + (0.5 * mpp) ** 2)
    profile = membrane_width / (sigma * 2.5066) * np.exp(-0.5 * (gap / sigma) ** 2)
    dab = np.where(tumour & stained_arc, membrane_conc * profile, 0.0) + np.where(tumour, blush * (1 - nucleus), 0.0)
    membrane = tumour & stained_arc & (gap < np.maximum(membrane_width / 2.0, 0.5 * mpp))
    # Nuclei 0.27-0.37 with chromatin texture (CV ~0.3) in cytoplasm of 0.07-0.10 (textured: granular 0.035-0.06).
    chromatin = np.clip(1.0 + 1.5 * (_value_noise(spec.seed, x, y, CHROMATIN_STEP_UM, 42) - 0.5), 0.3, None)
    # Fine tissue texture (what makes real tissue read sharp, whatever its HER2 class): granular cytoplasm
    # (value noise every GRAIN_STEP_UM, +-GRAIN_AMPLITUDE) and a haematoxylin cell outline at every cell
    # boundary, so that edges alone say nothing about DAB (docs/training.md, "texture").
    # Off by default: the bundled CNN was trained without it (docs/training.md, "Texture diagnosis").
    h_nucleus = 0.32 * (0.85 + 0.30 * rnd(41)) * chromatin
    if spec.textured:
        grain = 1.0 + 2.0 * GRAIN_AMPLITUDE * (_value_noise(spec.seed, x, y, GRAIN_STEP_UM, 44) - 0.5)
        cytoplasm = (0.035 + 0.025 * rnd(43)) * grain
        outline = OUTLINE_H * np.exp(-0.5 * (gap / np.hypot(OUTLINE_SIGMA_UM, 0.5 * mpp)) ** 2)
        outline *= np.clip((d3 - d2) / 2.0 / OUTLINE_FADE_UM, 0.0, 1.0) ** 2  # (d3 - d2) / 2: how far from a corner
        cytoplasm = cytoplasm + outline * (1.0 - nucleus)
        phi, off = 6.283185 * rnd(23), 0.35 * nuc_r * rnd(24)
        radius = NUCLEOLUS_RADIUS_UM[0] + (NUCLEOLUS_RADIUS_UM[1] - NUCLEOLUS_RADIUS_UM[0]) * rnd(25)
        nucleolus = _soft_edge(np.hypot(dx - off * np.cos(phi), dy - off * np.sin(phi)) - radius, mpp)
        h_nucleus = h_nucleus + NUCLEOLUS_H * nucleolus
    else:
        cytoplasm = 0.07 + 0.03 * rnd(43)
    h_tumour = cytoplasm + (h_nucleus - cytoplasm) * nucleus

    # Stroma: pale fibres and sparse elongated fibroblast nuclei (gaps: see _Layout.labels).
    si, sj, sdx, sdy, _, _, _ = _nearest(spec.seed, x, y, STROMA_SPACING_UM, salt=51)
    present = _hash01(spec.seed, si, sj, 52) < 0.35
    theta = 3.14159 * _hash01(spec.seed, si, sj, 53)
    u = sdx * np.cos(theta) + sdy * np.sin(theta)
    v = -sdx * np.sin(theta) + sdy * np.cos(theta)
    fib_nucleus = present * _soft_edge(np.hypot(u / 3.0, v / 1.2) - 1.0, mpp / 2.0)
    fibres = 0.5 + 0.5 * np.sin((x * 0.8 + y * 0.35) / 2.5 + 3.0 * np.sin(y / 40.0))
    if spec.textured:
        fibre_grain = 2.0 * _value_noise(spec.seed, x, y, GRAIN_STEP_UM, 45)
        h_fibres = (0.035 + 0.035 * fibres ** FIBRE_SHARPNESS * fibre_grain) * (0.5 + fibre_grain * 0.5)
    else:
        h_fibres = 0.035 + 0.035 * fibres
    h_stroma = h_fibres + (0.30 * chromatin - h_fibres) * fib_nucleus

    # Brown false hits: grey-brown discs ~7 um across (red cells, pigment), H above DAB, in any tissue.
    fi, fj, _, _, f1, _, _ = _nearest(spec.seed, x, y, FALSE_HIT_SPACING_UM, salt=61)
    hit = tissue * (_hash01(spec.seed, fi, fj, 62) < FALSE_HIT_SHARE) * _soft_edge(
        f1 - (3.0 + 0.8 * _hash01(spec.seed, fi, fj, 63)), mpp)
    h_hit = 0.45 + 0.15 * _hash01(spec.seed, fi, fj, 64)
    dab_hit = 0.22 + 0.10 * _hash01(spec.seed, fi, fj, 65)

    h = np.where(tumour, h_tumour, np.where(tissue, h_stroma, 0.0))
    h = (h + hit * (h_hit - h)) * layout.h_gain
    dab = dab + hit * (dab_hit - dab)
    od = h[..., None] * np.asarray(centre.stain_matrix[0])
    if spec.stain == "H&E":
        eosin = np.where(tissue, np.where(tumour, 0.45, 0.35) * (1.0 - 0.6 * nucleus * tumour), 0.0)
        od = od + eosin[..., None] * np.asarray(EOSIN_OD)
    else:
        od = od + dab[..., None] * np.asarray(centre.stain_matrix[1])
    od = od + np.where(tissue, 0.02, 0.0)[..., None]
    if "fold" in spec.artefacts:  # tissue folded onto itself: about double optical density
        cx, cy = 0.5 * spec.width_um, 0.45 * spec.height_um
        fold = tissue & (((x - cx) / (0.18 * spec.width_um)) ** 2 + ((y - cy) / (0.06 * spec.height_um)) ** 2 < 1)
        od = np.where(fold[..., None], od * 2.4 + 0.15, od)
    if "pen" in spec.artefacts:  # a marker stroke across the slide
        dist = np.abs(y - (0.25 * spec.height_um + 0.3 * x)) / np.hypot(1.0, 0.3)
        od = od + (dist < 60.0)[..., None] * 1.2 * np.asarray(PEN_INK)
    blur_um = centre.blur_um + (2.5 if "blur" in spec.artefacts else 0.0)
    if blur_um > 0:
        s = blur_um / mpp
        od = ndimage.gaussian_filter(od, sigma=(s, s, 0))
    noise_rng = np.random.default_rng([spec.seed, int(x_um * 64), int(y_um * 64), int(mpp * 1000)])
    rgb = (layout.glass + 1.0) * np.exp(-od) - 1.0 + noise_rng.normal(0.0, 1.0, od.shape) * layout.noise_sd
    return Rendered(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), membrane, cls)


@dataclass(frozen=True)
class RegionCells:
    """The tumour-lattice cells whose centres lie in a region, as :func:`render_region` draws them.

    ``centres_um`` (N, 2) is (x, y) in slide micrometres; ``tumour`` marks cells
    drawn (centre in a tumour nest); ``cls`` is the HER2 class index into
    ``CLASSES`` (-1 outside tumour); ``stained_fraction`` is the share of the
    circumference drawn with DAB (0 for class 0, 1.0 for complete) and
    ``dab`` the membrane DAB concentration.
    """

    centres_um: np.ndarray
    tumour: np.ndarray
    cls: np.ndarray
    stained_fraction: np.ndarray
    dab: np.ndarray


def region_cells(spec: SlideSpec, x_um: float, y_um: float, width_um: float, height_um: float) -> RegionCells:
    """Ground truth per cell for the region whose top-left corner is (x_um, y_um): what a cell grader is scored on.

    Reuses the lattice and per-cell random values of :func:`render_region`
    (cell centres of :func:`_nearest` with salt 11, staining draws 31/32),
    so it cannot drift from what is drawn.
    """
    s = CELL_SPACING_UM
    i, j = np.meshgrid(np.arange(np.floor(x_um / s) - 1, np.ceil((x_um + width_um) / s) + 1, dtype=np.int64),
                       np.arange(np.floor(y_um / s) - 1, np.ceil((y_um + height_um) / s) + 1, dtype=np.int64))
    i, j = i.ravel(), j.ravel()
    cx = (i + 0.15 + 0.7 * _hash01(spec.seed, i, j, 11)) * s
    cy = (j + 0.15 + 0.7 * _hash01(spec.seed, i, j, 12)) * s
    inside = (cx >= x_um) & (cx < x_um + width_um) & (cy >= y_um) & (cy < y_um + height_um)
    i, j, cx, cy = i[inside], j[inside], cx[inside], cy[inside]
    _, tumour, cls = spec.layout.labels(cx, cy)
    frac = np.zeros(len(cx))
    dab = np.zeros(len(cx))
    for k, name in enumerate(CLASSES):
        st = STAINING[name]
        here = cls == k
        if st.dab[1] > 0:
            dab[here] = (st.dab[0] + (st.dab[1] - st.dab[0]) * _hash01(spec.seed, i, j, 31))[here]
            frac[here] = (st.fraction[0] + (st.fraction[1] - st.fraction[0]) * _hash01(spec.seed, i, j, 32))[here]
    return RegionCells(np.column_stack([cx, cy]), tumour, cls, frac, dab)


def render_thumbnail(spec: SlideSpec, mpp: float = THUMBNAIL_MPP, supersample: int = 4) -> np.ndarray:
    """The whole slide at ``mpp`` um/px, area-averaged from a ``supersample``-times finer render."""
    fine = mpp / supersample
    w = int(np.ceil(spec.width_um / mpp)) * supersample
    h = int(np.ceil(spec.height_um / mpp)) * supersample
    rgb = render_region(spec, 0.0, 0.0, w, h, fine).rgb.astype(np.float32)
    rgb = rgb.reshape(h // supersample, supersample, w // supersample, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def truth_grid(spec: SlideSpec, tile_um: float, samples: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile ground truth on the grid of ``tile_um`` tiles from (0, 0).

    Returns class fractions of the tumour area (rows, cols, 4; zeros where no
    tumour) and the tumour fraction of each tile's area (rows, cols).
    """
    rows = int(np.ceil(spec.height_um / tile_um))
    cols = int(np.ceil(spec.width_um / tile_um))
    step = tile_um / samples
    ys, xs = np.mgrid[0 : rows * samples, 0 : cols * samples].astype(np.float64)
    _, tumour, cls = spec.layout.labels((xs + 0.5) * step, (ys + 0.5) * step)
    onehot = np.stack([(cls == k) for k in range(len(CLASSES))], axis=-1).astype(np.float64)
    per_tile = onehot.reshape(rows, samples, cols, samples, len(CLASSES)).sum(axis=(1, 3))
    tumour_frac = tumour.reshape(rows, samples, cols, samples).mean(axis=(1, 3))
    totals = per_tile.sum(axis=-1, keepdims=True)
    fractions = np.divide(per_tile, totals, out=np.zeros_like(per_tile), where=totals > 0)
    return fractions, tumour_frac


def slide_truth(spec: SlideSpec, tile_um: float = 256.0) -> tuple[dict[str, float], SlideCall]:
    """Ground-truth tumour-area percentages per class and the ASCO/CAP call (rules applied literally)."""
    fractions, tumour = truth_grid(spec, tile_um)
    weights = fractions * tumour[..., None]
    total = weights.sum()
    pct = {c: (100.0 * float(weights[..., k].sum()) / total if total else 0.0) for k, c in enumerate(CLASSES)}
    return pct, asco_cap_call(pct)


def random_spec(rng: np.random.Generator, centre: str, patient_id: str, size_um: tuple[float, float] = (2048.0, 2048.0)) -> SlideSpec:
    """A slide with a random dominant class and a random minority mix (for cohorts)."""
    dominant = CLASSES[int(rng.integers(len(CLASSES)))]
    mix = {c: 0.0 for c in CLASSES}
    mix[dominant] = 1.0
    if rng.random() < 0.5:
        other = CLASSES[int(rng.integers(len(CLASSES)))]
        mix[other] += float(rng.uniform(0.1, 0.6))
    return SlideSpec(
        seed=int(rng.integers(2**31)),
        width_um=size_um[0],
        height_um=size_um[1],
        class_mix=mix,
        tumour_fraction=float(rng.uniform(0.4, 0.9)),
        centre=centre,
        patient_id=patient_id,
    )
