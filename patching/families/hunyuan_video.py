"""HunyuanVideo: the host's ``HunyuanVideo`` (comfy/ldm/hunyuan_video/model.py).

It runs Flux's kind of double- and single-stream blocks with the same ``block_type`` / ``block_index`` marks
and block replacements (``dit_reach.host_block_marks``), but attends over ``cat(image, text)``: the text after
the image, and reference-latent tokens before it. The token grid is ``(frames, h, w)``.
"""
from __future__ import annotations

from comfy.ldm.hunyuan_video.model import HunyuanVideo

from ...guidance_core.layer_spec import BlockKind, DiTLayout, LayerDefault, Method
from ..dit_reach import TokenOrder, host_block_marks
from .family import Family, KnownModel

DEFAULTS = {
    Method.PAG: LayerDefault(spec="double.2", source="STG's HunyuanVideo command (junhahyung/STGuidance README: "
                             "--stg-block-idx 2, STG-R, scale 2.0)"),
    Method.SAG: LayerDefault(spec="double.2", source="no published SAG setting for HunyuanVideo; the PAG default block"),
}


def layout(config_name: str, double: int, single: int) -> DiTLayout:
    kinds = [BlockKind(name="double", count=double, host_path="double_blocks", diffusers_path="transformer_blocks"),
             BlockKind(name="single", count=single, host_path="single_blocks",
                       diffusers_path="single_transformer_blocks")]
    return DiTLayout(family=config_name, kinds=kinds, defaults=DEFAULTS)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, HunyuanVideo) or not len(diffusion_model.double_blocks):
        return None
    return layout(config_name, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))


FAMILY = Family(
    name="HunyuanVideo",
    host_types=("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V"),
    models="HunyuanVideo",
    recognise=recognise,
    reach=host_block_marks(token_order=TokenOrder.IMAGE_FIRST, frames=True),
    layer_examples="'double.2'",
    known_models=(KnownModel(name="HunyuanVideo (20 double, 40 single)", layout=lambda: layout("HunyuanVideo", 20, 40)),),
)
