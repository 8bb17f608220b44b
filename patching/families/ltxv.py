"""LTX-Video: the host's ``LTXVModel`` (comfy/ldm/lightricks/model.py).

Each transformer block runs a video-only self-attention (``attn1``), then a cross-attention to the text; 0.3.75
sets no block index, so a block replacement marks each chosen block (``dit_reach.video_block_marks``).
"""
from __future__ import annotations

from comfy.ldm.lightricks import model as ltxv_model

from ...guidance_core.layer_spec import BlockKind, DiTLayout, LayerDefault, Method
from ..dit_reach import video_block_marks
from .family import Family, KnownModel

DEFAULTS = {
    Method.PAG: LayerDefault(spec="block.19", source="STG's LTX-Video command (junhahyung/STGuidance README: "
                             "--stg_block_idx 19, stg-a, scale 1.0)"),
    Method.SAG: LayerDefault(spec="block.19", source="no published SAG setting for LTX-Video; the PAG default block"),
}


def layout(config_name: str, depth: int) -> DiTLayout:
    kinds = [BlockKind(name="block", count=depth, host_path="transformer_blocks", diffusers_path="transformer_blocks",
                       diffusers_attention="attn1")]
    return DiTLayout(family=config_name, kinds=kinds, defaults=DEFAULTS)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, getattr(ltxv_model, "LTXVModel", ())) or not len(diffusion_model.transformer_blocks):
        return None
    return layout(config_name, len(diffusion_model.transformer_blocks))


FAMILY = Family(
    name="LTX-Video",
    host_types=("LTXV",),
    models="LTX-Video",
    recognise=recognise,
    reach=video_block_marks(),
    layer_examples="'block.19' or 'transformer_blocks.19'",
    # LTX-Video's latent is 1/32 of the image (EmptyLTXVLatentVideo)
    image_scales={"LTXV": 32},
    known_models=(KnownModel(name="LTX-Video 2B (28 blocks)", layout=lambda: layout("LTXV", 28)),),
)
