#!/usr/bin/env python3
"""Train the quality benchmark's diffusion model and judge classifier on scikit-learn's digits.

Writes tests/benchmarks/quality_assets/digits_unet.safetensors (EMA weights, fp16, with the learned
class tokens), digits_judge.safetensors (fp32) and SHA256SUMS. Seeded and single-threaded, so a rerun
on the same torch build gives the same files (bit-exact only on the same CPU kernels). Prints its time.

    COMFYUI_PATH=.cache/comfyui .cache/venv/bin/python scripts/train_quality_model.py [--steps 2000] [--only unet|judge]

Recipe (see tests/benchmarks/quality_model.py for the architecture): eps-prediction on the host's
SD1.x schedule (t uniform over 0..999), batch 64, AdamW lr 5e-4 (200 warm-up steps), gradient clip 1,
10 % of labels replaced by the null class, EMA 0.999 (with the usual short-run warm-up).
The judge: 80 % of the digits (seeded split), 40 epochs with +-1 pixel random shifts; its accuracy on
the held-out 20 % is printed and stored in its metadata.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "benchmarks"))


def _host():
    host = Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui").resolve()
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    from comfy.cli_args import args

    args.cpu = True


def _initialise(module, torch) -> None:
    """The host's layers skip initialisation (comfy.ops.disable_weight_init): torch's defaults here,
    and the UNet's last conv zeroed (as in SD's UNet) so that training starts from eps = 0."""
    for sub in module.modules():
        if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5))
            if sub.bias is not None:
                fan_in = sub.weight[0].numel()
                torch.nn.init.uniform_(sub.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and sub.weight is not None:
            torch.nn.init.ones_(sub.weight)
            torch.nn.init.zeros_(sub.bias)
    last = module.out[-1]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)


def train_unet(steps: int, seed: int, out: Path) -> None:
    import torch
    from safetensors.torch import save_file

    import quality_model as qm

    torch.manual_seed(seed)
    images, labels = qm.load_digits_images()
    model = qm.build_base_model()
    unet = model.diffusion_model
    _initialise(unet, torch)
    tokens = torch.nn.Parameter(torch.randn(qm.NUM_CLASSES + 1, qm.CLASS_TOKENS, qm.CONTEXT_DIM))
    params = list(unet.parameters()) + [tokens]
    print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters, {len(images)} images "
          f"{tuple(images.shape[1:])}, {steps} steps of batch 64", flush=True)
    sigmas = model.model_sampling.sigmas.float()
    alphas_cumprod = 1.0 / (1.0 + sigmas**2)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_tokens = tokens.detach().clone()
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 5e-4 * min(1.0, (step + 1) / 200)
        index = torch.randint(0, len(images), (64,), generator=generator)
        x0, y = images[index], labels[index].clone()
        y[torch.rand(64, generator=generator) < 0.1] = qm.NULL_CLASS
        t = torch.randint(0, 1000, (64,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = torch.nn.functional.mse_loss(unet(xt, t.float(), context=tokens[y]), eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            ema_tokens.mul_(decay).add_(tokens.detach(), alpha=1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps}  loss {running:.4f}  {time.time() - start:.0f} s", flush=True)
    state = {k: v.to(torch.float16).contiguous() for k, v in ema.items()}
    state["class_tokens"] = ema_tokens.to(torch.float16).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={
        "description": "class-conditional digits UNet (host UNetModel, eps, SD1.x schedule), EMA 0.999, fp16",
        "recipe": json.dumps({"steps": steps, "batch": 64, "lr": 5e-4, "seed": seed, "null_dropout": 0.1,
                              "unet_config": qm.UNET_CONFIG, "train_seconds": round(time.time() - start)}),
    })
    print(f"UNet trained in {time.time() - start:.0f} s on {torch.get_num_threads()} thread(s): {out}", flush=True)


def train_judge(seed: int, out: Path) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    import quality_model as qm

    torch.manual_seed(seed)
    images, labels = qm.load_digits_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(images))
    train, held = order[:cut], order[cut:]
    judge = qm.Judge()
    optimizer = torch.optim.Adam(judge.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(40):
        perm = train[torch.randperm(len(train), generator=generator)]
        judge.train()
        for i in range(0, len(perm), 64):
            batch = perm[i:i + 64]
            x = images[batch]
            dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts=(dy, dx), dims=(2, 3))[:, :, 1:-1, 1:-1]
            loss = F.cross_entropy(judge(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    judge.eval()
    with torch.no_grad():
        accuracy = (judge(images[held]).argmax(1) == labels[held]).float().mean().item()
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out), metadata={
        "description": "digits judge CNN (16x16, [-1, 1]); features = 64-wide penultimate layer",
        "held_out_accuracy": f"{accuracy:.4f}", "seed": str(seed),
    })
    print(f"judge trained in {time.time() - start:.0f} s, held-out accuracy {accuracy:.4f} "
          f"({len(held)} images): {out}", flush=True)


def write_hashes() -> None:
    import quality_model as qm

    lines = [f"{qm.sha256(p)}  {p.name}" for p in (qm.UNET_PATH, qm.JUDGE_PATH) if p.is_file()]
    qm.HASHES_PATH.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("unet", "judge"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    options = parser.parse_args(argv)
    _host()
    import torch

    import quality_model as qm

    torch.set_num_threads(options.threads)
    if options.only in (None, "judge"):
        train_judge(options.seed, qm.JUDGE_PATH)
    if options.only in (None, "unet"):
        train_unet(options.steps, options.seed, qm.UNET_PATH)
    write_hashes()


if __name__ == "__main__":
    main()
