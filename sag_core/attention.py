"""Self-attention together with the attention mass each key receives, for the SAG mask.

SAG's mask (diffusers ``sag_masking``, ComfyUI ``create_blur_map``) is
``probs.reshape(b, heads, Q, K).mean(heads).sum(queries)``: per key token, the total softmax weight it
receives from all queries, averaged over heads. Every softmax row sums to 1, so the key mass sums to
``Q`` per image and averages 1.0 per key.

Inputs are laid out as a ComfyUI attention replacement receives them: ``q, k, v`` of shape
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


def _attention(q, k, v, heads, query_chunk, with_output, scale=None):
    _check_inputs(q, k, heads, query_chunk)
    q_heads = _split_heads(q, heads, "q")
    k_heads = _split_heads(k, heads, "k").float()
    batch, _, queries, dim_head = q_heads.shape
    keys = k_heads.shape[2]
    scale = 1.0 / math.sqrt(dim_head) if scale is None else scale
    chunk = _query_chunk(query_chunk, batch, heads, queries, keys)

    key_mass = torch.zeros(batch, heads, keys, dtype=torch.float32, device=q.device)
    if with_output:
        if v.shape[:2] != k.shape[:2]:
            raise ValueError(f"v {tuple(v.shape)} must have the same batch size and token count as k {tuple(k.shape)}.")
        v_heads = _split_heads(v, heads, "v").float()
        out = torch.empty(batch, heads, queries, v_heads.shape[-1], dtype=q.dtype, device=q.device)
    for start in range(0, queries, chunk):
        scores = torch.matmul(q_heads[:, :, start:start + chunk].float(), k_heads.transpose(-1, -2)) * scale
        probs = scores.softmax(dim=-1)
        key_mass += probs.sum(dim=2)
        if with_output:
            out[:, :, start:start + chunk] = torch.matmul(probs, v_heads).to(q.dtype)
    key_mass = key_mass.mean(dim=1)
    if not with_output:
        return key_mass
    return out.transpose(1, 2).reshape(batch, queries, -1), key_mass


def attention_with_key_mass(q, k, v, heads, query_chunk=None, scale=None):
    """Multi-head attention output and per-key attention mass in one pass.

    Args:
        q, k, v: ``[B, L, heads * dim_head]`` (``v`` may have its own ``dim_head``).
        heads: number of heads.
        query_chunk: queries per block; ``None`` picks the largest block whose float32 scores fit in
            ``DEFAULT_CHUNK_BYTES``. The results do not depend on it beyond float rounding.
        scale: the factor of ``q k^T`` where the caller gives its own; None is ``1 / sqrt(dim_head)``.

    Returns:
        ``(out, key_mass)``: ``out`` is ``softmax(q k^T / sqrt(dim_head)) v`` as ``[B, Lq, heads * dim_v]``
        in ``q``'s dtype; ``key_mass`` is float32 ``[B, Lk]``, the mean over heads of the sum over
        queries of the softmax probabilities.
    """
    return _attention(q, k, v, heads, query_chunk, with_output=True, scale=scale)


def key_attention_mass(q, k, heads, query_chunk=None, scale=None):
    """Only the float32 ``[B, Lk]`` key mass of ``attention_with_key_mass``."""
    return _attention(q, k, None, heads, query_chunk, with_output=False, scale=scale)
