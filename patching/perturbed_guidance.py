"""What PAG and SEG share around their perturbation: the chosen layers, the sampling window and the placement.

``apply_perturbed_guidance`` installs a method's perturbation on a clone: with the placement 'own branch' a
perturbed copy of the positive (``perturbed_copy``) and a post-CFG function combining it as the method says; with
'uncond branch' the sampler's own negative perturbed (``perturbed_uncond``), CFG doing the combining.
"""
from __future__ import annotations

from typing import Callable

from ..guidance_core.layer_spec import Method
from .layers import choose_layers
from .perturbed_copy import DiTPerturbation, PerturbedCopy, UNetPerturbation
from .perturbed_uncond import Placement, PerturbedUncond
from .sigma_window import SigmaWindow


def apply_perturbed_guidance(model, *, node: str, method: Method, name: str, layers: str, scale: float,
                             start_percent: float, end_percent: float, placement: Placement,
                             perturb_unet: Callable[[str], UNetPerturbation], perturb_dit: DiTPerturbation,
                             combine: Callable, finish: Callable | None = None,
                             scale_in_window: Callable | None = None):
    """A clone of ``model`` with the perturbation installed (a plain clone at scale 0).

    ``combine(args, scale, x0_perturbed)``: the post-CFG result of the 'own branch' placement from the host's
    post-CFG ``args``; ``finish(args)``: what the 'uncond branch' placement does after CFG (None: nothing);
    ``scale_in_window(window, base_model, sigma)``: the scale at a step inside the window (default ``scale``).
    ``perturb_unet(label)``: the UNet perturbation, given the label its messages name the layers by; ``name`` is the
    method's short name for messages ("PAG")."""
    chosen = choose_layers(model, node=node, input_name="layers", spec=layers, method=method, label=f"{name} layers")
    patched = model.clone()
    if scale == 0.0:
        return patched
    window = SigmaWindow(patched, start_percent, end_percent)

    def scale_at(base_model, sigma) -> float:
        if not window.contains(base_model.model_sampling, sigma):
            return 0.0
        return scale if scale_in_window is None else scale_in_window(window, base_model, sigma)

    label = f"{name} layers '{chosen.resolved}'"
    unet_perturbation = perturb_unet(label)
    if placement is Placement.UNCOND:
        # CFG combines the positive with the perturbed negative; the scale only switches (scale_at > 0)
        PerturbedUncond(model=patched, chosen=chosen, node=node, label=label,
                        active_at=lambda base_model, sigma: scale_at(base_model, sigma) > 0.0,
                        perturb_unet=unet_perturbation, perturb_dit=perturb_dit, finish=finish)
        return patched

    copy = PerturbedCopy(model=patched, chosen=chosen, node=node, label=label, scale_at=scale_at,
                         perturb_unet=unet_perturbation, perturb_dit=perturb_dit)

    def post_cfg_function(args):
        step = copy.guidance_step(args)
        if step is None:
            return args["denoised"]
        step_scale, x0_perturbed = step
        return combine(args, step_scale, x0_perturbed)

    patched.set_model_sampler_post_cfg_function(post_cfg_function)
    return patched
