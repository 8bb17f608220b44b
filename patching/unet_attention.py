"""Our handlers at a UNet's attn1 sites, chained so that every patch keeps its effect.

The host keeps one attn1 replacement per key and looks up ``(block, id, transformer_index)``
before ``(block, id)`` (comfy/ldm/modules/attention.py, BasicTransformerBlock.forward, 0.3.75).
We always register the 3-tuple key and call whatever was there before (ours or another pack's,
under either key), so two guidance nodes on one layer, or ours over another pack's replacement,
all act. ComfyUI's own SAG + PAG pair loses PAG because SAG's 3-tuple key shadows PAG's 2-tuple.
"""
from __future__ import annotations

from typing import Callable

import comfy.ldm.modules.attention

AttentionFn = Callable[..., "torch.Tensor"]  # noqa: F821


def host_attention(q, k, v, extra_options, **kwargs):
    """What the host would have computed at this site without any replacement."""
    return comfy.ldm.modules.attention.optimized_attention(
        q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
        transformer_options=extra_options,
    )


def attn1_replacements(model) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})


def require_own_queries(q, k, extra_options: dict, label: str) -> None:
    """Stop with a message naming the conflict where another patch re-laid this layer's queries.

    HyperTile (tiles, at random per call) and ToMe (merges tokens) rewrite the queries of the
    highest-resolution attn1 layers in an attn1_patch and leave keys and values as they were; the
    host's attention pairs them up by reshaping (comfy_extras/nodes_hypertile.py, nodes_tomesd.py,
    0.3.75). Identity attention and SAG's map need one query per token of the layer's own grid.
    """
    if tuple(q.shape[:2]) == tuple(k.shape[:2]):
        return
    block = extra_options.get("block") or ("?", "?")
    raise RuntimeError(
        f"{label}: at {block[0]} block {block[1]}, transformer {extra_options.get('block_index', 0)}, another model "
        f"patch has changed this layer's queries ({q.shape[0]} rows of {q.shape[1]} tokens against keys of "
        f"{k.shape[0]} rows of {k.shape[1]} tokens), as HyperTile and ToMe do at the highest-resolution layers. "
        "Choose a lower-resolution layer (e.g. 'mid'), or lower HyperTile's max_depth or remove ToMe so that "
        "they leave this layer alone."
    )


def install_site_handler(model, sites, make_handler: Callable[[AttentionFn], AttentionFn], guard=None) -> None:
    """Replace attn1 at the given sites by ``make_handler(previous)``; the handler must call
    ``previous`` (with narrowed extra_options) for every row it does not handle itself. With ``guard`` (a
    ``displacement.DisplacementGuard``) the handler keeps acting where a later patch replaces it.

    A site set covering a whole SpatialTransformer is registered under the host's 2-tuple key
    ``(block, id)``, so a patch another node puts on that same key at run time (the host's PAG does,
    inside its own extra pass) replaces ours there instead of being shadowed by a 3-tuple key; any
    3-tuple entries already on the model are wrapped too. A partial set uses 3-tuple keys.
    """
    replacements = attn1_replacements(model)
    modules: dict = {}
    for site in sites:
        modules.setdefault(site.module, []).append(site.transformer_index)
    for module, indices in modules.items():
        block = (module.block, module.block_id)
        if len(indices) == module.depth:
            keys = [block] + [block + (i,) for i in range(module.depth) if block + (i,) in replacements]
        else:
            keys = [block + (i,) for i in indices]
        previous = {key: replacements.get(key, replacements.get(block, host_attention)) for key in keys}
        for key in keys:
            if guard is None:
                handler = make_handler(previous[key])
            else:
                covered = [block + (i,) for i in indices if len(key) == 2 or key[2] == i]
                handler = guard.attn1(make_handler, previous[key], covered)
            model.set_model_attn1_replace(handler, *key)
