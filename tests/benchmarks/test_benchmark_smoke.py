"""The throughput benchmark runs end to end on two tiny slides and prints every figure (no timing thresholds)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"(-?\d+(?:\.\d+)?)"


def _tiny_model(folder: Path) -> Path:
    """A two-convolution ONNX tile model with a valid card (only the benchmark's plumbing is under test)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 4, 4)).astype(np.float32) * 0.1, "w0"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.1, "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "wp"),
             numpy_helper.from_array(rng.standard_normal((8, 1)).astype(np.float32), "wt")]
    nodes = [helper.make_node("Conv", ["tiles", "w0"], ["c0"], strides=[4, 4]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("GlobalAveragePool", ["r1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "wp"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("MatMul", ["f", "wt"], ["t"]),
             helper.make_node("Sigmoid", ["t"], ["tumour_fraction"])]
    graph = helper.make_graph(
        nodes, "smoke", [helper.make_tensor_value_info("tiles", TensorProto.FLOAT, ["N", 3, 512, 512])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("tumour_fraction", TensorProto.FLOAT, ["N", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "smoke.onnx"
    onnx.save(model, path)
    card = {"name": "benchmark-smoke", "version": "0", "classes": ["0", "1+", "2+", "3+"],
            "input": {"tile_size": 512, "magnification": 10, "mpp": 1.0, "layout": "NCHW", "scale": 255.0,
                      "name": "tiles"},
            "outputs": {"probabilities": "probabilities", "tumour_fraction": "tumour_fraction"},
            "preprocessing": {"white_fraction_max": 0.6, "stain": {
                "method": "macenko-absolute-dab",
                "stain_matrix": [[0.650, 0.704, 0.286], [0.268, 0.570, 0.776]], "h_max": 0.7}},
            "intended_use": "Benchmark smoke test only."}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.throughput", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=240)


def test_help():
    proc = _run("--help")
    assert proc.returncode == 0 and "--small-only" in proc.stdout and "--cache" in proc.stdout
    assert "--arch" in proc.stdout and "--tiatoolbox-python" in proc.stdout


def test_benchmark_prints_every_figure(tmp_path):
    model = _tiny_model(tmp_path)
    proc = _run("--small", "tiny", "--large", "tiny-wide", "--cache", str(tmp_path / "slides"),
                "--model-path", str(model), "--min-seconds", "0.05", "--sample-tiles", "4",
                "--membrane-fields", "2", "--slide-40x", "tiny40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    def row(label: str) -> list[str]:
        lines = [ln for ln in out.splitlines() if ln.startswith(f"| {label}")]
        assert len(lines) == 1, (label, out)
        return [c.strip() for c in lines[0].strip("|").split("|")]

    def positive(text: str) -> float:
        value = float(text)
        assert value > 0, text
        return value

    for label in ("bare model", "end-to-end score_slide, tiny slide", "end-to-end score_slide, tiny-wide slide",
                  "naive loop, tiny slide", "naive loop, tiny-wide slide", "JPEG read + decode alone", "white filter alone", "Macenko normalisation alone",
                  "input conversion alone", "QC tile sharpness alone"):
        cells = row(label)
        positive(cells[1])  # tiles/s
        positive(cells[3])  # x bare model
        positive(cells[4])  # CPU ms/tile
    positive(row("membrane grader alone")[1])  # fields/s
    positive(row("membrane grader alone")[4])  # CPU ms/field
    on = positive(row("end-to-end score_slide, tiny40 slide (40x), membrane grader on")[2])
    off = positive(row("end-to-end score_slide, tiny40 slide (40x), membrane grader off")[2])
    assert on > off  # the grader reads and grades fields only when on
    for label in ("end-to-end score_slide", "naive loop"):
        for slide in ("tiny", "tiny-wide"):
            positive(row(f"{label}, {slide} slide")[2])  # wall s
            assert "median of 3 runs" in row(f"{label}, {slide} slide")[5]  # after an untimed warm-up run
    # The tiatoolbox peer is not configured: its row and ratio line say so, and nothing else is missing.
    peer = row("tiatoolbox PatchPredictor, tiny-wide slide")
    assert peer[1:5] == ["-"] * 4 and peer[5].startswith("skipped: no --tiatoolbox-python"), peer
    assert "end-to-end / tiatoolbox (tiny-wide slide, same network): skipped: no --tiatoolbox-python" in out
    for pattern in (r"end-to-end / bare model \(tiny-wide slide\): " + NUMBER,
                    r"end-to-end / naive loop \(tiny slide\): " + NUMBER,
                    r"end-to-end / naive loop \(tiny-wide slide\): " + NUMBER,
                    r"peak RSS tiny slide \(\d+ tissue tiles\): " + NUMBER + " MiB",
                    r"peak RSS tiny-wide slide \(\d+ tissue tiles\): " + NUMBER + " MiB",
                    r"peak RSS ratio large/small: " + NUMBER,
                    r"peak RSS tiny-wide slide .* first \(cold\) job took " + NUMBER + " s",
                    r"ceiling with JPEG decode alone .*: " + NUMBER + " tiles/s",
                    r"ceiling with every per-tile stage .*: " + NUMBER + " tiles/s"):
        match = re.search(pattern, out)
        assert match, (pattern, out)
        positive(match.group(1))
    # Second run reuses the rendered slides; a peer interpreter that cannot run gives one line, no traceback.
    again = _run("--small-only", "--small", "tiny", "--cache", str(tmp_path / "slides"), "--model-path", str(model),
                 "--min-seconds", "0.05", "--sample-tiles", "4", "--membrane-fields", "2", "--slide-40x", "tiny40",
                 "--tiatoolbox-python", str(tmp_path / "no-such-venv" / "python"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "rendering" not in again.stderr
    assert "Traceback" not in again.stdout + again.stderr
    assert re.search(r"end-to-end / tiatoolbox \(tiny slide, same network\): failed: .*no-such-venv.* could not "
                     r"run the peer \(FileNotFoundError", again.stdout), again.stdout
    assert re.search(r"end-to-end / naive loop \(tiny slide\): " + NUMBER, again.stdout)
