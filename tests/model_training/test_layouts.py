"""User dataset layouts: folder-per-class, BCI, HER2-IHC-40x -> tile sets with labels and patients."""

import numpy as np
import pytest
from PIL import Image

from her2_synthetic.render import SlideSpec, render_region
from model_training.layouts import bci_images, folder_images, layout_datasets

LEVELS = ("0", "1+", "2+", "3+")


def _ihc(level: int, seed: int, size: int = 256) -> np.ndarray:
    """A synthetic IHC patch of one HER2 level, darkened so that the white filter keeps all of it."""
    spec = SlideSpec(seed=seed, width_um=2048, height_um=2048, class_mix={LEVELS[level]: 1.0}, tumour_fraction=1.0)
    return (render_region(spec, 896.0, 896.0, size, size, 1.0).rgb * 0.85).astype(np.uint8)


def _save(path, rgb) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def test_folder_layout_groups_by_patient_subfolder_and_splits_by_patient(tmp_path):
    for level in range(4):
        for patient in range(5):
            for k in range(2):
                _save(tmp_path / LEVELS[level] / f"pat{level}{patient}" / f"t{k}.png", _ihc(level, 10 * level + patient))
    images = folder_images(tmp_path)
    assert len(images) == 40 and len({im.patient_id for im in images}) == 20
    data = layout_datasets("folder", tmp_path, None, tile_size=128, seed=0, mpp=1.0)
    assert sum(len(d) for d in data.values()) == 40 * 4  # each 256 px image -> four 128 px tiles
    patients = [{d.slides[s].patient_id for s in np.unique(d.slide)} for d in data.values()]
    assert not (patients[0] & patients[1]) and not (patients[0] & patients[2]) and not (patients[1] & patients[2])
    train = data["train"]
    assert set(np.unique(train.labels)) == {0, 1, 2, 3}
    assert np.isnan(train.tumour_fraction).all()  # unknown for labelled patches
    for s in np.unique(train.slide):  # patient label = its images' class
        assert (train.labels[train.slide == s] == train.slides[s].label).all()


def test_bci_names_carry_the_level_and_her2_40x_prefix_is_the_slide(tmp_path):
    for i, level in enumerate(LEVELS):
        _save(tmp_path / "IHC" / "train" / f"{i:05d}_train_{level}.png", _ihc(i, i))
        _save(tmp_path / "IHC" / "test" / f"{i:05d}_test_{level}.png", _ihc(i, 50 + i))
    assert [im.label for im in bci_images(tmp_path, "train")] == [0, 1, 2, 3]
    data = layout_datasets("bci", tmp_path, None, tile_size=128, seed=0, mpp=0.5, data_mpp=0.5)
    assert len(data["test"].slides) == 4 and sorted(data["test"].labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    _save(tmp_path / "x40" / "3+" / "WSI7_1024_2048.png", _ihc(3, 7))
    _save(tmp_path / "x40" / "3+" / "WSI7_0_0.png", _ihc(3, 8))
    assert {im.patient_id for im in folder_images(tmp_path / "x40", patient_from_prefix=True)} == {"WSI7"}


def test_bad_names_are_refused(tmp_path):
    _save(tmp_path / "IHC" / "train" / "image.png", _ihc(0, 1, 32))
    with pytest.raises(ValueError, match="not a BCI file name"):
        bci_images(tmp_path, "train")
    _save(tmp_path / "other" / "4+" / "a.png", _ihc(0, 1, 32))
    with pytest.raises(ValueError, match="class folder"):
        folder_images(tmp_path / "other")
