"""Z-Image (Turbo, base) and Lumina 2: the host's ``NextDiT`` (comfy/ldm/lumina/model.py).

The main ``layers`` attend over ``cat(text, image)`` (text padded, then the image's tokens, then their
padding); the context and noise refiners before them see the text or the image alone and are not guided.
0.3.75 sets no block index (the newest host marks the main layers only) and offers no block replacement, so
object patches name the chosen layers and measure the image stream at the first noise refiner
(``dit_reach.object_patch_marks``).
"""
from __future__ import annotations

from comfy.ldm.lumina.model import NextDiT

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import object_patch_marks
from .family import Family, KnownModel, published_defaults


def layout(config_name: str, depth: int) -> DiTLayout:
    attention = "attention" if config_name == "ZImage" else "attn"  # diffusers' ZImage / Lumina2 transformer blocks
    kinds = [BlockKind(name="single", count=depth, host_path="layers", diffusers_path="layers",
                       diffusers_attention=attention)]
    defaults = published_defaults("single", 13, 13, published_depth=24, depth=depth,
                                  source="diffusers' SD3 PAG block 13 of 24 (a stack of joint text-image blocks like "
                                  "this one)", elsewhere=f"none published for {config_name}")
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, NextDiT) or not len(diffusion_model.layers) or not len(diffusion_model.noise_refiner):
        return None
    return layout(config_name, len(diffusion_model.layers))


FAMILY = Family(
    name="Z-Image / Lumina 2",
    host_types=("ZImage", "Lumina2"),
    models="Z-Image (Turbo, base) and Lumina 2 (NextDiT)",
    recognise=recognise,
    # the first noise refiner runs on the image stream alone (its tokens and their padding)
    reach=object_patch_marks(measured_at="noise_refiner.0", argument="x", text_length_site="its first noise refiner"),
    layer_examples="'layers.16'",
    known_models=(KnownModel(name="Z-Image (30 layers)", layout=lambda: layout("ZImage", 30)),
                  KnownModel(name="Lumina 2 (26 layers)", layout=lambda: layout("Lumina2", 26))),
)
