"""Self-Attention Guidance (Hong et al., arXiv 2210.00939) in plain torch: no host imports.

Pipeline, as the SAG patch uses it (``patching/sag.py``):
1. in the chosen self-attention layer, ``key_attention_mass(q, k, heads)`` gives the attention mass each
   key token receives (the layer's output is whatever it computed anyway);
2. in x0 space, ``sag_mask`` marks the tokens whose mass exceeds the threshold on the layer's token grid
   (``guidance_core.token_grid``), ``upsample_mask`` lays it on the latent, and ``blur_under_mask`` blurs
   the reference prediction under it;
3. the degraded prediction is re-noised (the host's ``noise_scaling``), the model is run on it, and
   ``sag_guided`` adds the paper's term.
"""
from .attention import key_attention_mass
from .blur import effective_kernel_size, gaussian_blur_2d, gaussian_kernel_1d, validate_kernel_size, validate_sigma
from .guidance import sag_guided
from .mask import MASS_TOLERANCE, blur_under_mask, sag_mask, upsample_mask
from .validation import validate_sag_inputs

__all__ = [
    "MASS_TOLERANCE",
    "blur_under_mask",
    "effective_kernel_size",
    "gaussian_blur_2d",
    "gaussian_kernel_1d",
    "key_attention_mass",
    "sag_guided",
    "sag_mask",
    "upsample_mask",
    "validate_kernel_size",
    "validate_sigma",
    "validate_sag_inputs",
]
