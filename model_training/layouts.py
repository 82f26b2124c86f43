"""Tile datasets users bring: folder-per-class, BCI, HER2-IHC-40x (layouts in docs/training.md).

Images are resampled from the dataset's pixel spacing to the training
spacing, cut into non-overlapping ``tile_size`` tiles (an image smaller than
one tile becomes one tile), tiles more than 60 % white are dropped and the
rest are Macenko-normalised with the shared preprocessing: the stain
normaliser is fitted once per slide (on a sample of the kept tiles of all
images of one slide/patient, as the worker fits a slide), never per tile. Labels are per image; the tumour fraction of these
tiles is unknown (NaN), so only the class head learns from them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from her2_analysis.tiles import stain_fit_indices
from her2_core.aggregate import CLASSES
from her2_core.facts import WHITE_FRACTION_MAX
from her2_core.preprocessing import fit_stains, white_fraction
from model_training.splits import split_datasets
from model_training.tileset import SlideInfo, TileSet

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
#: Folder / file-name spellings of the HER2 classes.
CLASS_ALIASES = {"0": 0, "1+": 1, "2+": 2, "3+": 3, "1": 1, "2": 2, "3": 3,
                 "score0": 0, "score1": 1, "score2": 2, "score3": 3}
#: Pixel spacing (um) each layout's images are assumed to have unless told otherwise.
LAYOUT_MPP = {"folder": 1.0, "bci": 0.5, "her2-ihc-40x": 0.25}
_BCI_NAME = re.compile(r"^(?P<id>\d+)_(?P<split>train|test)_(?P<level>[0-3]\+?)$")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int
    patient_id: str


def _class_of(name: str) -> int:
    key = name.strip().lower().replace(" ", "")
    if key not in CLASS_ALIASES:
        raise ValueError(f"class folder {name!r} is not one of {sorted(CLASS_ALIASES)}")
    return CLASS_ALIASES[key]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def folder_images(root: Path, patient_from_prefix: bool = False) -> list[LabelledImage]:
    """``root/<class>/...`` images. Patient: the first sub-folder under the class folder, else

    the file-name prefix before the first ``_`` (``patient_from_prefix``, HER2-IHC-40x patches
    named ``<wsi>_<x>_<y>.png``), else the file itself (no patient grouping known).
    """
    out = []
    for class_dir in sorted(d for d in Path(root).iterdir() if d.is_dir()):
        label = _class_of(class_dir.name)
        for path in _images(class_dir):
            rel = path.relative_to(class_dir).parts
            if len(rel) > 1:
                patient = rel[0]
            elif patient_from_prefix:
                patient = path.stem.split("_")[0]
            else:
                patient = path.stem
            out.append(LabelledImage(path, label, patient))
    if not out:
        raise ValueError(f"no images under {root}/<class>/ (classes: {sorted(CLASS_ALIASES)})")
    return out


def bci_images(root: Path, split: str) -> list[LabelledImage]:
    """BCI IHC images of ``split`` (``IHC/<split>/<id>_<split>_<level>.png``; level = the WSI's HER2 score).

    BCI publishes no patient ids: every image is its own patient.
    """
    folder = Path(root) / "IHC" / split
    out = []
    for path in _images(folder):
        m = _BCI_NAME.match(path.stem)
        if m is None:
            raise ValueError(f"{path.name}: not a BCI file name <id>_{split}_<0|1+|2+|3+>")
        out.append(LabelledImage(path, _class_of(m["level"]), f"BCI-{m['id']}"))
    if not out:
        raise ValueError(f"no BCI images in {folder}")
    return out


def _resample(rgb: np.ndarray, factor: float) -> np.ndarray:
    if abs(factor - 1.0) < 1e-6:
        return rgb
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))


def _cut(rgb: np.ndarray, tile_size: int) -> list[np.ndarray]:
    h, w = rgb.shape[:2]
    if h < tile_size or w < tile_size:
        return [_resample(rgb, tile_size / min(h, w))[:tile_size, :tile_size]]
    return [rgb[r : r + tile_size, c : c + tile_size]
            for r in range(0, h - tile_size + 1, tile_size) for c in range(0, w - tile_size + 1, tile_size)]


def images_tileset(images: list[LabelledImage], centre: str, tile_size: int, data_mpp: float, mpp: float,
                   white_fraction_max: float = WHITE_FRACTION_MAX) -> TileSet:
    """Tiles of labelled images at ``mpp`` um/px, one slide per patient, normalised per slide."""
    by_patient: dict[str, list[LabelledImage]] = defaultdict(list)
    for im in images:
        by_patient[im.patient_id].append(im)
    tiles, labels, slide_of, slides = [], [], [], []
    for patient, items in sorted(by_patient.items()):
        cuts = []
        for im in items:
            cut = np.stack(_cut(_resample(np.asarray(Image.open(im.path).convert("RGB")), data_mpp / mpp), tile_size))
            cuts.append(cut[white_fraction(cut) <= white_fraction_max])
        kept = np.concatenate(cuts)
        normaliser = fit_stains(kept[list(stain_fit_indices(len(kept)))])
        for im, cut in zip(items, cuts):
            if len(cut):
                tiles.append(normaliser(cut))
                labels.extend([im.label] * len(cut))
                slide_of.extend([len(slides)] * len(cut))
        slides.append(SlideInfo(patient, patient, centre, max(im.label for im in items)))
    n = len(labels)
    onehot = np.eye(len(CLASSES), dtype=np.float32)[np.asarray(labels, int)] if n else np.zeros((0, 4), np.float32)
    return TileSet(np.concatenate(tiles) if tiles else np.zeros((0, tile_size, tile_size, 3), np.uint8), onehot,
                   np.full(n, np.nan, np.float32), np.asarray(slide_of, int), slides, mpp)


def layout_datasets(layout: str, root: Path, test_root: Path | None, tile_size: int, seed: int, mpp: float,
                    data_mpp: float | None = None) -> dict[str, TileSet]:
    """``train`` / ``val`` / ``test`` tile sets of a user dataset, split by patient (stratified).

    The test set is ``test_root`` (an independent centre, same layout) when given, BCI's own
    ``test`` folder for BCI, else a patient-level 15 % of ``root``.
    """
    data_mpp = data_mpp or LAYOUT_MPP[layout]

    def read(folder: Path, split: str = "train") -> list[LabelledImage]:
        if layout == "bci":
            return bci_images(folder, split)
        return folder_images(folder, patient_from_prefix=layout == "her2-ihc-40x")

    tiles = images_tileset(read(root), "train-centre", tile_size, data_mpp, mpp)
    test = None
    if test_root is not None or layout == "bci":
        test = images_tileset(read(test_root or root, "test"), "test-centre", tile_size, data_mpp, mpp)
    return split_datasets(tiles, test, seed)
