"""The tile path (her2_analysis/tiles.py): every tissue tile is read and decoded once, the stain fit's ones included."""

from collections import Counter
from dataclasses import replace

import numpy as np

from dicom_io.wsi import open_slide
from her2_analysis.tiles import stain_fit_indices, survey_slide, tile_batches, tile_slide
from her2_core.preprocessing import REFERENCE
from her2_synthetic.dicom import write_synthetic_slide
from her2_synthetic.render import SlideSpec


def test_stain_fit_tiles_are_decoded_once_and_graded_as_if_read_again(tmp_path):
    write_synthetic_slide(SlideSpec(seed=7, width_um=2560, height_um=2048, class_mix={"1+": 1.0}), tmp_path / "s")
    with open_slide(tmp_path / "s") as slide:
        reads: Counter = Counter()
        source = slide.tile_source(1.0, 512)
        read = source.read

        def counting_read(r: int, c: int) -> np.ndarray:
            reads[(r, c)] += 1
            return read(r, c)

        slide.tile_source = lambda mpp, size: replace(source, read=counting_read)  # type: ignore[method-assign]
        prepared = tile_slide(slide, survey_slide(slide), 512, 1.0, REFERENCE)
        assert len(prepared.decoded) == len(stain_fit_indices(len(prepared.candidates))) >= 4
        batches = list(tile_batches(prepared, 4, 2, 0.6))
        assert reads == Counter({pos: 1 for pos in prepared.candidates})  # none decoded twice
        assert not prepared.decoded  # the fit's copies were handed out and released

        again = replace(prepared, tiles=source, decoded={})  # the same slide, every tile read afresh
        fresh = list(tile_batches(again, 4, 2, 0.6))
    assert [b.positions for b in batches] == [b.positions for b in fresh]
    assert all(np.array_equal(a.tiles, b.tiles) for a, b in zip(batches, fresh))
