"""Tiny models of the real UNet families, built from the host's own classes, and the host's own
sampling paths to run them.

Families (see ``UNET_CONFIGS``):

- ``sd15``: epsilon prediction, ``comfy.supported_models.SD15`` + ``comfy.model_base.BaseModel``;
  conv proj_in/out, 8 heads everywhere, attention on every level and in the middle.
- ``sd2v``: v-prediction, ``SD20`` + ``BaseModel(ModelType.V_PREDICTION)``; linear proj_in/out,
  a fixed number of channels per head (so the head count grows with the level, as in SD2.x).
- ``sdxl``: epsilon, ``SDXL`` + ``comfy.model_base.SDXL``; no attention on the first level,
  2 and 3 transformer blocks per SpatialTransformer deeper down, a middle block of 3 transformer
  blocks, and ``adm_in_channels`` = pooled text + six 256-wide size embeddings, built by the host's
  own ``SDXL.encode_adm`` from the conditioning's width/height/crop/target entries.

Every model is fp32 on the CPU, weights random but fixed by ``seed``; a build takes ~0.1 s and one
forward a few milliseconds at 8x8..16x24 latents.

Sampling helpers (all through the host's own code, so every ``model_options`` hook runs as in a
real sampler): ``denoise_once`` (one model evaluation at a given sigma), ``sample`` (what the
KSampler node runs) and ``count_model_calls`` (what the diffusion model was called with).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.supported_models
import torch
from comfy_extras.nodes_custom_sampler import Guider_DualCFG
from comfy_extras.nodes_perpneg import Guider_PerpNeg

from attention_guidance.patching.options import chunk_ids

FAMILIES = ("sd15", "sd2v", "sdxl")

# Tensors this small gain nothing from intra-op threads, and when other processes share the two
# cores, OpenMP's spinning threads make each op 10-100x slower (measured: an SD1.5-like denoise
# step 25 ms on one thread, 0.5-3 s on two under load). Process-wide, for the test session.
torch.set_num_threads(1)

# Unet configs in the form `comfy.model_detection.detect_unet_config` returns for a checkpoint.
# GroupNorm in the host's UNet has 32 groups, so every channel count is a multiple of 32.
_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
UNET_CONFIGS = {
    "sd15": {
        **_COMMON,
        "adm_in_channels": None,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 48,
    },
    "sd2v": {
        **_COMMON,
        "adm_in_channels": None,
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": True,
        "context_dim": 40,
    },
    "sdxl": {
        **_COMMON,
        "num_classes": "sequential",
        "adm_in_channels": 32 + 6 * 256,  # pooled text (32 here, 1280 in SDXL) + 6 Timestep(256) embeddings
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4],
        "transformer_depth": [0, 0, 2, 2, 3, 3],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 3, 3, 3],
        "transformer_depth_middle": 3,
        "use_linear_in_transformer": True,
        "context_dim": 64,
    },
}
# Head layout, applied after the host's model config class has set its own: SD15 forces 8 heads,
# SD20 and SDXL force 64 channels per head (`unet_extra_config`), which a 32-channel UNet cannot have.
HEADS = {
    "sd15": {"num_heads": 8, "num_head_channels": -1},
    "sd2v": {"num_heads": -1, "num_head_channels": 16},
    "sdxl": {"num_heads": -1, "num_head_channels": 16},
}
POOLED_DIM = {"sd15": 48, "sd2v": 40, "sdxl": 32}
# What the CLIPTextEncodeSDXL node puts into the conditioning; all six differ so that a twin that
# orders them differently from the host's `SDXL.encode_adm` cannot agree with it by accident.
SDXL_SIZE_CONDITIONING = {
    "width": 1024,
    "height": 768,
    "crop_w": 48,
    "crop_h": 16,
    "target_width": 896,
    "target_height": 640,
}

_MODEL_CLASSES = {
    "sd15": (comfy.supported_models.SD15, comfy.model_base.BaseModel, comfy.model_base.ModelType.EPS),
    "sd2v": (comfy.supported_models.SD20, comfy.model_base.BaseModel, comfy.model_base.ModelType.V_PREDICTION),
    "sdxl": (comfy.supported_models.SDXL, comfy.model_base.SDXL, comfy.model_base.ModelType.EPS),
}


def _check_family(family: str) -> None:
    if family not in UNET_CONFIGS:
        raise ValueError(f"Unknown model family '{family}'. Use one of: {', '.join(FAMILIES)}.")


def family_of(patcher: comfy.model_patcher.ModelPatcher) -> str:
    """The family name of a model built by `build_model`."""
    family = getattr(patcher.model, "tiny_family", None)
    if family is None:
        raise ValueError("This model was not built by tests/support/models.py:build_model.")
    return family


def initialise_weights(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter deterministically.

    The host builds its UNet with `comfy.ops.disable_weight_init`, which leaves weights as
    uninitialised memory. Norm scales are ~1 and shifts small; every other weight is normal with
    std 1/sqrt(fan_in), which keeps activations O(1) through the network and attention logits O(1)
    (attention maps neither uniform nor one-hot); biases are small.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape, std):
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std

    with torch.no_grad():
        for submodule in module.modules():
            is_norm = isinstance(submodule, (torch.nn.GroupNorm, torch.nn.LayerNorm))
            for name, param in submodule.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    value = 1.0 + normal(param.shape, 0.1)
                elif param.ndim == 1:
                    value = normal(param.shape, 0.05)
                else:
                    value = normal(param.shape, 1.0 / math.sqrt(param[0].numel()))
                param.copy_(value.to(param.dtype))


def build_model(family: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A tiny random model of `family` ("sd15", "sd2v" or "sdxl") in a ModelPatcher, fp32 on the CPU."""
    _check_family(family)
    config_class, model_class, model_type = _MODEL_CLASSES[family]
    model_config = config_class(UNET_CONFIGS[family])
    model_config.unet_config.update(HEADS[family])
    model_config.set_inference_dtype(torch.float32, None)
    device = torch.device("cpu")
    model = model_class(model_config, model_type=model_type, device=device)
    initialise_weights(model.diffusion_model, seed)
    model.tiny_family = family
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=device
    )


