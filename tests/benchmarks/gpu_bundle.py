"""Pack what the GPU run of bench_guidance.py needs into .cache/gpu/, for a machine with no network.

The GPU machine lent to some sessions (see the tool library's ``device``) has Python 3.12 with torch,
torchvision, numpy, transformers, safetensors, einops, scipy, PIL, yaml, psutil and aiohttp, but
nothing can be installed there from a registry. The benchmark's imports (the host's ``comfy``,
``comfy_extras`` and ``comfy_api``, the pack, tests/support) need three more packages, carried as
wheels; and the host itself, which this writes as a copy of the provisioned one without its
tokenizer data (17 MiB the benchmark never reads), so that the whole working tree that travels
stays under the tool's 64 MiB:

    python3 scripts/host.py setup
    python3 tests/benchmarks/gpu_bundle.py           # here: writes .cache/gpu/ (about 43 MiB)
    # then the device tool's `run`, carry [".cache/gpu"], command: bash tests/benchmarks/run_on_gpu.sh

Checked here by running the benchmark in an environment that holds only the GPU image's packages
plus these wheels (the list of that image is in the tool library's device/KINDS.md).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = REPO / ".cache" / "comfyui"
BUNDLE = REPO / ".cache" / "gpu"
# the packages of the benchmark's import closure that the GPU image lacks (av: comfy_api's video types;
# torchsde and its dependency trampoline: the host's k-diffusion samplers), at the versions the CPU
# tests run with
WHEELS = ["av==18.1.0", "torchsde==0.2.6", "trampoline==0.1.2"]
GPU_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
# data the benchmark never reads: the text encoders' tokenizer files
LEFT_OUT = ["comfy/sd1_tokenizer", "comfy/text_encoders/*_tokenizer", "extra_model_paths.yaml"]


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    if not (HOST / "comfy").is_dir():
        sys.exit(f"No provisioned host at {HOST}: run `python3 scripts/host.py setup` first.")
    shutil.rmtree(BUNDLE, ignore_errors=True)
    host_copy = BUNDLE / "comfyui"
    left_out = {path for pattern in LEFT_OUT for path in HOST.glob(pattern)}
    shutil.copytree(HOST, host_copy, ignore=lambda folder, names: [
        name for name in names if name == "__pycache__" or Path(folder, name) in left_out])
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", GPU_PYTHON, "--implementation", "cp", *platforms,
                    "--dest", str(BUNDLE / "wheels"), *WHEELS], check=True)
    print(f"{BUNDLE.relative_to(REPO)}: host copy {size_mib(host_copy):.1f} MiB, "
          f"wheels {size_mib(BUNDLE / 'wheels'):.1f} MiB ({', '.join(WHEELS)})")


if __name__ == "__main__":
    main()
