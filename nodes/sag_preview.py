"""SAG Mask Preview: the mask a SAG-patched model would blur at one step, for tuning ``threshold`` and ``layer``."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..patching.sag_preview import sag_mask_at_step
from .common import CATEGORY


class SAGMaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AG_SAGMaskPreview",
            display_name="SAG Mask Preview",
            category=CATEGORY,
            description=(
                "Shows the mask Self-Attention Guidance blurs at one step: connect the MODEL output of a "
                "Self-Attention Guidance (SAG) node (its threshold and layer are used) and the sampler's "
                "inputs. Runs one model evaluation on the latent noised to that step's sigma, as "
                "KSampler (Advanced) starting at that step would."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of a Self-Attention Guidance (SAG) node."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input(
                    "latent_image",
                    tooltip="Empty latent for the first steps; for later steps a latent of a finished image "
                    "(sampler output or VAE Encode) shows what SAG sees near the end.",
                ),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=20, min=1, max=10000),
                io.Int.Input("step", default=0, min=0, max=10000,
                             tooltip="Which step of the schedule, 0 = first (shown even outside SAG's start/end window)."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="As on the sampler: at 1.0 SAG takes the map of the positive pass."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES),
            ],
            outputs=[
                io.Mask.Output(display_name="mask"),
                io.Image.Output(display_name="image"),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, step, cfg, scheduler) -> io.NodeOutput:
        mask, image = sag_mask_at_step(model, positive, negative, latent_image, seed=seed, steps=steps, step=step,
                                       cfg=cfg, scheduler=scheduler)
        return io.NodeOutput(mask, image)
