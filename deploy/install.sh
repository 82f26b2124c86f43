#!/usr/bin/env bash
# Set up her2-dicom-worker on a fresh Debian/Ubuntu machine.
#
#   bash deploy/install.sh              worker + CLI in .venv (no torch)
#   bash deploy/install.sh --dev        + test tools, and .venv-convert with the third-party converter
#                                       wsidicomizer (it pins an older wsidicom than the worker needs)
#   bash deploy/install.sh --train      + torch/torchvision for model_training (~5 GB)
#   bash deploy/install.sh --services   + Debian orthanc(-wsi,-dicomweb), redis-server, dcmtk, dicom3tools, chromium, her2_viewer/page/ npm ci (viewer, tests)
#   bash deploy/install.sh --gpu        + onnxruntime-gpu (CUDA execution provider)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
services=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras+=(dev) ;;
    --train) extras+=(train) ;;
    --gpu) extras+=(gpu) ;;
    --services) services=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ "$services" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  if ! command -v Orthanc >/dev/null || ! command -v redis-server >/dev/null || ! command -v storescu >/dev/null \
     || ! command -v dciodvfy >/dev/null || ! command -v OrthancWSIDicomizer >/dev/null \
     || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || ! command -v chromium >/dev/null \
     || ! command -v npm >/dev/null; then
    $SUDO apt-get update -qq
    node=""; command -v npm >/dev/null || node="nodejs npm"  # the viewer page and its browser test (her2_viewer/page/)
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq orthanc orthanc-wsi orthanc-dicomweb redis-server dcmtk \
      dicom3tools chromium $node >/dev/null
  fi
  # dicom-microscopy-viewer and puppeteer-core as pinned in her2_viewer/page/package-lock.json; the browser is Debian's chromium.
  [ her2_viewer/page/node_modules/.package-lock.json -nt her2_viewer/page/package-lock.json ] \
    || (cd her2_viewer/page && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
if [[ " ${extras[*]-} " == *" gpu "* ]]; then
  # onnxruntime and onnxruntime-gpu install the same module: keep only the GPU build (as deploy/Dockerfile does).
  .venv/bin/python -m pip uninstall -q -y onnxruntime
  .venv/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "onnxruntime-gpu>=1.18"
fi
if [[ " ${extras[*]-} " == *" dev "* ]]; then
  [ -x .venv-convert/bin/python ] || "$PYTHON" -m venv .venv-convert
  .venv-convert/bin/python -m pip install -q --disable-pip-version-check -r deploy/convert-requirements.txt
fi
echo "installed her2-dicom-worker ($spec) into .venv: run .venv/bin/her2 --help"
