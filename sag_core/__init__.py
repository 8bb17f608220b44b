"""Self-Attention Guidance (Hong et al., arXiv 2210.00939) in plain torch: no host imports.

Pipeline, as the SAG node uses it:
1. in the chosen self-attention layer, ``attention_with_key_mass(q, k, v, heads)`` gives the layer
   output and the attention mass each key token receives (``key_attention_mass`` for the mass alone);
2. in x0 space, ``sag_degraded_x0(x0_ref, key_mass, grid_hw, threshold, kernel_size, sigma)`` blurs
   the reference prediction where that mass exceeds ``threshold`` (``guidance_core.layer_grid.token_grid``
   gives ``grid_hw`` from ComfyUI's ``activations_shape``);
3. re-noise it (``renoise_ve`` / ``renoise_flow``, or the host's ``noise_scaling``), run the model on
   it, and combine with ``sag_guided``.
"""
from .attention import attention_with_key_mass, key_attention_mass
from .blur import effective_kernel_size, gaussian_blur_2d, gaussian_kernel_1d, validate_kernel_size, validate_sigma
from .guidance import renoise_flow, renoise_ve, sag_guided
from .mask import MASS_TOLERANCE, blur_under_mask, sag_degraded_x0, sag_mask, upsample_mask
from .validation import validate_sag_inputs

__all__ = [
    "MASS_TOLERANCE",
    "attention_with_key_mass",
    "blur_under_mask",
    "effective_kernel_size",
    "gaussian_blur_2d",
    "gaussian_kernel_1d",
    "key_attention_mass",
    "renoise_flow",
    "renoise_ve",
    "sag_degraded_x0",
    "sag_guided",
    "sag_mask",
    "upsample_mask",
    "validate_kernel_size",
    "validate_sag_inputs",
    "validate_sigma",
]
