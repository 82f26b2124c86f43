"""Peer measurement: tiatoolbox's patch predictor grading the same tiles of a DICOM slide with the same network.

Runs under a separate interpreter that has tiatoolbox (it needs torch < 2.13, so it cannot share the
project's virtualenv; setup in docs/performance.md, "Peer: tiatoolbox"), from the repository root::

    /work/tia-venv/bin/python -m benchmarks.peer_tiatoolbox SERIES_DIR --arch tiny < tiles.json

``benchmarks.throughput --tiatoolbox-python PYTHON`` starts it on its main slide and hands it, as a JSON
list of ``[x, y]`` on standard input, the top-left corners (pixels at ``--mpp``) of the tiles that its
own end-to-end run graded. It times what a tiatoolbox user runs: ``DICOMWSIReader`` opening the series
folder, then ``PatchPredictor.run`` in WSI mode (tile reads, batches through the network, its zarr
output) over exactly those tiles. It does no tissue finding, white filter, stain normalisation, QC or
DICOM output, which the end-to-end row includes. The network is ``model_training.models.TileClassifier``
(RGB/255 in, the class probabilities kept), as the worker's ONNX model was exported from.

Two workarounds make tiatoolbox 2.1 read a DICOM folder at all: ``WSIReader.open(folder)`` fails (it
looks for a file suffix), and its WSI-mode dataset keeps only the reader's path and reopens by it; so
the dataloader is ours (:class:`GivenTilesPredictor`), with the opened reader in the dataset and one
reader per DataLoader worker. After one warm-up batch, the whole run is timed once per worker count of
``--num-workers`` and the fastest counts (tiatoolbox reads serially in the main process with none).

Prints one line: ``PEER-TIATOOLBOX {json}`` with tiles, seconds, tiles_per_s, num_workers (the fastest),
every worker count's tiles/s, and versions.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tiatoolbox.models.dataset.dataset_abc import WSIPatchDataset
from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
from tiatoolbox.models.engine.patch_predictor import PatchPredictor
from tiatoolbox.models.models_abc import ModelABC
from tiatoolbox.wsicore.wsireader import DICOMWSIReader
from torch.utils.data import DataLoader, get_worker_info

from benchmarks import PEER_MARK
from model_training.models import TileClassifier


class TileNetwork(ModelABC):
    """A ``TileClassifier`` as tiatoolbox runs a model: uint8 NHWC tiles in, class probabilities out."""

    def __init__(self, net: TileClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).logits, dim=1)

    @staticmethod
    def infer_batch(model: torch.nn.Module, batch_data: torch.Tensor, *, device: str) -> np.ndarray:
        """RGB/255 in NCHW, as the worker feeds the exported model; probabilities (N, classes) out."""
        x = batch_data.to(device=device, dtype=torch.float32).permute(0, 3, 1, 2).contiguous() / 255.0
        model.eval()
        with torch.inference_mode():
            return model(x).cpu().numpy()


def _open_own_reader(worker_id: int) -> None:
    """DataLoader worker start: its own reader of the series (a forked reader would share file offsets)."""
    dataset = get_worker_info().dataset
    dataset.reader = DICOMWSIReader(dataset.img_path)


class GivenTilesPredictor(PatchPredictor):
    """``PatchPredictor`` whose WSI-mode dataset reads ``boxes`` through ``reader``, a DICOM reader set before ``run``."""

    def __init__(self, model: TileNetwork, boxes: np.ndarray, batch_size: int, num_workers: int) -> None:
        super().__init__(model=model, batch_size=batch_size, num_workers=num_workers, device="cpu", verbose=False)
        self.boxes = boxes
        self.reader: DICOMWSIReader | None = None

    def get_dataloader(self, images, masks=None, labels=None, ioconfig=None, *, patch_mode=True,
                       auto_get_mask=True, wsireader_kwargs=None) -> DataLoader:
        """tiatoolbox's own dataset and preprocessing, on the given reader and tiles (no mask of its own)."""
        resolution = ioconfig.input_resolutions[0]
        dataset = WSIPatchDataset(input_img=self.reader, patch_input_shape=ioconfig.patch_input_shape,
                                  stride_shape=ioconfig.stride_shape, resolution=resolution["resolution"],
                                  units=resolution["units"], auto_get_mask=False)
        dataset.inputs = self.boxes
        dataset.reader = self.reader
        dataset.preproc_func = self._get_model_attr("preproc_func")
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False,
                          worker_init_fn=_open_own_reader if self.num_workers else None)


