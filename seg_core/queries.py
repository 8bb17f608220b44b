"""SEG's query blur (paper Sec. 3.2, Prop. 3.1: blurring the queries blurs the attention's energy, the
logits ``QK^T``, at linear cost), as the reference ``SEGCFGSelfAttnProcessor`` computes it
(SusungHong/SEG-SDXL ``pipeline_seg.py``):

- a Gaussian of width sigma with ``k = ceil(6 sigma) + 1`` taps, made odd, at integer offsets
  ``linspace(-(k-1)/2, (k-1)/2, k)``, normalised; reflect padding of ``k // 2``; each query channel
  blurred on its own over the image's ``h x w`` token grid;
- sigma above the reference's threshold (9999, diffusers' ``seg_blur_threshold_inf``) is the infinite
  blur: every query becomes the mean query of the grid.

Where the reference leaves things open:

- It reads the grid as ``isqrt(tokens)`` squared; here the grid is the layer's own ``(h, w)``, so any
  aspect ratio and odd sizes are blurred where their tokens are, and on video each frame on its own.
- It clamps the kernel to the map, ``min(k, side - (side % 2 - 1))`` (the side if odd, side + 1 if even,
  the largest odd size whose reflect padding fits), with the same sigma and the taps renormalised. Here
  that clamp is applied per axis: on a square grid it is the reference's kernel, on a non-square grid
  each axis gets the largest kernel its side allows. A side of 1 is not blurred along that axis.
- sigma at exactly 9999 counts as infinite here (the reference's test is ``sigma > 9999``; at 9999
  its clamped finite kernel is already a near-flat box filter).
- sigma so small that ``k`` is 1 (sigma <= 1/6) would blur nothing (and the reference divides 0 by 0
  at sigma 0): ``validate_seg_inputs`` refuses it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..guidance_core.gaussian import gaussian_kernel_1d

# reference SEGCFGSelfAttnProcessor(inf_blur_threshold=9999.0); diffusers' seg_blur_threshold_inf
INFINITE_BLUR_SIGMA = 9999.0


def is_infinite_blur(sigma: float) -> bool:
    return sigma >= INFINITE_BLUR_SIGMA


def seg_kernel_size(sigma: float) -> int:
    # reference pipeline_seg.py: ceil(6 sigma) + 1 - ceil(6 sigma) % 2 (odd)
    extent = math.ceil(6 * sigma)
    return extent + 1 - extent % 2


def grid_kernel_size(kernel_size: int, side: int) -> int:
    # reference gaussian_blur_2d: min(k, side - (side % 2 - 1)), the largest odd size reflect padding allows
    return min(kernel_size, side + 1 - side % 2)


def validate_seg_inputs(scale: float, blur_sigma: float) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 0.0 <= scale <= 100.0):
        raise ValueError(f"SEG scale is {scale}; it must be a number from 0.0 to 100.0 (3.0 is the paper's setting).")
    if not (isinstance(blur_sigma, (int, float)) and not math.isnan(blur_sigma) and blur_sigma >= 0):
        raise ValueError(f"SEG blur_sigma is {blur_sigma}; it must be a number >= 0 (9999 or more is the infinite "
                         "blur, the paper's best setting).")
    if math.isfinite(blur_sigma) and seg_kernel_size(blur_sigma) <= 1:
        raise ValueError(
            f"SEG blur_sigma is {blur_sigma}: its Gaussian kernel (ceil(6 sigma) + 1, odd) has one tap, so the "
            "queries would not be blurred and SEG would change nothing. Use more than 1/6: the paper's settings "
            "are 1, 2, 5, 10 and 9999 or more (infinite blur)."
        )


def _blur_planes(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[N, 1, h, w]`` blurred along each axis with the reference kernel clamped to that axis."""
    height, width = planes.shape[-2:]
    kernel_size = seg_kernel_size(sigma)
    size_h, size_w = grid_kernel_size(kernel_size, height), grid_kernel_size(kernel_size, width)
    if size_h > 1:
        taps = gaussian_kernel_1d(size_h, sigma, device=planes.device)
        planes = F.conv2d(F.pad(planes, [0, 0, size_h // 2, size_h // 2], mode="reflect"), taps.view(1, 1, -1, 1))
    if size_w > 1:
        taps = gaussian_kernel_1d(size_w, sigma, device=planes.device)
        planes = F.conv2d(F.pad(planes, [size_w // 2, size_w // 2, 0, 0], mode="reflect"), taps.view(1, 1, 1, -1))
    return planes


def blur_queries(queries: torch.Tensor, grid: Sequence[int], sigma: float, frames: int = 1) -> torch.Tensor:
    """SEG's smoothed queries.

    Args:
        queries: ``[..., frames * h * w, C]`` image queries, tokens row-major per frame, frames one after
            another (``[B, L, heads * D]`` or ``[B, heads, L, D]``: every channel is blurred on its own).
        grid: ``(h, w)``, the layer's token grid of one frame.
        sigma: blur width in tokens; ``is_infinite_blur(sigma)`` gives every token the frame's mean query.
        frames: frames of a video layout; each is blurred on its own.

    Returns:
        A new tensor of ``queries``' shape and dtype (half precision is blurred in float32).
    """
    height, width = (int(s) for s in grid)
    *lead, tokens, channels = queries.shape
    if tokens != frames * height * width:
        raise ValueError(
            f"SEG: {tokens} image queries do not fill {frames} frame(s) of the {height}x{width} token grid "
            f"({frames * height * width} tokens)."
        )
    per_frame = queries.reshape(*lead, frames, height * width, channels)
    if is_infinite_blur(sigma):
        return per_frame.mean(dim=-2, keepdim=True).expand_as(per_frame).reshape(queries.shape).clone()
    compute_dtype = queries.dtype if queries.dtype in (torch.float32, torch.float64) else torch.float32
    planes = per_frame.movedim(-1, -2).reshape(-1, 1, height, width).to(compute_dtype)
    planes = _blur_planes(planes, sigma)
    blurred = planes.reshape(*lead, frames, channels, height * width).movedim(-1, -2)
    return blurred.reshape(queries.shape).to(queries.dtype)
