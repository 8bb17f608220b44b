"""Where a SAG step spends its time: torch.profiler over one sampling step of the host's SAG and ours,
on the full-width SD1.5-shaped UNet of bench_guidance.py.

Prints, per node, the step's wall time, the time under each of our own profiler labels
(``attention_guidance.sag_key_mass``: the probabilities of the reference rows at the one recorded
layer; ``sag_mask``, ``sag_blur``, ``sag_degraded_pass``) and the ops with the most self time.

    COMFYUI_PATH=.cache/comfyui .cache/venv/bin/python tests/benchmarks/profile_sag.py [--latent 32] [--batch 1]

A measurement, not a test.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_guidance import build, conditioning, configurations  # noqa: E402  (puts the host on sys.path)
from support.models import sample  # noqa: E402

LABELS = ("attention_guidance.sag_key_mass", "attention_guidance.sag_mask", "attention_guidance.sag_blur",
          "attention_guidance.sag_degraded_pass")


def profile_step(model, positive, negative, latent):
    def step():
        sample(model, positive, negative, latent, sampler_name="euler", steps=1, cfg=5.0, seed=1)

    step()  # warm-up
    start = time.perf_counter()
    step()
    wall = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return wall, prof.key_averages()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=8)
    options = parser.parse_args()
    model = build("sd15", torch.float32)
    positive, negative = conditioning("sd15", options.batch)
    latent = torch.zeros(options.batch, 4, options.latent, options.latent)
    configs = configurations(model)
    print(f"# one euler step, CFG 5, SD1.5-shaped UNet, latent {options.latent}x{options.latent}, batch {options.batch}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in ("CFG only", "host SAG", "our SAG"):
        wall, averages = profile_step(configs[name].model, positive, negative, latent)
        print(f"\n## {name}: {wall * 1000:.0f} ms per step (unprofiled)\n")
        by_name = {a.key: a for a in averages}
        for label in LABELS:
            if label in by_name:
                a = by_name[label]
                print(f"- {label}: {a.cpu_time_total / 1000:.1f} ms in {a.count} call(s)")
        print(f"\n| op | self CPU (ms) | calls |\n|---|---|---|")
        ops = sorted((a for a in averages if not a.key.startswith("attention_guidance.")),
                     key=lambda a: a.self_cpu_time_total, reverse=True)
        for a in ops[:options.top]:
            print(f"| {a.key} | {a.self_cpu_time_total / 1000:.1f} | {a.count} |")


if __name__ == "__main__":
    main()
