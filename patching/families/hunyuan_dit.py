"""HunyuanDiT (v1.0 - v1.2): the host's ``HunYuanDiT`` (comfy/ldm/hydit/models.py).

Its blocks (the second half with long skip connections from the first) run a self-attention over the image
tokens (``attn1``, queries and keys rotated by 2-D RoPE), then a cross-attention to the text (``attn2``). The host
(0.3.75) calls the attention without transformer_options and its block replacements get none, so no attention
override reaches it; object patches on each chosen block's ``attn1`` read its queries and keys where its q / k
norms hand them on, rotate them with the host's own RoPE function and the block's frequencies, take its values
from its ``Wqkv`` projection, and give its ``out_proj`` the guided attention (``dit_reach.tapped_attention``). The
token grid is the latent's in 2x2 patches.
"""
from __future__ import annotations

from comfy.ldm.hydit.attn_layers import apply_rotary_emb
from comfy.ldm.hydit.models import HunYuanDiT

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import AttentionTaps, tapped_attention
from .family import Family, KnownModel, published_defaults


def queries_keys_values(module, recorded, args, kwargs):
    """Queries and keys after the q / k norms (``[B, heads, L, D]``) and the RoPE the module's forward gets,
    values from the ``Wqkv`` projection."""
    batch, tokens, width = recorded["Wqkv"].shape
    values = recorded["Wqkv"].reshape(batch, tokens, 3, module.num_heads, -1)[:, :, 2].transpose(1, 2)
    q, k = recorded["q_norm"], recorded["k_norm"]
    frequencies = args[1] if len(args) > 1 else kwargs.get("freqs_cis_img")
    if frequencies is not None:
        q, k = apply_rotary_emb(q, k, frequencies, head_first=True)
    return q, k, values


TAPS = AttentionTaps(attention="attn1", recorded=("Wqkv", "q_norm", "k_norm"), qkv=queries_keys_values,
                     output="out_proj")


def layout(config_name: str, depth: int) -> DiTLayout:
    kinds = [BlockKind(name="block", count=depth, host_path="blocks", diffusers_path="blocks",
                       diffusers_attention="attn1")]
    # diffusers' HunyuanDiT PAG example: pag_applied_layers=[14] of its 40 blocks, pag_scale 3 (the pipeline's
    # signature defaults to blocks.1)
    defaults = published_defaults("block", 14, 14, published_depth=40, depth=depth,
                                  source="diffusers' HunyuanDiT PAG example (HunyuanDiTPAGPipeline: "
                                  "pag_applied_layers=[14] of its 40 blocks)", elsewhere="another HunyuanDiT depth")
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, HunYuanDiT) or not len(diffusion_model.blocks):
        return None
    return layout(config_name, len(diffusion_model.blocks))


FAMILY = Family(
    name="HunyuanDiT",
    host_types=("HunyuanDiT", "HunyuanDiT1"),
    models="HunyuanDiT v1.0 - v1.2",
    recognise=recognise,
    reach=tapped_attention(TAPS),
    layer_examples="'block.14' or 'blocks.14'",
    known_models=(KnownModel(name="HunyuanDiT v1.x DiT-g/2 (40 blocks)", layout=lambda: layout("HunyuanDiT", 40)),),
    notes=("The host runs HunyuanDiT's attention without transformer_options, so the nodes read its queries, keys "
           "and values at its submodules and compute the attention of a chosen block again (the host's own result "
           "there is dropped): one more attention per chosen block and step.",),
)
