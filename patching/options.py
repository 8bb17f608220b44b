"""Our keys in the host's ``transformer_options``, and the chunk numbering of a batched forward.

Everything the pack tells its own handlers about one forward travels in
``transformer_options[GUIDANCE_OPTIONS]``, a dict copied (never changed in place) for each call that
adds to it, except where a model hands one dict to all its blocks and a value measured in one block
must reach the later ones (``dit_reach``).

The host evaluates several conditionings in one forward: the batch is ``len(chunks)`` chunks of equal
size, chunk ``i`` belonging to cond list ``chunks[i]`` (the host's ``cond_or_uncond``: 0 the positive,
1 the negative, guidance passes add 2, 3, ...).
"""
from __future__ import annotations

import contextlib
import contextvars

GUIDANCE_OPTIONS = "attention_guidance"

# Keys under transformer_options[GUIDANCE_OPTIONS]:
PERTURBED = "perturbed"  # {node instance: cond id of the copy whose rows that node perturbs}
EXTRA_PASS = "extra_pass"  # True in a pass a node runs itself (not the sampler's cond/uncond call)
COPIES = "copies"  # {cond id of a copy we batched: cond id of the list it copies}
# the chunks' cond ids as the host numbered them, kept where the forward shows other patches the copies as
# their source (batched_pass.label_copies_as_their_source)
CHUNK_IDS = "chunk_ids"
SAG_RECORD = "sag_record"  # {node instance: cond id whose chunks the SAG site records}
# a function the SAG post-CFG function hands its mask to instead of guiding (sag.with_sag_mask_probe)
SAG_PREVIEW = "sag_preview"
# in a guarded forward: {guard key: list}; the node's own (displaced) handler appends to it (displacement)
DISPLACEMENT_PROBES = "displacement_probes"
# the attn1 replacements this forward runs with (compiled_model.apart_when_compiled, unet_attention.at_own_sites)
ATTN1_REPLACEMENTS = "attn1_replacements"
# DiT forwards (dit_reach, dit_attention):
LATENT_HW = "dit_latent_hw"  # (H, W) of the latent this forward runs on
LATENT_FRAMES = "dit_latent_frames"  # T of a [B, C, T, H, W] latent this forward runs on
JOINT_BLOCK = "dit_mmdit_block"  # the joint block running now (a JointBlockMark), set by our block replacement
TEXT_TOKENS = "dit_text_tokens"  # text tokens of this forward, measured at the first double block
MARKED_BLOCK = "dit_block"  # the chosen block running now (a DiTBlock), set by our object patch
IMAGE_STREAM = "dit_image_stream"  # image-stream tokens of this forward (with padding), set by our object patch
VIDEO_BLOCK = "dit_video_block"  # the video block running now (a VideoBlockMark), set by our block replacement
GRID_BLOCK = "dit_grid_block"  # the block running now and its input's grid (a GridBlockMark), set by our object patch


def guidance_options(options: dict) -> dict:
    return options.get(GUIDANCE_OPTIONS, {})


def with_guidance_options(model_options: dict, **updates) -> dict:
    """A copy of model_options whose transformer_options carry our per-call markers."""
    options = model_options.copy()
    transformer_options = dict(options.get("transformer_options", {}))
    ours = {k: (dict(v) if isinstance(v, dict) else v) for k, v in transformer_options.get(GUIDANCE_OPTIONS, {}).items()}
    for name, value in updates.items():
        if isinstance(value, dict):
            ours.setdefault(name, {}).update(value)
        else:
            ours[name] = value
    transformer_options[GUIDANCE_OPTIONS] = ours
    options["transformer_options"] = transformer_options
    return options


def chunk_ids(options: dict) -> list[int]:
    """The cond id of each chunk of this forward as the host numbered them (0 the positive, 1 the negative,
    2, 3, ... further lists, among them the copies our nodes batch), also where ``cond_or_uncond`` shows
    other patches those copies as the list they copy (see batched_pass.label_copies_as_their_source)."""
    chunks = list(options.get("cond_or_uncond", []))
    ids = guidance_options(options).get(CHUNK_IDS)
    return list(ids) if ids is not None and len(ids) == len(chunks) else chunks


def options_for_chunks(options: dict, positions: list[int]) -> dict:
    """``options`` as seen by a call that gets only the chunks at ``positions``."""
    narrowed = dict(options)
    chunks = options["cond_or_uncond"]
    narrowed["cond_or_uncond"] = [chunks[i] for i in positions]
    if "uuids" in options and len(options["uuids"]) == len(chunks):
        narrowed["uuids"] = [options["uuids"][i] for i in positions]
    ours = guidance_options(options)
    if CHUNK_IDS in ours:
        ids = chunk_ids(options)
        narrowed[GUIDANCE_OPTIONS] = dict(ours, **{CHUNK_IDS: [ids[i] for i in positions]})
    return narrowed


# The transformer_options of the diffusion model's forward running now in this thread (set by an object patch on
# the diffusion model's forward, dit_reach.record_forward_options), for modules the host runs without them. A
# context variable: the host's multi-GPU forwards run in worker threads of their own.
_FORWARD_OPTIONS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("attention_guidance_forward_options",
                                                                               default=None)


@contextlib.contextmanager
def running_forward(options: dict):
    token = _FORWARD_OPTIONS.set(options)
    try:
        yield
    finally:
        _FORWARD_OPTIONS.reset(token)


def forward_options() -> dict | None:
    """The transformer_options of the model forward running now, or None outside one."""
    return _FORWARD_OPTIONS.get()
