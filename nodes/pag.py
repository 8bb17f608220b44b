"""Perturbed-Attention Guidance (Ahn et al., arXiv 2403.17377) as a MODEL patch."""
from __future__ import annotations

import logging
import uuid

from comfy_api.latest import io

from ..guidance_core.layer_spec import DiTLayout, LayerSpecError
from ..guidance_core.rows import split_by_chunk
from ..guidance_core.schedule import in_sigma_window, validate_percent_window
from ..pag_core import adaptive_pag_scale, identity_attention, pag_guided, rescale_guided, validate_pag_inputs
from .attention_sites import (
    chunk_ids, guidance_options, install_site_handler, options_for_chunks, require_own_queries,
)
from .batched_pass import add_batched_positive_copy, clear_after_sampling
from .dit_attention import install_dit_handler
from .dit_handlers import perturbed_attention_handler
from .dit_layout import attention_layout
from .displacement import DisplacementGuard
from .post_cfg_watch import PostCfgWatch

CATEGORY = "model_patches/attention_guidance"


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
                io.String.Input(
                    "layers", default="mid", multiline=False,
                    tooltip=(
                        "Self-attention layers to perturb, comma-separated: 'mid', 'down_blocks.2', "
                        "'up_blocks.0.attentions.1' (diffusers), 'm0', 'u0.4', 'd2.2-9' (paper / "
                        "sd-perturbed-attention index), 'middle.0' (host block). SD3: 'joint.13' or "
                        "'transformer_blocks.13'; Flux, Chroma: 'double.7', 'single.20', 'single.0-9'; "
                        "Qwen-Image: 'double.30'. A wrong name lists the model's layers."
                    ),
                ),
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
        try:
            sites = layout.select(layers)
        except LayerSpecError as error:
            raise LayerSpecError(f"PAG layers: {error}") from None
        m = model.clone()
        if scale == 0.0:
            return io.NodeOutput(m)
        instance = uuid.uuid4().hex

        def scale_at(base_model, sigma) -> float:
            sampling = base_model.model_sampling
            sigma = sigma.flatten()[:1]
            window = (sampling.percent_to_sigma(start_percent), sampling.percent_to_sigma(end_percent))
            if not in_sigma_window(float(sigma), *window):
                return 0.0
            return adaptive_pag_scale(scale, adaptive_scale, float(sampling.timestep(sigma)))

        watch = PostCfgWatch(m, "Perturbed-Attention Guidance")
        perturbed_x0 = add_batched_positive_copy(m, instance, lambda base_model, sigma: scale_at(base_model, sigma) > 0.0,
                                                 watch)
        # this run: "reached" once a chosen layer computed the perturbed rows, "checked" after the first
        # guided step looked at it
        run: dict = {}
        clear_after_sampling(m, run)

        def perturbing():
            run["reached"] = True

        def make_handler(previous):
            def perturbed_attention(q, k, v, extra_options, **kwargs):
                cond_id = guidance_options(extra_options).get("perturbed", {}).get(instance)
                chunks = chunk_ids(extra_options)
                if cond_id is None or cond_id not in chunks:
                    return previous(q, k, v, extra_options, **kwargs)
                require_own_queries(q, k, extra_options, f"PAG layers '{layers}'")
                perturbing()
                return split_by_chunk(
                    q, k, v, chunks, lambda c: c == cond_id,
                    lambda q, k, v, positions: identity_attention(q, k, v),
                    lambda q, k, v, positions: previous(q, k, v, options_for_chunks(extra_options, positions), **kwargs),
                )

            return perturbed_attention

        guard = DisplacementGuard(m, "Perturbed-Attention Guidance",
                                  lambda options: instance in guidance_options(options).get("perturbed", {}))
        if isinstance(layout, DiTLayout):
            install_dit_handler(m, layout, sites, perturbed_attention_handler(instance, perturbing), guard)
        else:
            install_site_handler(m, sites, make_handler, guard)

        def post_cfg_function(args):
            watch.post_cfg_ran()
            s = scale_at(args["model"], args["sigma"])
            if s == 0.0:
                return args["denoised"]
            x0_perturbed = perturbed_x0(args)
            if not run.get("checked"):
                # the first guided step of a run always runs the model (a cache such as EasyCache has
                # nothing to serve yet), so a layer that was not reached here is never reached
                run["checked"] = True
                if not run.get("reached"):
                    logging.warning(
                        "Perturbed-Attention Guidance reached none of its layers ('%s') in the first step of this "
                        "run, so it adds nothing. Either a node applied after it replaced the same attention (an "
                        "attn1 replacement or the attention override) without calling the one before: apply "
                        "attention guidance last; or this ComfyUI does not mark the transformer blocks of this "
                        "model (Flux, Chroma and Qwen-Image need the block_type / block_index that ComfyUI 0.3.75 "
                        "sets and 0.3.64 does not): update ComfyUI.", layers)
            guided = pag_guided(args["denoised"], args["cond_denoised"], x0_perturbed, s)
            return rescale_guided(guided, args["cond_denoised"], rescale)

        m.set_model_sampler_post_cfg_function(post_cfg_function)
        return io.NodeOutput(m)
