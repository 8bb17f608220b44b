"""Cosmos 1 (Text2World, Video2World 7B / 14B): the host's ``GeneralDIT`` (comfy/ldm/cosmos/model.py).

Each block (``blocks.block0`` ... in a ModuleDict) runs a video-only self-attention over the space-time tokens,
a cross-attention to the text and an MLP ("FA-CA-MLP"), both attentions through ``optimized_attention`` with the
forward's transformer_options. The host (0.3.75) sets no block index and offers no block replacement but hands
every block transformer_options as a keyword, so an object patch on each chosen block's forward marks it
(``dit_reach.video_object_patch_marks``, as for Cosmos Predict2); the blocks take the tokens as ``[T, H, W, B, C]``.
The token grid is the latent's ``(frames, h, w)`` in patches of ``(patch_temporal, patch_spatial, patch_spatial)``.
"""
from __future__ import annotations

from comfy.ldm.cosmos.model import GeneralDIT

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import video_object_patch_marks
from .family import Family, KnownModel, published_defaults


def layout(config_name: str, depth: int) -> DiTLayout:
    kinds = [BlockKind(name="block", count=depth, host_path="blocks", diffusers_path="transformer_blocks",
                       diffusers_attention="attn1", host_index_prefix="block")]
    # No PAG / STG / SAG setting is published for Cosmos; its blocks are video blocks of Wan's kind, so the default
    # is Wan's skip-layer guidance block (10 of Wan 14B's 40) at the same relative depth, as for Cosmos Predict2.
    defaults = published_defaults(
        "block", 10, 10, published_depth=40, depth=depth,
        source="the skip-layer guidance block 10 of Wan 2.1 14B's 40 blocks (kijai's WanVideoSLG, ComfyUI's "
               "SkipLayerGuidanceWanVideo)", elsewhere="none published for Cosmos 1", published_here=False)
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, GeneralDIT) or not len(diffusion_model.blocks):
        return None
    if getattr(diffusion_model, "block_x_format", "THWBD") != "THWBD" \
            or not str(getattr(diffusion_model.blocks["block0"], "x_format", "THWBD")).upper() == "THWBD":
        return None  # only the host's own block layout, whose token axes the marks count
    return layout(config_name, len(diffusion_model.blocks))


FAMILY = Family(
    name="Cosmos 1",
    host_types=("CosmosT2V", "CosmosI2V"),
    models="Cosmos 1 7B / 14B (Text2World, Video2World)",
    recognise=recognise,
    reach=video_object_patch_marks(batch_axis=3),
    layer_examples="'block.7' or 'blocks.block7'",
    known_models=(KnownModel(name="Cosmos 1 7B (28 blocks)", layout=lambda: layout("CosmosT2V", 28)),
                  KnownModel(name="Cosmos 1 14B (36 blocks)", layout=lambda: layout("CosmosT2V", 36))),
    notes=("Video2World (image / video to world): the conditioning frames are part of the latent, so their tokens "
           "are guided with the generated ones.",),
)
