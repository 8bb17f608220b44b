"""Guided attention where the host calls a block's self-attention without transformer_options.

No attention override reaches such a call (0.3.75 and 0.38.x: PixArt's and HunyuanDiT's self-attention), so
the family's ``dit_reach.AttentionTaps`` names where the module's queries, keys and values can be read: object
patches (the host's ``add_object_patch``, undone when the model is unpatched) on the module's ``forward`` open a
record for the call, on the named submodules keep their outputs, and on the output projection replace its input,
the host's attention output, with what our handler computes from the recorded queries, keys and values. The
handler sees a ``DiTAttention`` as under the override: rows it does not perturb go through the override the
model had when the node ran (or the host's attention), with the forward's own transformer_options
(``dit_reach.record_forward_options``). The host's own attention output is computed too and dropped: one more
attention in each chosen block.
"""
from __future__ import annotations

import contextvars

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


def install_tapped_handler(model, dit: DiTModel, blocks: list, handler: Handler, previous_override) -> None:
    """``handler`` on the self-attention of each of ``blocks`` (see the module's docstring)."""
    taps = dit.reach.taps
    for block in blocks:
        path = f"{block.host_name}.{taps.attention}"
        module = model.get_model_object(f"diffusion_model.{path}")
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
        patch_block_forward(model, f"{path}.{taps.output}", _guided_output(path, module, block, dit, handler,
                                                                          previous_override))



