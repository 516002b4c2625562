#!/usr/bin/env bash
# README command 1 in a new virtual environment, without the test extras (so without matplotlib):
#   pip install -c constraints.txt -e . && python -m timm_denseres
# then the package as a wheel (pip install .), run outside the clone: one clear instruction without --model and
# --data-dir, the main job with them.
# Usage: .ci/clean_install.sh [VENV]   (VENV must not exist yet; default: a new one in a temporary folder,
# removed on exit)
# .ci/run goes on in the same VENV with the test extras: the package is editable again after that install.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
elsewhere=$(mktemp -d)
trap 'rm -rf "$elsewhere"' EXIT
venv=${1:-$elsewhere/venv}
start=$SECONDS

python -m venv "$venv"
py=$venv/bin/python
cd "$repo"
"$py" -m pip install -q -c constraints.txt -e .
echo "clean_install: venv with README command 1's install in $((SECONDS - start)) s"
if "$py" -c 'import matplotlib' 2>/dev/null; then
    echo "clean_install: matplotlib is installed, so this does not test the main job without it" >&2
    exit 1
fi

"$py" -m timm_denseres | tee "$elsewhere/main.out"
grep -q 'top-1 accuracy 93.00%' "$elsewhere/main.out"  # the number README quotes
grep -q '^  gate figure skipped: matplotlib is not installed' "$elsewhere/main.out"
echo "clean_install: main job in $((SECONDS - start)) s so far"

"$py" -m pip install -q -c constraints.txt --no-deps .
cd "$elsewhere"
if "$py" -m timm_denseres --no-table 2> wheel.err; then
    echo "clean_install: the wheel ran the main job without the bundled files" >&2
    exit 1
fi
cat wheel.err
grep -q -- '--model' wheel.err
"$py" -m timm_denseres --no-table --show 2 --model "local-dir:$repo/weights/denseresnet110_n4.fmnist" \
    --data-dir "$repo/data/sample/fashion-mnist" | tee wheel.out
grep -q 'top-1 accuracy' wheel.out
echo "clean_install: done in $((SECONDS - start)) s"