def tiny_controlnet(patcher: comfy.model_patcher.ModelPatcher, seed: int):
    """A ControlNet of the host's class for ``patcher``'s UNet (same config, 3-channel hint), random
    weights fixed by ``seed``: the host's controller and the ControlNet module (for forward hooks)."""
    config = dict(patcher.model.model_config.unet_config)
    config.pop("out_channels")
    cpu = torch.device("cpu")
    config.update(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device=cpu)
    control_model = comfy.cldm.cldm.ControlNet(**config)
    initialise_weights(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, load_device=cpu, manual_cast_dtype=None), control_model


def make_conditioning(family: str, batch: int = 1, seed: int = 0, tokens: int = 7):
    """(positive, negative) CONDITIONING as the host's text encode nodes produce it.

    ``[[cross_attn (batch, tokens, context_dim), {"pooled_output": (batch, pooled_dim)}]]``; SDXL
    also carries the size entries of CLIPTextEncodeSDXL (``SDXL_SIZE_CONDITIONING``).
    """
    _check_family(family)
    generator = torch.Generator().manual_seed(seed)
    context_dim = UNET_CONFIGS[family]["context_dim"]

    def encode():
        cross_attn = torch.randn(batch, tokens, context_dim, generator=generator)
        extras = {"pooled_output": torch.randn(batch, POOLED_DIM[family], generator=generator)}
        if family == "sdxl":
            extras.update(SDXL_SIZE_CONDITIONING)
        return [[cross_attn, extras]]

    positive = encode()
    negative = encode()
    return positive, negative


def _as_sigma(sigma) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    if sigma.numel() != 1:
        raise ValueError(f"sigma must be one value, got {sigma.numel()}.")
    return sigma


def denoise_once(patcher, positive, negative, x: torch.Tensor, sigma, cfg: float, seed: int = 0) -> torch.Tensor:
    """The denoised x0 of ONE guided model evaluation at exactly (x, sigma), through the host's sampler path.

    A real `comfy.samplers.CFGGuider` (set_conds / set_cfg) samples with a `comfy.samplers.KSAMPLER`
    whose sampler function makes one call of the wrapped model at ``(x, sigmas[0])`` and keeps the
    denoised output. So conds go through the host's `process_conds` (SDXL's adm included), and every
    ``model_options`` entry (wrappers, pre/post-CFG functions, attention patches, CFG-1 optimisation)
    runs as in a real sampler.

    ``x`` is in the host's coordinates: the noisy latent at ``sigma`` (``x0 + sigma * eps`` for
    EPS/V models), not scaled by the latent format. The sampler function ignores the start latent
    KSAMPLER builds from (noise, latent_image) with `noise_scaling` and `max_denoise`, and the
    returned tensor is the kept denoised value, not the sample that `process_latent_out` rescales.
    The schedule handed to the guider (``transformer_options["sample_sigmas"]``) is ``[sigma, 0]``.
    """
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return evaluate_guider_once(guider, x, sigma, seed=seed)


def evaluate_guider_once(guider, x: torch.Tensor, sigma, seed: int = 0) -> torch.Tensor:
    """``denoise_once`` for any host guider (set up by the caller): its denoised x0 at exactly (x, sigma)."""
    sigma = _as_sigma(sigma)
    x = x.to(torch.float32)
    kept = []

    def evaluate_once(model, noise, sigmas, extra_args=None, callback=None, disable=None, **kwargs):
        denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        kept.append(denoised)
        return denoised

    sigmas = torch.cat([sigma, sigma.new_zeros(1)])
    zeros = torch.zeros_like(x)
    guider.sample(zeros, zeros, comfy.samplers.KSAMPLER(evaluate_once), sigmas, disable_pbar=True, seed=seed)
    if len(kept) != 1:
        raise RuntimeError(f"expected one model evaluation, got {len(kept)}")
    return kept[0].to(torch.float32).cpu()


