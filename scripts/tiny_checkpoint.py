#!/usr/bin/env python3
"""A tiny SD1.5 checkpoint with random weights, for demos and tests without any model download.

The file has the real single-file SD1.5 key layout (``model.diffusion_model.*``,
``cond_stage_model.transformer.text_model.*``, ``first_stage_model.*``), so ComfyUI's
``CheckpointLoaderSimple`` (``comfy.sd.load_checkpoint_guess_config``) detects it as ``SD15``. The
UNet keeps what SD15 detection needs (``model_channels`` 320, ``context_dim`` 768, no linear
proj_in) and is shrunk to two levels with one res block and one SpatialTransformer each, plus the
middle block transformer. CLIP-L and the VAE have their real sizes (ComfyUI builds them from fixed
configs). All state dicts come from ComfyUI's own classes and ComfyUI's own key renaming for saving.
Its images are random noise: it only shows that a graph runs.

    python scripts/tiny_checkpoint.py [--comfyui PATH] [--force] [--verify] [OUTPUT]

Needs the ComfyUI host on ``sys.path`` (``--comfyui``, else ``$COMFYUI_PATH``, else ``.cache/comfyui``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PATH = REPO / ".cache" / "models" / "checkpoints" / "ag_tiny_sd15_random.safetensors"
SEED = 20240317

# What comfy.model_detection.detect_unet_config reads back from the saved keys.
TINY_SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

# comfy.sd.VAE's default SD1.x/SD2.x autoencoder.
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}


def _randomize_(module, generator) -> None:
    """Deterministic random weights that keep fp32 activations O(1).

    ComfyUI's layers skip initialisation (``comfy.ops.disable_weight_init``), so every tensor is set
    here: norms to identity, biases to zero, linear/conv weights N(0, 1/fan_in), embeddings N(0, 0.02).
    """
    import torch

    assigned = set()
    with torch.no_grad():
        for sub in module.modules():
            params = dict(sub.named_parameters(recurse=False))
            if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                for name, p in params.items():
                    p.fill_(1.0 if name == "weight" else 0.0)
            elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                weight = params["weight"]
                fan_in = weight[0].numel()
                weight.copy_(torch.randn(weight.shape, generator=generator) / math.sqrt(fan_in))
                if params.get("bias") is not None:
                    params["bias"].zero_()
            elif isinstance(sub, torch.nn.Embedding):
                params["weight"].copy_(torch.randn(params["weight"].shape, generator=generator) * 0.02)
            else:
                continue
            assigned.update(id(p) for p in params.values())
        for name, p in module.named_parameters():
            if id(p) not in assigned:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def build_tiny_sd15_state_dict(seed: int = SEED) -> dict:
    """The checkpoint's state dict (fp32), in the SD1.5 single-file layout. Needs ComfyUI importable."""
    import torch
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model_config = comfy.supported_models.SD15(TINY_SD15_UNET_CONFIG)
    generator = torch.Generator().manual_seed(seed)

    unet = UNetModel(**model_config.unet_config, device="cpu", operations=comfy.ops.disable_weight_init)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    vae = AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    for module in (unet, clip, vae):
        _randomize_(module, generator)

    state_dict = model_config.process_unet_state_dict_for_saving(unet.state_dict())
    state_dict.update(model_config.process_clip_state_dict_for_saving(clip.state_dict()))
    state_dict.update(model_config.process_vae_state_dict_for_saving(vae.state_dict()))
    return state_dict


def write_tiny_sd15_checkpoint(path=DEFAULT_PATH, seed: int = SEED, force: bool = False) -> Path:
    """Write the tiny checkpoint (fp16 safetensors) unless it already exists; returns its path.

    The file appears atomically, so concurrent callers never read a partial checkpoint.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_file() and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {
        key: (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
        for key, t in build_tiny_sd15_state_dict(seed).items()
    }
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(state_dict, str(partial), metadata={
        "description": "attention-guidance tiny SD1.5 test checkpoint: RANDOM weights, images are noise",
        "seed": str(seed),
    })
    os.chmod(partial, 0o644)
    os.replace(partial, path)
    return path


def verify_tiny_sd15_checkpoint(path) -> dict:
    """Load through ComfyUI's checkpoint loader, sample 64x64 at CFG 4 and decode.

    Raises AssertionError when the checkpoint is not detected as SD15 or the image is not finite.
    Returns what was checked.
    """
    import torch
    import comfy.sample
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        str(path), output_vae=True, output_clip=True, embedding_directory=None
    )
    detected = type(model.model.model_config).__name__
    assert detected == "SD15", f"{path} is detected as {detected}, not SD15"
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photograph of a red fox"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    samples = comfy.sample.sample(model, noise, 3, 4.0, "euler", "normal", positive, negative, latent,
                                  disable_pbar=True, seed=0)
    images = vae.decode(samples)
    assert torch.isfinite(samples).all(), "sampled latent is not finite"
    assert tuple(images.shape) == (1, 64, 64, 3), f"decoded shape {tuple(images.shape)}"
    assert torch.isfinite(images).all(), "decoded image is not finite"
    return {"model": detected, "latent_std": float(samples.detach().std()), "image_std": float(images.detach().std())}


def _put_host_on_path(comfyui: str | None) -> Path:
    host = Path(comfyui or os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui").resolve()
    if not (host / "comfy").is_dir():
        sys.exit(f"No ComfyUI at {host}: pass --comfyui PATH, set COMFYUI_PATH, or run `python3 scripts/host.py setup`.")
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    from comfy.cli_args import args

    args.cpu = True
    return host


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", nargs="?", default=str(DEFAULT_PATH), help=f"checkpoint path (default {DEFAULT_PATH})")
    parser.add_argument("--comfyui", help="ComfyUI folder (default $COMFYUI_PATH, else .cache/comfyui)")
    parser.add_argument("--force", action="store_true", help="rewrite the file even when it exists")
    parser.add_argument("--verify", action="store_true", help="load it with ComfyUI, sample 64x64 and decode")
    options = parser.parse_args(argv)
    _put_host_on_path(options.comfyui)
    existed = Path(options.output).is_file() and not options.force
    path = write_tiny_sd15_checkpoint(options.output, force=options.force)
    size_mb = path.stat().st_size / 2**20
    print(f"{'kept existing' if existed else 'wrote'} {path} ({size_mb:.0f} MiB, random weights: images are noise)")
    if options.verify:
        print(f"verified: {verify_tiny_sd15_checkpoint(path)}")


if __name__ == "__main__":
    main()
