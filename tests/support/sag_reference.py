"""Closed-form references for SAG's pipeline, against which the tests check the pack and diffusers.

The pack itself computes only the key mass (``sag_core.key_attention_mass``: a SAG site returns the
attention its layer would have computed anyway), builds its mask on the latent from the recorded map
(``patching.sag``) and re-noises through the host's ``noise_scaling``. These are the textbook forms of
the same steps: attention output and key mass in one pass, the degradation of x0 from a token map, and
the re-noise written out for VE and flow coordinates.
"""
import math

import torch
import torch.nn.functional as F

from attention_guidance.sag_core import blur_under_mask, key_attention_mass, sag_mask


def attention_with_key_mass(q, k, v, heads, query_chunk=None, scale=None):
    """Multi-head attention output (``[B, L, heads * Dv]``, q's dtype) and per-key mass (``[B, K]``, float32),
    the scores in float32 and in blocks of ``query_chunk`` queries."""
    batch, queries, inner = q.shape
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v {tuple(v.shape)} must have the same batch size and token count as k {tuple(k.shape)}.")
    key_mass = key_attention_mass(q, k, heads, query_chunk, scale)
    q_heads = q.reshape(batch, queries, heads, -1).transpose(1, 2).float()
    k_heads = k.reshape(batch, k.shape[1], heads, -1).transpose(1, 2).float()
    v_heads = v.reshape(batch, v.shape[1], heads, -1).transpose(1, 2).float()
    scale = 1.0 / math.sqrt(q_heads.shape[-1]) if scale is None else scale
    chunk = query_chunk or queries
    out = torch.empty(batch, heads, queries, v_heads.shape[-1], dtype=q.dtype, device=q.device)
    for start in range(0, queries, chunk):
        probs = (torch.matmul(q_heads[:, :, start:start + chunk], k_heads.transpose(-1, -2)) * scale).softmax(-1)
        out[:, :, start:start + chunk] = torch.matmul(probs, v_heads).to(q.dtype)
    return out.transpose(1, 2).reshape(batch, queries, -1), key_mass


def upsample_mask(mask, latent_hw):
    """Nearest-neighbour resize of a ``[b, 1, h, w]`` mask to the latent's ``(H, W)`` (F.interpolate default)."""
    return F.interpolate(mask, size=tuple(int(s) for s in latent_hw), mode="nearest")


def sag_degraded_x0(x0, key_mass, grid_hw, threshold=1.0, kernel_size=9, sigma=1.0, tolerance=0.0):
    """The whole SAG degradation of x0 (diffusers' ``sag_masking``): mask from the key mass on the token grid,
    upsampled to the latent, blur under it."""
    if key_mass.shape[0] != x0.shape[0]:
        raise ValueError(
            f"key_mass has {key_mass.shape[0]} rows but x0 has batch {x0.shape[0]}; take the attention rows of "
            "the same cond/uncond chunk as x0."
        )
    mask = upsample_mask(sag_mask(key_mass, grid_hw, threshold, tolerance), x0.shape[-2:])
    return blur_under_mask(x0, mask, kernel_size, sigma)


def _per_sample(sigma, like):
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.numel() == 1:
        return sigma.reshape(())
    return sigma.reshape((-1,) + (1,) * (like.ndim - 1))


def renoise_ve(degraded_x0, x, x0_ref):
    """Re-noise ``degraded_x0`` with the noise of ``x`` in VE coordinates (eps and v models)."""
    # x = x0_ref + sigma * eps  =>  x_deg = degraded_x0 + sigma * eps = x + (degraded_x0 - x0_ref)
    return x + (degraded_x0 - x0_ref)


def renoise_flow(degraded_x0, x, x0_ref, sigma):
    """Re-noise ``degraded_x0`` with the noise of ``x`` for flow models (``x = (1 - sigma) x0 + sigma eps``)."""
    # x_deg = (1 - sigma) * degraded_x0 + sigma * eps = x + (1 - sigma) * (degraded_x0 - x0_ref)
    return x + (1 - _per_sample(sigma, x)) * (degraded_x0 - x0_ref)
