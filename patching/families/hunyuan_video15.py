"""HunyuanVideo 1.5 (T2V, I2V, the distilled super-resolution model): the host's ``HunyuanVideo`` class
(comfy/ldm/hunyuan_video/model.py) with 54 double-stream blocks and no single-stream block.

Reached as HunyuanVideo is (``dit_reach.host_block_marks``: the host marks each double block and offers its
block replacement); each block attends over ``cat(image, text)``, where the text is the image embeddings of
I2V (``vision_in``), then ByT5's glyph tokens, then Qwen2.5-VL's. The token grid is ``(frames, h, w)``.
"""
from __future__ import annotations

from ...guidance_core.layer_spec import DiTLayout
from .family import Family, KnownModel, published_defaults
from .hunyuan_video import HUNYUAN_VIDEO15, HUNYUAN_VIDEO15_CONFIGS, REACH, kinds, variant

# HunyuanVideo 1.0's published STG block (double 2 of its 20 double blocks)
STG_BLOCK, STG_DEPTH = 2, 20


def layout(config_name: str, double: int, single: int = 0) -> DiTLayout:
    # No PAG / STG / SAG setting is published for HunyuanVideo 1.5; its blocks are HunyuanVideo's double-stream
    # blocks, so the default is HunyuanVideo's STG block at the same relative depth of the double-stream stack.
    defaults = published_defaults(
        "double", STG_BLOCK, STG_BLOCK, published_depth=STG_DEPTH, depth=double,
        source="STG's HunyuanVideo command (junhahyung/STGuidance README: --stg-block-idx 2 of HunyuanVideo's 20 "
               "double-stream blocks, STG-R)",
        elsewhere="none published for HunyuanVideo 1.5", published_here=False)
    return DiTLayout(family=config_name, kinds=[kind for kind in kinds(double, single) if kind.count], defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if variant(diffusion_model, config_name) != HUNYUAN_VIDEO15:
        return None
    return layout(config_name, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))


FAMILY = Family(
    name=HUNYUAN_VIDEO15,
    host_types=HUNYUAN_VIDEO15_CONFIGS,
    models="HunyuanVideo 1.5 (T2V, I2V, 720p super-resolution)",
    recognise=recognise,
    reach=REACH,
    layer_examples="'double.6' or 'transformer_blocks.6'",
    # its VAE's latent is 1/16 of the image (EmptyHunyuanVideo15Latent)
    image_scales={"HunyuanVideo15": 16},
    known_models=(KnownModel(name="HunyuanVideo 1.5 (54 double)", layout=lambda: layout("HunyuanVideo15", 54)),),
)
