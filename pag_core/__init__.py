"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377) in plain torch."""
from .guidance import adaptive_pag_scale, identity_attention, pag_guided, rescale_guided, validate_pag_inputs
from .joint_attention import (
    image_first_to_text_first, joint_identity_attention, mask_image_first_to_text_first, text_first_to_image_first,
)

__all__ = [
    "adaptive_pag_scale",
    "identity_attention",
    "image_first_to_text_first",
    "joint_identity_attention",
    "mask_image_first_to_text_first",
    "pag_guided",
    "rescale_guided",
    "text_first_to_image_first",
    "validate_pag_inputs",
]
