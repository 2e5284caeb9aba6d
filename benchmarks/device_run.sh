#!/usr/bin/env bash
# The GPU session's command (see README, Benchmarks): installs the carried wheels, then runs the stages named
# (default: all, most wanted first), each printing its table; logs go to $OUT.
#   device run: bash benchmarks/device_run.sh [STAGE ...]   (carry: .whl, from benchmarks/device_wheels.sh)
# Stages (issue 10's tables):
#   train   train_throughput.py: the bare step, ours and diffusers', eager and compiled, TFLOP/s, MFU, memory
#   sample  sample_latency.py --compile: 50 DDIM steps with CFG, eager, compiled and CUDA graphs, both sides
#   e2e     train_e2e.py: train.py from cached latents and from raw shards beside the bare step
#   gpu     the gpu-marked tests (training steps under torch.cuda.set_sync_debug_mode("error"))
#   check   gpu_check.py: bf16-mixed, fused AdamW, resume, FSDP2, fp16 sampling, as train.py/sample.py runs
#   data    data_throughput.py: the input pipeline on the device machine's cores
# A device call lasts at most 600 s, so the stages share BUDGET_S seconds (default 570): each runs under a
# timeout of what is left (its rows print as they are measured, so a cut stage keeps what it finished), one
# that would start with under MIN_S (default 45) left is skipped, and the summary names the command that runs
# what was cut or skipped (call it at once: the machine stays warm, and its compile caches with it, only a
# short while). Exit status 1 when a stage fails, is cut or is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ldm-device-out}
BUDGET_S=${BUDGET_S:-570}
MIN_S=${MIN_S:-45}
ALL=(train sample e2e gpu check data)
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL[@]}")
for stage in "${STAGES[@]}"; do
    case " ${ALL[*]} " in
        *" $stage "*) ;;
        *) echo "device_run.sh: no stage '$stage'; the stages are: ${ALL[*]}" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"
deadline=$((SECONDS + BUDGET_S))
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

stage_command() {
    case "$1" in
        train) echo "python3 benchmarks/train_throughput.py" ;;
        sample) echo "python3 benchmarks/sample_latency.py --compile" ;;
        e2e) echo "python3 benchmarks/train_e2e.py" ;;
        # the files holding gpu-marked tests (collecting the whole suite would import what the device lacks)
        gpu) echo "python3 -m pytest -q -p no:cacheprovider -m gpu $(grep -l "mark.gpu" tests/test_*.py | tr '\n' ' ')" ;;
        check) echo "python3 benchmarks/gpu_check.py" ;;
        data) echo "python3 benchmarks/data_throughput.py --workers 1 4" ;;
    esac
}

status=0
summary=()
rest=()
for stage in "${STAGES[@]}"; do
    left=$((deadline - SECONDS))
    if [ "$left" -lt "$MIN_S" ]; then
        summary+=("$stage: skipped, ${left} s of the budget left")
        rest+=("$stage")
        status=1
        continue
    fi
    if [ "$stage" = gpu ] && ! python3 -c "import pytest" 2>/dev/null; then
        echo "no pytest here: the gpu-marked tests did not run (carry .whl from benchmarks/device_wheels.sh)" \
            | tee "$OUT/gpu.txt"
        summary+=("gpu: no pytest")
        status=1
        continue
    fi
    echo "== $stage (up to ${left} s): $(stage_command "$stage")"
    start=$SECONDS
    # shellcheck disable=SC2046  # the command's words split as printed
    timeout -k 10 "$left" $(stage_command "$stage") 2>&1 | tee "$OUT/$stage.txt"
    rc=${PIPESTATUS[0]}
    took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then
        summary+=("$stage: done in ${took} s")
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        summary+=("$stage: cut at the budget after ${took} s (its finished rows are in $OUT/$stage.txt)")
        rest+=("$stage")
        status=1
    else
        summary+=("$stage: failed (exit $rc) after ${took} s")
        status=1
    fi
done
{
    echo "== summary (budget ${BUDGET_S} s, used ${SECONDS} s)"
    printf '%s\n' "${summary[@]}"
    if [ ${#rest[@]} -gt 0 ]; then
        echo "to run what was cut or skipped: bash benchmarks/device_run.sh ${rest[*]}"
    fi
} | tee "$OUT/summary.txt"
exit $status
