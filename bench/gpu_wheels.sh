#!/usr/bin/env bash
# Download the wheels the GPU machine needs over its image's torch (../shared/notes/gpu.md) into
# bench/.gpu-wheels/ (git-ignored): CPython 3.12, manylinux x86_64, no dependencies resolved
# (the list is complete; pytest and its dependencies for the gpu test tier, bench/gpu_run.sh --tier).
# antlr4-python3-runtime 4.9.3 ships as an sdist only, so its wheel is built here (pure Python,
# any platform). The device has no network: bench/gpu_run.sh installs them there with --no-index.
# Usage: bash bench/gpu_wheels.sh   (or make gpu-wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/.gpu-wheels
PY=${PY:-.venv/bin/python}
mkdir -p "$DEST"
WHEELS=(trl==1.16.0 hydra-core==1.3.8 omegaconf==2.3.1 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
        transformers==5.23.0 peft==0.21.2 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
        pygments==2.21.0 packaging==26.3)
"$PY" -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --implementation cp --abi cp312 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --no-deps -d "$DEST" "${WHEELS[@]}"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$DEST" \
    antlr4-python3-runtime==4.9.3 2>/dev/null \
  || "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$DEST" antlr4-python3-runtime==4.9.3
ls -l "$DEST"
du -sh "$DEST"
