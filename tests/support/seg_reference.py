"""Smoothed Energy Guidance's reference computation on the diffusers twin of a tiny UNet.

Written here from the algorithm of the paper's own pipeline (SusungHong/SEG-SDXL ``pipeline_seg.py``,
``SEGCFGSelfAttnProcessor`` and ``StableDiffusionXLSEGPipeline``), not from this pack's code:

- the batch is ``[uncond, cond, cond]`` with CFG, ``[cond, cond]`` without; one UNet forward;
- in the chosen self-attentions (``attn1`` of the mid block: the reference's ``['mid']``) the last
  chunk's queries, read as a square ``isqrt(L) x isqrt(L)`` map of ``heads * head_dim`` channels, are
  blurred by a 2-D Gaussian of ``ceil(6 sigma) + 1`` taps made odd, clamped to the map as
  ``min(k, side - (side % 2 - 1))``, with reflect padding, or, for sigma above 9999, replaced by
  their mean over the map; then plain scaled-dot-product attention;
- ``out = u + w (c - u) + s (c - c_seg)`` with CFG, ``c + s (c - c_seg)`` without.

diffusers' own SEG (``hooks.smoothed_energy_guidance_utils._gaussian_blur_2d``, 0.42.1) has the two
branches the other way round (a finite sigma gets the mean query), so it is not used.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .diffusers_twin import DiffusersTwin, TwinCond

REFERENCE_INFINITE_ABOVE = 9999.0


def reflect(index: int, side: int) -> int:
    if index < 0:
        return -index
    if index >= side:
        return 2 * (side - 1) - index
    return index


def axis_operator(side: int, sigma: float) -> torch.Tensor:
    """``[side, side]`` matrix of a 1-D Gaussian blur with reflect padding: ceil(6 sigma) + 1 taps made odd,
    at most the side (odd) or the side + 1 (even), weights at integer offsets, normalised."""
    taps = math.ceil(6 * sigma)
    taps += 1 - taps % 2
    taps = min(taps, side if side % 2 else side + 1)
    half = taps // 2
    weights = torch.tensor([math.exp(-0.5 * (a / sigma) ** 2) for a in range(-half, half + 1)], dtype=torch.float64)
    weights /= weights.sum()
    matrix = torch.zeros(side, side, dtype=torch.float64)
    for i in range(side):
        for n, offset in enumerate(range(-half, half + 1)):
            matrix[i, reflect(i + offset, side)] += weights[n]
    return matrix


def direct_query_blur(queries: torch.Tensor, grid, sigma: float, frames: int) -> torch.Tensor:
    """``[B, frames * h * w, C]`` blurred per frame and channel as ``A_h X A_w^T`` (float64), with ``A`` the
    reflect-padded Gaussian of ``axis_operator`` (sigma >= 9999: the frame's mean query): SEG's blur computed directly, for grids the reference cannot take."""
    height, width = grid
    batch, _, channels = queries.shape
    if sigma >= 9999:  # the infinite blur: each frame's mean query
        means = queries.double().reshape(batch, frames, height * width, channels).mean(dim=2, keepdim=True)
        return means.expand(batch, frames, height * width, channels).reshape(queries.shape)
    x = queries.double().reshape(batch, frames, height, width, channels).permute(0, 1, 4, 2, 3)
    out = axis_operator(height, sigma) @ x @ axis_operator(width, sigma).T
    return out.permute(0, 1, 3, 4, 2).reshape(queries.shape)


def reference_query_blur(queries: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[n, C, side, side]`` blurred as the reference does (one 2-D kernel, square maps only)."""
    side = queries.shape[-1]
    extent = math.ceil(6 * sigma)
    size = extent + 1 - extent % 2
    size = min(size, side - (side % 2 - 1))
    offsets = torch.linspace(-(size - 1) / 2, (size - 1) / 2, steps=size)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    weights = (weights / weights.sum()).to(queries)
    kernel = (weights[:, None] * weights[None, :]).expand(queries.shape[1], 1, size, size)
    padded = F.pad(queries, [size // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=queries.shape[1])


class SEGReferenceProcessor:
    """A diffusers attention processor: plain self-attention, with the last of ``chunks`` batch chunks
    attending with smoothed queries."""

    def __init__(self, blur_sigma: float, chunks: int):
        self.blur_sigma = blur_sigma
        self.chunks = chunks

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        batch, length, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = q.shape[-1] // heads
        q, k, v = (t.view(batch, length, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        side = math.isqrt(length)
        assert side * side == length, "the reference reads the tokens as a square map"
        n = batch // self.chunks
        smoothed = q[-n:].permute(0, 1, 3, 2).reshape(n, heads * head_dim, side, side)
        if self.blur_sigma > REFERENCE_INFINITE_ABOVE:
            smoothed = smoothed.mean(dim=(-2, -1), keepdim=True).expand_as(smoothed)
        else:
            smoothed = reference_query_blur(smoothed, self.blur_sigma)
        smoothed = smoothed.reshape(n, heads, head_dim, length).permute(0, 1, 3, 2)
        q = torch.cat([q[:-n], smoothed])
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(batch, length, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@torch.no_grad()
def seg_guided_output(twin: DiffusersTwin, x_vp: torch.Tensor, t: int, cond: TwinCond, uncond: TwinCond, cfg: float,
                      seg_scale: float, blur_sigma: float, layers: str = r"^mid_block\..*\.attn1$") -> torch.Tensor:
    """One step of the reference pipeline's loop at integer timestep ``t``: the guided model output."""
    do_cfg = cfg > 1.0

    def batched(c, u):
        return torch.cat([u, c, c]) if do_cfg else torch.cat([c, c])

    chunks = 3 if do_cfg else 2
    hidden = batched(cond.encoder_hidden_states, uncond.encoder_hidden_states)
    added = None
    if cond.added_cond_kwargs is not None:
        added = {k: batched(v, uncond.added_cond_kwargs[k]) for k, v in cond.added_cond_kwargs.items()}
    latent_input = twin.scheduler.scale_model_input(torch.cat([x_vp] * chunks), t)

    original = twin.unet.attn_processors
    pattern = re.compile(layers)
    chosen = {name: SEGReferenceProcessor(blur_sigma, chunks) if pattern.search(name[: -len(".processor")]) else p
              for name, p in original.items()}
    assert any(isinstance(p, SEGReferenceProcessor) for p in chosen.values())
    twin.unet.set_attn_processor(chosen)
    try:
        output = twin.unet(latent_input, t, encoder_hidden_states=hidden, added_cond_kwargs=added,
                           return_dict=False)[0]
    finally:
        twin.unet.set_attn_processor(original)
    if do_cfg:
        out_u, out_c, out_seg = output.chunk(3)
        return out_u + cfg * (out_c - out_u) + seg_scale * (out_c - out_seg)
    out_c, out_seg = output.chunk(2)
    return out_c + seg_scale * (out_c - out_seg)


def seg_reference(twin: DiffusersTwin, x: torch.Tensor, sigma, positive, negative, cfg: float, seg_scale: float,
                  blur_sigma: float) -> torch.Tensor:
    """The reference SEG step as denoised x0 at the host's (x_VE, sigma) with host CONDITIONINGs."""
    t = twin.timestep(sigma)
    x_vp = twin.to_vp(x.to(torch.float32), sigma)
    cond = twin.cond(positive, x)
    uncond = twin.cond(negative, x) if negative is not None else cond
    return twin.to_x0(x_vp, t, seg_guided_output(twin, x_vp, t, cond, uncond, cfg, seg_scale, blur_sigma))
