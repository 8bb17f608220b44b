"""Cost of the guidance on families whose attention is read at its submodules (PixArt, HunyuanDiT), side by side in
one run.

There no attention override reaches the attention, so each chosen block's attention is computed once more by the
guidance (``patching/tapped_attention.py``). Samples one denoising step of a PixArt Sigma-shaped model (the real
28 blocks, narrower: ``--width``, random weights) with CFG only, PAG and SEG (each in its own branch and with
the placement 'uncond branch'), in interleaved rounds; prints the median seconds per step and the median of the
per-round ratios to CFG only. The uncond placement's ratio minus 1 is the extra attention's cost.

    COMFYUI_PATH=.cache/comfyui .cache/venv/bin/python tests/benchmarks/bench_tapped.py [--width 384] [--latent 64]

This is a measurement, not a test: it never fails on a slow machine, it reports.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import conftest  # noqa: E402,F401  (the host and the pack, as the tests import them)
import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402

from attention_guidance.nodes.pag import PerturbedAttentionGuidance  # noqa: E402
from attention_guidance.nodes.seg import SmoothedEnergyGuidance  # noqa: E402
from support.dit_models import DIT_CONFIGS, make_dit_conditioning  # noqa: E402
from support.models import denoise_once, initialise_weights  # noqa: E402


def pixart(width: int) -> comfy.model_patcher.ModelPatcher:
    config = comfy.supported_models.PixArtSigma({**DIT_CONFIGS["pixart"], "hidden_size": width,
                                                 "num_heads": width // 64})
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    model = comfy.model_base.PixArt(config, device=cpu)
    initialise_weights(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=384, help="hidden width (1152 in PixArt Sigma XL)")
    parser.add_argument("--latent", type=int, default=64, help="latent side; 64 is a 512x512 image, 1024 tokens")
    parser.add_argument("--layers", default="block.14")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = pixart(args.width)
    positive, negative = make_dit_conditioning("pixart", seed=1)
    x = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(2))
    configurations = {"CFG only": model}
    for placement in ("own branch", "uncond branch"):
        configurations[f"PAG {placement}"] = PerturbedAttentionGuidance.execute(
            model, 3.0, args.layers, 0.0, 0.0, 1.0, 0.0, placement=placement).result[0]
        configurations[f"SEG {placement}"] = SmoothedEnergyGuidance.execute(
            model, 3.0, 10.0, args.layers, 0.0, 1.0, placement=placement).result[0]
    seconds = {name: [] for name in configurations}
    with torch.inference_mode():
        for patched in configurations.values():  # warm-up
            denoise_once(patched, positive, negative, x, 0.6, 4.0)
        for _ in range(args.rounds):
            for name, patched in configurations.items():
                start = time.perf_counter()
                denoise_once(patched, positive, negative, x, 0.6, 4.0)
                seconds[name].append(time.perf_counter() - start)
    print(f"PixArt Sigma-shaped, 28 blocks, width {args.width}, latent {args.latent}x{args.latent}, layers "
          f"{args.layers}, CFG 4, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| configuration | s per step | vs CFG only |\n|---|---|---|")
    for name, times in seconds.items():
        ratio = statistics.median(t / c for t, c in zip(times, seconds["CFG only"]))
        print(f"| {name} | {statistics.median(times):.2f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
