"""Patient-level stratified splits: no patient in two splits, strata spread over splits."""

import numpy as np
import pytest

from model_training.splits import patient_labels, patient_split
from model_training.synthetic_data import synthetic_cohort
from model_training.tileset import SlideInfo, TileSet


def _tileset(patients_labels: dict[str, int], slides_per_patient: int = 2, tiles_per_slide: int = 3) -> TileSet:
    slides = [SlideInfo(f"{p}-S{k}", p, "A", label)
              for p, label in patients_labels.items() for k in range(slides_per_patient)]
    n = len(slides) * tiles_per_slide
    slide = np.repeat(np.arange(len(slides)), tiles_per_slide)
    return TileSet(np.zeros((n, 8, 8, 3), np.uint8), np.eye(4, dtype=np.float32)[slide % 4],
                   np.ones(n, np.float32), slide, slides, 1.0)


def test_no_patient_in_two_splits_and_every_tile_kept():
    labels = {f"P{i:03d}": i % 4 for i in range(41)}
    tiles = _tileset(labels)
    split = patient_split(patient_labels(tiles), {"train": 0.7, "val": 0.15, "test": 0.15}, seed=3)
    sets = [set(v) for v in split.values()]
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]
    assert set().union(*sets) == set(labels)
    parts = {name: tiles.of_patients(p) for name, p in split.items()}
    assert sum(len(t) for t in parts.values()) == len(tiles)
    for name, part in parts.items():  # the tiles of a split belong to that split's patients only
        assert {part.slides[s].patient_id for s in np.unique(part.slide)} <= set(split[name])
    assert [len(split[n]) for n in ("train", "val", "test")] == [29, 6, 6]


def test_split_is_stratified_and_deterministic():
    labels = {f"P{i:03d}": i % 4 for i in range(40)}
    a = patient_split(labels, {"train": 0.5, "test": 0.5}, seed=1)
    assert a == patient_split(labels, {"train": 0.5, "test": 0.5}, seed=1)
    for name in a:
        assert sorted(np.bincount([labels[p] for p in a[name]], minlength=4)) == [5, 5, 5, 5]


def test_synthetic_cohort_patients_never_cross_splits():
    specs = synthetic_cohort(12, "A", seed=5, size_um=(512.0, 512.0), second_slide_share=0.5)
    patients = [s.patient_id for s in specs]
    assert len(set(patients)) == 12 and len(patients) > 12  # some patients have two slides
    slides = [SlideInfo(str(s.seed), s.patient_id, s.centre, 0) for s in specs]
    tiles = TileSet(np.zeros((len(specs), 4, 4, 3), np.uint8), np.zeros((len(specs), 4), np.float32),
                    np.zeros(len(specs), np.float32), np.arange(len(specs)), slides, 1.0)
    split = patient_split(patient_labels(tiles), {"train": 0.75, "val": 0.25}, seed=0)
    train, val = tiles.of_patients(split["train"]), tiles.of_patients(split["val"])
    assert not {slides[i].patient_id for i in train.slide} & {slides[i].patient_id for i in val.slide}
    assert len(train) + len(val) == len(specs)


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        patient_split({"P": 0}, {"train": 0.5, "val": 0.2}, seed=0)
