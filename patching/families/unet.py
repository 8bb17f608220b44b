"""SD1.x, SD2.x (eps and v-prediction) and SDXL-style UNets: ComfyUI's ``UNetModel``.

Self-attention sites are the ``attn1`` of every transformer block of every SpatialTransformer, reached
through the host's attn1 replacements (``patching/unet_attention.py``); their names are
``guidance_core.layer_spec``'s (index, diffusers, host spellings).
"""
from __future__ import annotations

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...guidance_core.layer_spec import AttentionLayout, LayerDefault, Method
from ..unet_layout import attention_modules
from .family import Family, KnownModel

DEFAULTS = {
    Method.PAG: LayerDefault(spec="mid", source="diffusers' PAG default pag_applied_layers='mid' (the paper's SD1.5 'm0')"),
    Method.SAG: LayerDefault(spec="m0.0", source="diffusers' StableDiffusionSAGPipeline and ComfyUI's SAG node: the "
                             "middle block's first transformer"),
}


def recognise(diffusion_model, config_name: str) -> AttentionLayout | None:
    if not isinstance(diffusion_model, UNetModel):
        return None
    return AttentionLayout(attention_modules(diffusion_model), defaults=DEFAULTS)


FAMILY = Family(
    name="UNet",
    host_types=("SD15", "SD20", "SD21UnclipL", "SD21UnclipH", "SDXL", "SDXLRefiner", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B", "SD_X4Upscaler", "SD15_instructpix2pix",
                "SDXL_instructpix2pix", "LotusD"),
    models="SD1.x, SD2.x (eps and v-prediction) and SDXL-style UNets",
    recognise=recognise,
    layer_examples="'mid', 'down_blocks.2', 'up_blocks.0.attentions.1' (diffusers), 'm0', 'u0.4', 'd2.2-9' (paper / "
                   "sd-perturbed-attention index), 'middle.0' (host block)",
    known_models=(KnownModel(name="SD1.5, SD2.x, SDXL", layout=lambda: AttentionLayout([], defaults=DEFAULTS)),),
    notes=("Layer names: the index syntax of the PAG paper and sd-perturbed-attention (d/m/u with an optional "
           "transformer index), diffusers' module paths and the host's block names are all accepted.",),
)
