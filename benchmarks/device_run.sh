#!/usr/bin/env bash
# The GPU session's one command (see README, Benchmarks): installs the carried wheels, then runs the
# training checks and both benchmarks on the GPU, each printing its table; logs go to $OUT.
#   device run: bash benchmarks/device_run.sh   (carry: .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ldm-device-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
status=0
python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt" || status=1
python3 benchmarks/train_throughput.py 2>&1 | tee "$OUT/train_throughput.txt" || status=1
python3 benchmarks/sample_latency.py 2>&1 | tee "$OUT/sample_latency.txt" || status=1
exit $status
