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
from .layers import choose_layers
from .perturbed_copy import PerturbedCopy
from .perturbed_uncond import Placement, PerturbedUncond
from .sigma_window import SigmaWindow

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


def apply_pag(model, settings: PAGSettings):
    """A clone of ``model`` with PAG installed (a plain clone at scale 0)."""
    chosen = choose_layers(model, node=NODE, input_name="layers", spec=settings.layers, method=Method.PAG,
                           label="PAG layers")
    patched = model.clone()
    if settings.scale == 0.0:
        return patched
    window = SigmaWindow(patched, settings.start_percent, settings.end_percent)

    def scale_at(base_model, sigma) -> float:
        sampling = base_model.model_sampling
        if not window.contains(sampling, sigma):
            return 0.0
        if settings.adaptive_scale <= 0.0:
            return settings.scale
        timestep = window.per_step(sigma, "timestep", lambda: float(sampling.timestep(sigma.flatten()[:1])))
        return adaptive_pag_scale(settings.scale, settings.adaptive_scale, timestep)

    label = f"PAG layers '{chosen.resolved}'"
    perturb_unet = lambda q, k, v, options, attend: identity_attention(q, k, v)  # noqa: E731

    if settings.placement is Placement.UNCOND:
        # CFG combines the positive with the perturbed negative; the scale only switches (scale_at > 0)
        finish = (lambda args: rescale_guided(args["denoised"], args["cond_denoised"], settings.rescale)) \
            if settings.rescale > 0.0 else None
        PerturbedUncond(model=patched, chosen=chosen, node=NODE, label=label,
                        active_at=lambda base_model, sigma: scale_at(base_model, sigma) > 0.0,
                        perturb_unet=perturb_unet, perturb_dit=joint_identity, finish=finish)
        return patched

    copy = PerturbedCopy(model=patched, chosen=chosen, node=NODE, label=label, scale_at=scale_at,
                         perturb_unet=perturb_unet, perturb_dit=joint_identity)

    def post_cfg_function(args):
        step = copy.guidance_step(args)
        if step is None:
            return args["denoised"]
        scale, x0_perturbed = step
        guided = pag_guided(args["denoised"], args["cond_denoised"], x0_perturbed, scale)
        return rescale_guided(guided, args["cond_denoised"], settings.rescale)

    patched.set_model_sampler_post_cfg_function(post_cfg_function)
    return patched
