"""Stable Cascade, stage C (the prior) and stage B: the host's ``StageC`` and ``StageB``
(comfy/ldm/cascade/stage_c.py, stage_b.py), U-shaped models of ResBlocks, timestep blocks and attention blocks.

Each level of the U has its own resolution and its own module lists, ``down_blocks.<level>`` and ``up_blocks.<n>``
(the host lists the up path deepest level first, so ``up_blocks.0`` is the deepest level's). A level whose
``level_config`` has an ``A`` interleaves an attention block (``AttnBlock``, self_attn on) with the other blocks of each
repeat ("CTA": ResBlock, timestep block, attention block). That attention is the model's only one: its queries are
the ``h x w`` feature map's tokens, its keys and values ``cat(those tokens, the conditioning tokens)`` (the CLIP text,
pooled text and image tokens in stage C, the pooled text's in stage B), through ``optimized_attention`` with the
forward's transformer_options. The host (0.3.75) sets no block index and offers no block replacement, but hands each
attention block transformer_options as a keyword, so an object patch on each chosen block's forward marks it with
its input's grid (``dit_reach.grid_object_patch_marks``).

Block names: ``down.L.i`` is the i-th attention block of level L on the down path, ``up.L.i`` on the up path, in the
order the forward runs them; L is the host's level (its ``c_hidden`` index, 0 the finest), the same on both paths,
so ``down.1`` and ``up.1`` run at the same resolution. ``down.1`` alone names a level's blocks, ``down`` or ``up``
alone every level's. The host's and diffusers' module paths (``down_blocks.1.2``, ``up_blocks.0.5``, diffusers'
``StableCascadeUNet`` names them the same) are accepted too.
"""
from __future__ import annotations

from comfy.ldm.cascade.common import AttnBlock
from comfy.ldm.cascade.stage_b import StageB
from comfy.ldm.cascade.stage_c import StageC

from ...guidance_core.layer_spec import BlockKind, DiTLayout, LayerDefault, Method
from ..dit_reach import grid_object_patch_marks
from .family import Family, KnownModel, spec

# SDXL's PAG default (diffusers' pag_applied_layers 'mid') is the attention at the bottom of its U, 10 transformer
# blocks; Stable Cascade has no middle block, its U turns between the deepest level's down and up paths
TURN_BLOCKS = 4

PAG_SOURCE = ("none published for Stable Cascade; by analogy with SDXL's PAG default 'mid' (diffusers' "
              "pag_applied_layers, the 10 transformer blocks at the bottom of its U): the attention blocks where "
              "the U turns, the deepest level's last {down} on the down path and first {up} on the up path")
SAG_SOURCE = ("none published for Stable Cascade; by analogy with the SAG of diffusers and ComfyUI on SDXL (the "
              "middle block's first transformer, at the bottom of its U): the deepest level's last down-path block, "
              "which runs once per forward")


def attention_positions(level_config: str, repeats: int) -> tuple[int, ...]:
    """Where the attention blocks sit in a level's module list built from ``repeats`` repeats of ``level_config``."""
    return tuple(repeat * len(level_config) + position
                 for repeat in range(repeats) for position, letter in enumerate(level_config) if letter == "A")


def layout(config_name: str, down: list[tuple[int, ...]], up: list[tuple[int, ...]]) -> DiTLayout:
    """The layout of a model whose level L has attention blocks at ``down[L]`` in ``down_blocks.L`` and at ``up[L]``
    in the up path's module list of that level (``up_blocks.<levels - 1 - L>``)."""
    levels = len(down)
    kinds = [BlockKind(name=f"down.{level}", count=len(down[level]), host_path=f"down_blocks.{level}",
                       diffusers_path=f"down_blocks.{level}", diffusers_attention="attention",
                       module_indices=down[level])
             for level in range(levels) if down[level]]
    kinds += [BlockKind(name=f"up.{level}", count=len(up[level]), host_path=f"up_blocks.{levels - 1 - level}",
                        diffusers_path=f"up_blocks.{levels - 1 - level}", diffusers_attention="attention",
                        module_indices=up[level])
              for level in reversed(range(levels)) if up[level]]
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults(down, up))


