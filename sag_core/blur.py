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
import math

import torch
import torch.nn.functional as F


def validate_kernel_size(kernel_size, name="kernel_size"):
    """Raise ``ValueError`` unless ``kernel_size`` is an odd integer >= 1."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise ValueError(f"{name} must be an odd integer >= 1 (got {kernel_size!r}); use e.g. 9.")
    if kernel_size < 1:
        raise ValueError(f"{name} must be an odd integer >= 1 (got {kernel_size}); use 1 for no blur or e.g. 9.")
    if kernel_size % 2 == 0:
        raise ValueError(
            f"{name} must be odd so the kernel has a centre tap (got {kernel_size}); "
            f"use {kernel_size - 1} or {kernel_size + 1}."
        )


def validate_sigma(sigma, name="sigma"):
    """Raise ``ValueError`` unless ``sigma`` is a finite number >= 0 (0 = no blur)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"{name} must be a number >= 0 (got {sigma!r}); use 0 for no blur or e.g. 1.0.")
    if math.isnan(sigma) or math.isinf(sigma) or sigma < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0 (got {sigma}); use 0 for no blur or a positive value such as 1.0."
        )


def effective_kernel_size(kernel_size, height, width):
    """The kernel size actually used on a ``height x width`` image.

    Reflect padding of ``k // 2`` needs ``k // 2 <= side - 1``, i.e. ``k <= 2 * side - 1`` (always odd),
    so a kernel larger than that is shrunk to it.
    """
    validate_kernel_size(kernel_size)
    return max(1, min(kernel_size, 2 * min(height, width) - 1))


def gaussian_kernel_1d(kernel_size, sigma, dtype=torch.float32, device=None):
    """Normalised 1-D Gaussian taps of length ``kernel_size``, as in diffusers' ``gaussian_blur_2d``.

    The taps are computed in float32 (as diffusers does) and then cast to ``dtype``. ``sigma == 0``
    gives the unit impulse.
    """
    validate_kernel_size(kernel_size)
    validate_sigma(sigma)
    # made on the device itself: a copy from the host would wait for the device at every step
    if sigma == 0:
        taps = torch.zeros(kernel_size, dtype=torch.float32, device=device)
        taps[kernel_size // 2] = 1.0
    else:
        half = (kernel_size - 1) * 0.5
        x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float32, device=device)
        pdf = torch.exp(-0.5 * (x / sigma).pow(2))
        taps = pdf / pdf.sum()
    return taps.to(dtype=dtype)


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
