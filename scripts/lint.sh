#!/usr/bin/env bash
# ruff and mypy (strict) over the whole project (run by .ci/run).
#
# mypy reads the package through llamafleet/{runtime,worker,client,backends}: symlinks
# to the repository's folders, laid out as the wheel installs them (pyproject.toml's
# package-dir does the same mapping at install time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m ruff check .
"$PY" -m mypy
