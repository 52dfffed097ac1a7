#!/usr/bin/env bash
# ruff and mypy over the whole project (run by .ci/run).
#
# mypy cannot follow setuptools' editable finder, which maps the repository's
# runtime/ worker/ client/ backends/ folders into the llamafleet namespace, so the
# installed layout is laid out for it as symlinks in a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m ruff check .

tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/llamafleet"
for f in llamafleet/*; do ln -s "$PWD/$f" "$tree/llamafleet/$(basename "$f")"; done
for d in runtime worker client backends; do ln -s "$PWD/$d" "$tree/llamafleet/$d"; done
(cd "$tree" && "$PY" -m mypy --config-file "$OLDPWD/pyproject.toml" -p llamafleet)
