"""HunyuanImage 2.1 and its refiner: the host's ``HunyuanVideo`` class (comfy/ldm/hunyuan_video/model.py) with
2-D patches (the refiner: 3-D patches of one), 20 double- and 40 single-stream blocks.

Reached as HunyuanVideo is (``dit_reach.host_block_marks``); each block attends over ``cat(image, text)``,
the text being Qwen2.5-VL's tokens, then ByT5's glyph tokens. The token grid is the latent's ``(h, w)``
(the refiner's: ``(frames, h, w)``).
"""
from __future__ import annotations

from ...guidance_core.layer_spec import DiTLayout
from .family import Family, KnownModel
from .flux import slg_defaults
from .hunyuan_video import HUNYUAN_IMAGE21, HUNYUAN_IMAGE21_CONFIGS, REACH, kinds, variant


def layout(config_name: str, double: int, single: int) -> DiTLayout:
    # No PAG / SAG setting is published for HunyuanImage 2.1; its blocks are Flux's kind of double- and
    # single-stream blocks (the text after the image), so the default is Flux.1's skip-layer guidance blocks.
    return DiTLayout(family=config_name, kinds=kinds(double, single),
                     defaults=slg_defaults("double", double, config_name, published_here=False))


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if variant(diffusion_model, config_name) != HUNYUAN_IMAGE21:
        return None
    return layout(config_name, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))


FAMILY = Family(
    name=HUNYUAN_IMAGE21,
    host_types=HUNYUAN_IMAGE21_CONFIGS,
    models="HunyuanImage 2.1 (base, distilled) and its refiner",
    recognise=recognise,
    reach=REACH,
    layer_examples="'double.8', 'single.20'",
    # its VAE's latent is 1/32 of the image (EmptyHunyuanImageLatent); the refiner's latent is HunyuanVideo
    # 1.5's, 1/16 (its VAE's ffactor_spatial, comfy/sd.py)
    image_scales={"HunyuanImage21": 32, "HunyuanImage21Refiner": 16},
    known_models=(KnownModel(name="HunyuanImage 2.1 (20 double, 40 single)",
                             layout=lambda: layout("HunyuanImage21", 20, 40)),),
)
