"""SD3 and SD3.5 (Medium, Large): the host's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py).

Its ``joint_blocks`` attend over ``cat(text, image)``; SD3.5 Medium's first blocks also run an image-only
self-attention (``attn2``) with the same options, guided together with the joint one. 0.3.75 sets no block
index: a block replacement on each chosen block names it (``dit_reach.joint_block_marks``).
"""
from __future__ import annotations

from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

from ...guidance_core.layer_spec import BlockKind, DiTLayout, LayerDefault, Method
from ..dit_reach import joint_block_marks
from .family import Family, KnownModel, published_defaults, ranges


def mmdit_grid(latent_size, patch_size) -> tuple[int, int]:
    """(H + 1) // patch by (W + 1) // patch: MMDiT's cropped position embedding and unpatchify."""
    height, width = latent_size[-2:]  # MMDiT.cropped_pos_embed / unpatchify: (h + 1) // p
    return (height + 1) // patch_size, (width + 1) // patch_size


def defaults(depth: int, sd35_medium: bool) -> dict[Method, LayerDefault]:
    if sd35_medium:
        # Stability AI's SD3.5 Medium skip-layer guidance layers; ComfyUI's SkipLayerGuidanceSD3 default "7, 8, 9"
        return published_defaults("joint", 7, 9, published_depth=24, depth=depth,
                                  source="Stability AI's skip-layer guidance layers 7, 8, 9 for SD3.5 Medium "
                                  "(ComfyUI's SkipLayerGuidanceSD3 default)", elsewhere="another SD3.5 depth")
    return published_defaults("joint", 13, 13, published_depth=24, depth=depth,
                              source="diffusers' StableDiffusion3PAGPipeline example, pag_applied_layers=['blocks.13'] "
                              "on SD3 Medium", elsewhere="none published for this depth (e.g. SD3.5 Large's 38 blocks)")


def layout(config_name: str, depth: int, dual_attention: list[int]) -> DiTLayout:
    note = None
    if dual_attention:
        note = (f"blocks {ranges(dual_attention)} also have SD3.5's image-only self-attention (attn2), guided "
                "together with their joint attention")
    kinds = [BlockKind(name="joint", count=depth, host_path="joint_blocks", diffusers_path="transformer_blocks",
                       note=note)]
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults(depth, bool(dual_attention)))


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, MMDiT) or getattr(diffusion_model, "joint_blocks", None) is None:
        return None
    blocks = diffusion_model.joint_blocks
    return layout(config_name, len(blocks), [i for i, block in enumerate(blocks) if block.x_block.x_block_self_attn])


FAMILY = Family(
    name="SD3",
    host_types=("SD3", "SD35"),
    models="SD3 / SD3.5 (MMDiT)",
    recognise=recognise,
    reach=joint_block_marks(token_grid=mmdit_grid),
    layer_examples="'joint.13' or 'transformer_blocks.13'",
    known_models=(
        KnownModel(name="SD3 Medium (24 blocks)", layout=lambda: layout("SD3", 24, [])),
        KnownModel(name="SD3.5 Medium (24 blocks, 0-12 dual)", layout=lambda: layout("SD35", 24, list(range(13)))),
        KnownModel(name="SD3.5 Large (38 blocks)", layout=lambda: layout("SD35", 38, [])),
    ),
)
