"""Whole-slide throughput: our streaming pipeline against the bare model and a naive loop.

Run from the repository root::

    .venv/bin/python -m benchmarks.throughput [--small-only] [--cache DIR] [--device cpu|cuda|auto] [--arch resnet34]

It renders (once; later runs reuse ``--cache``) a small and a large synthetic
HER2 slide as DICOM, then prints, from this one run on this machine, a table of

* bare-model throughput: ONNX Runtime on pre-decoded, pre-normalised tiles
  already converted to the model's float input (the limit for our glue);
* end-to-end :func:`her2_analysis.pipeline.score_slide` on each slide: tissue tiles
  graded per second of the whole job's wall time, and the ratio to the bare model;
* a naive loop on each slide: every tissue region read through wsidicom's
  whole-region ``read_region``, normalised, and graded by the torch definition
  of the model one tile at a time (ONNX Runtime one tile at a time if torch or
  the torch definition is not available; the row says which);
* with ``--tiatoolbox-python``, a real peer on the large slide: tiatoolbox's
  patch predictor reading the same DICOM series and grading the same tiles with
  the same network (:mod:`benchmarks.peer_tiatoolbox`, run by that interpreter);
* every per-tile stage alone, one thread each (JPEG read + decode, white
  filter, Macenko normalisation, float input conversion, QC sharpness), and
  the ceiling those stages put on end-to-end throughput on this machine's cores;
* peak RSS of scoring each slide in a fresh process, and their ratio;
* the membrane (cell) grader: :func:`her2_analysis.membrane.field.grade_field` alone on
  1024 px fields at 0.25 um/px cut from the real HER2 cores in
  ``tests/data/real_her2`` (fields per second on one thread), and
  ``score_slide`` on a synthetic 40x slide with the grader on and off (its
  whole-slide cost; on 10x slides it does not run: no level fine enough).

Ratios are against the bare model of the same run. The benchmark asserts
nothing about speed; ``tests/benchmarks/test_benchmark_smoke.py`` runs it on tiny slides
so it keeps working.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import PEER_MARK
from benchmarks.slides import DEFAULT_CACHE, SLIDES, SLIDES_40X, ensure_slide

#: Tiles (from the small slide) used for the bare-model, decode and normalisation rates.
SAMPLE_TILES = 64
#: Marker the child process prints before its JSON result line.
CHILD_MARK = "BENCH-CHILD "


@dataclass
class Row:
    label: str
    tiles_per_s: float | None = None
    seconds: float | None = None
    ratio: float | None = None
    cpu_ms: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- machine


def machine_description() -> str:
    """CPU model, logical cores and RAM (from /proc on Linux), plus the GPU if ONNX Runtime sees CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f", {int(line.split()[1]) / 1024**2:.0f} GiB RAM"
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores{ram}, Python {platform.python_version()}"


# --------------------------------------------------------------------------- settings


#: Command-line options that override the worker's settings (also passed on to the RSS child process).
_SETTING_ARGS = ("model_path", "precision", "batch_size", "decode_threads", "intra_op_threads")


def _settings(args: argparse.Namespace):
    from worker.settings import load_settings

    overrides = {"device": args.device}
    for key in _SETTING_ARGS:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    return load_settings(**overrides)


def random_init_model(arch: str, cache: Path, log) -> Path:
    """``arch`` (a :mod:`model_training.models` architecture) with random weights, exported once into ``cache``.

    Time per tile does not depend on the weights; the card is the bundled
    model's with the architecture named, so the naive loop builds the same
    torch definition. Needs the ``train`` extra (torch).
    """
    from her2_core.model_card import card_path
    from model_training.export import export_onnx, write_card
    from model_training.models import TileClassifier
    from worker.settings import load_settings

    path = cache / "models" / f"{arch}-random.onnx"
    if not path.is_file():
        log(f"exporting a randomly initialised {arch} into {path} ...")
        default = Path(load_settings().model_path)
        card = json.loads(card_path(default).read_text())
        net = TileClassifier(arch, n_classes=len(card["classes"]))
        export_onnx(net, path, card["input"]["tile_size"])
        card.update(name=f"{arch}-random-init", version="0", metrics={},
                    training={"arch": arch, "input_size": net.input_size, "weights": "random init (benchmark only)"})
        write_card(card, path)
    return path


