#!/usr/bin/env bash
# The GPU tables of issue 5, on the device machine (no network there): first, here,
# `python3 tests/benchmarks/gpu_bundle.py`; then the device tool's run with carry [".cache/gpu"] and
# command `bash tests/benchmarks/run_on_gpu.sh` (timeout_s 600). Each table lands in $OUT as soon as
# it is done, so a run cut short still returns the first ones.
# SD1.5-shaped at 512x512 (64x64 latent), then SDXL-shaped at 1024x1024 (128x128 latent), fp16,
# batch 1 and 2; 8 steps (on a GPU a 2-step run is mostly the sampler's per-call overhead), 5 rounds.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/bench_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .cache/gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site COMFYUI_PATH="$PWD/.cache/gpu/comfyui" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  nproc; } 2>&1 | tee "$OUT/machine.txt"
status=0
timeout 240 python3 tests/benchmarks/bench_guidance.py --fp16 --latent 64 --steps 8 --repeats 5 2>&1 \
  | grep -v "^WARNING:root:torchaudio" | tee "$OUT/sd15_512.md" || status=1
timeout 300 python3 tests/benchmarks/bench_guidance.py --fp16 --arch sdxl --latent 128 --steps 8 --repeats 5 2>&1 \
  | grep -v "^WARNING:root:torchaudio" | tee "$OUT/sdxl_1024.md" || status=1
exit $status
