"""Qwen-Image and Qwen-Image-Edit: the host's ``QwenImageTransformer2DModel`` (comfy/ldm/qwen_image/model.py).

Its dual-stream ``transformer_blocks`` are marked as Flux marks its double blocks (``block_type`` "double",
``block_index``, ``("double_block", i)`` replacements with the text stream) and attend over
``cat(text, image)``; edit models append reference latents' tokens after the image's.
"""
from __future__ import annotations

from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import host_block_marks
from .family import Family, KnownModel
from .flux import slg_defaults


def layout(config_name: str, depth: int) -> DiTLayout:
    kinds = [BlockKind(name="double", count=depth, host_path="transformer_blocks", diffusers_path="transformer_blocks")]
    return DiTLayout(family=config_name, kinds=kinds,
                     defaults=slg_defaults("double", depth, config_name, published_here=False))


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, QwenImageTransformer2DModel) or not len(diffusion_model.transformer_blocks):
        return None
    return layout(config_name, len(diffusion_model.transformer_blocks))


FAMILY = Family(
    name="Qwen-Image",
    host_types=("QwenImage",),
    models="Qwen-Image and Qwen-Image-Edit",
    recognise=recognise,
    reach=host_block_marks(),
    layer_examples="'double.30'",
    known_models=(KnownModel(name="Qwen-Image (60 blocks)", layout=lambda: layout("QwenImage", 60)),),
)
