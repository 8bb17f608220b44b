"""Mochi 1 (preview): the host's ``AsymmDiTJoint`` (comfy/ldm/genmo/joint_model/asymm_models_joint.py).

Each of its 48 blocks attends over ``cat(video, text)`` from two streams of different widths, the text cropped to
its ``num_tokens`` real tokens (the host's count from the text encoder's mask). 0.3.75 sets no block index but
offers ``double_block`` replacements handed transformer_options: a block replacement on each chosen block names
it and carries its token counts, the text's being the cropped count (``dit_reach.joint_block_marks``). The token
grid is the latent's ``(frames, h, w)`` in 2x2 spatial patches (no temporal patching).
"""
from __future__ import annotations

from comfy.ldm.genmo.joint_model.asymm_models_joint import AsymmDiTJoint

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ...guidance_core.token_grid import patch_grid
from ..dit_reach import TokenOrder, joint_block_marks
from .family import Family, KnownModel, published_defaults


def mochi_grid(latent_size, patch_size) -> tuple[int, ...]:
    """``(frames, ceil(h / p), ceil(w / p))``: every latent frame, spatial patches of ``p``."""
    spatial = patch_grid(latent_size, patch_size)
    return (int(latent_size[0]), *spatial) if len(latent_size) == 3 else spatial


def text_tokens(args) -> int:
    """The text tokens the block's attention takes: the host crops the text stream to ``num_tokens``."""
    return min(int(args["num_tokens"]), args["txt"].shape[1])


def layout(config_name: str, depth: int) -> DiTLayout:
    kinds = [BlockKind(name="block", count=depth, host_path="blocks", diffusers_path="transformer_blocks",
                       diffusers_attention="attn1")]
    # STG's published Mochi setting: layer 35 of its 48 blocks (junhahyung/STGuidance, stg_scale 0.8)
    defaults = published_defaults("block", 35, 35, published_depth=48, depth=depth,
                                  source="STG's Mochi setting (junhahyung/STGuidance: layer 35 of Mochi's 48 blocks, "
                                  "stg_scale 0.8)", elsewhere="another Mochi depth")
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, AsymmDiTJoint) or not len(diffusion_model.blocks):
        return None
    return layout(config_name, len(diffusion_model.blocks))


FAMILY = Family(
    name="Mochi",
    host_types=("GenmoMochi",),
    models="Mochi 1 (preview)",
    recognise=recognise,
    reach=joint_block_marks(token_grid=mochi_grid, token_order=TokenOrder.IMAGE_FIRST, frames=True,
                            text_tokens_of=text_tokens),
    layer_examples="'block.35' or 'blocks.35'",
    known_models=(KnownModel(name="Mochi 1 preview (48 blocks)", layout=lambda: layout("GenmoMochi", 48)),),
)
