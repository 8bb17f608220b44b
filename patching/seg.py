"""Smoothed Energy Guidance (Hong, NeurIPS 2024, arXiv 2408.00760) on a ModelPatcher.

PAG's batched copy of the positive (``perturbed_copy``) with another perturbation: in the chosen
self-attention layers the copy's image queries are blurred on the layer's token grid
(``seg_core.blur_queries``) and the layer then attends as it would have. The guidance is PAG's formula.
With the uncond placement the same perturbation acts on the sampler's own negative (``perturbed_uncond``).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..guidance_core.layer_spec import Method
from ..guidance_core.schedule import validate_percent_window
from ..guidance_core.token_grid import token_grid
from ..pag_core import pag_guided
from ..seg_core import blur_queries, validate_seg_inputs
from .dit_attention import DiTAttention
from .perturbed_guidance import apply_perturbed_guidance
from .perturbed_uncond import Placement

NODE = "Smoothed Energy Guidance"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SEGSettings:
    """One SEG node's inputs, checked: the guidance ``scale``, the queries' ``blur_sigma`` in tokens (9999 or
    more: infinite), the ``layers`` spec, the sampling window in percent and where the perturbation goes."""

    scale: float
    blur_sigma: float
    layers: str
    start_percent: float = 0.0
    end_percent: float = 1.0
    placement: Placement = Placement.OWN_BRANCH

    def __post_init__(self):
        validate_seg_inputs(self.scale, self.blur_sigma)
        validate_percent_window(self.start_percent, self.end_percent)
        object.__setattr__(self, "placement", Placement.of(self.placement))


def blurred_query_attention(blur_sigma: float, label: str):
    """UNet rows of the copy: they attend with their queries blurred on the layer's grid (``activations_shape``)."""

    def perturb(q, k, v, extra_options, attend):
        if extra_options.get("activations_shape") is None:
            raise RuntimeError(
                f"{label}: this ComfyUI does not tell attention patches the layer's token grid "
                "(transformer_options['activations_shape'], set by ComfyUI 0.3.75 and later, not by 0.3.64), "
                "which Smoothed Energy Guidance needs to blur the queries. Update ComfyUI."
            )
        grid = token_grid(extra_options["activations_shape"], tokens=q.shape[1])
        return attend(blur_queries(q, grid, blur_sigma), k, v)

    return perturb


def smoothed_queries(blur_sigma: float):
    """DiT rows of the copy: the call's own attention with the generated image's queries blurred on its token
    grid (per frame where the grid has a time axis); text queries and reference-image tokens keep theirs. A
    block's image-only self-attention has no text tokens: all its queries are the image's."""

    def perturb(part: DiTAttention) -> torch.Tensor:
        *frames, height, width = part.image_grid()
        image = part.image_tokens_of_grid()
        q = part.q_heads().clone()
        q[:, :, image] = blur_queries(q[:, :, image], (height, width), blur_sigma, math.prod(frames))
        return part.with_queries(q).run()

    return perturb


def apply_seg(model, settings: SEGSettings):
    """A clone of ``model`` with SEG installed (a plain clone at scale 0)."""

    def combine(args, scale, x0_blurred):
        # SEG-SDXL: eps = eps_cfg + s * (eps_c - eps_seg), PAG's Eq. 14 with the blurred-query prediction
        return pag_guided(args["denoised"], args["cond_denoised"], x0_blurred, scale)

    return apply_perturbed_guidance(
        model, node=NODE, method=Method.SEG, name="SEG", layers=settings.layers, scale=settings.scale,
        start_percent=settings.start_percent, end_percent=settings.end_percent, placement=settings.placement,
        perturb_unet=lambda label: blurred_query_attention(settings.blur_sigma, label),
        perturb_dit=smoothed_queries(settings.blur_sigma), combine=combine)
