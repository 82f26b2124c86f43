"""Patient-level, stratified train / validation / test splits.

All slides (and so all tiles) of a patient land in the same split: tiles of
one tumour never sit on both sides of an evaluation. (Seed 001's patch-level
split of HER2-IHC-40x is likely leaky for exactly this reason.) Patients are
stratified by their highest slide label, so every split sees every class when
there are enough patients.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from model_training.tileset import TileSet


def patient_labels(tiles: TileSet) -> dict[str, int]:
    """Patient -> highest slide label among the patient's slides (-1 if none known)."""
    out: dict[str, int] = {}
    for s in tiles.slides:
        out[s.patient_id] = max(out.get(s.patient_id, -1), s.label)
    return out


def patient_split(labels: dict[str, int], fractions: dict[str, float], seed: int) -> dict[str, list[str]]:
    """Assign patients to named splits in proportion to ``fractions``, stratified by label.

    Parameters
    ----------
    labels
        Patient id -> stratum (e.g. from :func:`patient_labels`).
    fractions
        Split name -> share of patients, e.g. ``{"train": 0.8, "val": 0.2}``; must sum to 1.
    seed
        Shuffling seed: same inputs, same split.

    Returns
    -------
    dict
        Split name -> sorted patient ids; every patient is in exactly one split.
    """
    if not np.isclose(sum(fractions.values()), 1.0) or any(v < 0 for v in fractions.values()):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    strata: dict[int, list[str]] = defaultdict(list)
    for patient, label in sorted(labels.items()):
        strata[label].append(patient)
    names = list(fractions)
    shares = np.array([fractions[n] for n in names])
    out: dict[str, list[str]] = {n: [] for n in names}
    carry = np.zeros(len(names))  # rounding remainders, carried across strata so totals match the shares
    for label in sorted(strata):
        patients = strata[label]
        rng.shuffle(patients)
        want = shares * len(patients) + carry
        counts = np.floor(want).astype(int)
        for i in np.argsort(-(want - counts))[: len(patients) - counts.sum()]:
            counts[i] += 1
        carry = want - counts
        start = 0
        for name, n in zip(names, counts):
            out[name].extend(patients[start : start + n])
            start += n
    return {n: sorted(p) for n, p in out.items()}


def split_datasets(tiles: TileSet, test: TileSet | None, seed: int) -> dict[str, TileSet]:
    """``train`` / ``val`` / ``test`` tile sets split by patient (stratified).

    With an independent ``test`` set (another centre), ``tiles`` is split 80/20 into train / val;
    without one, 70/15/15 into train / val / test.
    """
    fractions = {"train": 0.8, "val": 0.2} if test is not None else {"train": 0.7, "val": 0.15, "test": 0.15}
    split = patient_split(patient_labels(tiles), fractions, seed)
    out = {name: tiles.of_patients(patients) for name, patients in split.items()}
    if test is not None:
        out["test"] = test
    return out
