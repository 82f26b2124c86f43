#!/usr/bin/env bash
# The GPU measurement of docs/performance.md ("GPU") in one command, on a host with an NVIDIA GPU:
#
#   bash benchmarks/gpu.sh [OUT_DIR]        (default out/gpu-benchmark)
#
# Installs the worker with onnxruntime-gpu and the train extra (ResNet34 is exported with torch),
# then runs benchmarks.throughput with the CUDA provider for the bundled model and ResNet34, each in
# float32 and float16, decode threads = the host's cores. Each run's table goes to OUT_DIR/<model>-<precision>.md
# and OUT_DIR/summary.md collects the GPU's name and the end-to-end lines, ready for docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/gpu-benchmark}"
mkdir -p "$out"
command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi: this host has no NVIDIA driver" >&2; exit 2; }
bash deploy/install.sh --gpu --train >/dev/null
.venv/bin/python -c "import onnxruntime as o, sys; p = o.get_available_providers(); \
sys.exit(0 if 'CUDAExecutionProvider' in p else f'gpu.sh: onnxruntime has no CUDA provider ({p})')"
gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
{ echo "# GPU benchmark, $(date -u +%Y-%m-%d)"; echo; echo "GPU: $gpu; CPU cores: $(nproc)"; echo; } > "$out/summary.md"
for model in default resnet34; do
  for precision in float32 float16; do
    args=(--device cuda --precision "$precision" --decode-threads "$(nproc)")
    [ "$model" = resnet34 ] && args+=(--arch resnet34)
    echo "== $model $precision" >&2
    .venv/bin/python -m benchmarks.throughput "${args[@]}" | tee "$out/$model-$precision.md"
    { echo "## $model, $precision"; grep -E "^(model|end-to-end|ceiling|\| (bare|end-to-end|naive))" "$out/$model-$precision.md" || true; echo; } \
      >> "$out/summary.md"
  done
done
echo "gpu.sh: tables in $out, summary in $out/summary.md" >&2
