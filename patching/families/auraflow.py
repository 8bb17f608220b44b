"""AuraFlow (v0.1-v0.3): the host's AuraFlow ``MMDiT`` (comfy/ldm/aura/mmdit.py).

Its ``double_layers`` attend over ``cat(text, image)`` from two streams (the text stream starts with 8 register
tokens), its ``single_layers`` over the concatenated stream, text first. 0.3.75 sets no block index but offers
``double_block`` and ``single_block`` replacements, each handed transformer_options: a block replacement on each
chosen block names it and carries its token counts, the single blocks' text length measured at the first double
block (``dit_reach.joint_and_single_block_marks``). The token grid is MMDiT's, ``(H + 1) // 2`` by ``(W + 1) // 2``.
"""
from __future__ import annotations

from comfy.ldm.aura.mmdit import MMDiT

from ...guidance_core.layer_spec import BlockKind, DiTLayout, LayerDefault, Method, scaled_block_range
from ..dit_reach import joint_and_single_block_marks
from .family import Family, KnownModel, spec
from .sd3 import mmdit_grid

# diffusers' SD3 PAG example block (StableDiffusion3PAGPipeline: pag_applied_layers=["blocks.13"] of 24)
SD3_PAG_BLOCK, SD3_DEPTH = 13, 24


def defaults(double: int, single: int) -> dict[Method, LayerDefault]:
    # No PAG / SAG / skip-layer setting is published for AuraFlow. Its double and single blocks are one stack of
    # joint text-image attention blocks, as SD3's joint blocks are, so the default is diffusers' SD3 PAG block at
    # the same relative depth of the whole stack (block 20 of 36: single.16 on AuraFlow's 4 + 32).
    first, _ = scaled_block_range(SD3_PAG_BLOCK, SD3_PAG_BLOCK, SD3_DEPTH, double + single)
    kind, index = ("double", first) if first < double else ("single", first - double)
    source = ("none published for AuraFlow: diffusers' SD3 PAG example block 13 of 24 (StableDiffusion3PAGPipeline, "
              "pag_applied_layers=['blocks.13']), at the same relative depth of its double + single stack")
    return {Method.PAG: LayerDefault(spec=spec(kind, index, index), source=source),
            Method.SAG: LayerDefault(spec=spec(kind, index, index),
                                     source=f"none published for SAG; PAG's default block ({source})")}


def layout(config_name: str, double: int, single: int) -> DiTLayout:
    kinds = [BlockKind(name="double", count=double, host_path="double_layers", diffusers_path="joint_transformer_blocks"),
             BlockKind(name="single", count=single, host_path="single_layers", diffusers_path="single_transformer_blocks")]
    return DiTLayout(family=config_name, kinds=[kind for kind in kinds if kind.count], defaults=defaults(double, single))


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, MMDiT) or not len(diffusion_model.double_layers):
        return None
    return layout(config_name, len(diffusion_model.double_layers), len(diffusion_model.single_layers))


FAMILY = Family(
    name="AuraFlow",
    host_types=("AuraFlow",),
    models="AuraFlow v0.1-v0.3",
    recognise=recognise,
    reach=joint_and_single_block_marks(token_grid=mmdit_grid),
    layer_examples="'single.16' or 'single_layers.16'",
    known_models=(KnownModel(name="AuraFlow (4 double + 32 single)", layout=lambda: layout("AuraFlow", 4, 32)),),
    notes=("The text stream's 8 register tokens count with the text.",),
)
