"""ONNX Runtime tile model: CUDA execution provider when available, CPU otherwise.

No torch at inference time: the model is an ONNX graph described by its model
card (:mod:`worker.model_card`), which fixes input name, scaling and outputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from worker.model_card import ModelCard, load_model_card

log = logging.getLogger(__name__)


def select_providers(device: str) -> list[str]:
    """Execution providers for ``device`` ("auto", "cpu", "cuda"), best first."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(f"device 'cuda' requested but ONNX Runtime offers only {available} (install the [gpu] extra)")
    return ["CPUExecutionProvider"]


@dataclass
class TilePrediction:
    """Per-tile outputs of one batch: class probabilities (N, 4) and tumour fraction (N,) if the model has it."""

    probabilities: np.ndarray
    tumour_fraction: np.ndarray | None


class TileModel:
    """A loaded tile classifier and its card."""

    def __init__(self, model_path: Path, device: str = "auto", intra_op_threads: int = 0,
                 white_fraction_max: float | None = None) -> None:
        self.card: ModelCard = load_model_card(model_path, white_fraction_max)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(model_path), options, providers=select_providers(device))
        outputs = {o.name for o in self.session.get_outputs()}
        wanted = [self.card.probabilities_output] + ([self.card.tumour_fraction_output] if self.card.tumour_fraction_output else [])
        missing = set(wanted) - outputs
        if missing:
            raise ValueError(f"model {model_path} lacks outputs {sorted(missing)} named in its card")
        self._outputs = wanted
        log.info("model %s %s on %s", self.card.name, self.card.version, self.session.get_providers()[0])

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def predict(self, tiles: np.ndarray) -> TilePrediction:
        """Grade a batch of normalised uint8 RGB tiles (N, H, W, 3)."""
        x = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2), dtype=np.float32)
        x /= self.card.input_scale
        results = self.session.run(self._outputs, {self.card.input_name: x})
        tumour = results[1].reshape(-1) if len(results) > 1 else None
        return TilePrediction(probabilities=results[0], tumour_fraction=tumour)
