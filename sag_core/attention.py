"""The attention mass each key token receives, for the SAG mask.

SAG's mask (diffusers ``sag_masking``, ComfyUI ``create_blur_map``) is
``probs.reshape(b, heads, Q, K).mean(heads).sum(queries)``: per key token, the total softmax weight it
receives from all queries, averaged over heads. Every softmax row sums to 1, so the key mass sums to
``Q`` per image and averages 1.0 per key.

Inputs are laid out as a ComfyUI attention replacement receives them: ``q, k`` of shape
``[B, L, heads * dim_head]``, already projected. The scores are computed in float32 whatever the
input dtype, in chunks of queries, so the ``[B, heads, Q, K]`` matrix is never held at once: only
``[B, heads, query_chunk, K]``.
"""
import math

import torch

# Float32 bytes allowed for one [B, heads, query_chunk, K] block of scores when query_chunk is None.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


def _split_heads(t, heads, name):
    if t.ndim != 3:
        raise ValueError(f"{name} must have shape [batch, tokens, heads * dim_head] (got {tuple(t.shape)}).")
    if t.shape[-1] % heads != 0:
        raise ValueError(
            f"{name} has {t.shape[-1]} channels, which is not divisible by heads={heads}; "
            "pass the layer's own head count (extra_options['n_heads'])."
        )
    b, length, inner = t.shape
    return t.reshape(b, length, heads, inner // heads).transpose(1, 2)


def _check_inputs(q, k, heads, query_chunk):
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive integer (got {heads!r}); pass extra_options['n_heads'].")
    if query_chunk is not None and (
        isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1
    ):
        raise ValueError(f"query_chunk must be a positive integer or None for automatic (got {query_chunk!r}).")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same batch size and channel count."
        )


def _query_chunk(query_chunk, batch, heads, queries, keys):
    if query_chunk is not None:
        return query_chunk
    per_query = max(1, batch * heads * keys * 4)
    return max(1, min(queries, DEFAULT_CHUNK_BYTES // per_query))


def key_attention_mass(q, k, heads, query_chunk=None, scale=None):
    """Per-key attention mass ``[B, K]`` (float32): the softmax weight each key receives from all queries,
    summed over queries and averaged over heads (diffusers' ``sag_masking``, ComfyUI's ``create_blur_map``).

    Args:
        q, k: ``[B, L, heads * dim_head]``.
        heads: number of heads.
        query_chunk: queries per block; ``None`` picks the largest block whose float32 scores fit in
            ``DEFAULT_CHUNK_BYTES``.
        scale: the factor of ``QK^T`` (the caller's own, where it gives one); None is ``1 / sqrt(dim_head)``.
    """
    _check_inputs(q, k, heads, query_chunk)
    q_heads = _split_heads(q, heads, "q")
    k_heads = _split_heads(k, heads, "k").float()
    batch, _, queries, dim_head = q_heads.shape
    keys = k_heads.shape[2]
    scale = 1.0 / math.sqrt(dim_head) if scale is None else scale
    chunk = _query_chunk(query_chunk, batch, heads, queries, keys)
    key_mass = torch.zeros(batch, heads, keys, dtype=torch.float32, device=q.device)
    for start in range(0, queries, chunk):
        scores = torch.matmul(q_heads[:, :, start:start + chunk].float(), k_heads.transpose(-1, -2)) * scale
        key_mass += scores.softmax(dim=-1).sum(dim=2)
    return key_mass.mean(dim=1)
