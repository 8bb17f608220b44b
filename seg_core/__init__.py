"""Smoothed Energy Guidance (Hong, NeurIPS 2024, arXiv 2408.00760) in plain torch: no host imports.

SEG's perturbed prediction is the positive one with the queries of chosen self-attention layers
blurred over the image's token grid (``blur_queries``); the guidance itself is PAG's formula
(``pag_core.pag_guided``).
"""
from .queries import (
    INFINITE_BLUR_SIGMA, blur_queries, grid_kernel_size, is_infinite_blur, seg_kernel_size, validate_seg_inputs,
)

__all__ = [
    "INFINITE_BLUR_SIGMA",
    "blur_queries",
    "grid_kernel_size",
    "is_infinite_blur",
    "seg_kernel_size",
    "validate_seg_inputs",
]
