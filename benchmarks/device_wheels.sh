#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels the GPU machine lacks (it has torch, lightning and
# transformers, no network, Python 3.12) into .whl/, which device_run.sh installs from.
#   bash benchmarks/device_wheels.sh      then run on the device, carrying .whl:
#   bash benchmarks/device_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl && mkdir .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl \
    hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 braceexpand==0.1.7 open-clip-torch==3.3.0 \
    ftfy==6.3.1 wcwidth==0.9.4 diffusers==0.42.1 \
    hydra-submitit-launcher==1.2.0 submitit==1.5.4 \
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1  # the gpu-marked tests (device_run.sh)
# hydra's parser runtime is published as a source archive only; it is pure Python
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl && du -sh .whl
