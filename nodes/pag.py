"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377): the node."""
from __future__ import annotations

from comfy_api.latest import io

from ..patching.pag import PAGSettings, apply_pag
from ..patching.perturbed_uncond import Placement
from .common import CATEGORY, layers_input, placement_input, window_inputs


class PerturbedAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AG_PerturbedAttentionGuidance",
            display_name="Perturbed-Attention Guidance (PAG)",
            category=CATEGORY,
            description=(
                "Guides away from a prediction whose chosen self-attention maps are replaced by the "
                "identity (Ahn et al. 2024). Works with or without CFG; at CFG 1 it is PAG alone."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input(
                    "scale", default=3.0, min=0.0, max=100.0, step=0.01, round=0.01,
                    tooltip="PAG scale s in cfg + s * (cond - perturbed). 3.0 with CFG, about 5.0 alone. 0 disables. With "
                    "placement 'uncond branch' only on (above 0) or off (0).",
                ),
                layers_input(),
                io.Float.Input(
                    "adaptive_scale", default=0.0, min=0.0, max=1.0, step=0.0001, round=0.0001,
                    tooltip="diffusers' pag_adaptive_scale: scale falls by this much per timestep, max(0, s - a*(1000 - t)). 0 = constant.",
                ),
                *window_inputs("PAG", "no extra work is done"),
                io.Float.Input(
                    "rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="CFG-rescale of the guided result toward the positive prediction's std (Lin et al.). 0 = off.",
                ),
                placement_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, start_percent, end_percent, rescale,
                placement=Placement.OWN_BRANCH.value) -> io.NodeOutput:
        settings = PAGSettings(scale=scale, layers=layers, adaptive_scale=adaptive_scale, start_percent=start_percent,
                               end_percent=end_percent, rescale=rescale, placement=placement)
        return io.NodeOutput(apply_pag(model, settings))
