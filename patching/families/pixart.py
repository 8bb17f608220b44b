"""PixArt Alpha and PixArt Sigma: the host's ``PixArtMS`` (comfy/ldm/pixart/pixartms.py).

Each block runs a self-attention over the image tokens (``attn``), then a cross-attention to the T5 text
(``cross_attn``). The host (0.3.75, and 0.38.x) calls the self-attention without transformer_options and runs the
blocks without them, so no attention override reaches it; object patches on each chosen block's ``attn`` read
its queries and keys where its q / k norms hand them on (an identity where the model has no qk-norm), its values
from its ``qkv`` projection, and give its ``proj`` the guided attention (``dit_reach.tapped_attention``). The token
grid is the latent's in 2x2 patches.
"""
from __future__ import annotations

from comfy.ldm.pixart.pixartms import PixArtMS

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import AttentionTaps, tapped_attention
from .family import Family, KnownModel, published_defaults


def _heads(t, heads):
    """``[B, L, heads * D]`` as ``[B, heads, L, D]``."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def queries_keys_values(module, recorded, args, kwargs):
    """The self-attention's queries and keys after its q / k norms, its values the third of its qkv projection."""
    batch, tokens, width = recorded["qkv"].shape
    values = recorded["qkv"].reshape(batch, tokens, 3, width // 3)[:, :, 2]
    return (_heads(recorded["q_norm"], module.num_heads), _heads(recorded["k_norm"], module.num_heads),
            _heads(values, module.num_heads))


def compressed_keys(module) -> str | None:
    ratio = getattr(module, "sr_ratio", 1)
    if ratio > 1:
        return (f"its keys and values are compressed {ratio}x (PixArt's KV compression), so its attention is not "
                "over the image's own tokens")
    return None


TAPS = AttentionTaps(attention="attn", recorded=("qkv", "q_norm", "k_norm"), qkv=queries_keys_values, output="proj",
                     check=compressed_keys)


def layout(config_name: str, depth: int) -> DiTLayout:
    kinds = [BlockKind(name="block", count=depth, host_path="blocks", diffusers_path="transformer_blocks",
                       diffusers_attention="attn1")]
    # diffusers' PixArt-Sigma PAG example: pag_applied_layers=["blocks.14"] of its 28 blocks, pag_scale 4.0
    # (the pipeline's signature defaults to blocks.1)
    defaults = published_defaults("block", 14, 14, published_depth=28, depth=depth,
                                  source="diffusers' PixArt-Sigma PAG example (PixArtSigmaPAGPipeline: "
                                  "pag_applied_layers=['blocks.14'] of its 28 blocks)",
                                  elsewhere="another PixArt depth")
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, PixArtMS) or not len(diffusion_model.blocks):
        return None
    return layout(config_name, len(diffusion_model.blocks))


FAMILY = Family(
    name="PixArt",
    host_types=("PixArtAlpha", "PixArtSigma"),
    models="PixArt Alpha, PixArt Sigma",
    recognise=recognise,
    reach=tapped_attention(TAPS),
    layer_examples="'block.14' or 'transformer_blocks.14'",
    known_models=(KnownModel(name="PixArt Alpha / Sigma XL-2 (28 blocks)", layout=lambda: layout("PixArtSigma", 28)),),
    notes=("The host runs PixArt's self-attention without transformer_options, so the nodes read its queries, keys "
           "and values at its submodules and compute the attention of a chosen block again (the host's own result "
           "there is dropped): one more attention per chosen block and step.",
           "Blocks with KV compression (PixArt Sigma's token-compression variants) are refused: their attention is "
           "not over the image's own tokens."),
)
