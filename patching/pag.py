"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377) on a ModelPatcher: the settings a PAG node
builds and the patch they install: a perturbed copy of the positive (``perturbed_copy``) and a post-CFG
function adding ``pag_core.pag_guided``, or with the uncond placement the sampler's own negative perturbed
(``perturbed_uncond``)."""
from __future__ import annotations

import dataclasses

import torch

from ..guidance_core.layer_spec import Method
from ..guidance_core.schedule import validate_percent_window
from ..pag_core import (
    adaptive_pag_scale, identity_attention, image_query_identity_attention, joint_identity_attention,
    joint_identity_attention_text_last, pag_guided, rescale_guided, validate_pag_inputs,
)
from .dit_attention import DiTAttention
from .perturbed_guidance import apply_perturbed_guidance
from .perturbed_uncond import Placement

NODE = "Perturbed-Attention Guidance"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PAGSettings:
    """One PAG node's inputs, checked: ``scale`` s of Eq. 14, the ``layers`` spec, diffusers' ``adaptive_scale``,
    the sampling window in percent, the CFG-rescale factor, and where the perturbation goes (``placement``)."""

    scale: float
    layers: str
    adaptive_scale: float = 0.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    rescale: float = 0.0
    placement: Placement = Placement.OWN_BRANCH

    def __post_init__(self):
        validate_pag_inputs(self.scale, self.adaptive_scale, self.rescale)
        validate_percent_window(self.start_percent, self.end_percent)
        object.__setattr__(self, "placement", Placement.of(self.placement))


def joint_identity(part: DiTAttention) -> torch.Tensor:
    """DiT rows of the copy: diffusers' joint-attention PAG (each image token attends to itself and the text, text
    tokens to everything; ``joint_identity_attention``), in the family's token order; where only the image queries,
    its rows of that (``image_query_identity_attention``)."""
    if part.image_queries:
        return part.from_heads(image_query_identity_attention(part.q_heads(), part.k_heads(), part.v_heads(), part.mask,
                                                              scale=part.scale))
    attention = joint_identity_attention_text_last if part.image_first else joint_identity_attention
    return part.from_heads(attention(part.q_heads(), part.k_heads(), part.v_heads(), part.text_tokens, part.mask,
                                     scale=part.scale))


def identity_self_attention(q, k, v, extra_options, attend) -> torch.Tensor:
    """UNet rows of the copy: Eq. 13's identity attention."""
    return identity_attention(q, k, v)


def apply_pag(model, settings: PAGSettings):
    """A clone of ``model`` with PAG installed (a plain clone at scale 0)."""

    def adaptive_scale(window, base_model, sigma) -> float:
        sampling = base_model.model_sampling
        timestep = window.per_step(sigma, "timestep", lambda: float(sampling.timestep(sigma.flatten()[:1])))
        return adaptive_pag_scale(settings.scale, settings.adaptive_scale, timestep)

    def combine(args, scale, x0_perturbed):
        guided = pag_guided(args["denoised"], args["cond_denoised"], x0_perturbed, scale)
        return rescale_guided(guided, args["cond_denoised"], settings.rescale)

    finish = (lambda args: rescale_guided(args["denoised"], args["cond_denoised"], settings.rescale)) \
        if settings.rescale > 0.0 else None
    return apply_perturbed_guidance(
        model, node=NODE, method=Method.PAG, name="PAG", layers=settings.layers, scale=settings.scale,
        start_percent=settings.start_percent, end_percent=settings.end_percent, placement=settings.placement,
        perturb_unet=lambda label: identity_self_attention, perturb_dit=joint_identity,
        combine=combine, finish=finish, scale_in_window=adaptive_scale if settings.adaptive_scale > 0.0 else None)
