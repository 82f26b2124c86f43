"""The deep tile grader: an ONNX Runtime tile model (CUDA when available, CPU otherwise) over a slide's tiles.

No torch at inference time: the model is an ONNX graph described by its model
card (:mod:`her2_core.model_card`), which fixes input name, scaling and outputs.
:func:`grade_tiles` runs it over a tiled slide's tissue tiles
(:func:`her2_analysis.tiles.tile_batches`) and weighs the class probabilities
by tumour area (:func:`her2_core.aggregate.class_percentages`).
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dicom_io.errors import SlideError
from her2_analysis.tiles import TiledSlide, sharpness_sample, tile_batches
from her2_core.aggregate import CLASSES, SlideScore, TileGrid, asco_cap_call, class_percentages
from her2_core.model_card import ModelCard, load_model_card

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


def model_graph(model_path: Path, precision: str = "float32") -> str | bytes:
    """What ONNX Runtime loads for ``model_path``: the file, or for ``precision`` "float16" its half-precision copy.

    The float16 copy (onnxconverter-common, converted in memory at load, about
    1 s for a ResNet34) keeps float32 inputs and outputs, so the rest of the
    worker is unchanged; it is for CUDA tensor cores (slower than float32 on
    CPU). Its grades differ from the float32 graph's in the third decimal:
    validate it like a new model before use.
    """
    if precision == "float32":
        return str(model_path)
    if precision != "float16":
        raise ValueError(f"precision must be 'float32' or 'float16', not {precision!r}")
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as exc:
        raise RuntimeError("precision 'float16' needs onnx and onnxconverter-common (install the [gpu] extra)") from exc
    with warnings.catch_warnings():  # it warns for every weight below float16's range that it rounds (to +-1e-7)
        warnings.simplefilter("ignore", UserWarning)
        graph = float16.convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True)
    return graph.SerializeToString()


@dataclass
class TilePrediction:
    """Per-tile outputs of one batch: class probabilities (N, 4) and tumour fraction (N,) if the model has it."""

    probabilities: np.ndarray
    tumour_fraction: np.ndarray | None


class TileModel:
    """A loaded tile classifier and its card."""

    def __init__(self, model_path: Path, device: str = "auto", intra_op_threads: int = 0,
                 white_fraction_max: float | None = None, precision: str = "float32") -> None:
        self.card: ModelCard = load_model_card(model_path, white_fraction_max)
        self.precision = precision
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # Tiles are decoded and normalised in other threads while the model runs: ORT's idle threads must
        # sleep, not spin (spinning cost ~4 ms of CPU per tile on 2 cores, taken from decoding; measured).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(model_graph(model_path, precision), options,
                                            providers=select_providers(device))
        outputs = {o.name for o in self.session.get_outputs()}
        wanted = [self.card.probabilities_output] + ([self.card.tumour_fraction_output] if self.card.tumour_fraction_output else [])
        missing = set(wanted) - outputs
        if missing:
            raise ValueError(f"model {model_path} lacks outputs {sorted(missing)} named in its card")
        self._outputs = wanted
        # On CUDA, run through an IO binding (input copied to the device once, outputs bound to host memory).
        # Not exercised on a GPU yet: any failure falls back to session.run for the rest of the session.
        self._bind = self.provider == "CUDAExecutionProvider"
        self._local = threading.local()
        log.info("model %s %s (%s) on %s", self.card.name, self.card.version, precision, self.provider)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def input_tensor(self, tiles: np.ndarray, reuse: bool = False) -> np.ndarray:
        """The model's float32 NCHW input for normalised uint8 RGB tiles (N, H, W, 3), scaled as its card says.

        With ``reuse`` it is written into this thread's reused array, valid
        until the thread's next such call: a batch's input is 50 MB at
        16 x 512 px, above glibc's largest mmap threshold, so a new array per
        batch is mapped, faulted in page by page and unmapped again (40 % of
        the conversion's time, measured).
        """
        n, h, w, c = tiles.shape
        out = None
        if reuse:
            out = getattr(self._local, "input", None)
            if out is None or len(out) < n or out.shape[1:] != (c, h, w):
                out = self._local.input = np.empty((n, c, h, w), np.float32)
            out = out[:n]
        planar = np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))  # transposed as bytes, then cast and scaled
        return np.divide(planar, np.float32(self.card.input_scale), out=out, dtype=np.float32)  # in one pass

    def predict(self, tiles: np.ndarray) -> TilePrediction:
        """Grade a batch of normalised uint8 RGB tiles (N, H, W, 3)."""
        x = self.input_tensor(tiles, reuse=True)
        results = self._run_bound(x) if self._bind else None
        if results is None:
            results = self.session.run(self._outputs, {self.card.input_name: x})
        tumour = results[1].reshape(-1) if len(results) > 1 else None
        return TilePrediction(probabilities=results[0], tumour_fraction=tumour)

    def _run_bound(self, x: np.ndarray) -> list[np.ndarray] | None:
        """Run with an ONNX Runtime IO binding (CUDA); None (and plain runs from now on) if that fails."""
        try:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.card.input_name, x)
            for name in self._outputs:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        except Exception as exc:  # an IO binding problem must not fail a slide that session.run can grade
            log.warning("IO binding failed on %s (%s: %s); using session.run", self.provider, type(exc).__name__, exc)
            self._bind = False
            return None


#: More undecodable tiles than this share of the tissue tiles fails the slide instead of flagging it.
MAX_CORRUPT_SHARE = 0.05


@lru_cache(maxsize=2)
def load_model(model_path: Path, device: str, intra_op_threads: int, white_fraction_max: float,
               precision: str = "float32") -> TileModel:
    """One ONNX Runtime session per process and model."""
    return TileModel(model_path, device, intra_op_threads, white_fraction_max, precision)


def grade_tiles(tiled: TiledSlide, model: TileModel, batch_size: int, threads: int, white_fraction_max: float,
                evidence_floor: float, progress: Callable[[int, int], None] | None = None,
                ) -> tuple[SlideScore, np.ndarray, dict[str, float]]:
    """Grade the slide's tissue tiles with the CNN batch by batch and aggregate them to a :class:`SlideScore`.

    Also returns the sharpness of the sampled tiles (for blur QC) and the tile counts.
    """
    grid = tiled.grid
    probabilities = np.full((grid.rows, grid.cols, len(CLASSES)), np.nan, np.float32)
    tumour = np.zeros((grid.rows, grid.cols), np.float32)
    scored = np.zeros((grid.rows, grid.cols), bool)
    corrupt = done = 0
    infer_seconds = 0.0
    tile_sharpness: list[np.ndarray] = []
    for batch in tile_batches(tiled, batch_size, threads, white_fraction_max, sharpness_sample(tiled.candidates)):
        corrupt += batch.corrupt
        done += batch.read
        if batch.positions:
            t0 = time.perf_counter()
            pred = model.predict(batch.tiles)
            infer_seconds += time.perf_counter() - t0
            fractions = pred.tumour_fraction if pred.tumour_fraction is not None else 1.0 - batch.white
            rows, cols = np.array(batch.positions).T
            probabilities[rows, cols] = pred.probabilities
            tumour[rows, cols] = fractions
            scored[rows, cols] = True
            tile_sharpness.append(batch.sharpness[~np.isnan(batch.sharpness)])
        if progress:
            progress(done, len(tiled.candidates))
    if corrupt > MAX_CORRUPT_SHARE * max(1, len(tiled.candidates)):
        raise SlideError(f"{corrupt} of {len(tiled.candidates)} tissue tiles could not be decoded: slide is corrupt")
    score = tile_area_score(grid, probabilities, tumour, scored, evidence_floor)
    stats = {"tiles_candidate": len(tiled.candidates), "tiles_scored": int(scored.sum()),
             "tiles_corrupt": corrupt, "infer_seconds": infer_seconds}
    return score, np.concatenate(tile_sharpness) if tile_sharpness else np.zeros(0), stats


def tile_area_score(grid: TileGrid, probabilities: np.ndarray, tumour: np.ndarray, scored: np.ndarray,
                    evidence_floor: float) -> SlideScore:
    """Tumour-area weighted class percentages and the ASCO/CAP slide call (no tumour: quality control decides)."""
    pct = class_percentages(probabilities[scored], tumour[scored])
    return SlideScore(call=asco_cap_call(pct, evidence_floor), percentages=pct, grid=grid,
                      probabilities=probabilities, tumour_fraction=tumour, scored=scored, flags=[])
