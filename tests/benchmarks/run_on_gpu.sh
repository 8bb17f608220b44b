#!/usr/bin/env bash
# The GPU tables of issues 5 and 18, on the device machine (no network there): first, here,
# `python3 tests/benchmarks/gpu_bundle.py`; then the device tool's run with carry [".cache/gpu"] and
# command `bash tests/benchmarks/run_on_gpu.sh` (timeout_s 600). Each table lands in $OUT as soon as
# it is done, so a run cut short still returns the first ones.
# 1. SD1.5-shaped at 512x512 (64x64 latent), fp16, batch 1 and 2, 8 steps (on a GPU a 2-step run is
#    mostly the sampler's per-call overhead), 5 rounds; then the per-step work on the tiny test model.
# 2. The same model at batch 1 with the host's TorchCompileModel after our nodes (inductor; cudagraphs
#    if inductor cannot build here): first run (compiling), speed-up, graphs compiled per step.
# 3. SDXL-shaped at 1024x1024 (128x128 latent), as 1.
# The timeouts add up to 9 minutes at most (150 + 230 + 170 s); the last run's tables took well under that.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-/tmp/bench_out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .cache/gpu/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site COMFYUI_PATH="$PWD/.cache/gpu/comfyui" PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
  nproc; git log -1 --format="%h %s" 2>/dev/null | cut -c1-100; } 2>&1 | tee "$OUT/machine.txt"
BENCH="python3 tests/benchmarks/bench_guidance.py --fp16"
QUIET="^WARNING:root:torchaudio"
status=0
timeout 150 $BENCH --latent 64 --steps 8 --repeats 5 --batch 1 2 2>&1 | grep -v "$QUIET" | tee "$OUT/sd15_512.md" || status=1
timeout 230 $BENCH --latent 64 --steps 8 --repeats 3 --batch 1 --compile 2>&1 | grep -v "$QUIET" | tee "$OUT/sd15_512_compile.md"
if ! grep -q "^graphs compiled during" "$OUT/sd15_512_compile.md"; then
  status=1
  timeout 60 $BENCH --latent 64 --steps 8 --repeats 3 --batch 1 --compile --backend cudagraphs 2>&1 \
    | grep -v "$QUIET" | tee "$OUT/sd15_512_compile_cudagraphs.md"
fi
timeout 170 $BENCH --arch sdxl --latent 128 --steps 8 --repeats 5 --batch 1 2 --work-steps 0 2>&1 | grep -v "$QUIET" | tee "$OUT/sdxl_1024.md" || status=1
exit $status
