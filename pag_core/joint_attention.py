"""PAG's perturbed self-attention for joint text-image attention (one softmax over text and image tokens),
in plain torch.

diffusers' joint-attention PAG (``PAGJointAttnProcessor2_0`` / ``PAGCFGJointAttnProcessor2_0``,
diffusers/models/attention_processor.py, 0.42) runs the perturbed rows through
``scaled_dot_product_attention`` over the joint sequence ``[image, text]`` with an additive mask that
is -inf on the image-image block except its diagonal and 0 everywhere else. So:

- an image token attends to itself and to every text token (a softmax over those 1 + T keys), never
  to another image token;
- a text token attends to every token, text and image, as without PAG.

With no text tokens (an image-only self-attention) that is the paper's identity map: every token
keeps its own value.

Here the sequence is text first, the order most of the host's DiTs use (``cat(text, image)``); attention is
permutation-equivariant, so the order does not change any token's result, and a sequence ``[image, text]``
is rotated to text first and back (``joint_identity_attention_text_last``). The image rows
are computed from the 1 + T scores they have, in chunks of queries, never from an L x L mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Float32 bytes allowed for one [B, heads, query_chunk, 1 + T] block of image-row scores.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


def additive_mask(mask, like: torch.Tensor):
    """A host attention mask as an additive float mask broadcastable to ``[B, heads, L, L]``.

    The host's attention takes ``[L, L]``, ``[B, L, L]`` or ``[B, heads, L, L]`` masks, additive, or
    boolean with True = attend (comfy/ldm/modules/attention.py, attention_pytorch, 0.3.75).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)}: expected [L, L], [B, L, L] or [B, heads, L, L].")
    return mask.to(device=like.device)


def joint_identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_tokens: int, mask=None,
                             query_chunk: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Joint attention of PAG's perturbed branch, as diffusers' joint-attention PAG processors compute it.

    Args:
        q, k, v: ``[B, heads, L, D]`` (``v`` may have its own ``D``), text tokens at ``[0, text_tokens)``,
            image tokens after them.
        text_tokens: number of text tokens (0 for an image-only self-attention: the output is ``v``).
        mask: the call's own attention mask, if any (see ``additive_mask``); it is added to the scores
            the perturbed rows keep.
        query_chunk: image queries per block; None picks one whose float32 scores fit ``DEFAULT_CHUNK_BYTES``.
        scale: the factor of ``QK^T`` (the caller's own, where it gives one); None is ``1 / sqrt(D)``.

    Returns:
        ``[B, heads, L, Dv]`` in ``q``'s dtype.
    """
    batch, heads, length, dim = q.shape
    if not 0 <= text_tokens <= length:
        raise ValueError(f"text_tokens={text_tokens} must be between 0 and the sequence length {length}.")
    scale = dim ** -0.5 if scale is None else scale
    mask = additive_mask(mask, q)
    out = torch.empty(batch, heads, length, v.shape[-1], dtype=q.dtype, device=q.device)
    if text_tokens:
        text_mask = None if mask is None else mask[..., :text_tokens, :].to(q.dtype)
        out[:, :, :text_tokens] = F.scaled_dot_product_attention(q[:, :, :text_tokens], k, v, attn_mask=text_mask,
                                                                    scale=scale)
    if text_tokens == length:
        return out

    k_text = k[:, :, :text_tokens].float()
    v_text = v[:, :, :text_tokens].float()
    if query_chunk is None:
        query_chunk = max(1, DEFAULT_CHUNK_BYTES // max(1, batch * heads * (text_tokens + 1) * 4))
    for start in range(text_tokens, length, query_chunk):
        stop = min(length, start + query_chunk)
        q_image = q[:, :, start:stop].float()
        own = (q_image * k[:, :, start:stop].float()).sum(-1, keepdim=True) * scale
        to_text = torch.matmul(q_image, k_text.transpose(-1, -2)) * scale
        if mask is not None and mask.shape[-2] == 1:  # one row for every query: a key mask (text padding)
            own = own + mask[..., 0, start:stop].float().unsqueeze(-1)
            to_text = to_text + mask[..., :text_tokens].float()
        elif mask is not None:
            rows = mask[..., start:stop, :].float()
            own = own + torch.diagonal(rows[..., start:stop], dim1=-2, dim2=-1).unsqueeze(-1)
            to_text = to_text + rows[..., :text_tokens]
        probs = torch.cat([own, to_text], dim=-1).softmax(dim=-1)
        image_out = probs[..., :1] * v[:, :, start:stop].float() + torch.matmul(probs[..., 1:], v_text)
        out[:, :, start:stop] = image_out.to(q.dtype)
    return out


def joint_identity_attention_text_last(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_tokens: int,
                                       mask=None, scale: float | None = None) -> torch.Tensor:
    """``joint_identity_attention`` for a sequence with the text after the image tokens (``cat(image, text)``):
    the same rows, computed on the sequence rotated to text first and rotated
    back (attention is permutation-equivariant, so no token's result depends on the order)."""
    if not text_tokens:
        return joint_identity_attention(q, k, v, 0, mask, scale=scale)
    length = q.shape[2]
    mask = additive_mask(mask, q)
    if mask is not None:
        for dim in (-1, -2):
            if mask.shape[dim] == length:
                mask = torch.roll(mask, text_tokens, dims=dim)
    out = joint_identity_attention(*(torch.roll(t, text_tokens, dims=2) for t in (q, k, v)), text_tokens, mask,
                                   scale=scale)
    return torch.roll(out, -text_tokens, dims=2)