def _model(settings):
    from her2_analysis.cnn import load_model

    return load_model(Path(settings.model_path), settings.device, settings.intra_op_threads,
                      settings.white_fraction_max, settings.precision)


# --------------------------------------------------------------------------- stages


@dataclass
class Rate:
    """A measured rate: tiles per second of wall time and CPU milliseconds (all threads) per tile."""

    tiles: int
    seconds: float
    cpu_seconds: float

    @property
    def per_s(self) -> float:
        return self.tiles / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000.0 * self.cpu_seconds / max(1, self.tiles)


def _timed(fn) -> tuple[object, float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def _repeat(fn, tiles: np.ndarray, batch_size: int, min_seconds: float) -> Rate:
    """``fn`` on batches of ``tiles``, repeated for at least ``min_seconds`` after one warm-up batch."""
    fn(tiles[:batch_size])
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for i in range(0, len(tiles), batch_size):
            fn(tiles[i : i + batch_size])
            done += len(tiles[i : i + batch_size])
        if time.perf_counter() - t0 >= min_seconds:
            return Rate(done, time.perf_counter() - t0, time.process_time() - c0)


@dataclass
class Sample:
    """Kept tissue tiles of one slide: decoded, and normalised; the slide's normaliser; read+decode rate."""

    raw: np.ndarray
    normalised: np.ndarray
    normaliser: object
    decode: Rate


def sample_tiles(series_dir: Path, model, n: int) -> Sample:
    """Up to ``n`` kept tissue tiles of a slide, with the single-thread read + decode rate measured on them."""
    from dicom_io.wsi import open_slide
    from her2_analysis.tiles import survey_slide, tile_slide
    from her2_core.preprocessing import white_fraction

    card = model.card
    with open_slide(series_dir) as slide:
        prepared = tile_slide(slide, survey_slide(slide), card.tile_size, card.mpp, card.stain)
        positions = prepared.candidates[: max(n, 1) * 2]
        decoded, seconds, cpu = _timed(lambda: [prepared.read(r, c) for r, c in positions])
    raw = np.stack(decoded)
    raw = raw[white_fraction(raw) <= card.white_fraction_max][:n]
    return Sample(raw, prepared.normaliser(raw), prepared.normaliser, Rate(len(decoded), seconds, cpu))


def reference_session(model_path: Path, device: str, precision: str):
    """An ONNX Runtime session with the library's default options (threads, spinning), for the bare model."""
    import onnxruntime as ort

    from her2_analysis.cnn import model_graph, select_providers

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model_graph(model_path, precision), options, providers=select_providers(device))


def bare_model_rate(session, model, normalised: np.ndarray, batch_size: int, min_seconds: float) -> Rate:
    """ONNX Runtime alone on tiles already decoded, normalised and converted to its float NCHW input."""
    card = model.card
    inputs = [model.input_tensor(normalised[i : i + batch_size]) for i in range(0, len(normalised), batch_size)]
    outputs = [card.probabilities_output] + ([card.tumour_fraction_output] if card.tumour_fraction_output else [])
    session.run(outputs, {card.input_name: inputs[0]})  # warm-up: the first run allocates
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        for x in inputs:
            session.run(outputs, {card.input_name: x})
            done += len(x)
        if time.perf_counter() - t0 >= min_seconds:
            return Rate(done, time.perf_counter() - t0, time.process_time() - c0)


#: Real HER2 IHC cores (about 0.25 um/px) the membrane grader's rate is measured on.
REAL_CORES = Path(__file__).resolve().parents[1] / "tests" / "data" / "real_her2"


