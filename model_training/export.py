"""ONNX export with a dynamic batch axis, a parity check against torch, and the model card.

The graph takes ``tiles`` = RGB/255 of Macenko-normalised tiles (float32
NCHW, the worker divides uint8 by the card's ``input.scale`` = 255) and
returns ``probabilities`` (N, 4, softmax over 0/1+/2+/3+) and
``tumour_fraction`` (N, 1, sigmoid). Resizing to the architecture's input
size and the ImageNet mean/std are inside the graph. The card is written in
exactly the schema :func:`her2_core.model_card.load_model_card` validates.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from her2_core.aggregate import CLASSES
from her2_core.facts import INTENDED_USE, MAGNIFICATION_MPP
from her2_core.model_card import ModelCard, RealCoreFigure, card_path, load_model_card
from her2_core.preprocessing import REFERENCE
from model_training.models import TileClassifier

INPUT_NAME = "tiles"
OUTPUTS = ("probabilities", "tumour_fraction")
OPSET = 18


class _Deployed(nn.Module):
    """Raw outputs -> (softmax probabilities, sigmoid tumour fraction (N, 1))."""

    def __init__(self, model: TileClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(tiles)
        return torch.softmax(out.logits, dim=1), torch.sigmoid(out.tumour_logit).unsqueeze(1)


def export_onnx(model: TileClassifier, path: Path, tile_size: int) -> None:
    """Write ``model`` as ONNX (4-class heads only: the worker grades 0/1+/2+/3+)."""
    if model.classes != CLASSES:
        raise ValueError(f"only 4-class models ({list(CLASSES)}) can be deployed; this one has {list(model.classes)}")
    model.eval()
    dummy = torch.rand(2, 3, tile_size, tile_size)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the tile size is fixed by design: shape-to-constant tracing is intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(_Deployed(model), (dummy,), str(path), input_names=[INPUT_NAME],
                          output_names=list(OUTPUTS),
                          dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}},
                          opset_version=OPSET, dynamo=False)


def onnx_parity(model: TileClassifier, path: Path, tiles: np.ndarray) -> float:
    """Largest absolute difference between ONNX Runtime and torch outputs on uint8 NHWC ``tiles``."""
    import onnxruntime as ort

    x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(list(OUTPUTS), {INPUT_NAME: x})
    with torch.no_grad():
        want = _Deployed(model.eval())(torch.from_numpy(x))
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def model_card(name: str, version: str, tile_size: int, mpp: float, white_fraction_max: float,
               training: dict, metrics: dict) -> dict:
    """The card of an exported model, as the dict written beside it (:class:`her2_core.model_card.ModelCard`)."""
    magnification = {v: k for k, v in MAGNIFICATION_MPP.items()}.get(mpp)
    if magnification is None:
        raise ValueError(f"{mpp} um/px is not one of the worker's magnifications {MAGNIFICATION_MPP}")
    return ModelCard(name=name, version=version, classes=CLASSES, tile_size=tile_size, magnification=magnification,
                     mpp=mpp, white_fraction_max=white_fraction_max, stain=REFERENCE,
                     probabilities_output=OUTPUTS[0], tumour_fraction_output=OUTPUTS[1], input_name=INPUT_NAME,
                     input_scale=255.0, layout="NCHW", training=training, metrics=metrics,
                     intended_use=INTENDED_USE).to_dict()


def write_card(card: dict, model_path: Path) -> Path:
    """Write ``card`` beside ``model_path`` (``model.onnx`` -> ``model.json``)."""
    path = card_path(model_path)
    path.write_text(json.dumps(card, indent=1, default=float) + "\n")
    return path


def add_real_tissue(model_path: Path, figures: list[RealCoreFigure], data: str) -> dict:
    """Put ``figures`` (results on real cores, scoring only) into the card of ``model_path`` as its
    ``real_tissue`` block, replacing any earlier one; the card is read back and validated. Returns the card."""
    path = card_path(model_path)
    card = replace(ModelCard.from_dict(json.loads(path.read_text())), real_tissue=tuple(figures),
                   real_tissue_data=data).to_dict()
    write_card(card, model_path)
    if load_model_card(model_path).real_tissue != tuple(figures):
        raise RuntimeError(f"{path}: real-tissue figures did not read back")
    return card
