#!/usr/bin/env bash
# The GPU session's one command (see README, Benchmarks): installs the carried wheels, then runs the
# gpu-marked tests (training steps under torch.cuda.set_sync_debug_mode("error")), the training checks and
# the benchmarks on the GPU, each printing its table; logs go to $OUT.
#   device run: bash benchmarks/device_run.sh   (carry: .whl, from benchmarks/device_wheels.sh)
# Issue 10 item 5's benchmarks, each a table: train_throughput.py (the bare step, ours and diffusers', eager and
# compiled, MFU), sample_latency.py, data_throughput.py (the input pipeline, on the device machine's 16 cores)
# and, last (the longest), train_e2e.py (train.py from cached latents and from raw shards beside the bare step).
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
if python3 -c "import pytest" 2>/dev/null; then
    # the files holding gpu-marked tests (collecting the whole suite would import what the device lacks)
    python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py) 2>&1 \
        | tee "$OUT/gpu_tests.txt" || status=1
else
    echo "no pytest here: the gpu-marked tests did not run (carry .whl from benchmarks/device_wheels.sh)" \
        | tee "$OUT/gpu_tests.txt"
    status=1
fi
python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt" || status=1
python3 benchmarks/train_throughput.py 2>&1 | tee "$OUT/train_throughput.txt" || status=1
python3 benchmarks/sample_latency.py --compile 2>&1 | tee "$OUT/sample_latency.txt" || status=1
python3 benchmarks/data_throughput.py --workers 1 4 2>&1 | tee "$OUT/data_throughput.txt" || status=1
python3 benchmarks/train_e2e.py 2>&1 | tee "$OUT/train_e2e.txt" || status=1
exit $status
