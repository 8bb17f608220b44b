"""Smoothed Energy Guidance (Hong, NeurIPS 2024, arXiv 2408.00760) as a MODEL patch.

PAG's batched copy of the positive (``perturbed_copy.PerturbedCopy``) with another perturbation: in the
chosen self-attention layers the copy's image queries are blurred on the layer's token grid
(``seg_core.blur_queries``) and the layer then attends as it would have. The guidance is PAG's formula.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..guidance_core.layer_grid import token_grid
from ..guidance_core.schedule import validate_percent_window
from ..pag_core import pag_guided
from ..seg_core import blur_queries, validate_seg_inputs
from .dit_handlers import smoothed_queries
from .dit_layout import attention_layout
from .pag import CATEGORY, layers_input, select_layers
from .perturbed_copy import PerturbedCopy
from .sigma_window import SigmaWindow


def blurred_query_attention(blur_sigma: float, label: str):
    """UNet: the copy's rows attend with their queries blurred on the layer's grid (``activations_shape``)."""

    def perturb(q, k, v, extra_options, attend):
        if extra_options.get("activations_shape") is None:
            raise RuntimeError(
                f"{label}: this ComfyUI does not tell attention patches the layer's token grid "
                "(transformer_options['activations_shape'], set by ComfyUI 0.3.75 and later, not by 0.3.64), "
                "which Smoothed Energy Guidance needs to blur the queries. Update ComfyUI."
            )
        grid = token_grid(extra_options["activations_shape"], tokens=q.shape[1])
        return attend(blur_queries(q, grid, blur_sigma), k, v)

    return perturb


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
                    "setting (raise it if infinite blur is not enough). 0 disables.",
                ),
                io.Float.Input(
                    "blur_sigma", default=10000.0, min=0.0, max=9999999.0, step=0.1, round=0.01,
                    tooltip="Gaussian blur of the queries in tokens of the layer's grid. 9999 or more is the "
                    "infinite blur (every query the mean query): the reference pipeline's default (9999999) and "
                    "the paper's best FID. Smaller is weaker; SEG-SDXL's README shows 100 and suggests 1, 4, 16, ...",
                ),
                layers_input(),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                    tooltip="Sampling progress (of the model's noise range) where SEG starts.",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                    tooltip="Sampling progress where SEG stops. Outside the window no extra work is done.",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, blur_sigma, layers, start_percent, end_percent) -> io.NodeOutput:
        validate_seg_inputs(scale, blur_sigma)
        validate_percent_window(start_percent, end_percent)
        layout = attention_layout(model, "Smoothed Energy Guidance")
        spec, sites, in_use = select_layers(layout, layers, "Smoothed Energy Guidance", "SEG layers", "seg")
        m = model.clone()
        if scale == 0.0:
            return io.NodeOutput(m)

        window = SigmaWindow(m, start_percent, end_percent)

        def scale_at(base_model, sigma) -> float:
            return scale if window.contains(base_model.model_sampling, sigma) else 0.0

        label = f"SEG layers '{spec}'"
        copy = PerturbedCopy(m, layout, sites, "Smoothed Energy Guidance", spec, label, in_use, scale_at,
                             blurred_query_attention(blur_sigma, label), smoothed_queries(blur_sigma))

        def post_cfg_function(args):
            step = copy.guidance_step(args)
            if step is None:
                return args["denoised"]
            s, x0_blurred = step
            # SEG-SDXL: eps = eps_cfg + s * (eps_c - eps_seg), PAG's Eq. 14 with the blurred-query prediction
            return pag_guided(args["denoised"], args["cond_denoised"], x0_blurred, s)

        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)
