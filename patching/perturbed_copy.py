"""A batched copy of the positive, perturbed at chosen attention sites: what PAG and SEG share.

The method gives the layers and its perturbation; this installs the copy in the sampler's own forward
(``batched_pass.add_batched_positive_copy``), the handlers at a UNet's attn1 sites
(``unet_attention.install_site_handler``) or in a DiT's blocks (``dit_attention.install_dit_handler``)
that perturb the copy's rows and run every other row as before, and gives the post-CFG function the
copy's prediction with the scale of this step.
"""
from __future__ import annotations

import logging
import uuid
from typing import Callable

from ..guidance_core.rows import split_by_chunk
from .batched_pass import add_batched_positive_copy
from .dit_attention import DiTAttention, install_dit_handler
from .displacement import DisplacementGuard
from .layers import ChosenLayers, dit_model
from .options import PERTURBED, chunk_ids, guidance_options, options_for_chunks
from .post_cfg_watch import PostCfgWatch
from .run_state import GuidanceRun, clear_after_sampling, log_once_per_run
from .unet_attention import install_site_handler, require_own_queries

# UNet: perturb(q, k, v, extra_options, attend) for the copy's rows ([B, L, heads * D]); attend(q, k, v)
# is the attention those rows would have had (the host's, or the patch before ours)
UNetPerturbation = Callable[..., "torch.Tensor"]  # noqa: F821
# DiT: perturb(call) for the copy's rows, the call's output in the caller's layout
DiTPerturbation = Callable[[DiTAttention], "torch.Tensor"]  # noqa: F821


def perturbed_copy_handler(instance: str, perturbing: Callable[[], None], perturb: DiTPerturbation):
    """DiT: the rows of the chunk tagged for ``instance`` get ``perturb(part)``; every other row gets the
    attention it would have had. ``perturbing()`` is called whenever it computes them."""

    def handler(call: DiTAttention):
        cond_id = guidance_options(call.options).get(PERTURBED, {}).get(instance)
        if cond_id is None or cond_id not in call.chunks:
            return call.run()
        perturbing()
        return call.split(lambda c: c == cond_id, perturb, lambda part: part.run())

    return handler


def install_perturbation(model, chosen: ChosenLayers, *, instance: str, node: str, label: str,
                         perturbing: Callable[[], None], perturb_unet: UNetPerturbation,
                         perturb_dit: DiTPerturbation) -> None:
    """Handlers at the ``chosen`` layers of ``model`` (a clone) that perturb the rows of the chunk a forward
    tags for ``instance`` (``options.PERTURBED``) and run every other row as before; ``perturbing()`` is
    called whenever they compute perturbed rows. Which chunk is tagged is the caller's: a batched copy of
    the positive (``PerturbedCopy``) or the sampler's own negative (``perturbed_uncond``)."""

    def make_handler(previous):
        def perturbed_attention(q, k, v, extra_options, **kwargs):
            cond_id = guidance_options(extra_options).get(PERTURBED, {}).get(instance)
            chunks = chunk_ids(extra_options)
            if cond_id is None or cond_id not in chunks:
                return previous(q, k, v, extra_options, **kwargs)
            require_own_queries(q, k, extra_options, label)
            perturbing()

            def perturbed(q, k, v, positions):
                options = options_for_chunks(extra_options, positions)
                return perturb_unet(q, k, v, options, lambda q, k, v: previous(q, k, v, options, **kwargs))

            return split_by_chunk(
                q, k, v, chunks, lambda c: c == cond_id, perturbed,
                lambda q, k, v, positions: previous(q, k, v, options_for_chunks(extra_options, positions), **kwargs),
            )

        return perturbed_attention

    # keeps the handlers acting where a node applied later displaces them (displacement.DisplacementGuard)
    guard = DisplacementGuard(model, node, lambda options: instance in guidance_options(options).get(PERTURBED, {}))
    if chosen.on_dit:
        install_dit_handler(model, dit_model(model, chosen), list(chosen.sites),
                            perturbed_copy_handler(instance, perturbing, perturb_dit), guard)
    else:
        install_site_handler(model, chosen.sites, make_handler, guard)


def warn_unreached(node: str, layers: str) -> None:
    """The first perturbed step of a run reached none of the node's layers: say why that happens."""
    # the first guided step of a run always runs the model (a cache such as EasyCache has nothing to serve
    # yet), so a layer that was not reached there is never reached
    logging.warning(
        "%s reached none of its layers ('%s') in the first step of this "
        "run, so it adds nothing. Either a node applied after it replaced the same attention (an "
        "attn1 replacement or the attention override) without calling the one before: apply "
        "attention guidance last; or this ComfyUI does not mark the transformer blocks of this "
        "model (families reached through the host's block_type / block_index marks need ComfyUI 0.3.75 "
        "or later; see docs/model-families.md): update ComfyUI.", node, layers)


class PerturbedCopy:
    """Installed on ``model`` (the node's clone) at the ``chosen`` layers. ``scale_at(base_model, sigma)`` is
    the guidance scale of a step, 0 outside the node's window; ``node`` names the node and ``label`` its layers
    input in messages (e.g. "PAG layers 'mid'"); ``perturb_unet`` / ``perturb_dit`` compute the copy's rows."""

    def __init__(self, *, model, chosen: ChosenLayers, node: str, label: str,
                 scale_at: Callable[[object, object], float], perturb_unet: UNetPerturbation,
                 perturb_dit: DiTPerturbation):
        self.node = node
        self.layers = chosen.resolved
        self.in_use = chosen.in_use
        self.scale_at = scale_at
        instance = uuid.uuid4().hex
        self.watch = PostCfgWatch(model, node)
        self._perturbed_x0 = add_batched_positive_copy(
            model, instance, lambda base_model, sigma: scale_at(base_model, sigma) > 0.0, self.watch)
        self.run = GuidanceRun()
        clear_after_sampling(model, self.run)

        def perturbing():
            self.run.reached = True

        install_perturbation(model, chosen, instance=instance, node=node, label=label, perturbing=perturbing,
                             perturb_unet=perturb_unet, perturb_dit=perturb_dit)

    def guidance_step(self, args):
        """``(scale, perturbed x0)`` for this post-CFG call, or None where the node does not guide this step."""
        self.watch.post_cfg_ran()
        scale = self.scale_at(args["model"], args["sigma"])
        if scale == 0.0:
            return None
        x0_perturbed = self._perturbed_x0(args)
        log_once_per_run(self.run, self.in_use)
        if not self.run.checked:
            # the first guided step of a run always runs the model (a cache such as EasyCache has
            # nothing to serve yet), so a layer that was not reached here is never reached
            self.run.checked = True
            if not self.run.reached:
                warn_unreached(self.node, self.layers)
        return scale, x0_perturbed
