"""The model family registry: one module per family, read by everything else.

Each module declares a ``FAMILY`` (``family.Family``): how the family is recognised, its blocks and their
names (ours, diffusers', the host's), token order and grid rule (its ``DiTReach``), the default layers per
method with the source of each, the latent scale of its formats where the host does not say, and notes.
Layer specs, the DiT handlers, SAG's grid and mask preview, the refusal of other models, the nodes'
tooltips and docs/model-families.md all read it. A new family is one module here, listed in ``FAMILIES``.
"""
from __future__ import annotations

import dataclasses

from . import (
    auraflow, cosmos1, cosmos_predict2, flux, hidream, hunyuan_dit, hunyuan_image21, hunyuan_video, hunyuan_video15, ltxv,
    mochi, nextdit, omnigen2, pixart, qwen_image, sd3, stable_cascade, unet, wan, wan_s2v,
)
from .family import Family, Layout
from .refused import REFUSED

# in the order the docs list them; a model is at most one family's
FAMILIES: tuple[Family, ...] = (
    unet.FAMILY, sd3.FAMILY, auraflow.FAMILY, pixart.FAMILY, hunyuan_dit.FAMILY, flux.FAMILY, qwen_image.FAMILY,
    nextdit.FAMILY, omnigen2.FAMILY, hidream.FAMILY, hunyuan_image21.FAMILY, wan.FAMILY, wan_s2v.FAMILY,
    hunyuan_video.FAMILY, hunyuan_video15.FAMILY, ltxv.FAMILY, mochi.FAMILY, cosmos1.FAMILY, cosmos_predict2.FAMILY,
    stable_cascade.FAMILY,
)

SUPPORTED_MODELS = "; ".join(family.models for family in FAMILIES)


class UnsupportedModelError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Recognised:
    """A model's family and its attention layout."""

    family: Family
    layout: Layout


def model_config_name(model) -> str:
    """The host's name for the model (its model config class, e.g. "SDXL", "Flux"), for messages."""
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def recognise(model, node_name: str) -> Recognised:
    """The family and layout of a ModelPatcher's model, or a clear error naming the model and what is supported."""
    diffusion_model = model.get_model_object("diffusion_model")
    config_name = model_config_name(model)
    for family in FAMILIES:
        layout = family.recognise(diffusion_model, config_name)
        if layout is None:
            continue
        if not layout.sites:
            raise UnsupportedModelError(
                f"{node_name} found no self-attention layer in this {config_name} {family.name}, so it has "
                f"nothing to guide with. Supported: {SUPPORTED_MODELS}."
            )
        return Recognised(family, layout)
    reason = REFUSED.get(config_name)
    raise UnsupportedModelError(
        f"{node_name} cannot patch this model: it is a {config_name} model "
        f"({type(diffusion_model).__name__}), whose self-attention the node cannot reach, so it would do "
        f"nothing{': ' + reason if reason else ''}. Supported: {SUPPORTED_MODELS}. Remove the node for this model."
    )


def image_pixels_per_latent_pixel(latent_format) -> int:
    """Image pixels per latent pixel: the format's own ratio where the host has one (newer hosts'
    ``spacial_downscale_ratio``), else the one a family declares for that format, else 8 (the VAE of every
    other family the nodes patch)."""
    ratio = getattr(latent_format, "spacial_downscale_ratio", None)
    if ratio is not None:
        return int(ratio)
    names = {cls.__name__ for cls in type(latent_format).__mro__}
    for family in FAMILIES:
        for name, scale in family.image_scales.items():
            if name in names:
                return scale
    return 8
