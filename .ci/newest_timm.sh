#!/usr/bin/env bash
# timm's own model tests (tests/test_models.py of the newest timm's sdist) on our models: by default one model per
# code path (the two tiny test models, which are the CIFAR-layout DenseResNet and the DenseMobileNetV2; the
# CIFAR-layout pair at depth 20, with the published fmnist tag; DenseResNet-34 with the ImageNet stem and the warm
# tags); the other depths and N build the same modules in other numbers, and tests/test_contract.py checks every
# model's config. OUR_MODELS=all runs every model we register (about 10 minutes more with -n 2 in PYTEST ARGS).
# Beside them, our own tests of what timm's code does with our models: its loading and Hub code with our checkpoints
# (tests/test_pretrained.py), its ONNX export (tests/test_onnx.py) and what our launchers ask of it
# (tests/test_timm_scripts.py): our suite runs on the pinned timm, and timm 1.0.31 changed what a local-dir: folder
# passes to the model, its default ONNX exporter and its error for an unknown model source.
# The two run at once, one process each (on 2 cores that is faster than one after the other with -n 2 each, whose
# workers import torch again); timm's output follows ours.
# Usage: .ci/newest_timm.sh [VENV [PYTEST ARGS...]]
#   VENV: a virtual environment to install into (made if missing; default: a new one in a temporary folder,
#   removed on exit with timm's tests).
#   PYTEST ARGS are added to those of timm's tests, e.g. -x, or -k "not pretrained and torchscript" to run a part.
# The venv gets this tree (editable, with the test extras), then the newest timm; nothing of timm's is copied
# into the repo.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=${1:-$work/venv}
shift || true
start=$SECONDS

[ -x "$venv/bin/python" ] || python -m venv "$venv"
py=$venv/bin/python
if ! (cd "$work" && "$py" -c 'import timm_denseres' 2>/dev/null); then  # .ci/run's venv has it already
    "$py" -m pip install -q -c "$repo/constraints.txt" -e "$repo[test]"
fi
"$py" -m pip install -q -U timm 'pytest<9.2' pytest-xdist pytest-timeout  # timm's own test requirements
version=$("$py" -c 'import timm; print(timm.__version__)')
"$py" -m pip download -q --no-binary :all: --no-deps -d "$work" "timm==$version"
tar -xzf "$work/timm-$version.tar.gz" -C "$work" "timm-$version/pyproject.toml" "timm-$version/tests"
echo "newest_timm: timm $version installed, its tests in $work/timm-$version/tests ($((SECONDS - start)) s)"

# -p timm_denseres registers our models before the test module lists them; .ci/timm_our_models.py keeps the tests
# whose model_name is one of ours (-k NAME would also match timm's resnet200 for our resnet20). pytest exits
# non-zero on a failure and with 5 when no test was selected.
cd "$work/timm-$version"
case ${OUR_MODELS:-} in
    all) OUR_MODELS= ;;
    '') OUR_MODELS='test_denseresnet test_densemobilenetv2 resnet20 denseresnet20_n4 denseresnet34_n6' ;;
esac
OUR_MODELS=$OUR_MODELS PYTHONPATH="$repo/.ci" "$py" -m pytest tests/test_models.py -p timm_denseres -p timm_our_models \
    -k 'not pretrained' -p no:cacheprovider -n 0 -q -rfE --tb=short "$@" > "$work/timm_tests.log" 2>&1 &
timm_tests=$!
cd "$repo"
ours=0
"$py" -m pytest tests/test_pretrained.py tests/test_onnx.py tests/test_timm_scripts.py -p no:cacheprovider -n 0 -q -rfE \
    --tb=short || ours=$?
theirs=0
wait "$timm_tests" || theirs=$?
echo "newest_timm: timm's tests/test_models.py on our models (exit $theirs):"
cat "$work/timm_tests.log"
echo "newest_timm: done in $((SECONDS - start)) s"
[ "$ours" = 0 ] && [ "$theirs" = 0 ]
