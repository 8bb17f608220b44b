"""Smoothed Energy Guidance (Hong, NeurIPS 2024, arXiv 2408.00760): the node."""
from __future__ import annotations

from comfy_api.latest import io

from ..patching.perturbed_uncond import Placement
from ..patching.seg import SEGSettings, apply_seg
from .common import CATEGORY, layers_input, placement_input, window_inputs


class SmoothedEnergyGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AG_SmoothedEnergyGuidance",
            display_name="Smoothed Energy Guidance (SEG)",
            category=CATEGORY,
            description=(
                "Guides away from a prediction whose chosen self-attention layers see Gaussian-blurred queries, "
                "which smooths the attention's energy landscape (Hong 2024). Works with or without CFG, and "
                "with PAG and SAG."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input(
                    "scale", default=3.0, min=0.0, max=100.0, step=0.01, round=0.01,
                    tooltip="SEG scale in cfg + scale * (cond - blurred). 3.0: the paper's and SEG-SDXL's fixed "
                    "setting (raise it if infinite blur is not enough). 0 disables. With placement 'uncond branch' only on "
                    "(above 0) or off (0).",
                ),
                io.Float.Input(
                    "blur_sigma", default=10000.0, min=0.0, max=9999999.0, step=0.1, round=0.01,
                    tooltip="Gaussian blur of the queries in tokens of the layer's grid. 9999 or more is the "
                    "infinite blur (every query the mean query): the reference pipeline's default (9999999) and "
                    "the paper's best FID. Smaller is weaker; SEG-SDXL's README shows 100 and suggests 1, 4, 16, ...",
                ),
                layers_input(),
                *window_inputs("SEG", "no extra work is done"),
                placement_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, layers, start_percent, end_percent,
                placement=Placement.OWN_BRANCH.value) -> io.NodeOutput:
        settings = SEGSettings(scale=scale, blur_sigma=blur_sigma, layers=layers, start_percent=start_percent,
                               end_percent=end_percent, placement=placement)
        return io.NodeOutput(apply_seg(model, settings))
