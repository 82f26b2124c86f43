#!/usr/bin/env bash
# Set up everything the tests need (Python deps incl. torch, Orthanc, redis-server, dcmtk) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install.sh --dev --train --services
.venv/bin/ruff check .           # lint (rules in pyproject.toml)
.venv/bin/python -m mypy         # types of dicom_io (pyproject.toml)
exec .venv/bin/python -m pytest -q "$@"
