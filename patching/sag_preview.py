"""The SAG mask a SAG-patched model would use at one step, as a MASK and an IMAGE, for tuning
``threshold`` and ``layer`` by eye."""
from __future__ import annotations

import inspect

import comfy.sample
import comfy.samplers
import torch.nn.functional as F

from .families import image_pixels_per_latent_pixel
from .sag import SAG_PATCH_ATTRIBUTE, with_sag_mask_probe


def sag_instances(model) -> list[str]:
    return [
        getattr(fn, SAG_PATCH_ATTRIBUTE)
        for fn in model.model_options.get("sampler_post_cfg_function", [])
        if hasattr(fn, SAG_PATCH_ATTRIBUTE)
    ]


# Keys of a LATENT dict that newer hosts' empty-latent nodes add and their fix_empty_latent_channels takes
# as keyword arguments of the same name (EmptyLatentImage's "downscale_ratio_spacial": 8, 0.38.x).
_EMPTY_LATENT_HINTS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def sampler_latent(model, latent_image: dict):
    """The latent KSampler samples for ``latent_image``: the host's ``fix_empty_latent_channels`` with the
    downscale hints the LATENT dict carries, where the host's function takes them (0.3.75 takes none)."""
    fix = comfy.sample.fix_empty_latent_channels
    parameters = inspect.signature(fix).parameters
    hints = {name: latent_image[name] for name in _EMPTY_LATENT_HINTS if name in parameters and name in latent_image}
    return fix(model, latent_image["samples"], **hints)


def one_evaluation_sampler() -> comfy.samplers.KSAMPLER:
    """A host sampler that makes one model call at the first sigma and returns its input."""

    def one_evaluation(model, x, sigmas, extra_args=None, callback=None, disable=None):
        model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return x

    return comfy.samplers.KSAMPLER(one_evaluation)


def sag_mask_at_step(model, positive, negative, latent_image: dict, *, seed: int, steps: int, step: int, cfg: float,
                     scheduler: str):
    """``(mask [B, H, W], image [B, H, W, 3])`` at image resolution: the mask the SAG patch of ``model`` blurs
    at ``step`` of a ``steps``-step ``scheduler`` schedule, from one model evaluation on ``latent_image`` noised
    to that step's sigma."""
    if not sag_instances(model):
        raise ValueError(
            "SAG Mask Preview: this model has no Self-Attention Guidance patch. Connect the MODEL output "
            "of a 'Self-Attention Guidance (SAG)' node (with a scale other than 0) to 'model'."
        )
    if step >= steps:
        raise ValueError(f"SAG Mask Preview: step is {step} but steps is {steps}; use a step from 0 to {steps - 1}.")

    latent = sampler_latent(model, latent_image)
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)

    collected: list = []

    def keep(mask):
        collected.append(mask)

    guider = comfy.samplers.CFGGuider(with_sag_mask_probe(model, keep))
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    guider.sample(noise, latent, one_evaluation_sampler(), sigmas[step:], denoise_mask=latent_image.get("noise_mask"),
                  disable_pbar=True, seed=seed)

    # Post-CFG functions run in patch order; the last is the SAG node nearest this one.
    mask = collected[-1] if collected else None
    if mask is None:
        raise ValueError(
            "SAG Mask Preview: the SAG patch recorded no attention at this step (no conditioning entry "
            "was active). Check the conditioning's timestep range or choose another step."
        )
    ratio = image_pixels_per_latent_pixel(model.get_model_object("latent_format"))
    mask = F.interpolate(mask.float().cpu(), scale_factor=ratio, mode="nearest")[:, 0]
    image = mask.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()
    return mask, image
