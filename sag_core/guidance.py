"""SAG guidance in the host's denoised (x0) space, and the re-noising of the degraded x0.

Notation: ``x`` the sampler's input at noise level ``sigma``; ``x0_ref`` the denoised prediction of the
branch SAG degrades (uncond with CFG, cond without); ``degraded_x0`` its blurred-under-mask version
(``mask.blur_under_mask``); ``x_deg`` = ``degraded_x0`` re-noised with the same noise as ``x``;
``degraded_denoised`` the model's denoised prediction at ``x_deg``; ``cfg_x0`` the CFG result.

Paper (Hong et al. 2210.00939, Eq. 25 with CFG) in noise space:
``eps_final = eps_cfg + s * (eps_ref - eps(x_deg))``, with ``x_deg`` built from ``eps_ref``.

Same thing in x0 space. For any parameterisation ``x = a(sigma) * x0 + b(sigma) * eps`` (VP, VE, flow):
``x0 = (x - b eps) / a``, so ``x0_final = cfg_x0 - s * (b / a) * (eps_ref - eps_deg)``. The re-noise uses
``eps_ref``: ``x_deg = a * degraded_x0 + b * eps_ref``, hence
``degraded_denoised = (x_deg - b eps_deg) / a = degraded_x0 + (b / a) * (eps_ref - eps_deg)``, and

    x0_final = cfg_x0 + s * (degraded_x0 - degraded_denoised)          (``sag_guided``)

For epsilon models this is exactly diffusers' ``StableDiffusionSAGPipeline`` and ComfyUI core's
``cfg_result + (degraded - sag) * scale``.

v-prediction: diffusers adds ``s * (v_ref - v_deg)`` to the *v* output instead. With ``abar =
alphas_cumprod[t] = 1 / (1 + sigma^2)`` and VP ``x0 = sqrt(abar) x - sqrt(1 - abar) v`` that is
``x0_final = cfg_x0 + s * (abar * degraded_x0 + (1 - abar) * x0_ref - degraded_denoised)``, i.e. the
paper's term minus ``s * (1 - abar) * (x0_ref - degraded_x0)``. This pack follows the paper
(noise-space guidance, the formula above) for every parameterisation; it therefore differs from
diffusers on v-prediction models by that term (up to 0.85 in the reference notes' tiny model).

Re-noising, in the patch (``patching/sag.py``): recover the noise of ``x`` through the model's own parameterisation and
call the host's ``model_sampling.noise_scaling(sigma, eps_ref, degraded_x0)``. Written out:

- eps / v models (ComfyUI's VE coordinates ``x = x0 + sigma * eps``, ``x_VE = x_VP / sqrt(abar)``,
  ``sigma = sqrt((1 - abar) / abar)``): ``eps_ref = (x - x0_ref) / sigma`` and
  ``x_deg = x + (degraded_x0 - x0_ref)`` (ComfyUI core's ``degraded + x - uncond_pred``).
- flow models (ComfyUI ``CONST``: ``x = (1 - sigma) * x0 + sigma * eps``):
  ``eps_ref = (x - (1 - sigma) * x0_ref) / sigma`` and
  ``x_deg = x + (1 - sigma) * (degraded_x0 - x0_ref)``. The VE form would be off
  by ``sigma * (degraded_x0 - x0_ref)`` there.
"""


def sag_guided(cfg_x0, degraded_x0, degraded_denoised, scale):
    """SAG applied to the CFG result in x0 space: ``cfg_x0 + scale * (degraded_x0 - degraded_denoised)``."""
    # Paper Eq. 25 (eps_cfg + s * (eps_ref - eps(x_deg))) rewritten in x0 space, see the module docstring.
    return cfg_x0 + scale * (degraded_x0 - degraded_denoised)
