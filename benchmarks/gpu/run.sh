#!/usr/bin/env bash
# Issue 32's GPU benchmark in one command (benchmarks/gpu/README.md): where the interpreter lacks diffusers or FastAPI
# (a bare GPU machine), installs the wheels of .whl/ (fetch_wheels.sh) first; then runs bench_gpu.py with these arguments.
#   benchmarks/gpu/run.sh --json benchmarks/results/gpu-h200.json   # SD1.5 shapes on the GPU, under 10 minutes
#   benchmarks/gpu/run.sh --smoke --json /tmp/gpu-smoke.json        # the same script on the demo model, on CPU
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import diffusers, fastapi" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    site=${BENCH_SITE:-/tmp/sd-bench-site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec env PYTHONUNBUFFERED=1 "$PYTHON" benchmarks/gpu/bench_gpu.py "$@"
