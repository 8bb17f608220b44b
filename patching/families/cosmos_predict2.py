"""Cosmos Predict2 (Text2Image, Video2World) and the models built on it (Anima): the host's ``MiniTrainDIT``
(comfy/ldm/cosmos/predict2.py).

Each block runs a video-only self-attention over the space-time tokens (``self_attn``), then a cross-attention
to the text (``cross_attn``), both through ``optimized_attention`` with the forward's transformer_options. The
host (0.3.75) sets no block index and offers no block replacement, but hands every block transformer_options
as a keyword, so an object patch on each chosen block's forward marks it
(``dit_reach.video_object_patch_marks``). The token grid is the latent's ``(frames, h, w)`` in patches of
``(patch_temporal, patch_spatial, patch_spatial)``; Text2Image runs on a one-frame latent.
"""
from __future__ import annotations

from comfy.ldm.cosmos.predict2 import MiniTrainDIT

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import video_object_patch_marks
from .family import Family, KnownModel, published_defaults


def layout(config_name: str, depth: int) -> DiTLayout:
    kinds = [BlockKind(name="block", count=depth, host_path="blocks", diffusers_path="transformer_blocks",
                       diffusers_attention="attn1")]
    # No PAG / STG / SAG setting is published for Cosmos; its blocks are video blocks of Wan's kind (a
    # self-attention over the video tokens, a cross-attention to the text, an MLP, each AdaLN-modulated), so the
    # default is Wan's skip-layer guidance block (10 of Wan 14B's 40) at the same relative depth.
    defaults = published_defaults(
        "block", 10, 10, published_depth=40, depth=depth,
        source="the skip-layer guidance block 10 of Wan 2.1 14B's 40 blocks (kijai's WanVideoSLG, ComfyUI's "
               "SkipLayerGuidanceWanVideo)", elsewhere="none published for Cosmos Predict2", published_here=False)
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, MiniTrainDIT) or not len(diffusion_model.blocks):
        return None
    return layout(config_name, len(diffusion_model.blocks))


FAMILY = Family(
    name="Cosmos Predict2",
    host_types=("CosmosT2IPredict2", "CosmosI2VPredict2"),
    models="Cosmos Predict2 2B / 14B (Text2Image, Video2World) and models built on it (Anima)",
    recognise=recognise,
    reach=video_object_patch_marks(),
    layer_examples="'block.7' or 'blocks.7'",
    known_models=(KnownModel(name="Cosmos Predict2 2B (28 blocks)", layout=lambda: layout("CosmosT2IPredict2", 28)),
                  KnownModel(name="Cosmos Predict2 14B (36 blocks)", layout=lambda: layout("CosmosT2IPredict2", 36))),
    notes=("Video2World (image to video): the conditioning frames are part of the latent, so their tokens are "
           "guided with the generated ones.",),
)
