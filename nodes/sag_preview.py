"""The SAG mask a SAG-patched model would use at one step, as a MASK and an IMAGE, for tuning
``threshold`` and ``layer`` by eye."""
from __future__ import annotations

import inspect

import comfy.latent_formats
import comfy.sample
import comfy.samplers
import torch.nn.functional as F
from comfy_api.latest import io

from .sag import CATEGORY, SAG_PATCH_ATTRIBUTE, with_sag_mask_probe


def sag_instances(model) -> list[str]:
    return [
        getattr(fn, SAG_PATCH_ATTRIBUTE)
        for fn in model.model_options.get("sampler_post_cfg_function", [])
        if hasattr(fn, SAG_PATCH_ATTRIBUTE)
    ]


# Image pixels per latent pixel where it is not 8 (0.3.75's latent formats do not say; its VAEs do):
# Flux.2's 128-channel latent is 1/16 of the image (EmptyFlux2LatentImage), Chroma Radiance is pixel space,
# the Wan 2.2 VAE's 48-channel latent is 1/16 (Wan22ImageToVideoLatent), LTX-Video's 1/32 (EmptyLTXVLatentVideo).
_IMAGE_SCALE = {"Flux2": 16, "ChromaRadiance": 1, "Wan22": 16, "LTXV": 32}


def image_pixels_per_latent_pixel(latent_format) -> int:
    """The format's own ratio where the host has one (newer hosts' ``spacial_downscale_ratio``), else
    ``_IMAGE_SCALE``'s or 8, the VAE of every other family the nodes patch."""
    ratio = getattr(latent_format, "spacial_downscale_ratio", None)
    if ratio is not None:
        return int(ratio)
    for name, scale in _IMAGE_SCALE.items():
        if isinstance(latent_format, getattr(comfy.latent_formats, name, ())):
            return scale
    return 8


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


class SAGMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AG_SAGMaskPreview",
            display_name="SAG Mask Preview",
            category=CATEGORY,
            description=(
                "Shows the mask Self-Attention Guidance blurs at one step: connect the MODEL output of a "
                "Self-Attention Guidance (SAG) node (its threshold and layer are used) and the sampler's "
                "inputs. Runs one model evaluation on the latent noised to that step's sigma, as "
                "KSampler (Advanced) starting at that step would."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of a Self-Attention Guidance (SAG) node."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input(
                    "latent_image",
                    tooltip="Empty latent for the first steps; for later steps a latent of a finished image "
                    "(sampler output or VAE Encode) shows what SAG sees near the end.",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Int.Input("step", default=0, min=0, max=10000,
                             tooltip="Which step of the schedule, 0 = first (shown even outside SAG's start/end window)."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="As on the sampler: at 1.0 SAG takes the map of the positive pass."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES),
            ],
            outputs=[
                io.Mask.Output(display_name="mask"),
                io.Image.Output(display_name="image"),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, step, cfg, scheduler) -> io.NodeOutput:
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
        return io.NodeOutput(mask, image)
