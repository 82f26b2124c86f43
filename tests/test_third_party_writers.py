"""Slides written by other tools (wsidicomizer, OrthancWSIDicomizer, highdicom) read and graded like ours (issue 13)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_io.wsi import open_slide
from tests.conftest import REAL_HER2
from tests.third_party import needs_wsidicomizer, wsidicomize

#: A real 2+ ISH+ core (tests/data/real_her2) at 0.25 um/px.
REAL_2P = REAL_HER2 / "2_0123a214-85b7-4804-86db-474b05a4ae57.jpg"


def real_crop(width: int, height: int, x: int = 1400, y: int = 1400) -> np.ndarray:
    """A ``width`` x ``height`` px piece of the real 2+ ISH+ core (0.25 um/px)."""
    return np.asarray(Image.open(REAL_2P).convert("RGB"))[y : y + height, x : x + width]


@needs_wsidicomizer
def test_black_edge_padding_of_wsidicomizer_reads_white(tmp_path: Path) -> None:
    # 2200 x 2400 px at 0.25 um/px: 550 x 600 px at 1 um/px, so three of the four 512 px tiles are partial.
    series = wsidicomize(real_crop(2200, 2400), 0.25, tmp_path / "s", tile_size=512)
    with open_slide(series) as slide:
        level = slide.level_for_mpp(1.0)
        assert (level.width, level.height, level.tile_width) == (550, 600, 512)
        frame = np.asarray(Image.open(io.BytesIO(slide._wsi.read_encoded_tile(level.index, (1, 1), crop_to_image_boundary=False))))
        assert frame[100:, 50:].max() < 40  # what wsidicomizer wrote beyond the image: black
        read = slide.tile_reader(level, 512)  # JPEG baseline 512 px frames: the fast, encoded-frame path
        for row, col in ((0, 1), (1, 0), (1, 1)):
            tile = read(row, col)
            w, h = level.width - 512 * col if col else 512, level.height - 512 * row if row else 512
            assert (tile[h:] == 255).all() and (tile[:, w:] == 255).all()
            region = np.asarray(slide._read(level, 512 * col, 512 * row, w, h))
            assert np.abs(tile[:h, :w].astype(int) - region).max() <= 1  # inside: the image itself


def test_real_cores_are_wsidicomizer_pyramids_with_a_1um_level(real_cores: dict[str, Path]) -> None:
    assert sorted(real_cores) == ["0", "1+", "2+ISH+", "2+ISH-"]
    patients = set()
    for series in real_cores.values():
        with open_slide(series) as slide:
            assert [lvl.mpp for lvl in slide.levels] == pytest.approx([0.25, 0.5, 1.0, 2.0, 4.0, 8.0], rel=0.01)
            assert (slide.levels[0].width, slide.levels[0].height) == (5468, 5468)
            assert slide.level_for_mpp(1.0).index == 2
            patients.add(slide.identity.patient_id)
            assert slide.level_dataset(0).Manufacturer != "her2-dicom-worker"
    assert patients == {f"REAL-{label}" for label in real_cores}
