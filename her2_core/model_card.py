"""The model card: the JSON file beside every ONNX model (``model.onnx`` -> ``model.json``).

It records what the worker must reproduce at inference time (tile size,
magnification, stain normalisation reference, classes, input scaling, output
names) plus provenance (training data, metrics, version). The worker refuses a
model whose card does not match its own preprocessing.

Schema (all keys required unless marked optional)::

    {
      "name": "her2-tiny-cnn", "version": "0.1.0",
      "classes": ["0", "1+", "2+", "3+"],
      "input": {"tile_size": 512, "magnification": 10, "mpp": 1.0,
                "layout": "NCHW", "scale": 255.0, "name": "tiles"},
      "outputs": {"probabilities": "probabilities",
                  "tumour_fraction": "tumour_fraction"},    # optional output
      "preprocessing": {"white_fraction_max": 0.6,
                        "stain": {"method": "macenko-absolute-dab", "stain_matrix": [[...], [...]], "h_max": 1.2}},
      "training": {...}, "metrics": {...},                    # free-form provenance
      "real_tissue": {"data": "...",                          # optional: scored, never trained on
                      "cores": [{"label": "2+ISH-", "call": "2+",
                                 "percentages": {"0": 0.0, "1+": 10.0, "2+": 90.0, "3+": 0.0},
                                 "expected_score": 1.9}]},
      "intended_use": "Research use only. Not for clinical use."
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from her2_core.aggregate import CLASSES
from her2_core.facts import MAGNIFICATION_MPP
from her2_core.preprocessing.stain import StainReference

PREPROCESSING_METHOD = "macenko-absolute-dab"


class ModelCardError(ValueError):
    """The model card is missing, malformed or does not match this worker's preprocessing."""


@dataclass(frozen=True)
class RealCoreFigure:
    """The model on one real tissue core it was never trained on: the pathologists' label, the model's slide call,
    its tumour-area percentages per class and the continuous score 0*p0 + 1*p1 + 2*p2 + 3*p3 (fractions)."""

    label: str
    call: str
    percentages: dict[str, float]
    expected_score: float

    def to_dict(self) -> dict:
        return {"label": self.label, "call": self.call, "percentages": self.percentages,
                "expected_score": self.expected_score}

    @classmethod
    def from_dict(cls, d: dict) -> RealCoreFigure:
        pct = {str(c): float(d["percentages"][c]) for c in CLASSES}
        return cls(label=str(d["label"]), call=str(d["call"]), percentages=pct,
                   expected_score=float(d["expected_score"]))


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    classes: tuple[str, ...]
    tile_size: int
    magnification: int
    mpp: float
    input_name: str
    input_scale: float
    probabilities_output: str
    tumour_fraction_output: str | None
    white_fraction_max: float
    stain: StainReference
    raw: dict[str, Any]
    #: Results on real cores (scoring only), empty when the card has none.
    real_tissue: tuple[RealCoreFigure, ...] = ()

    @property
    def intended_use(self) -> str:
        return str(self.raw.get("intended_use", ""))


def card_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def load_model_card(model_path: Path, white_fraction_max: float | None = None) -> ModelCard:
    """Read and validate the card of ``model_path``.

    Raises :class:`ModelCardError` naming exactly what is wrong, including a
    preprocessing mismatch (unknown stain method, a magnification the worker
    cannot map to a pixel spacing, classes other than the ASCO/CAP four, or a
    white-background threshold different from the configured one).
    """
    path = card_path(model_path)
    if not path.is_file():
        raise ModelCardError(f"model card not found: {path} (every model needs its card beside it)")
    try:
        raw = json.loads(path.read_text())
        inp, out, pre = raw["input"], raw["outputs"], raw["preprocessing"]
        card = ModelCard(
            name=str(raw["name"]),
            version=str(raw["version"]),
            classes=tuple(raw["classes"]),
            tile_size=int(inp["tile_size"]),
            magnification=int(inp["magnification"]),
            mpp=float(inp["mpp"]),
            input_name=str(inp.get("name", "tiles")),
            input_scale=float(inp.get("scale", 255.0)),
            probabilities_output=str(out["probabilities"]),
            tumour_fraction_output=out.get("tumour_fraction"),
            white_fraction_max=float(pre["white_fraction_max"]),
            stain=StainReference.from_dict(pre["stain"]),
            raw=raw,
            real_tissue=tuple(RealCoreFigure.from_dict(c) for c in raw.get("real_tissue", {}).get("cores", [])),
        )
        stain_method = pre["stain"].get("method")
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        raise ModelCardError(f"model card {path} is malformed: {exc!r}") from exc
    if stain_method != PREPROCESSING_METHOD:
        raise ModelCardError(
            f"model card {path}: stain normalisation {stain_method!r} does not match this worker's "
            f"{PREPROCESSING_METHOD!r}"
        )
    if card.classes != CLASSES:
        raise ModelCardError(f"model card {path}: classes {list(card.classes)} are not {list(CLASSES)}")
    if MAGNIFICATION_MPP.get(card.magnification) != card.mpp:
        raise ModelCardError(
            f"model card {path}: magnification {card.magnification}x with {card.mpp} um/px is not one of "
            f"{MAGNIFICATION_MPP}"
        )
    if white_fraction_max is not None and abs(card.white_fraction_max - white_fraction_max) > 1e-9:
        raise ModelCardError(
            f"model card {path}: trained with white_fraction_max={card.white_fraction_max}, "
            f"worker configured with {white_fraction_max}"
        )
    return card
