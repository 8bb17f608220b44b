"""Guided attention where the host calls a block's self-attention without transformer_options.

No attention override reaches such a call (0.3.75 and 0.38.x: PixArt's and HunyuanDiT's self-attention), so
the family's ``dit_reach.AttentionTaps`` names where the module's queries, keys and values can be read: object
patches (the host's ``add_object_patch``, undone when the model is unpatched) on the module's ``forward`` open a
record for the call, on the named submodules keep their outputs, and on the output projection replace its input,
the host's attention output, with what our handler computes from the recorded queries, keys and values. The
handler sees a ``DiTAttention`` as under the override: rows it does not perturb go through the override the
model had when the node ran (or the host's attention), with the forward's own transformer_options
(``dit_reach.record_forward_options``). The host's own attention output is computed too and dropped: one more
attention in each chosen block. Where an earlier node already guides the same module, the later one takes its place
on the output projection and hands the rows it does not compute to the earlier one's handler, as chained attention
overrides do (``_Tapped``).
"""
from __future__ import annotations

import contextvars
import dataclasses
from typing import Callable

from comfy.ldm.modules.attention import optimized_attention

from .compiled_model import outside_compiled
from .dit_attention import DiTAttention, DiTModel, Handler
from .dit_reach import patch_block_forward, record_forward_options
from .options import forward_options


class _Record:
    """One run of a tapped attention module: its forward's arguments and its submodules' outputs."""

    def __init__(self, path: str, options: dict, args, kwargs):
        self.path = path
        self.options = options
        self.args = args
        self.kwargs = kwargs
        self.outputs: dict = {}


_RUNNING: contextvars.ContextVar[_Record | None] = contextvars.ContextVar("attention_guidance_tapped", default=None)


def _open_record(path: str):
    def run(previous, args, kwargs):
        options = forward_options()
        if options is None:
            return previous(*args, **kwargs)
        token = _RUNNING.set(_Record(path, options, args, kwargs))
        try:
            return previous(*args, **kwargs)
        finally:
            _RUNNING.reset(token)

    return run


def _keep_output(path: str, name: str):
    def run(previous, args, kwargs):
        out = previous(*args, **kwargs)
        record = _RUNNING.get()
        if record is not None and record.path == path:
            record.outputs[name] = out
        return out

    return run


def _guided_output(path: str, module, block, dit: DiTModel, handler: Handler, previous_override):
    taps = dit.reach.taps

    # never traced where the model is compiled, as the override (compiled_model): the handler reads this forward's
    # options
    @outside_compiled
    def guided_attention(record: _Record):
        q, k, v = taps.qkv(module, record.outputs, record.args, record.kwargs)
        # as the host's wrap_attn hands a call to an override: the previous override computes what we do not,
        # and its call of the attention function goes straight to it
        values = {"q": q, "k": k, "v": v, "heads": q.shape[1], "skip_reshape": True,
                  "transformer_options": record.options, "_inside_attn_wrapper": True}
        precision = getattr(module, "attn_precision", None)  # HunyuanDiT's: float32 (the host's unet_extra_config)
        if precision is not None:
            values["attn_precision"] = precision
        return handler(DiTAttention(previous_override, optimized_attention, values, 4, block=block, model=dit,
                                    text_tokens=0, joint=True))

    def run(previous, args, kwargs):
        record = _RUNNING.get()
        if record is None or record.path != path:
            return previous(*args, **kwargs)
        host_output = args[0]
        guided = guided_attention(record)
        return previous(guided.reshape(host_output.shape).to(host_output.dtype), *args[1:], **kwargs)

    return run


_TAPPED = "attention_guidance_tapped"  # the attribute of our object patch on an output projection


@dataclasses.dataclass(frozen=True)
class _Tapped:
    """What our object patch on an output projection keeps for a later node on the same module: its handler as the
    attention override that node's other rows go through, and the projection's forward below the patch."""

    as_override: Callable
    below: Callable


def _as_override(handler: Handler, block, dit: DiTModel, previous_override):
    def attention_guidance_tapped(func, q, k, v, heads, **kwargs):
        values = {"q": q, "k": k, "v": v, "heads": heads, **kwargs}
        return handler(DiTAttention(previous_override, func, values, 4, block=block, model=dit, text_tokens=0,
                                    joint=True))

    return attention_guidance_tapped


def _patch_output(model, path: str, module, block, dit: DiTModel, handler: Handler, previous_override) -> None:
    key = f"diffusion_model.{path}.{dit.reach.taps.output}.forward"
    below = model.get_model_object(key)
    earlier = getattr(below, _TAPPED, None)
    if earlier is not None:  # an earlier node guides this attention: the rows we do not compute go through it
        previous_override, below = earlier.as_override, earlier.below
    run = outside_compiled(_guided_output(path, module, block, dit, handler, previous_override), whole=False)

    def attention_guidance_forward(*args, **kwargs):
        return run(below, args, kwargs)

    patched = outside_compiled(attention_guidance_forward, whole=False)
    setattr(patched, _TAPPED, _Tapped(_as_override(handler, block, dit, previous_override), below))
    model.add_object_patch(key, patched)


def install_tapped_handler(model, dit: DiTModel, blocks: list, handler: Handler, previous_override) -> None:
    """``handler`` on the self-attention of each of ``blocks`` (see the module's docstring)."""
    taps = dit.reach.taps
    for block in blocks:
        path = f"{block.host_name}.{taps.attention}"
        module = model.get_model_object(f"diffusion_model.{path}")
        missing = [name for name in (*taps.recorded, taps.output) if not hasattr(module, name)]
        if missing:
            raise ValueError(f"Attention guidance cannot guide this {dit.family} model: the self-attention of "
                             f"{block.index_name} ({path}) has no {', '.join(missing)}, which this ComfyUI builds "
                             "otherwise than the pack knows. Update the pack, or remove the node for this model.")
        reason = taps.check(module)
        if reason is not None:
            raise ValueError(f"Attention guidance cannot guide {block.index_name} of this {dit.family} model: {reason}. "
                             "Choose another block.")
    record_forward_options(model)
    for block in blocks:
        path = f"{block.host_name}.{taps.attention}"
        module = model.get_model_object(f"diffusion_model.{path}")
        patch_block_forward(model, path, _open_record(path))
        for name in taps.recorded:
            patch_block_forward(model, f"{path}.{name}", _keep_output(path, name))
        _patch_output(model, path, module, block, dit, handler, previous_override)



