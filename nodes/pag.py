"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377) as a MODEL patch."""
from __future__ import annotations

from comfy_api.latest import io

from ..guidance_core.layer_spec import LayerSpecError
from ..guidance_core.schedule import validate_percent_window
from ..pag_core import adaptive_pag_scale, identity_attention, pag_guided, rescale_guided, validate_pag_inputs
from .dit_handlers import joint_identity
from .dit_layout import attention_layout
from .layer_choice import layers_in_use
from .perturbed_copy import PerturbedCopy
from .sigma_window import SigmaWindow

CATEGORY = "model_patches/attention_guidance"


def layers_input() -> io.String.Input:
    """The ``layers`` input of the nodes that perturb a batched copy (PAG, SEG): one default, one syntax."""
    return io.String.Input(
        "layers", default="auto", multiline=False,
        tooltip=(
            "Self-attention layers to perturb. 'auto': the model family's default (UNets 'mid'; "
            "SD3 'joint.13'; Flux, Chroma 'double.7-9'; others in the node docs), logged at the "
            "first step. Or comma-separated: 'mid', 'down_blocks.2', "
            "'up_blocks.0.attentions.1' (diffusers), 'm0', 'u0.4', 'd2.2-9' (paper / "
            "sd-perturbed-attention index), 'middle.0' (host block). SD3: 'joint.13' or "
            "'transformer_blocks.13'; Flux, Chroma: 'double.7', 'single.20', 'single.0-9'; "
            "Qwen-Image: 'double.30'; Z-Image, Lumina 2: 'layers.16'; HiDream: 'double.8'; Wan: 'block.10' "
            "or 'blocks.10'; HunyuanVideo: 'double.2'; LTX-Video: 'block.19' or 'transformer_blocks.19'. A wrong "
            "name lists the model's layers."
        ),
    )


def select_layers(layout, layers: str, node: str, label: str, kind: str) -> tuple[str, list, str]:
    """``(spec, sites, line)``: the spec ``layers`` stands for on this model (``auto`` = the family's default for
    nodes of ``kind``), the sites it names, and the line that tells the user which they are; an error starting
    with ``label`` (e.g. "PAG layers") where it names nothing."""
    spec = layout.resolve(layers, kind)
    try:
        sites = layout.select(spec)
    except LayerSpecError as error:
        raise LayerSpecError(f"{label}: {error}") from None
    return spec, sites, layers_in_use(node, "layers", layers, spec, layout, sites, kind)


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
                    tooltip="PAG scale s in cfg + s * (cond - perturbed). 3.0 with CFG, about 5.0 alone. 0 disables.",
                ),
                layers_input(),
                io.Float.Input(
                    "adaptive_scale", default=0.0, min=0.0, max=1.0, step=0.0001, round=0.0001,
                    tooltip="diffusers' pag_adaptive_scale: scale falls by this much per timestep, max(0, s - a*(1000 - t)). 0 = constant.",
                ),
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                    tooltip="Sampling progress (of the model's noise range) where PAG starts.",
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                    tooltip="Sampling progress where PAG stops. Outside the window no extra work is done.",
                ),
                io.Float.Input(
                    "rescale", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip="CFG-rescale of the guided result toward the positive prediction's std (Lin et al.). 0 = off.",
                ),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, scale, layers, adaptive_scale, start_percent, end_percent, rescale) -> io.NodeOutput:
        validate_pag_inputs(scale, adaptive_scale, rescale)
        validate_percent_window(start_percent, end_percent)
        layout = attention_layout(model, "Perturbed-Attention Guidance")
        spec, sites, in_use = select_layers(layout, layers, "Perturbed-Attention Guidance", "PAG layers", "pag")
        m = model.clone()
        if scale == 0.0:
            return io.NodeOutput(m)

        window = SigmaWindow(m, start_percent, end_percent)

        def scale_at(base_model, sigma) -> float:
            sampling = base_model.model_sampling
            if not window.contains(sampling, sigma):
                return 0.0
            if adaptive_scale <= 0.0:
                return scale
            timestep = window.per_step(sigma, "timestep", lambda: float(sampling.timestep(sigma.flatten()[:1])))
            return adaptive_pag_scale(scale, adaptive_scale, timestep)

        copy = PerturbedCopy(m, layout, sites, "Perturbed-Attention Guidance", spec, f"PAG layers '{spec}'", in_use,
                             scale_at, lambda q, k, v, options, attend: identity_attention(q, k, v), joint_identity)

        def post_cfg_function(args):
            step = copy.guidance_step(args)
            if step is None:
                return args["denoised"]
            s, x0_perturbed = step
            guided = pag_guided(args["denoised"], args["cond_denoised"], x0_perturbed, s)
            return rescale_guided(guided, args["cond_denoised"], rescale)

        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)
