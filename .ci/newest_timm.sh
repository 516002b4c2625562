#!/usr/bin/env bash
# timm's own model tests (tests/test_models.py of the newest timm's sdist) on every model timm_denseres registers.
# Usage: .ci/newest_timm.sh [VENV [PYTEST ARGS...]]
#   VENV: a virtual environment to install into (made if missing; default: a new one in a temporary folder).
#   PYTEST ARGS are added to pytest's, e.g. -x, or -k "not pretrained and torchscript" to run a part.
# The venv gets this tree (editable), then the newest timm; nothing of timm's is copied into the repo.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$(mktemp -d)/venv}
shift || true
work=$(mktemp -d)
start=$SECONDS

[ -x "$venv/bin/python" ] || python -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install -q -c "$repo/constraints.txt" -e "$repo"
"$py" -m pip install -q -U timm 'pytest<9.2' pytest-xdist pytest-timeout  # timm's own test requirements
version=$("$py" -c 'import timm; print(timm.__version__)')
"$py" -m pip download -q --no-binary :all: --no-deps -d "$work" "timm==$version"
tar -xzf "$work/timm-$version.tar.gz" -C "$work" "timm-$version/pyproject.toml" "timm-$version/tests"
echo "newest_timm: timm $version installed, its tests in $work/timm-$version/tests ($((SECONDS - start)) s)"

# -p timm_denseres registers our models before the test module lists them; .ci/timm_our_models.py keeps the tests
# whose model_name is one of ours (-k NAME would also match timm's resnet200 for our resnet20). pytest exits
# non-zero on a failure and with 5 when no test was selected.
cd "$work/timm-$version"
PYTHONPATH="$repo/.ci" "$py" -m pytest tests/test_models.py -p timm_denseres -p timm_our_models \
    -k 'not pretrained' -p no:cacheprovider -q -rfE --tb=short -n 2 "$@"
echo "newest_timm: done in $((SECONDS - start)) s"
