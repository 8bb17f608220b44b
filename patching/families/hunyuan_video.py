"""HunyuanVideo: the host's ``HunyuanVideo`` (comfy/ldm/hunyuan_video/model.py).

It runs Flux's kind of double- and single-stream blocks with the same ``block_type`` / ``block_index`` marks
and block replacements (``dit_reach.host_block_marks``), but attends over ``cat(image, text)``: the text after
the image, and reference-latent tokens before it. The token grid is ``(frames, h, w)``.

The host runs HunyuanVideo 1.5 and HunyuanImage 2.1 through the same class; they are families of their own
(``hunyuan_video15``, ``hunyuan_image21``), told apart here by ``variant``.
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

# the host's model configs (comfy/supported_models.py, 0.3.75 and 0.38.x) of the models that run through
# HunyuanVideo's class but are not HunyuanVideo 1.0
HUNYUAN_VIDEO15_CONFIGS = ("HunyuanVideo15", "HunyuanVideo15_SR_Distilled")
HUNYUAN_IMAGE21_CONFIGS = ("HunyuanImage21", "HunyuanImage21Refiner")
HUNYUAN_VIDEO = "HunyuanVideo"
HUNYUAN_VIDEO15 = "HunyuanVideo 1.5"
HUNYUAN_IMAGE21 = "HunyuanImage 2.1"


def variant(diffusion_model, config_name: str) -> str | None:
    """Which model of the host's HunyuanVideo class this is (None: not that class, or no double block).

    By the host's model config name where it is one of the known ones, else by structure: HunyuanImage 2.1
    patches 2-D latents; HunyuanVideo 1.5 has no single-stream blocks and embeds each condition's type
    (``cond_type_embedding``), which HunyuanVideo 1.0 has neither of."""
    if not isinstance(diffusion_model, HunyuanVideo) or not len(diffusion_model.double_blocks):
        return None
    if config_name in HUNYUAN_IMAGE21_CONFIGS or len(diffusion_model.patch_size) == 2:
        return HUNYUAN_IMAGE21
    if config_name in HUNYUAN_VIDEO15_CONFIGS or (
            not len(diffusion_model.single_blocks) and getattr(diffusion_model, "cond_type_embedding", None) is not None):
        return HUNYUAN_VIDEO15
    return HUNYUAN_VIDEO


def kinds(double: int, single: int) -> list[BlockKind]:
    """The double- and single-stream blocks, by the host's and diffusers' names (HunyuanVideo, HunyuanVideo 1.5
    and HunyuanImage transformers alike: ``transformer_blocks`` / ``single_transformer_blocks``)."""
    return [BlockKind(name="double", count=double, host_path="double_blocks", diffusers_path="transformer_blocks"),
            BlockKind(name="single", count=single, host_path="single_blocks",
                      diffusers_path="single_transformer_blocks")]


def layout(config_name: str, double: int, single: int) -> DiTLayout:
    return DiTLayout(family=config_name, kinds=kinds(double, single), defaults=DEFAULTS)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if variant(diffusion_model, config_name) != HUNYUAN_VIDEO:
        return None
    return layout(config_name, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))


# every model of the class: the image first, then the text; reference latents before the image
REACH = host_block_marks(token_order=TokenOrder.IMAGE_FIRST, frames=True)

FAMILY = Family(
    name="HunyuanVideo",
    host_types=("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V"),
    models="HunyuanVideo",
    recognise=recognise,
    reach=REACH,
    layer_examples="'double.2'",
    known_models=(KnownModel(name="HunyuanVideo (20 double, 40 single)", layout=lambda: layout("HunyuanVideo", 20, 40)),),
)
