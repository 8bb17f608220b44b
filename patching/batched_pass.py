"""An extra copy of the positive conditioning inside the host's own cond/uncond forward.

diffusers' PAG runs ``[uncond, cond, cond_perturbed]`` as one batch; the host's equivalent is to
hand ``calc_cond_batch`` one more cond list. A CALC_COND_BATCH wrapper (a list per key, so these
compose with every other pack's wrappers) appends the copy on the sampler's main call, tags its
cond id in transformer_options for the attention handlers, strips its output from the returned
list and leaves it for the post-CFG function. The host still splits the batch by free memory.
Anything that does not come through the main call (another guider's layout, context windows)
gets a separate pass from the post-CFG function instead, so the result is the same either way;
once that happened, a run stops batching the copy nobody used.

The host numbers the copy's chunk after the sampler's lists (``cond_or_uncond`` 2, or 3 with two
copies), but packs that add keys per chunk (IPAdapter, InstantID, PuLID) index a ``(cond, uncond)``
pair with those numbers and fail on anything else; the host's own PAG runs its pass as a lone
positive (0). An APPLY_MODEL wrapper therefore shows the copy to the model as the list it copies,
0, and keeps the host's numbering in our options for our handlers (``options.chunk_ids``).
"""
from __future__ import annotations

import uuid
from typing import Callable

import comfy.patcher_extension
import comfy.samplers

from .options import CHUNK_IDS, COPIES, EXTRA_PASS, GUIDANCE_OPTIONS, PERTURBED, with_guidance_options
from .run_state import WRAPPER_KEY, clear_after_sampling

COPY_LABELS_KEY = "attention_guidance_copy_labels"


def is_main_cond_call(conds, model_options) -> bool:
    """The sampler's cond/uncond evaluation (``[cond, uncond or None, ...]``), not an extra pass, nor one
    window of the host's context windows (which evaluate each window of frames through this call and blend
    only the lists they were given, comfy/context_windows.py, 0.3.75): the guidance then runs its own pass
    over the whole latent, which the context windows split the same way."""
    transformer_options = model_options.get("transformer_options", {})
    if transformer_options.get(GUIDANCE_OPTIONS, {}).get(EXTRA_PASS):
        return False
    if transformer_options.get("context_window") is not None:
        return False
    return len(conds) >= 2 and conds[0] is not None


def as_own_entries(entries: list, tag: str) -> list:
    """A guidance pass's copy of one cond list, each entry under a uuid of its own.

    The host gives every conditioning entry a uuid (sampler_helpers.convert_cond) and hands each
    forward the uuids of its chunks (transformer_options["uuids"], 0.3.75); caches such as the
    host's EasyCache keep one cached output per uuid. A guidance pass evaluates the entry with other
    attention or at another input, so under the entry's own uuid it would overwrite that entry's
    cache, or be served it. Derived from the entry's uuid and ``tag``, so it is the same every step.
    """
    return [dict(entry, uuid=uuid.uuid5(entry["uuid"], tag)) if isinstance(entry.get("uuid"), uuid.UUID) else entry
            for entry in entries]


def label_copies_as_their_source(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    """APPLY_MODEL wrapper: ``cond_or_uncond`` with every chunk of a copy we batched numbered as the list
    it copies; the host's numbering moves to our options (``CHUNK_IDS``)."""
    ours = transformer_options.get(GUIDANCE_OPTIONS, {})
    copies = ours.get(COPIES)
    chunks = transformer_options.get("cond_or_uncond")
    if copies and chunks and CHUNK_IDS not in ours and any(c in copies for c in chunks):
        transformer_options = dict(transformer_options, cond_or_uncond=[copies.get(c, c) for c in chunks])
        transformer_options[GUIDANCE_OPTIONS] = dict(ours, **{CHUNK_IDS: list(chunks)})
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def add_batched_positive_copy(model, instance: str, is_active: Callable[[object, object], bool], watch):
    """Install the wrapper on ``model`` (a clone) and return ``perturbed_x0(args)`` for post-CFG use.

    ``is_active(model, sigma)`` decides per call whether the copy is needed at all; no copy is batched
    once ``watch`` (a ``post_cfg_watch.PostCfgWatch``) knows the guider never uses it.
    """
    pending: dict = {}
    # set for the rest of a run once the post-CFG function guided with another list than the first of
    # the main call (DualCFGGuider evaluates [negative, middle, positive], then CFG of middle against
    # negative), so that a copy nobody uses is not batched every step
    unused: dict = {}

    def calc_cond_batch_wrapper(executor, base_model, conds, x_in, timestep, model_options):
        if not is_main_cond_call(conds, model_options):
            return executor(base_model, conds, x_in, timestep, model_options)
        pending.clear()
        if watch.guider_skips_post_cfg(timestep) or unused or not is_active(base_model, timestep):
            return executor(base_model, conds, x_in, timestep, model_options)
        cond_id = len(conds)
        options = with_guidance_options(model_options, **{PERTURBED: {instance: cond_id}, COPIES: {cond_id: 0}})
        out = executor(base_model, list(conds) + [as_own_entries(conds[0], instance)], x_in, timestep, options)
        pending.update(x=x_in, cond=conds[0], x0=out[cond_id])
        return out[:cond_id]

    def perturbed_x0(args):
        """The perturbed positive prediction for this post-CFG call: batched, else a separate pass."""
        x0 = None
        if pending.get("x") is args["input"] and pending.get("cond") is args["cond"]:
            x0 = pending["x0"]
        elif pending:
            unused["copy"] = True
        pending.clear()
        if x0 is not None:
            return x0
        options = with_guidance_options(args["model_options"], **{PERTURBED: {instance: 0}, EXTRA_PASS: True})
        (x0,) = comfy.samplers.calc_cond_batch(args["model"], [as_own_entries(args["cond"], instance)], args["input"],
                                               args["sigma"], options)
        return x0

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch_wrapper)
    if not model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COPY_LABELS_KEY):
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COPY_LABELS_KEY,
                                   label_copies_as_their_source)
    clear_after_sampling(model, pending)
    clear_after_sampling(model, unused)
    return perturbed_x0