def predict_seconds(series_dir: Path, network: TileNetwork, boxes: np.ndarray, args: argparse.Namespace,
                    num_workers: int) -> float:
    """Wall seconds of opening the series and ``PatchPredictor.run`` over ``boxes`` (WSI mode, zarr output).

    The engine (built once per process in real use) is built before the clock starts.
    """
    ioconfig = IOPatchPredictorConfig(input_resolutions=[{"units": "mpp", "resolution": args.mpp}],
                                      patch_input_shape=(args.tile_size, args.tile_size),
                                      stride_shape=(args.tile_size, args.tile_size))
    engine = GivenTilesPredictor(network, boxes, args.batch_size, num_workers)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        engine.reader = DICOMWSIReader(series_dir)
        engine.run([engine.reader], patch_mode=False, ioconfig=ioconfig, save_dir=Path(tmp) / "out",
                   return_probabilities=True)
        return time.perf_counter() - t0


def fastest_workers(series_dir: Path, network: TileNetwork, boxes: np.ndarray, args: argparse.Namespace,
                    ) -> tuple[int, dict[int, float]]:
    """Tiles/s of the whole run per DataLoader worker count of ``--num-workers``, after a one-batch warm-up."""
    predict_seconds(series_dir, network, boxes[: args.batch_size], args, 0)
    rates = {n: len(boxes) / predict_seconds(series_dir, network, boxes, args, n) for n in args.num_workers}
    return max(rates, key=rates.get), rates


def build_network(args: argparse.Namespace) -> tuple[TileNetwork, str]:
    """The architecture the worker's model was exported from; weights from ``--weights`` or random (same cost)."""
    net = TileClassifier(args.arch, n_classes=args.n_classes, input_size=args.input_size)
    how = "random init (same cost)"
    if args.weights is not None:
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        how = f"weights {args.weights.name}"
    return TileNetwork(net.eval()), how


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peer_tiatoolbox", description=__doc__.split("\n\n")[0])
    p.add_argument("series_dir", type=Path, help="DICOM WSI series folder (as benchmarks.slides writes them)")
    p.add_argument("--arch", default="tiny", help="model_training architecture (default tiny)")
    p.add_argument("--n-classes", type=int, default=4, help="classes of the head (default 4)")
    p.add_argument("--input-size", type=int, default=None, help="network input size (default: the architecture's)")
    p.add_argument("--weights", type=Path, default=None, help="a state_dict of the network (default random init)")
    p.add_argument("--tile-size", type=int, default=512, help="tile size in pixels at --mpp (default 512)")
    p.add_argument("--mpp", type=float, default=1.0, help="read resolution, um/px (default 1.0)")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per batch (default 16)")
    p.add_argument("--num-workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2],
                   help="DataLoader worker counts, each timed over the whole run; the fastest counts (default 0,1,2)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    origins = np.asarray(json.load(sys.stdin), dtype=np.int64).reshape(-1, 2)
    if len(origins) == 0:
        raise SystemExit("no tiles on standard input")
    boxes = np.concatenate([origins, origins + args.tile_size], axis=1)  # [x0, y0, x1, y1] at --mpp
    network, how = build_network(args)
    workers, rates = fastest_workers(args.series_dir, network, boxes, args)
    print(PEER_MARK + json.dumps({
        "tiles": len(boxes), "seconds": len(boxes) / rates[workers], "tiles_per_s": rates[workers],
        "num_workers": workers, "tiles_per_s_by_workers": {str(n): round(r, 2) for n, r in rates.items()},
        "torch_threads": torch.get_num_threads(), "arch": args.arch, "weights": how,
        "tiatoolbox": version("tiatoolbox"), "torch": torch.__version__, "wsidicom": version("wsidicom")}),
        flush=True)


if __name__ == "__main__":
    main()
