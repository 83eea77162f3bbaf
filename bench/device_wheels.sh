#!/usr/bin/env bash
# The Python wheels a benchmark run on the lent H200 needs beside what its image has (torch 2.11,
# transformers 5.x without this project's pins, no `datasets`): run here, then carry `.whl` and
# start the device command with bench/device_wheels.sh --install.
#
#   bench/device_wheels.sh            # here: download into .whl/ (git-ignored)
#   bench/device_wheels.sh --install  # there: install into .site/ (git-ignored) and print the PYTHONPATH to use
set -euo pipefail
WHEELS=(transformers==4.40.0 tokenizers==0.19.1 huggingface-hub==0.36.0 datasets==5.0.1 dill==0.4.0
        multiprocess==0.70.18)
if [[ "${1:-}" == "--install" ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
    echo "$PWD/.site"
    exit 0
fi
mkdir -p .whl
for wheel in "${WHEELS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$wheel"
done
