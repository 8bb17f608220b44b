"""Stand-ins for the model files the example workflows name, so that the real server can validate and run
them without any download.

The example workflows name the files users have (``v1-5-pruned-emaonly.safetensors``,
``control_v11p_sd15_canny.safetensors``, ...). A test server gets a folder in which each of those names
is a link to a tiny random model of the same architecture family:

- SD1.5 checkpoints: the tiny SD1.5 checkpoint of ``scripts/tiny_checkpoint.py``;
- the SD1.5 inpainting checkpoint: the same with a 9-channel input convolution (latent + mask +
  masked image), which the host detects as an inpainting model;
- the SD1.5 canny ControlNet: a ControlNet with the tiny UNet's layout, built from the host's own
  ``comfy.cldm.cldm.ControlNet`` and saved in the original ``control_model.*`` layout;
- files of architectures without a tiny stand-in (SDXL, SD3, Flux, Wan, Cosmos Predict2, Mochi, PixArt Sigma and their text
  encoders and VAEs): a
  link to the tiny SD1.5 checkpoint. The server validates names, not contents, so such a workflow
  passes ``/prompt`` validation, but what then runs is an SD1.5-layout file: it is validated, not
  executed as that architecture. (The host derives Flux's width and SD3's block count from fixed
  values or from the width, so a Flux or a 14-block SD3 model is hundreds of megabytes at least, and
  their text encoders have fixed sizes too; tests/test_dit.py runs tiny models of both families
  built from the host's classes instead.)

All random weights: every image is noise. Generated files are written once under
``.cache/models/tiny/`` and appear atomically.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .server import REPO, tiny_checkpoint, tiny_checkpoint_module

TINY_MODELS = REPO / ".cache" / "models" / "tiny"
TINY_INPAINTING_CHECKPOINT = TINY_MODELS / "ag_tiny_sd15_inpainting_random.ckpt"
TINY_CONTROLNET = TINY_MODELS / "ag_tiny_sd15_controlnet_random.safetensors"
SEED = 20240318

# Model file names used by the example workflows -> (model folder, stand-in kind).
# "sd15", "sd15_inpainting" and "sd15_controlnet" are the real architecture family of that name;
# "name_only" is a link to the tiny SD1.5 checkpoint, whatever the real file is (see the module docstring).
EXAMPLE_MODEL_FILES = {
    "v1-5-pruned-emaonly.safetensors": ("checkpoints", "sd15"),
    "sd-v1-5-inpainting.ckpt": ("checkpoints", "sd15_inpainting"),
    "sd_xl_base_1.0.safetensors": ("checkpoints", "name_only"),
    "sd3_medium_incl_clips.safetensors": ("checkpoints", "name_only"),
    "flux1-dev.safetensors": ("diffusion_models", "name_only"),
    "clip_l.safetensors": ("text_encoders", "name_only"),
    "t5xxl_fp16.safetensors": ("text_encoders", "name_only"),
    "ae.safetensors": ("vae", "name_only"),
    "z_image_turbo_bf16.safetensors": ("diffusion_models", "name_only"),
    "qwen_3_4b.safetensors": ("text_encoders", "name_only"),
    "wan2.1_t2v_1.3B_fp16.safetensors": ("diffusion_models", "name_only"),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", "name_only"),
    "wan_2.1_vae.safetensors": ("vae", "name_only"),
    "cosmos_predict2_2B_t2i.safetensors": ("diffusion_models", "name_only"),
    "oldt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoders", "name_only"),
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "name_only"),
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": ("diffusion_models", "name_only"),
    "mochi_preview_bf16.safetensors": ("diffusion_models", "name_only"),
    "mochi_vae.safetensors": ("vae", "name_only"),
    "PixArt-Sigma-XL-2-1024-MS.pth": ("diffusion_models", "name_only"),
    "sdxl_vae.safetensors": ("vae", "name_only"),
    "control_v11p_sd15_canny.safetensors": ("controlnet", "sd15_controlnet"),
}
REAL_ARCHITECTURE_KINDS = {"sd15", "sd15_inpainting", "sd15_controlnet"}


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_tiny_sd15_inpainting_checkpoint(path: Path = TINY_INPAINTING_CHECKPOINT) -> Path:
    """The tiny SD1.5 checkpoint with a 9-channel ``input_blocks.0.0`` (an inpainting UNet), as a .ckpt."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return path
    state_dict = load_file(str(tiny_checkpoint()))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    weight = state_dict[key]
    generator = torch.Generator().manual_seed(SEED)
    fan_in = 9 * weight.shape[2] * weight.shape[3]
    extra = torch.randn((weight.shape[0], 5, *weight.shape[2:]), generator=generator) / math.sqrt(fan_in)
    state_dict[key] = torch.cat([weight.float(), extra], dim=1).to(weight.dtype).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _atomic_path(path)
    torch.save({"state_dict": state_dict}, str(partial))
    os.replace(partial, path)
    return path


