"""Find the self-attention sites of the model a node was given, and refuse families we can't patch."""
from __future__ import annotations

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

from ..guidance_core.layer_spec import AttentionLayout, AttentionModule

SUPPORTED_FAMILIES = "SD1.x, SD2.x (eps and v-prediction) and SDXL-style UNet models"


class UnsupportedModelError(ValueError):
    pass


def model_family(model) -> str:
    config = getattr(model.model, "model_config", None)
    return type(config).__name__ if config is not None else type(model.model).__name__


def unet_attention_layout(model, node_name: str) -> AttentionLayout:
    """The attention layout of a ModelPatcher's UNet, or a clear error for any other architecture."""
    diffusion_model = model.get_model_object("diffusion_model")
    if not isinstance(diffusion_model, UNetModel):
        raise UnsupportedModelError(
            f"{node_name} cannot patch this model: it is a {model_family(model)} model "
            f"({type(diffusion_model).__name__}), not a UNet with self-attention layers. Supported: "
            f"{SUPPORTED_FAMILIES}. Remove the node for this model."
        )
    modules: list[AttentionModule] = []

    def transformers_in(block):
        return [m for m in block if isinstance(m, SpatialTransformer)]

    level, position = 0, 0
    for block_id, block in enumerate(diffusion_model.input_blocks):
        if block_id == 0:
            continue
        if any(isinstance(m, Downsample) for m in block):
            level, position = level + 1, 0
            continue
        for t in transformers_in(block):
            modules.append(AttentionModule("input", block_id, level, position, len(t.transformer_blocks)))
        position += 1
    for t in transformers_in(diffusion_model.middle_block):
        modules.append(AttentionModule("middle", 0, 0, 0, len(t.transformer_blocks)))
    level, position = 0, 0
    for block_id, block in enumerate(diffusion_model.output_blocks):
        for t in transformers_in(block):
            modules.append(AttentionModule("output", block_id, level, position, len(t.transformer_blocks)))
        position += 1
        if any(isinstance(m, Upsample) for m in block):
            level, position = level + 1, 0
    if not modules:
        raise UnsupportedModelError(
            f"{node_name} found no self-attention layer in this {model_family(model)} UNet, so it has "
            f"nothing to guide with. Supported: {SUPPORTED_FAMILIES}."
        )
    return AttentionLayout(modules)
