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

from .compiled_model import keep_apart_when_compiled, outside_compiled
from .options import ATTN1_REPLACEMENTS, guidance_options

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
    keep_apart_when_compiled(model, unet_transformer_blocks(model), outside_compiled(attention_at_live_site))
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
            covered = [block + (i,) for i in indices if len(key) == 2 or key[2] == i]
            if guard is None:
                handler = outside_compiled(make_handler(previous[key]))
            else:
                handler = guard.attn1(make_handler, previous[key], covered)
            model.set_model_attn1_replace(at_own_sites(handler, covered), *key)


def at_own_sites(handler: AttentionFn, sites: list) -> AttentionFn:
    """``handler`` where the host calls it at one of ``sites`` ((block, id, transformer index)); elsewhere what
    the host runs there: the forward's replacement for that site, or the host's attention.

    Compiled with the guards on transformer_options dropped (compiled_model), the code dynamo traced for one
    transformer block also runs other blocks of the same shapes, with the replacement it looked up at the first
    (BasicTransformerBlock reads the block and its index from transformer_options); the block and index in
    ``extra_options`` are this call's own.
    """
    own = frozenset(sites)

    def attention_guidance_site(q, k, v, extra_options, **kwargs):
        block = extra_options.get("block")
        if block is None or ATTN1_REPLACEMENTS not in guidance_options(extra_options):
            return handler(q, k, v, extra_options, **kwargs)
        if (block[0], block[1], extra_options.get("block_index", 0)) in own:
            return handler(q, k, v, extra_options, **kwargs)
        return attention_at_live_site(q, k, v, extra_options, **kwargs)

    site_handler = outside_compiled(attention_guidance_site)
    # what the handler is marked with (displacement.DisplacementGuard: whose handler it is, what it calls)
    for name, value in vars(handler).items():
        if name.startswith("attention_guidance"):
            setattr(site_handler, name, value)
    return site_handler


def attention_at_live_site(q, k, v, extra_options, **kwargs):
    """What the host runs at the block this call comes from (``extra_options``' block and index, this call's own):
    the forward's attn1 replacement for that site (``ATTN1_REPLACEMENTS``), or the host's attention."""
    block = extra_options["block"]
    site = (block[0], block[1], extra_options.get("block_index", 0))
    replacements = guidance_options(extra_options).get(ATTN1_REPLACEMENTS, {})
    there = replacements.get(site, replacements.get(site[:2]))
    if there is None:
        return host_attention(q, k, v, extra_options, **kwargs)
    return there(q, k, v, extra_options, **kwargs)


def unet_transformer_blocks(model) -> list[tuple]:
    """The host's ``(block, id)`` of every UNet block with a SpatialTransformer."""
    from comfy.ldm.modules.attention import SpatialTransformer

    diffusion_model = model.get_model_object("diffusion_model")
    stacks = (("input", diffusion_model.input_blocks), ("middle", [diffusion_model.middle_block]),
              ("output", diffusion_model.output_blocks))
    return [(name, i) for name, blocks in stacks for i, block in enumerate(blocks)
            if any(isinstance(module, SpatialTransformer) for module in block)]
