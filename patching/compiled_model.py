"""Right results where the model is compiled with guards on transformer_options dropped.

The newest host's TorchCompileModel compiles with a guard filter that drops every dynamo guard whose name
contains ``transformer_options`` (``skip_torch_compile_dict``, comfy_api/torch_helpers/torch_compile.py,
0.38.x), and other compile nodes copy it. Whatever the traced code read through transformer_options (its keys,
the patch functions, the values in them) is then baked into the compiled code at the first trace and never
checked again; dynamo keeps its compiled code per code object (``UNetModel.forward``, the blocks' forwards), so
that first trace also serves every other model with the same code and tensor shapes whose compile uses an
equal backend, with or without the filter, in the whole process.

Four things keep the guidance right there:

- ``outside_compiled``: every handler of this pack inside the model (attn1 replacements, the attention
  override, the DiT block marks) runs in Python, never traced (``torch.compiler.disable``). At a call to it the
  compiled code breaks its graph and fetches the function and its arguments from the live transformer_options,
  so the handler sees this forward's state: guided or not, which chunks are the copy, CFG on or off, the batch
  layout. Cost: one graph break per handler call (DiT: at every attention call of the model, since the
  attention override is one slot for all of them).
- ``GUIDANCE_OPTIONS`` is in every forward of a patched model (empty where a step is not guided): the host's
  traced code copies transformer_options key by key (BasicTransformerBlock builds its extra_options so), and a
  key that came and went between steps would be missing from, or looked up in vain by, the baked code.
- ``apart_when_compiled`` (an APPLY_MODEL wrapper): where the model is compiled, each forward runs under a
  pass-through torch function mode whose class stands for the structure of its transformer_options (keys, the
  code of the functions in them, never the values that change per step). Dynamo does guard the mode stack, so a
  guided model never runs code traced for a model without the guidance or with other layers (which would skip
  the guidance, or look up handlers that model does not have), and vice versa.
- On a compiled UNet, an attn1 replacement at every transformer block that runs what the host runs at the block
  it is called from (``unet_attention.attention_at_live_site``; our handlers do the same): once the graph
  breaks inside the blocks' loops, each transformer block compiles as a frame of its own, shared by the blocks
  of equal shapes with the replacement the first of them looked up. Cost: a graph break at every transformer
  block's attn1 while the model is compiled.
"""
from __future__ import annotations

import types
from typing import Callable

import comfy.patcher_extension
import torch
from torch.overrides import TorchFunctionMode

from .options import ATTN1_REPLACEMENTS, GUIDANCE_OPTIONS

# The key under which comfy_api.torch_helpers.set_torch_compile_wrapper (0.3.75, 0.38.x; TorchCompileModel and the
# compile nodes built on it) adds its APPLY_MODEL wrapper
HOST_COMPILE_KEY = "torch.compile"
APART_KEY = "attention_guidance_compiled"


def outside_compiled(function: Callable, whole: bool = True) -> Callable:
    """``function`` as dynamo will never trace it. ``whole=False``: only its own frame; what it calls (the host's
    block) is compiled as usual."""
    return torch.compiler.disable(function, recursive=whole)


class _PassThrough(TorchFunctionMode):
    """Changes nothing; its class is what dynamo guards (the torch function mode stack)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


_MODES: dict = {}


def _structure(value, depth: int = 0):
    """What traced code can bake from a transformer_options value: dict keys, list lengths, the code of functions,
    strings and flags; not numbers, tensors or other objects (their types only), which change per step."""
    if depth > 12:
        return type(value)
    if isinstance(value, dict):  # in any order: the code reads a dict by key
        return dict, frozenset((key, None if key == GUIDANCE_OPTIONS else _structure(item, depth + 1))
                               for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return (type(value),) + tuple(_structure(item, depth + 1) for item in value)
    if isinstance(value, (str, bool, types.NoneType)):
        return value
    code = getattr(value, "__code__", None)
    if code is not None:
        return code
    return type(value)


def structure_mode(transformer_options: dict) -> type:
    """The pass-through mode class that stands for this forward's transformer_options structure."""
    key = _structure(transformer_options)
    mode = _MODES.get(key)
    if mode is None:
        mode = type(f"AttentionGuidanceForward{len(_MODES)}", (_PassThrough,), {})
        _MODES[key] = mode
    return mode


def is_compiled(base_model, transformer_options: dict) -> bool:
    """Whether this forward runs compiled code: the host's compile wrapper is on the model (whole model or chosen
    blocks), or its diffusion model is a compiled module."""
    apply_model_wrappers = transformer_options.get("wrappers", {}).get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})
    if HOST_COMPILE_KEY in apply_model_wrappers:
        return True
    return isinstance(getattr(base_model, "diffusion_model", None), torch._dynamo.eval_frame.OptimizedModule)


def apart_when_compiled(attn1_blocks: list, live_site: Callable | None):
    """APPLY_MODEL wrapper: our options in every forward, and a compiled forward under its structure's mode.

    On a UNet (``attn1_blocks``: the host's ``(block, id)`` of its SpatialTransformers) a compiled forward also
    has an attn1 replacement at every such block, ``live_site``, which runs what the host runs at the block it is
    called from (``unet_attention.attention_at_live_site``): dynamo breaks the graph at our handlers inside the blocks'
    loops, so each transformer block compiles as a frame of its own, which blocks of the same shapes share with
    the replacement the first of them looked up, whether ours or none.
    """

    def attention_guidance_apart(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        replacements = transformer_options.get("patches_replace", {}).get("attn1", {})
        ours = {**transformer_options.get(GUIDANCE_OPTIONS, {}), ATTN1_REPLACEMENTS: replacements}
        transformer_options = {**transformer_options, GUIDANCE_OPTIONS: ours}
        if not is_compiled(executor.class_obj, transformer_options):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        filled = {block: live_site for block in attn1_blocks if block not in replacements}
        if filled:
            patches_replace = transformer_options.get("patches_replace", {})
            transformer_options["patches_replace"] = {**patches_replace, "attn1": {**replacements, **filled}}
        with structure_mode(transformer_options)():
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    return attention_guidance_apart


def keep_apart_when_compiled(model, attn1_blocks: list = (), live_site: Callable | None = None) -> None:
    """Install ``apart_when_compiled`` on ``model`` (a node's clone) once."""
    if not model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, APART_KEY):
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, APART_KEY,
                                   apart_when_compiled(list(attn1_blocks), live_site))
