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
      "intended_use": "Research use only - not for clinical use"
    }

:class:`ModelCard` is this schema as one typed class: ``model_training.export`` writes
``ModelCard(...).to_dict()``, the worker reads :func:`load_model_card`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her2_core.aggregate import CLASSES
from her2_core.facts import INTENDED_USE, MAGNIFICATION_MPP
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
    """The card's schema (module docstring): the model's input/output contract, which export writes
    (:meth:`to_dict`) and inference reads (:meth:`from_dict`), plus provenance.

    Construction checks what the worker must reproduce: the ASCO/CAP four classes and a magnification whose
    pixel spacing is the usual one (:data:`her2_core.facts.MAGNIFICATION_MPP`); :class:`ModelCardError`
    says which does not match.
    """

    name: str
    version: str
    classes: tuple[str, ...]
    tile_size: int
    magnification: int
    mpp: float
    white_fraction_max: float
    stain: StainReference
    probabilities_output: str = "probabilities"
    #: Name of the optional tumour-fraction output (None: the model has none).
    tumour_fraction_output: str | None = None
    input_name: str = "tiles"
    #: The worker divides uint8 tiles by this.
    input_scale: float = 255.0
    layout: str = "NCHW"
    #: Free-form provenance (data, configuration, parity) and metrics.
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str = INTENDED_USE
    #: Results on real cores (scoring only), empty when the card has none, and what the cores are.
    real_tissue: tuple[RealCoreFigure, ...] = ()
    real_tissue_data: str = ""

    def __post_init__(self) -> None:
        if tuple(self.classes) != CLASSES:
            raise ModelCardError(f"classes {list(self.classes)} are not {list(CLASSES)}")
        if MAGNIFICATION_MPP.get(self.magnification) != self.mpp:
            raise ModelCardError(f"magnification {self.magnification}x with {self.mpp} um/px is not one of "
                                 f"{MAGNIFICATION_MPP}")

    def to_dict(self) -> dict[str, Any]:
        """The card as written beside the model (JSON-ready; key order as in the schema)."""
        outputs = {"probabilities": self.probabilities_output}
        if self.tumour_fraction_output is not None:
            outputs["tumour_fraction"] = self.tumour_fraction_output
        card: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "classes": list(self.classes),
            "input": {"tile_size": self.tile_size, "magnification": self.magnification, "mpp": self.mpp,
                      "layout": self.layout, "scale": self.input_scale, "name": self.input_name},
            "outputs": outputs,
            "preprocessing": {"white_fraction_max": self.white_fraction_max, "stain": self.stain.to_dict()},
            "training": self.training,
            "metrics": self.metrics,
            "intended_use": self.intended_use,
        }
        if self.real_tissue or self.real_tissue_data:
            card["real_tissue"] = {"data": self.real_tissue_data, "cores": [f.to_dict() for f in self.real_tissue]}
        return card

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        """Parse a card; missing or mistyped keys raise KeyError / TypeError / ValueError, a card that does not
        match this worker's preprocessing :class:`ModelCardError`."""
        inp, out, pre = d["input"], d["outputs"], d["preprocessing"]
        real = d.get("real_tissue", {})
        values = dict(
            name=str(d["name"]),
            version=str(d["version"]),
            classes=tuple(d["classes"]),
            tile_size=int(inp["tile_size"]),
            magnification=int(inp["magnification"]),
            mpp=float(inp["mpp"]),
            white_fraction_max=float(pre["white_fraction_max"]),
            stain=StainReference.from_dict(pre["stain"]),
            probabilities_output=str(out["probabilities"]),
            tumour_fraction_output=out.get("tumour_fraction"),
            input_name=str(inp.get("name", "tiles")),
            input_scale=float(inp.get("scale", 255.0)),
            layout=str(inp.get("layout", "NCHW")),
            training=d.get("training", {}),
            metrics=d.get("metrics", {}),
            intended_use=str(d.get("intended_use", "")),
            real_tissue=tuple(RealCoreFigure.from_dict(c) for c in real.get("cores", [])),
            real_tissue_data=str(real.get("data", "")),
        )
        stain_method = pre["stain"].get("method")
        if stain_method != PREPROCESSING_METHOD:
            raise ModelCardError(f"stain normalisation {stain_method!r} does not match this worker's "
                                 f"{PREPROCESSING_METHOD!r}")
        return cls(**values)


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
        card = ModelCard.from_dict(json.loads(path.read_text()))
    except ModelCardError as exc:
        raise ModelCardError(f"model card {path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelCardError(f"model card {path} is malformed: {exc!r}") from exc
    if white_fraction_max is not None and abs(card.white_fraction_max - white_fraction_max) > 1e-9:
        raise ModelCardError(
            f"model card {path}: trained with white_fraction_max={card.white_fraction_max}, "
            f"worker configured with {white_fraction_max}"
        )
    return card
