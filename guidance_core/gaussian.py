"""Normalised Gaussian taps, the kernel SAG's latent blur and SEG's query blur share.

Taps at ``linspace(-(k-1)/2, (k-1)/2, k)``, a normalised Gaussian pdf, computed in float32: diffusers'
``gaussian_blur_2d`` (``pipeline_stable_diffusion_sag.py``) and SEG-SDXL's ``gaussian_blur_2d`` alike.
"""
import math

import torch


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
