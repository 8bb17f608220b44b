"""Self-Attention Guidance (Hong et al., arXiv 2210.00939): the node."""
from __future__ import annotations

from comfy_api.latest import io

from ..patching.sag import SAGSettings, apply_sag
from .common import CATEGORY, layer_input, window_inputs


class SelfAttentionGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AG_SelfAttentionGuidance",
            display_name="Self-Attention Guidance (SAG)",
            category=CATEGORY,
            description=(
                "Guides away from a prediction whose most-attended regions are blurred (Hong et al. 2023): "
                "the mask comes from one self-attention layer of the unconditional pass (the conditional "
                "one at CFG 1). Costs one extra model evaluation of that branch per step."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input(
                    "scale", default=0.75, min=-2.0, max=5.0, step=0.01, round=0.01,
                    tooltip="SAG scale (diffusers' sag_scale): cfg + scale * (blurred - prediction on blurred), "
                    "in the paper's noise space. 0 disables; negative values push towards the blur.",
                ),
                io.Float.Input(
                    "blur_sigma", default=1.0, min=0.0, max=10.0, step=0.1, round=0.01,
                    tooltip="Gaussian blur sigma in latent pixels (diffusers 1.0; the host's SAG node uses 2.0).",
                ),
                io.Float.Input(
                    "threshold", default=1.0, min=0.0, max=64.0, step=0.01, round=0.001,
                    tooltip="The paper's psi: a latent region is blurred where its tokens receive more than this "
                    "much attention (the mean is 1.0). Higher = smaller mask. See the SAG Mask Preview node.",
                ),
                io.Int.Input(
                    "kernel_size", default=9, min=1, max=63, step=2,
                    tooltip="Gaussian kernel size in latent pixels, odd (diffusers 9). Shrunk automatically on tiny latents.",
                ),
                layer_input(),
                *window_inputs("SAG", "nothing is recorded or evaluated"),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, threshold, kernel_size, layer, start_percent, end_percent) -> io.NodeOutput:
        settings = SAGSettings(scale=scale, layer=layer, blur_sigma=blur_sigma, threshold=threshold,
                               kernel_size=kernel_size, start_percent=start_percent, end_percent=end_percent)
        return io.NodeOutput(apply_sag(model, settings))