def membrane_fields(n: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``n`` 1024 px fields from the middle of the real cores (round robin), and their glass colour."""
    from PIL import Image

    from her2_core.preprocessing.tissue import REFERENCE_GLASS

    cores = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(REAL_CORES.glob("*.jpg"))]
    corners = [(2048, 2048), (1024, 2048), (2048, 1024), (3072, 2048), (2048, 3072)]  # inside every core
    fields = []
    for i in range(n):
        x, y = corners[(i // len(cores)) % len(corners)]
        fields.append(cores[i % len(cores)][y : y + 1024, x : x + 1024])
    return np.stack(fields), REFERENCE_GLASS  # the cores' glass


def membrane_rate(n: int, min_seconds: float) -> Rate:
    """The membrane grader alone, one field at a time on one thread (as one pool thread runs it)."""
    from her2_analysis.membrane.field import grade_field
    from her2_core.preprocessing import REFERENCE

    fields, glass = membrane_fields(n)
    stains = REFERENCE.matrix()
    return _repeat(lambda batch: [grade_field(f, 0.25, stains, glass=glass) for f in batch], fields, 1, min_seconds)


def median_run(run, repeats: int) -> tuple[Rate, str]:
    """The run (a ``Rate``) of median wall time among ``repeats`` calls of ``run``, and a note with their range.

    This machine class (a virtualised 2-core host) varies by 10-20 % from run to run: one run is not a figure.
    """
    rates = sorted((run() for _ in range(max(1, repeats))), key=lambda r: r.seconds)
    note = f"median of {len(rates)} runs ({rates[0].seconds:.2f}-{rates[-1].seconds:.2f} s)" if len(rates) > 1 else ""
    return rates[len(rates) // 2], note


def end_to_end(series_dir: Path, settings) -> tuple[Rate, list[list[int]]]:
    """``score_slide`` on a slide: tissue tiles graded over the wall time of the whole job.

    Also returns the graded tiles' top-left corners ``[x, y]`` in pixels of the model's level (the
    tiles the tiatoolbox peer is given).
    """
    from her2_analysis.pipeline import score_slide

    result, seconds, cpu = _timed(lambda: score_slide(series_dir, settings.scoring_options()))
    size = result.score.grid.tile_size
    origins = [[int(c) * size, int(r) * size] for r, c in np.argwhere(result.score.scored)]
    return Rate(int(result.stats["tiles_scored"]), seconds, cpu), origins


@dataclass
class TorchDefinition:
    """What the ONNX model was exported from: a ``model_training`` architecture, its input size, its weights."""

    arch: str
    input_size: int | None
    weights: Path | None  #: ``<model>.pt`` (a ``state_dict``) when it exists; None: random init, same cost


def torch_definition(model_path: Path, card) -> TorchDefinition:
    """The model's architecture as its card's training record names it (the bundled default: tiny)."""
    training = card.training if isinstance(card.training, dict) else {}
    weights = Path(model_path).with_suffix(".pt")
    return TorchDefinition(str(training.get("arch") or training.get("architecture") or "tiny"),
                           training.get("input_size") or None, weights if weights.is_file() else None)


def _torch_tile_model(model_path: Path, card):
    """The torch definition of the model (``model_training.models.TileClassifier``), or (None, why)."""
    try:
        import torch

        from model_training.models import TileClassifier
    except Exception as exc:  # torch not installed, or no torch definition yet
        return None, f"torch model unavailable ({type(exc).__name__}: {exc})"
    definition = torch_definition(model_path, card)
    arch, weights = definition.arch, definition.weights
    try:
        net = TileClassifier(arch, n_classes=len(card.classes), input_size=definition.input_size)
        how = "random init (same cost)"
        if weights is not None:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            how = f"weights {weights.name}"
    except Exception as exc:
        return None, f"torch {arch} model could not be built ({type(exc).__name__}: {exc})"
    threads = _fastest_torch_threads(net.eval(), card.tile_size)
    return net, f"torch {torch.__version__}, {arch} ({how}), {threads} thread(s): the faster setting here"


def _fastest_torch_threads(net, tile_size: int) -> int:
    """Give the naive loop its best torch thread count (default or 1) for single-tile forwards.

    Torch's OpenMP threads wait by spinning; on a small or shared machine one
    thread can be many times faster than the default for one tile at a time.
    """
    import torch

    x = torch.rand(1, 3, tile_size, tile_size)
    timings = {}
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            net(x)
            t0 = time.perf_counter()
            for _ in range(3):
                net(x)
        timings[threads] = time.perf_counter() - t0
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


#: The naive loop builds the normaliser's colour table up front on slides with more tissue tiles than this (the
#: worker's rule before it moved to 48 tiles, :data:`her2_core.preprocessing.stain_table.LUT_AFTER_PX`): a
#: serial loop, whose table build runs on every core, gains from it from about 26 tiles on, so the baseline keeps
#: the choice that is faster for it.
NAIVE_TABLE_AFTER_TILES = 16


def naive_loop(series_dir: Path, settings, model, max_tiles: int) -> tuple[Rate, str]:
    """The research-code loop: whole-region read, normalise, one tile at a time through the model.

    Returns the rate and which model ran. Tissue finding and the stain fit are
    the same as ours (counted in the wall time); there is no quality control.
    """
    from dicom_io.wsi import open_slide
    from her2_analysis.tiles import survey_slide, tile_slide
    from her2_core.preprocessing import white_fraction

    card = model.card
    net, engine = _torch_tile_model(Path(settings.model_path), card)
    if net is None:
        why = engine
        outputs = [card.probabilities_output] + ([card.tumour_fraction_output] if card.tumour_fraction_output else [])

        def grade(tile: np.ndarray):
            x = tile.transpose(2, 0, 1)[None].astype(np.float32) / card.input_scale
            return model.session.run(outputs, {card.input_name: x})

        engine = f"ONNX Runtime ({why})"
    else:
        import torch

        def grade(tile: np.ndarray):
            x = torch.from_numpy(tile.transpose(2, 0, 1)[None].astype(np.float32) / card.input_scale)
            with torch.inference_mode():
                return net(x)

    t0, c0 = time.perf_counter(), time.process_time()
    graded = 0
    with open_slide(series_dir) as slide:
        prepared = tile_slide(slide, survey_slide(slide), card.tile_size, card.mpp, card.stain)
        if len(prepared.candidates) > NAIVE_TABLE_AFTER_TILES:
            prepared.normaliser.lookup_table()
        level, size = prepared.level, card.tile_size
        for r, c in prepared.candidates[: max_tiles or None]:  # the whole-region API, as research code uses
            x, y = c * size, r * size
            w, h = min(size, level.width - x), min(size, level.height - y)
            tile = np.full((size, size, 3), 255, np.uint8)
            tile[:h, :w] = np.asarray(slide.read_region(level, x, y, w, h))
            if white_fraction(tile) > card.white_fraction_max:
                continue
            grade(prepared.normaliser(tile[None])[0])
            graded += 1
    return Rate(graded, time.perf_counter() - t0, time.process_time() - c0), engine


#: Where docs/performance.md says how to set up the peer's interpreter.
PEER_SETUP = 'docs/performance.md, "Peer: tiatoolbox"'
#: Longest the peer may run (three timed runs of the large slide with ResNet34 take about a minute).
PEER_TIMEOUT_S = 1800


@dataclass
class PeerResult:
    """The tiatoolbox peer on one slide: its rate and the settings it ran with, or why it did not run."""

    rate: Rate | None
    note: str


def tiatoolbox_peer(python: Path | None, series_dir: Path, origins: list[list[int]], settings, card) -> PeerResult:
    """tiatoolbox's patch predictor on ``origins`` of ``series_dir`` with the same network, under ``python``.

    Runs :mod:`benchmarks.peer_tiatoolbox` in that interpreter (tiatoolbox needs its own virtualenv) and
    reads its result line. Any failure (no interpreter, no tiatoolbox, a crash, a timeout) becomes a
    one-line note; the rest of the benchmark runs on. CPU time is not reported: the child also imports,
    warms up and times one run per DataLoader worker count.
    """
    if python is None:
        return PeerResult(None, f"skipped: no --tiatoolbox-python (setup: {PEER_SETUP})")
    definition = torch_definition(Path(settings.model_path), card)
    cmd = [str(python), "-m", "benchmarks.peer_tiatoolbox", str(Path(series_dir).resolve()),
           "--arch", definition.arch, "--n-classes", str(len(card.classes)), "--tile-size", str(card.tile_size),
           "--mpp", str(card.mpp), "--batch-size", str(settings.batch_size)]
    if definition.input_size:
        cmd += ["--input-size", str(definition.input_size)]
    if definition.weights is not None:
        cmd += ["--weights", str(definition.weights)]
    try:
        proc = subprocess.run(cmd, input=json.dumps(origins), capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=PEER_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return PeerResult(None, f"failed: {python} could not run the peer ({type(exc).__name__}: {exc}) "
                                f"(setup: {PEER_SETUP})")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(PEER_MARK)), None)
    if proc.returncode != 0 or line is None:
        last = next((ln.strip() for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "no output")
        return PeerResult(None, f"failed under {python} (exit {proc.returncode}): {last} (setup: {PEER_SETUP})")
    peer = json.loads(line[len(PEER_MARK):])
    tried = ", ".join(f"{n}: {r:.1f}" for n, r in peer["tiles_per_s_by_workers"].items())
    return PeerResult(Rate(int(peer["tiles"]), float(peer["seconds"]), 0.0),
                      f"tiatoolbox {peer['tiatoolbox']}, torch {peer['torch']} ({peer['torch_threads']} threads), "
                      f"wsidicom {peer['wsidicom']}, {peer['arch']} ({peer['weights']}); DataLoader workers "
                      f"{peer['num_workers']}, the fastest here (tiles/s by workers {tried}); tile reads + "
                      "network only (no tissue finding, normalisation, QC or DICOM output)")


#: A minimal launcher: a fresh small interpreter runs the scoring child and reports its peak RSS.
_LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
             "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); sys.exit(rc)")


def peak_rss_mib(series_dir: Path, args: argparse.Namespace) -> tuple[float, int, float]:
    """Peak RSS (MiB) of scoring ``series_dir`` in a fresh process, the tiles it graded and its seconds (a cold job:
    imports, the model's first runs and highdicom's first objects included).

    The scoring process is started by a small launcher that reports
    ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: on Linux a child's ``ru_maxrss``
    starts from the RSS of the process it was forked from, so starting it
    directly from this (large) benchmark process would report our own peak;
    one launcher per slide also keeps the two slides from contaminating each other.
    """
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--score-child", str(series_dir), "--device", args.device]
    for key in _SETTING_ARGS:
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"scoring child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = proc.stdout.splitlines()
    child = json.loads(next(ln for ln in lines if ln.startswith(CHILD_MARK))[len(CHILD_MARK):])
    kib = int(next(ln for ln in lines if ln.startswith("MAXRSS_KIB")).split()[1])  # Linux: KiB
    return kib / 1024.0, int(child["tiles_scored"]), float(child["seconds"])


def _score_child(series_dir: Path, args: argparse.Namespace) -> None:
    rate, _ = end_to_end(series_dir, _settings(args))
    print(CHILD_MARK + json.dumps({"tiles_scored": rate.tiles, "seconds": rate.seconds}), flush=True)


# --------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ratio(v: float | None) -> str:
    """Two decimals, or three significant digits for small ratios (never a misleading 0.00)."""
    return "-" if v is None else (f"{v:.2f}" if v >= 0.1 else f"{v:.2g}")


def print_table(rows: list[Row]) -> None:
    print("| measurement | tiles/s | wall s | x bare model | CPU ms/tile | note |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r.label} | {_fmt(r.tiles_per_s)} | {_fmt(r.seconds, 2)} | {_ratio(r.ratio)} | "
              f"{_fmt(r.cpu_ms, 2)} | {r.note} |")


def _stage(label: str, rate: Rate, bare: float, note: str = "") -> Row:
    return Row(label, rate.per_s, None, rate.per_s / bare, rate.cpu_ms, note)


def run(args: argparse.Namespace) -> None:
    from her2_analysis.pipeline import single_threaded_blas
    from her2_analysis.quality import sharpness
    from her2_analysis.tiles import SHARPNESS_TILES
    from her2_core.preprocessing import white_fraction

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    if args.arch:
        args.model_path = random_init_model(args.arch, args.cache, log)
    settings = _settings(args)
    single_threaded_blas()  # as score_slide does: every row (stages, naive loop) runs numpy's BLAS on one thread
    names = [args.small] if args.small_only else [args.small, args.large]
    dirs = {name: ensure_slide(name, args.cache, log) for name in names}
    model = _model(settings)
    card = model.card
    reference = reference_session(Path(settings.model_path), settings.device, settings.precision)
    print(f"machine: {machine_description()}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"model: {card.name} {card.version} ({card.tile_size} px at {card.mpp} um/px) on {model.provider}, "
          f"{model.precision}; batch {settings.batch_size}, decode threads {settings.decode_threads}, "
          f"ORT intra-op threads {settings.intra_op_threads or 'default'}")

    log("sampling tiles ...")
    sample = sample_tiles(dirs[args.small], model, args.sample_tiles)
    if len(sample.raw) == 0:
        raise SystemExit(f"slide {args.small!r} has no tissue tiles to sample")

    def bare_now() -> tuple[Rate, str]:
        """The faster of ORT's default session and the worker's own session: the reference we must approach."""
        candidates = [(bare_model_rate(reference, model, sample.normalised, settings.batch_size, args.min_seconds),
                       "ORT default session options"),
                      (bare_model_rate(model.session, model, sample.normalised, settings.batch_size, args.min_seconds),
                       "worker's session options")]
        return max(candidates, key=lambda c: c[0].per_s)

    log("bare model ...")
    bare_before = bare_now()
    e2e: dict[str, Rate] = {}
    e2e_note: dict[str, str] = {}
    graded: dict[str, list[list[int]]] = {}
    for name in names:
        log(f"end-to-end score_slide on {name} ...")
        # an untimed run first: the tiles it graded, and the warm-up (a process's first job pays one-off costs,
        # "cold" below, that a worker pays once)
        graded[name] = end_to_end(dirs[name], settings)[1]
        e2e[name], e2e_note[name] = median_run(lambda d=dirs[name]: end_to_end(d, settings)[0], args.repeats)
    log("bare model again ...")
    bare_after = bare_now()
    bare_rate, bare_how = max(bare_before, bare_after, key=lambda c: c[0].per_s)
    bare = bare_rate.per_s
    rows = [Row(f"bare model: ONNX Runtime on pre-decoded, pre-normalised tiles (batch {settings.batch_size})",
                bare, None, 1.0, bare_rate.cpu_ms,
                f"best of 4 runs (before: {bare_before[0].per_s:.0f}, after: {bare_after[0].per_s:.0f} tiles/s), "
                f"{bare_how}")]
    for name in names:
        r = e2e[name]
        rows.append(Row(f"end-to-end score_slide, {name} slide ({r.tiles} tissue tiles)", r.per_s, r.seconds,
                        r.per_s / bare, r.cpu_ms,
                        f"whole job: open, survey, QC, tiles, inference, SR + SEG; {e2e_note[name]}"))

    main = names[-1]
    naive: dict[str, Rate] = {}
    for name in names:
        log(f"naive loop on {name} ...")
        engine = naive_loop(dirs[name], settings, model, args.naive_max_tiles)[1]  # also its warm-up
        naive[name], note = median_run(lambda d=dirs[name]: naive_loop(d, settings, model, args.naive_max_tiles)[0],
                                       args.repeats)
        rows.append(Row(f"naive loop, {name} slide ({naive[name].tiles} tiles: read_region + normalise + 1 tile "
                        "at a time)", naive[name].per_s, naive[name].seconds, naive[name].per_s / bare,
                        naive[name].cpu_ms, f"{engine}; {note}"))
    log(f"tiatoolbox peer on {main} ..." if args.tiatoolbox_python else "tiatoolbox peer: not configured")
    peer = tiatoolbox_peer(args.tiatoolbox_python, dirs[main], graded[main], settings, card)
    tia = peer.rate
    rows.append(Row(f"tiatoolbox PatchPredictor, {main} slide ({len(graded[main])} tiles, same network)",
                    tia and tia.per_s, tia and tia.seconds, tia and tia.per_s / bare, None, peer.note))

    log("stages alone ...")
    per_tile = {  # every per-tile stage of the job besides the model, each on one thread
        "JPEG read + decode alone (1 thread)": (sample.decode, ""),
        "white filter alone (1 thread)":
            (_repeat(white_fraction, sample.raw, settings.batch_size, args.min_seconds), ""),
        "Macenko normalisation alone (1 thread)":
            (_repeat(sample.normaliser, sample.raw, settings.batch_size, args.min_seconds),
             "colour-table lookup; the table is built once per slide"),
        "input conversion alone: uint8 NHWC -> float NCHW (1 thread)":
            (_repeat(lambda t: model.input_tensor(t, reuse=True), sample.normalised, settings.batch_size,
                     args.min_seconds), "into the reused per-thread array, as predict does"),
    }
    rows += [_stage(label, rate, bare, note) for label, (rate, note) in per_tile.items()]
    rows.append(_stage("QC tile sharpness alone (1 thread)",
                       _repeat(sharpness, sample.normalised, settings.batch_size, args.min_seconds), bare,
                       f"her2_analysis.quality.sharpness, on {SHARPNESS_TILES} tiles per slide, in the decode pool"))
    log("membrane grader ...")
    cells = membrane_rate(args.membrane_fields, args.min_seconds)
    rows.append(Row("membrane grader alone: 1024 px fields at 0.25 um/px of the real cores (1 thread)",
                    cells.per_s, None, None, cells.cpu_ms, "fields/s (a field is 256 um, 1/4 of a CNN tile)"))
    slide40 = ensure_slide(args.slide_40x, args.cache, log)
    with_cells, _ = end_to_end(slide40, settings)
    without, _ = end_to_end(slide40, settings.model_copy(update={"membrane_grader": False}))
    rows.append(Row(f"end-to-end score_slide, {args.slide_40x} slide (40x), membrane grader on", None,
                    with_cells.seconds, None, None, f"{with_cells.seconds / without.seconds:.2f} x the time with it off"))
    rows.append(Row(f"end-to-end score_slide, {args.slide_40x} slide (40x), membrane grader off", None,
                    without.seconds, None, None, "CNN only"))
    print()
    print_table(rows)

    cores = os.cpu_count() or 1
    ceiling = 1.0 / (1.0 / bare + 1.0 / (sample.decode.per_s * cores))
    glue_ceiling = 1.0 / (1.0 / bare + sum(1.0 / (rate.per_s * cores) for rate, _ in per_tile.values()))
    r = e2e[main]
    print()
    print(f"end-to-end / bare model ({main} slide): {_ratio(r.per_s / bare)}")
    for name in names:
        print(f"end-to-end / naive loop ({name} slide): {_ratio(e2e[name].per_s / naive[name].per_s)}")
    versus_peer = peer.note if tia is None else _ratio(r.per_s / tia.per_s)
    print(f"end-to-end / tiatoolbox ({main} slide, same network): {versus_peer}")
    print(f"ceiling with JPEG decode alone added to the model on {cores} cores: {ceiling:.1f} tiles/s "
          f"= {_ratio(ceiling / bare)} x bare model")
    print(f"ceiling with every per-tile stage above (decode, white filter, normalisation, input conversion) added "
          f"on {cores} cores: {glue_ceiling:.1f} tiles/s = {_ratio(glue_ceiling / bare)} x bare model")

    log("peak RSS in fresh processes ...")
    rss = {name: peak_rss_mib(dirs[name], args) for name in names}
    for name in names:
        print(f"peak RSS {name} slide ({rss[name][1]} tissue tiles): {rss[name][0]:.1f} MiB; that process's "
              f"first (cold) job took {rss[name][2]:.2f} s")
    if not args.small_only:
        tissue_ratio = rss[args.large][1] / max(1, rss[args.small][1])
        print(f"tissue ratio large/small: {tissue_ratio:.2f}")
        print(f"peak RSS ratio large/small: {_ratio(rss[args.large][0] / rss[args.small][0])}")
        if tissue_ratio < 4:
            log(f"warning: the large slide has only {tissue_ratio:.1f}x the tissue tiles of the small one")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Slides: " + ", ".join(
                                    f"{k} ({v.width_um / 1000:g} x {v.height_um / 1000:g} mm)"
                                    for k, v in SLIDES.items()))
    p.add_argument("--small-only", action="store_true", help="only the small slide (no large slide, no RSS ratio)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                   help=f"folder holding the rendered slides, reused across runs (default {DEFAULT_CACHE})")
    p.add_argument("--small", default="small", choices=sorted(SLIDES), help="the small slide (default small)")
    p.add_argument("--large", default="large", choices=sorted(SLIDES), help="the large slide (default large)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"],
                   help="ONNX Runtime provider (default cpu; cuda on a GPU machine)")
    p.add_argument("--model-path", type=Path, default=None, help="ONNX model (default: the configured model)")
    p.add_argument("--arch", default=None,
                   help="benchmark this model_training architecture (e.g. resnet34) with random weights instead "
                        "(exported once into the cache; needs the train extra)")
    p.add_argument("--precision", default=None, choices=["float32", "float16"],
                   help="model arithmetic (default: settings; float16 is for CUDA, see her2_analysis.cnn.model_graph)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per batch (default: settings)")
    p.add_argument("--decode-threads", type=int, default=None, help="decode threads (default: settings)")
    p.add_argument("--intra-op-threads", type=int, default=None, help="ORT intra-op threads (default: settings)")
    p.add_argument("--sample-tiles", type=int, default=SAMPLE_TILES,
                   help=f"tiles used for the bare-model, decode and normalisation rates (default {SAMPLE_TILES})")
    p.add_argument("--min-seconds", type=float, default=3.0,
                   help="minimum seconds each rate (bare model, normalisation) is measured for (default 3)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs per end-to-end and naive-loop row, after an untimed warm-up; the median counts "
                        "(default 3)")
    p.add_argument("--naive-max-tiles", type=int, default=0,
                   help="grade at most this many tiles in the naive loop (default 0 = all tissue tiles)")
    p.add_argument("--tiatoolbox-python", type=Path, default=None,
                   help="an interpreter with tiatoolbox (e.g. /work/tia-venv/bin/python): runs its patch predictor "
                        "on the main slide's graded tiles with the same network (default: skipped, with a note)")
    p.add_argument("--membrane-fields", type=int, default=8,
                   help="real-core fields the membrane grader's rate is measured on (default 8)")
    p.add_argument("--slide-40x", default="small40", choices=sorted(SLIDES_40X),
                   help="the 40x slide scored with the membrane grader on and off (default small40)")
    p.add_argument("--score-child", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.score_child is not None:
        _score_child(args.score_child, args)
    else:
        run(args)


if __name__ == "__main__":
    main()
