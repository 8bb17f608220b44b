"""PAG arithmetic in the host's denoised (x0) space.

PAG guides with ``eps~ = eps_cfg + s * (eps(c) - eps^(c))`` (paper Eq. 14), ``eps^`` being the
prediction with the chosen self-attention maps replaced by the identity. The three branches share
x_t, and eps, v and x0 are affine in each other at fixed x_t with weights summing to one, so the
same combination of denoised predictions is exact for eps, v-prediction and flow models alike.
"""
from __future__ import annotations

import math

import torch


def identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention with softmax(QK^T/sqrt(d)) replaced by I (paper Sec. 4): every token keeps its value."""
    return v


def pag_guided(cfg_x0: torch.Tensor, cond_x0: torch.Tensor, perturbed_x0: torch.Tensor, scale: float) -> torch.Tensor:
    # paper Eq. 14 / diffusers PAGMixin: cfg + s * (cond - perturbed)
    return cfg_x0 + scale * (cond_x0 - perturbed_x0)


def adaptive_pag_scale(scale: float, adaptive_scale: float, timestep: float) -> float:
    """diffusers' ``pag_adaptive_scale``: ``max(0, s - a * (1000 - t))`` with t the 0..999 timestep.

    The scale falls linearly as sampling proceeds; a = 0 keeps it constant. Note how steep it is:
    with s = 3, a = 0.01 switches PAG off once t < 700.
    """
    if adaptive_scale <= 0.0:
        return scale
    return max(0.0, scale - adaptive_scale * (1000.0 - timestep))


def rescale_guided(guided: torch.Tensor, cond_x0: torch.Tensor, rescale: float) -> torch.Tensor:
    """CFG-rescale (Lin et al., arXiv 2305.08891, Alg. 2) applied to the guided denoised result.

    ``phi * guided * std(cond) / std(guided) + (1 - phi) * guided``, std per sample over C, H, W:
    pulls the guided prediction's spread back to the positive prediction's, against over-saturation.
    """
    if rescale == 0.0:
        return guided
    dims = tuple(range(1, guided.ndim))
    std_cond = cond_x0.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True).clamp_min(torch.finfo(guided.dtype).tiny)
    return rescale * guided * (std_cond / std_guided) + (1.0 - rescale) * guided


def validate_pag_inputs(scale: float, adaptive_scale: float, rescale: float) -> None:
    checks = (
        ("scale", scale, 0.0, 100.0, "3.0 is the paper's setting with CFG; 5.0 for PAG alone at CFG 1"),
        ("adaptive_scale", adaptive_scale, 0.0, 1.0, "0.0 keeps the scale constant over the steps"),
        ("rescale", rescale, 0.0, 1.0, "0.0 turns the rescale off; 0.7 is the usual setting"),
    )
    for name, value, low, high, hint in checks:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
            raise ValueError(f"PAG {name} is {value}; it must be a number from {low} to {high} ({hint}).")