def defaults(down: list[tuple[int, ...]], up: list[tuple[int, ...]]) -> dict[Method, LayerDefault]:
    deepest = max((level for level in range(len(down)) if down[level] and up[level]), default=None)
    if deepest is None:
        return {}
    n_down, n_up = len(down[deepest]), len(up[deepest])
    last_down = spec(f"down.{deepest}", max(0, n_down - TURN_BLOCKS), n_down - 1)
    first_up = spec(f"up.{deepest}", 0, min(TURN_BLOCKS, n_up) - 1)
    pag_source = PAG_SOURCE.format(down=min(TURN_BLOCKS, n_down), up=min(TURN_BLOCKS, n_up))
    return {Method.PAG: LayerDefault(spec=f"{last_down}, {first_up}", source=pag_source),
            Method.SAG: LayerDefault(spec=f"down.{deepest}.{n_down - 1}", source=SAG_SOURCE)}


def config_layout(config_name: str, level_config: list[str], blocks: list[list[int]]) -> DiTLayout:
    """The layout of the host's constructor arguments (``level_config``, ``blocks``: repeats per level on the down
    path, then on the up path deepest level first)."""
    up_repeats = blocks[1][::-1]
    levels = range(len(level_config))
    return layout(config_name, [attention_positions(level_config[level], blocks[0][level]) for level in levels],
                  [attention_positions(level_config[level], up_repeats[level]) for level in levels])


def _self_attention_positions(module_list) -> tuple[int, ...]:
    return tuple(i for i, module in enumerate(module_list) if isinstance(module, AttnBlock) and module.self_attn)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, (StageC, StageB)):
        return None
    levels = len(diffusion_model.down_blocks)
    if len(diffusion_model.up_blocks) != levels:
        return None
    down = [_self_attention_positions(diffusion_model.down_blocks[level]) for level in range(levels)]
    up = [_self_attention_positions(diffusion_model.up_blocks[levels - 1 - level]) for level in range(levels)]
    return layout(config_name, down, up)


STAGE_C_LEVELS = ["CTA", "CTA"]
STAGE_B_LEVELS = ["CT", "CT", "CTA", "CTA"]

FAMILY = Family(
    name="Stable Cascade",
    host_types=("Stable_Cascade_C", "Stable_Cascade_B"),
    models="Stable Cascade stage C (the prior) and stage B, full size and lite",
    recognise=recognise,
    reach=grid_object_patch_marks(),
    layer_examples="'down.1.23', 'up.1.0-3', 'down.1' (level, path and attention block) or 'down_blocks.1.71' (host)",
    image_scales={"SC_Prior": 42, "SC_B": 4},
    known_models=(
        KnownModel(name="Stable Cascade stage C (3.6B)",
                   layout=lambda: config_layout("Stable_Cascade_C", STAGE_C_LEVELS, [[8, 24], [24, 8]])),
        KnownModel(name="Stable Cascade stage C lite (1B)",
                   layout=lambda: config_layout("Stable_Cascade_C", STAGE_C_LEVELS, [[4, 12], [12, 4]])),
        KnownModel(name="Stable Cascade stage B (1.5B)",
                   layout=lambda: config_layout("Stable_Cascade_B", STAGE_B_LEVELS, [[2, 6, 28, 6], [6, 28, 6, 2]])),
        KnownModel(name="Stable Cascade stage B lite (700M)",
                   layout=lambda: config_layout("Stable_Cascade_B", STAGE_B_LEVELS, [[2, 4, 14, 4], [4, 14, 4, 2]])),
    ),
    notes=(
        "Blocks are named by level: `down.L.i` / `up.L.i` is the i-th attention block of level L (0 the finest) on "
        "the down / up path; the host's `up_blocks` list the levels deepest first, so stage C's `up.1` is the host's "
        "`up_blocks.0`. Stage C's two levels both run at the latent's resolution (its level change does not "
        "resample); stage B's attention levels 2 and 3 at 1/8 and 1/16 of its latent. Each block's token grid is "
        "measured at its input.",
        "The attention's queries are the image's tokens only; its keys and values are those tokens followed by the "
        "conditioning tokens. PAG's perturbed rows attend to their own token and to the conditioning tokens "
        "(diffusers' joint-attention PAG, which the other joint families use, and the UNet PAG's: the image's "
        "self-attention is replaced by the identity, its attention to the text kept); SEG blurs the queries on the "
        "block's grid; SAG's map is the image queries' attention over the image keys, nearest-upsampled from the "
        "block's grid to the latent.",
        "Stage B runs each up-path block 2 or 3 times per forward (its block_repeat): PAG and SEG perturb every run, "
        "SAG's map is the last run's.",
    ),
)
