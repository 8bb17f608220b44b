"""Separable Gaussian blur of latents, as SAG uses it.

The kernel and padding are diffusers' ``gaussian_blur_2d`` (``pipeline_stable_diffusion_sag.py``):
taps at ``linspace(-(k-1)/2, (k-1)/2, k)``, a normalised Gaussian pdf, reflect padding of ``k // 2``
and a depthwise convolution. Here the 2-D kernel (the outer product of the 1-D taps) is applied as
two 1-D passes, which is the same sum.

Two cases diffusers leaves undefined are defined here:

- ``sigma == 0`` or ``kernel_size == 1`` is the identity (diffusers divides by ``sigma``).
- Reflect padding needs ``k // 2 < side``. A latent too small for the kernel is blurred with the
  largest odd kernel the padding allows, ``min(kernel_size, 2 * min(H, W) - 1)``, same sigma, taps
  renormalised (see ``effective_kernel_size``). A side of 1 gives kernel 1, the identity.
"""
import torch
import torch.nn.functional as F

from ..guidance_core.gaussian import gaussian_kernel_1d, validate_kernel_size, validate_sigma

__all__ = ["effective_kernel_size", "gaussian_blur_2d", "gaussian_kernel_1d", "validate_kernel_size", "validate_sigma"]


def effective_kernel_size(kernel_size, height, width):
    """The kernel size actually used on a ``height x width`` image.

    Reflect padding of ``k // 2`` needs ``k // 2 <= side - 1``, i.e. ``k <= 2 * side - 1`` (always odd),
    so a kernel larger than that is shrunk to it.
    """
    validate_kernel_size(kernel_size)
    return max(1, min(kernel_size, 2 * min(height, width) - 1))


def gaussian_blur_2d(x, kernel_size, sigma):
    """Blur the last two dimensions of ``x`` (``[..., H, W]``, any leading shape) with a Gaussian.

    Matches diffusers' ``gaussian_blur_2d`` wherever that is defined (odd kernel, ``sigma > 0``,
    ``kernel_size // 2 < min(H, W)``); see the module docstring for the other cases.
    Half-precision inputs are blurred in float32 and returned in their own dtype.
    """
    validate_kernel_size(kernel_size)
    validate_sigma(sigma)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions [..., H, W] to blur (got shape {tuple(x.shape)}).")
    height, width = x.shape[-2:]
    if height == 0 or width == 0 or x.numel() == 0:
        return x.clone()
    kernel_size = effective_kernel_size(kernel_size, height, width)
    if kernel_size == 1 or sigma == 0:
        return x.clone()

    compute_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    taps = gaussian_kernel_1d(kernel_size, sigma, dtype=compute_dtype, device=x.device)
    pad = kernel_size // 2
    planes = x.reshape(-1, 1, height, width).to(compute_dtype)
    planes = F.pad(planes, [pad, pad, pad, pad], mode="reflect")
    planes = F.conv2d(planes, taps.view(1, 1, kernel_size, 1))
    planes = F.conv2d(planes, taps.view(1, 1, 1, kernel_size))
    return planes.reshape(x.shape).to(x.dtype)
