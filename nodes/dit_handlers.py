"""What PAG, SEG and SAG do inside a chosen DiT block (see dit_attention for how they get there)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..guidance_core.rows import chunk_rows
from ..pag_core import joint_identity_attention, joint_identity_attention_text_last
from ..sag_core import key_attention_mass
from ..seg_core import blur_queries
from .attention_sites import guidance_options
from .dit_attention import DiTAttention


def perturbed_copy_handler(instance: str, perturbing: Callable[[], None], perturb: Callable[[DiTAttention], torch.Tensor]):
    """The rows of the chunk tagged for ``instance`` get ``perturb(part)``; every other row gets the attention
    it would have had. ``perturbing()`` is called whenever it computes them."""

    def handler(call: DiTAttention):
        cond_id = guidance_options(call.options).get("perturbed", {}).get(instance)
        if cond_id is None or cond_id not in call.chunks:
            return call.run()

        perturbing()
        return call.split(lambda c: c == cond_id, perturb, lambda part: part.run())

    return handler


def joint_identity(part: DiTAttention) -> torch.Tensor:
    """PAG: diffusers' SD3 PAG attention (each image token attends to itself and the text, text tokens to
    everything; ``joint_identity_attention``), also where the image comes before the text (HiDream, HunyuanVideo)."""
    attention = joint_identity_attention_text_last if part.image_first else joint_identity_attention
    return part.from_heads(attention(part.q_heads(), part.k_heads(), part.v_heads(), part.text_tokens, part.mask,
                                     scale=part.scale))


def smoothed_queries(blur_sigma: float):
    """SEG: the call's own attention with the generated image's queries blurred on its token grid (per frame
    where the grid has a time axis); text queries and reference-image tokens (Flux Kontext, Qwen-Image-Edit)
    keep theirs. SD3.5's image-only ``attn2`` has no text tokens: all its queries are the image's."""

    def perturb(part: DiTAttention) -> torch.Tensor:
        *frames, height, width = part.image_grid()
        frames = math.prod(frames)
        image = part.image_tokens_of_grid()
        q = part.q_heads().clone()
        q[:, :, image] = blur_queries(q[:, :, image], (height, width), blur_sigma, frames)
        return part.with_queries(q).run()

    return perturb


def _flat(t):
    """``[B, heads, L, D]`` -> ``[B, L, heads * D]``, the layout ``key_attention_mass`` takes."""
    batch, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * dim)


def key_mass_recorder(instance: str, record_option: str, records: dict, make_record):
    """SAG: the call's output untouched, plus, for the rows of the chunks tagged ``record_option`` for
    ``instance``, the attention mass each image token receives from the image tokens, stored as
    ``records[entry uuid] = make_record(mass [B, h * w], (h, w))`` (on a video DiT ``[B, t * h * w]`` on
    ``(t, h, w)``: every space-time token of the video, the map over the whole video's self-attention).

    Text tokens are left out: the mass is that of the joint attention probabilities of image queries
    over image keys, renormalised per query (the same as a softmax over the image keys alone), so it
    averages 1.0 per key as in a UNet and the threshold keeps its meaning. Only the generated image's
    ``h x w`` grid counts (not Flux Kontext's reference tokens); SD3.5's image-only ``attn2`` is not
    recorded, the block's joint attention is.
    """

    def handler(call: DiTAttention):
        out = call.run()
        ref_id = guidance_options(call.options).get(record_option, {}).get(instance)
        chunks = call.chunks
        positions = [i for i, c in enumerate(chunks) if c == ref_id]
        if ref_id is None or not positions or not call.joint:
            return out
        grid = call.image_grid()
        image = call.image_tokens_of_grid()
        rows = chunk_rows(chunks, positions, call.q.shape[0], call.q.device)
        q, k = call.q_heads()[rows][:, :, image], call.k_heads()[rows][:, :, image]
        with torch.profiler.record_function("attention_guidance.sag_key_mass"):
            mass = key_attention_mass(_flat(q), _flat(k), q.shape[1], scale=call.scale)
        size = call.q.shape[0] // len(chunks)
        uuids = call.options.get("uuids") or [None] * len(chunks)
        for n, position in enumerate(positions):
            key = uuids[position] if uuids[position] is not None else position
            records[key] = make_record(mass[n * size:(n + 1) * size], grid)
        return out

    return handler
