"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377) in plain torch."""
from .guidance import adaptive_pag_scale, identity_attention, pag_guided, rescale_guided, validate_pag_inputs
from .joint_attention import image_query_identity_attention, joint_identity_attention, joint_identity_attention_text_last

__all__ = [
    "adaptive_pag_scale",
    "identity_attention",
    "image_query_identity_attention",
    "joint_identity_attention",
    "joint_identity_attention_text_last",
    "pag_guided",
    "rescale_guided",
    "validate_pag_inputs",
]