def dual_cfg_guider(patcher, positive, middle, negative, cfg_middle: float = 3.0, cfg_negative: float = 2.0):
    """The host's DualCFGGuider: one forward of [negative, middle, positive], then CFG of middle against
    negative plus ``cfg_middle`` times (positive - middle)."""
    guider = Guider_DualCFG(patcher)
    guider.set_conds(positive, middle, negative)
    guider.set_cfg(cfg_middle, cfg_negative)
    return guider


def perp_neg_guider(patcher, positive, negative, empty, cfg: float = 4.0, neg_scale: float = 1.0):
    """The host's PerpNegGuider: one forward of [positive, negative, empty]; it calls the post-CFG
    functions itself, with the positive as cond and the negative as uncond."""
    guider = Guider_PerpNeg(patcher)
    guider.set_conds(positive, negative, empty)
    guider.set_cfg(cfg, neg_scale)
    return guider


def cfg_term(patched, model, positive, negative, x: torch.Tensor, sigma, cfg: float) -> torch.Tensor:
    """What a patch adds to plain CFG of ``positive`` against ``negative`` at exactly (x, sigma)."""
    return (denoise_once(patched, positive, negative, x, sigma, cfg)
            - denoise_once(model, positive, negative, x, sigma, cfg))


def sample(patcher, positive, negative, latent: torch.Tensor, sampler_name: str = "euler", scheduler: str = "normal",
           steps: int = 4, cfg: float = 4.0, seed: int = 0, denoise: float = 1.0) -> torch.Tensor:
    """Sample as the KSampler node does (`nodes.common_ksampler`): noise from `seed`, `comfy.sample.sample`.

    ``latent`` and the result are LATENT samples (latent-format scaled, as the VAE gives them).
    """
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               denoise=denoise, disable_pbar=True, seed=seed)


class _TinyFreeMemory:
    """comfy.samplers' view of comfy.model_management with almost no free memory."""

    def __getattr__(self, name):
        return getattr(comfy.model_management, name)

    @staticmethod
    def get_free_memory(dev=None, torch_free_too=False):
        return (1, 1) if torch_free_too else 1


def short_of_memory(monkeypatch) -> None:
    """Let the host's sampler see almost no free memory (undone with `monkeypatch`), so that
    `comfy.samplers._calc_cond_batch` runs every cond entry in a forward of its own, as on a device
    where the batch does not fit."""
    monkeypatch.setattr(comfy.samplers, "model_management", _TinyFreeMemory())


@dataclasses.dataclass(frozen=True)
class ModelCall:
    """One forward of the diffusion model (the UNet itself)."""

    batch_size: int
    cond_or_uncond: list  # chunks' cond lists in batch order, as the host numbered them: 0 = positive, 1 = negative,
    # others = lists added by guiders and patches (our nodes' copies among them, which the model is shown as 0)
    timestep: torch.Tensor  # what the UNet received (the host's integer-valued timestep per row)
    shape: tuple
    uuids: list  # the conditioning entry uuid of each chunk (transformer_options["uuids"])


_counter = itertools.count()


@contextlib.contextmanager
def count_model_calls(patcher):
    """Record every diffusion-model forward run through `patcher` while the block is open.

    ``with count_model_calls(patcher) as calls: denoise_once(patcher, ...)`` leaves in ``calls`` one
    `ModelCall` per UNet (or Flux) forward. A DIFFUSION_MODEL wrapper is added to `patcher` itself
    (innermost: it sees the batch after every apply_model / calc_cond_batch wrapper, and only the
    forwards that run) and removed on exit. The host's MMDiT (SD3) runs no DIFFUSION_MODEL wrappers
    (0.3.75); see support.dit_models.count_forwards.
    """
    calls: list[ModelCall] = []
    key = f"tests.count_model_calls.{next(_counter)}"

    def record(executor, x, timesteps, *args, **kwargs):
        # UNetModel._forward passes transformer_options positionally, Flux._forward by keyword
        transformer_options = kwargs.get("transformer_options")
        if transformer_options is None:
            transformer_options = next(a for a in reversed(args) if isinstance(a, dict))
        calls.append(ModelCall(
            batch_size=x.shape[0],
            cond_or_uncond=chunk_ids(transformer_options),
            timestep=timesteps.detach().clone(),
            shape=tuple(x.shape),
            uuids=list(transformer_options.get("uuids", [])),
        ))
        return executor(x, timesteps, *args, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key, record)
    try:
        yield calls
    finally:
        patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, key)
