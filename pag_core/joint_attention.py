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

Where only the image tokens query and the keys are ``cat(image, text)`` (an attention that appends the text to
the image's own keys and values), the perturbed rows are those image rows alone
(``image_query_identity_attention``).
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

    _identity_rows(q, k, v, range(text_tokens, length), slice(0, text_tokens), mask, scale, query_chunk, out)
    return out


def _identity_rows(q, k, v, rows: range, text: slice, mask, scale: float, query_chunk: int | None,
                   out: torch.Tensor) -> None:
    """PAG's perturbed image rows into ``out``: query ``i`` of ``rows`` attends to its own key ``i`` and to the text
    keys ``text``, with the call's additive ``mask`` (``[..., queries or 1, keys]``) added to those scores."""
    batch, heads = q.shape[:2]
    text_tokens = text.stop - text.start
    k_text = k[:, :, text].float()
    v_text = v[:, :, text].float()
    if query_chunk is None:
        query_chunk = max(1, DEFAULT_CHUNK_BYTES // max(1, batch * heads * (text_tokens + 1) * 4))
    for start in range(rows.start, rows.stop, query_chunk):
        stop = min(rows.stop, start + query_chunk)
        q_image = q[:, :, start:stop].float()
        own = (q_image * k[:, :, start:stop].float()).sum(-1, keepdim=True) * scale
        to_text = torch.matmul(q_image, k_text.transpose(-1, -2)) * scale
        if mask is not None and mask.shape[-2] == 1:  # one row for every query: a key mask (text padding)
            own = own + mask[..., 0, start:stop].float().unsqueeze(-1)
            to_text = to_text + mask[..., text].float()
        elif mask is not None:
            mask_rows = mask[..., start:stop, :].float()
            own = own + torch.diagonal(mask_rows[..., start:stop], dim1=-2, dim2=-1).unsqueeze(-1)
            to_text = to_text + mask_rows[..., text]
        probs = torch.cat([own, to_text], dim=-1).softmax(dim=-1)
        image_out = probs[..., :1] * v[:, :, start:stop].float() + torch.matmul(probs[..., 1:], v_text)
        out[:, :, start:stop] = image_out.to(q.dtype)


def image_query_identity_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None,
                                   query_chunk: int | None = None, scale: float | None = None) -> torch.Tensor:
    """PAG's perturbed attention where only the image tokens query: ``q`` holds the ``N`` image tokens, ``k`` and
    ``v`` the same ``N`` tokens followed by the text's (``cat(image, text)``). It is the image rows of
    ``joint_identity_attention`` over that sequence: each image query attends to its own key and to the text
    keys, never to another image token (with no text: the paper's identity, every token keeps its value).

    Args:
        q: ``[B, heads, N, D]``; k, v: ``[B, heads, N + T, D]`` (``v`` may have its own ``D``).
        mask: the call's own attention mask, if any (``[..., N or 1, N + T]``, see ``additive_mask``).
        query_chunk, scale: as in ``joint_identity_attention``.

    Returns:
        ``[B, heads, N, Dv]`` in ``q``'s dtype.
    """
    batch, heads, length, dim = q.shape
    if k.shape[2] < length:
        raise ValueError(f"{k.shape[2]} keys cannot begin with the {length} image queries' own tokens.")
    scale = dim ** -0.5 if scale is None else scale
    out = torch.empty(batch, heads, length, v.shape[-1], dtype=q.dtype, device=q.device)
    _identity_rows(q, k, v, range(0, length), slice(length, k.shape[2]), additive_mask(mask, q), scale, query_chunk,
                   out)
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
