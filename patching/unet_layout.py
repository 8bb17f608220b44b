"""The self-attention modules of a UNet (ComfyUI's ``UNetModel``), in the host's block numbering."""
from __future__ import annotations

from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

from ..guidance_core.layer_spec import AttentionModule


def attention_modules(diffusion_model) -> list[AttentionModule]:
    """Every SpatialTransformer of the UNet with its host block, diffusers level and position, and depth."""
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
    return modules
