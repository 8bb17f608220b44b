"""OmniGen2 (text to image, image editing with reference images): the host's ``OmniGen2Transformer2DModel``
(comfy/ldm/omnigen/omnigen2.py).

Lumina 2's blocks: the main ``layers`` attend over ``cat(text, reference images, image)``; the context, reference
and noise refiners before them see the text, the references or the image alone and are not guided. 0.3.75 sets
no block index and offers no block replacement, so object patches name the chosen layers and measure the image
stream at the first noise refiner (``dit_reach.object_patch_marks``, as for Lumina 2); the text is the sequence
less that stream, so reference images count with the text and the image's tokens are the last ones.
"""
from __future__ import annotations

from comfy.ldm.omnigen.omnigen2 import OmniGen2Transformer2DModel

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import object_patch_marks
from .family import Family, KnownModel, published_defaults


def layout(config_name: str, depth: int) -> DiTLayout:
    # diffusers has no OmniGen2 model; its own repository (VectorSpaceLab/OmniGen2, OmniGen2Transformer2DModel)
    # names the blocks as the host does, each with its attention "attn"
    kinds = [BlockKind(name="single", count=depth, host_path="layers", diffusers_path="layers",
                       diffusers_attention="attn")]
    # No PAG / SAG setting is published for OmniGen2; its main layers are a stack of joint text-image blocks like
    # Lumina 2's and SD3's, so the default is diffusers' SD3 PAG block at the same relative depth (as Lumina 2's).
    defaults = published_defaults("single", 13, 13, published_depth=24, depth=depth,
                                  source="diffusers' SD3 PAG block 13 of 24 (a stack of joint text-image blocks like "
                                  "this one)", elsewhere="none published for OmniGen2")
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, OmniGen2Transformer2DModel) or not len(diffusion_model.layers) \
            or not len(diffusion_model.noise_refiner):
        return None
    return layout(config_name, len(diffusion_model.layers))


FAMILY = Family(
    name="OmniGen2",
    host_types=("Omnigen2",),
    models="OmniGen2 (text to image, editing with reference images)",
    recognise=recognise,
    # the first noise refiner runs on the generated image's tokens alone
    reach=object_patch_marks(measured_at="noise_refiner.0", argument="hidden_states",
                             text_length_site="its first noise refiner"),
    layer_examples="'single.18' or 'layers.18'",
    known_models=(KnownModel(name="OmniGen2 (32 layers)", layout=lambda: layout("Omnigen2", 32)),),
    notes=("diffusers has no OmniGen2 model: its names here are those of OmniGen2's own diffusers-style "
           "OmniGen2Transformer2DModel (VectorSpaceLab/OmniGen2).",
           "With reference images (ReferenceLatent), their tokens sit between the text and the image and are "
           "treated as text: PAG and SEG perturb, and SAG maps, the generated image's tokens only.",),
)
