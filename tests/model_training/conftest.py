"""A tiny synthetic cohort for training tests: 128 px tiles of 512 um slides, centres A and B."""

from __future__ import annotations

import pytest

from model_training.recipes import SyntheticCohort
from model_training.tileset import TileSet


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, TileSet]:
    """train / val (centre A, split by patient) and test (centre B) with exact membrane masks."""
    cohort = SyntheticCohort(train_patients=8, test_patients=4, slide_um=512.0, val_share=0.25, seed=7)
    return cohort.datasets(1.0, tile_size=128, cache=tmp_path_factory.mktemp("cache"), workers=1, membranes=True,
                           progress=False)