def build_tiny_sd15_controlnet_state_dict(seed: int = SEED) -> dict:
    """A ControlNet for the tiny UNet (3-channel hint), keys in the original ``control_model.*`` layout."""
    import torch
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.supported_models

    module = tiny_checkpoint_module()
    unet_config = dict(comfy.supported_models.SD15(module.TINY_SD15_UNET_CONFIG).unet_config)
    unet_config.pop("out_channels", None)
    for key in ("transformer_depth_output", "use_temporal_resblock", "use_temporal_attention"):
        unet_config.pop(key, None)
    controlnet = comfy.cldm.cldm.ControlNet(hint_channels=3, device="cpu", operations=comfy.ops.disable_weight_init,
                                            **unet_config)
    module._randomize_(controlnet, torch.Generator().manual_seed(seed))
    return {f"control_model.{k}": v for k, v in controlnet.state_dict().items()}


def write_tiny_sd15_controlnet(path: Path = TINY_CONTROLNET) -> Path:
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_file():
        return path
    state_dict = {k: (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
                  for k, t in build_tiny_sd15_controlnet_state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _atomic_path(path)
    save_file(state_dict, str(partial), metadata={"description": "attention-guidance tiny SD1.5 ControlNet: RANDOM weights"})
    os.replace(partial, path)
    return path


def stand_in_file(kind: str) -> Path:
    if kind in ("sd15", "name_only"):
        return tiny_checkpoint()
    if kind == "sd15_inpainting":
        return write_tiny_sd15_inpainting_checkpoint()
    if kind == "sd15_controlnet":
        return write_tiny_sd15_controlnet()
    raise ValueError(f"unknown stand-in kind {kind!r}")


def write_example_model_folder(root: Path) -> Path:
    """``root/<folder>/<name>`` links to the stand-ins, and ``root/extra_model_paths.yaml`` naming them."""
    root = Path(root)
    folders = set()
    for name, (folder, kind) in EXAMPLE_MODEL_FILES.items():
        target = root / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.is_symlink():
            target.symlink_to(stand_in_file(kind))
        folders.add(folder)
    lines = ["attention_guidance_examples:", f"    base_path: {json.dumps(str(root))}"]
    lines += [f"    {folder}: {folder}" for folder in sorted(folders)]
    config = root / "extra_model_paths.yaml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return config


def write_example_input_images(input_dir: Path, size: int = 64) -> dict:
    """The images the example workflows load, small: a picture with edges for ControlNet (``example.png``)
    and one with a transparent hole for inpainting (``inpaint_example.png``; LoadImage's MASK is 1 where
    alpha is 0)."""
    from PIL import Image, ImageDraw

    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    picture = Image.new("RGB", (size, size), (40, 70, 120))
    draw = ImageDraw.Draw(picture)
    draw.ellipse((size // 8, size // 8, size * 5 // 8, size * 5 // 8), fill=(230, 200, 60))
    draw.rectangle((size // 2, size // 2, size * 7 // 8, size * 7 // 8), fill=(200, 40, 40))
    picture.save(input_dir / "example.png")
    with_hole = picture.convert("RGBA")
    ImageDraw.Draw(with_hole).rectangle((size // 4, size // 4, size * 3 // 4, size * 3 // 4), fill=(0, 0, 0, 0))
    with_hole.save(input_dir / "inpaint_example.png")
    return {"example.png": input_dir / "example.png", "inpaint_example.png": input_dir / "inpaint_example.png"}
