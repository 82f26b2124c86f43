"""Synthetic benchmark slides, generated once and reused from a cache folder.

The base-level renderer costs about 0.7 s per million pixels, so the slides are
written once into ``cache`` and reused while their recorded spec matches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from her2_synthetic.dicom import TRUTH_FILE, write_synthetic_slide
from her2_synthetic.render import SlideSpec

#: Default cache (``/out/`` is git-ignored).
DEFAULT_CACHE = Path("out") / "bench-slides"
#: Base level spacing: 10x, the bundled model's magnification.
BENCH_MPP = 1.0
_MIX = {"0": 0.3, "1+": 0.3, "2+": 0.2, "3+": 0.2}

#: name -> spec. The benchmark pair: the large slide has 6x the area (and tissue) of the small one.
SLIDES: dict[str, SlideSpec] = {
    # Smoke-test pair (seconds to render): tiny and a slide with twice its area.
    "tiny": SlideSpec(seed=61, width_um=1536, height_um=1536, class_mix=_MIX, patient_id="BENCH-T"),
    "tiny-wide": SlideSpec(seed=64, width_um=3072, height_um=1536, class_mix=_MIX, patient_id="BENCH-TW"),
    "small": SlideSpec(seed=62, width_um=4096, height_um=4096, class_mix=_MIX, patient_id="BENCH-S"),
    "large": SlideSpec(seed=63, width_um=12288, height_um=8192, class_mix=_MIX, patient_id="BENCH-L"),
    # A resection-size section (4x the large one's area, ~1000 tissue tiles): where per-slide work amortises.
    # Not rendered unless asked for (``--large xlarge``).
    "xlarge": SlideSpec(seed=67, width_um=24576, height_um=16384, class_mix=_MIX, patient_id="BENCH-XL"),
}


#: 40x slides (base level 0.25 um/px, pyramid to 8 um/px) for the membrane grader's whole-slide rows.
SLIDES_40X: dict[str, SlideSpec] = {
    "tiny40": SlideSpec(seed=65, width_um=768, height_um=768, class_mix=_MIX, patient_id="BENCH-T40"),
    "small40": SlideSpec(seed=66, width_um=2048, height_um=2048, class_mix=_MIX, patient_id="BENCH-S40"),
}
#: Base level spacing of :data:`SLIDES_40X`.
BENCH_MPP_40X = 0.25


def _spec_record(spec: SlideSpec) -> dict:
    return {"seed": spec.seed, "width_um": spec.width_um, "height_um": spec.height_um,
            "class_mix": spec.class_mix, "tumour_fraction": spec.tumour_fraction,
            "centre": spec.centre, "patient_id": spec.patient_id}


def ensure_slide(name: str, cache: Path = DEFAULT_CACHE, log=print) -> Path:
    """The series folder of benchmark slide ``name`` (10x or 40x), rendered into ``cache`` unless already there."""
    spec = SLIDES[name] if name in SLIDES else SLIDES_40X[name]
    mpp = BENCH_MPP if name in SLIDES else BENCH_MPP_40X
    folder = Path(cache) / name
    truth = folder / TRUTH_FILE
    if truth.is_file():
        try:
            recorded = json.loads(truth.read_text())
            written = recorded.get("spec", {})
            same = all(written.get(k) == v for k, v in _spec_record(spec).items())
            if same and recorded.get("base_mpp") == mpp:
                return folder
        except (OSError, ValueError):
            pass
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mpx = spec.width_um * spec.height_um / mpp**2 / 1e6
    log(f"rendering benchmark slide {name!r} ({mpx:.0f} Mpx, 1-4 s per Mpx) into {folder}")
    write_synthetic_slide(spec, folder, mpp=mpp)
    return folder
