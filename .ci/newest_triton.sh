#!/usr/bin/env bash
# The gate's Triton kernels on the newest Triton release: what a user gets who installs the newest torch (each torch
# release requires its own Triton; the pinned torch 2.14.1 requires 3.8). tests/test_triton.py runs the kernels
# under the interpreter against the formula, values and gradients, and compiles them for sm_90 with that Triton's
# compiler, so a release that rejects or miscomputes a kernel, or warns at compile time, fails CI here.
# Usage: .ci/newest_triton.sh VENV [PYTEST ARGS...]
#   VENV: .ci/run's virtual environment (the package with its test extras); it keeps the newest Triton afterwards.
# pip may report that the pinned torch asks for another Triton: expected, the interpreter and the compiler need no
# torch of the same release.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$1
shift
start=$SECONDS
py=$venv/bin/python
"$py" -m pip install -q -U --no-deps triton
version=$("$py" -c 'import triton; print(triton.__version__)')
echo "newest_triton: triton $version installed ($((SECONDS - start)) s)"
cd "$repo"
"$py" -m pytest tests/test_triton.py -p no:cacheprovider -n 2 -q -rfE --tb=short "$@"
echo "newest_triton: done in $((SECONDS - start)) s"
