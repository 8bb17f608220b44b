"""The ``placement`` of PAG's and SEG's perturbation: a copy of the positive in a branch of its own (the
papers' method, ``perturbed_copy``), or the sampler's own unconditional branch.

With the uncond placement the chosen layers perturb the rows of the negative (cond id 1) in the sampler's
cond/uncond forward, and nothing is added to the batch: CFG then combines the positive with the perturbed
negative, ``D = D̂(u) + w · (D(c) − D̂(u))``, at exactly CFG's cost. This is the host's
SkipLayerGuidanceDiTSimple (comfy_extras/nodes_slg.py, 0.3.75: the uncond evaluated with the chosen blocks
skipped, no scale input) with the node's own perturbation in place of the skipped block.

A CALC_COND_BATCH wrapper tags the negative's chunk for the node's handlers (``options.PERTURBED``) in the
sampler's two-list call ``[positive, negative]`` (``comfy.samplers.sampling_function``), in every window of
the host's context windows too. Nothing is tagged in passes other nodes run themselves (``EXTRA_PASS``: SAG's
degraded pass, a default-placement node's separate pass), in guiders that evaluate other lists
(DualCFGGuider, PerpNegGuider), or at CFG 1, where the host computes no negative; the node then says once
per run that it does nothing and what to do instead.
"""
from __future__ import annotations

import enum
import logging
import math
import uuid
from typing import Callable

import comfy.patcher_extension

from .layers import ChosenLayers
from .options import COPIES, EXTRA_PASS, PERTURBED, guidance_options, with_guidance_options
from .perturbed_copy import DiTPerturbation, UNetPerturbation, install_perturbation, warn_unreached
from .run_state import WRAPPER_KEY, GuidanceRun, clear_after_sampling, log_once_per_run

NEGATIVE = 1  # the host's cond id of the negative in the sampler's [positive, negative] call


class Placement(str, enum.Enum):
    """Where PAG and SEG apply their perturbation: the values of the nodes' ``placement`` input (saved in
    workflows: never rename one)."""

    OWN_BRANCH = "own branch"  # a perturbed copy of the positive, guided with the node's scale (the papers')
    UNCOND = "uncond branch"  # the sampler's own negative, perturbed; CFG does the guiding (no extra cost)

    @classmethod
    def options(cls) -> list[str]:
        return [placement.value for placement in cls]

    @classmethod
    def of(cls, value) -> "Placement":
        """The placement a node's input names; a ValueError naming the input and its options otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"placement must be one of {', '.join(map(repr, cls.options()))}, not {value!r}.") from None


PLACEMENT_TOOLTIP = (
    "Where the perturbation goes. 'own branch' (default, the papers' method): a perturbed copy of the positive "
    "in one more batch branch, guided with the scale. 'uncond branch': the chosen layers perturb CFG's own "
    "negative instead (as ComfyUI's SkipLayerGuidanceDiTSimple and STG setups do): result = perturbed_uncond + "
    "cfg * (cond - perturbed_uncond), no extra cost; the scale only switches it (0 = off), CFG sets the "
    "strength. Needs CFG above 1."
)


class PerturbedUncond:
    """Installed on ``model`` (the node's clone) at the ``chosen`` layers: the negative's rows of the sampler's
    forward are perturbed while ``active_at(base_model, sigma)`` holds (the node's window and a scale above 0).
    ``node`` names the node and ``label`` its layers input in messages; ``perturb_unet`` / ``perturb_dit``
    compute the perturbed rows, as for ``perturbed_copy.PerturbedCopy``. ``finish(args)``, where given, is the
    node's post-CFG result on steps whose negative was perturbed (PAG's rescale)."""

    def __init__(self, *, model, chosen: ChosenLayers, node: str, label: str,
                 active_at: Callable[[object, object], bool], perturb_unet: UNetPerturbation,
                 perturb_dit: DiTPerturbation, finish: Callable[[dict], object] | None = None):
        self.node = node
        self.layers = chosen.resolved
        self.in_use = chosen.in_use
        instance = uuid.uuid4().hex
        run = GuidanceRun()
        self.run = run
        clear_after_sampling(model, run)

        def perturbing():
            run.reached = True

        install_perturbation(model, chosen, instance=instance, node=node, label=label, perturbing=perturbing,
                             perturb_unet=perturb_unet, perturb_dit=perturb_dit)

        def calc_cond_batch_wrapper(executor, base_model, conds, x_in, timestep, model_options):
            ours = guidance_options(model_options.get("transformer_options", {}))
            if ours.get(EXTRA_PASS):
                return executor(base_model, conds, x_in, timestep, model_options)
            # the lists the guider asked for, less the copies default-placement nodes batched (wrapped outside)
            lists = [i for i in range(len(conds)) if i not in ours.get(COPIES, {})]
            if lists != [0, NEGATIVE] or conds[0] is None:
                run.other_guider = True
                self._does_nothing(
                    "the sampler's guider does not evaluate the model as [positive, negative] "
                    "(DualCFGGuider and PerpNegGuider evaluate other lists), so there is no CFG negative to "
                    "perturb. Use placement 'own branch', or a KSampler / CFGGuider")
                return executor(base_model, conds, x_in, timestep, model_options)
            if conds[NEGATIVE] is None:
                self._does_nothing_at_cfg_1()
                return executor(base_model, conds, x_in, timestep, model_options)
            if not active_at(base_model, timestep):
                return executor(base_model, conds, x_in, timestep, model_options)
            options = with_guidance_options(model_options, **{PERTURBED: {instance: NEGATIVE}})
            out = executor(base_model, conds, x_in, timestep, options)
            log_once_per_run(run, self.in_use)
            if not run.checked:
                run.checked = True
                if not run.reached:
                    warn_unreached(self.node, self.layers)
            return out

        def post_cfg_function(args):
            if args["uncond"] is None:
                return args["denoised"]
            cond_scale = args.get("cond_scale")
            if cond_scale is not None and math.isclose(float(cond_scale), 1.0):  # a negative was computed (cfg-1 optimisation off), unused
                self._does_nothing_at_cfg_1()
                return args["denoised"]
            if finish is None or run.other_guider or not active_at(args["model"], args["sigma"]):
                return args["denoised"]
            return finish(args)

        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                                   calc_cond_batch_wrapper)
        model.set_model_sampler_post_cfg_function(post_cfg_function)

    def _does_nothing(self, why: str) -> None:
        if not self.run.warned:
            self.run.warned = True
            logging.warning("%s with placement '%s' does nothing in this run: %s.", self.node,
                            Placement.UNCOND.value, why)

    def _does_nothing_at_cfg_1(self) -> None:
        self._does_nothing(
            "at CFG 1 the sampler computes no unconditional (negative) prediction, and that is what this "
            f"placement perturbs. For guidance at CFG 1 use placement '{Placement.OWN_BRANCH.value}' (the "
            "default); or raise CFG above 1")
