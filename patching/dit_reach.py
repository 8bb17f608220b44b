"""How the attention override learns which DiT block is running: the ways into a family's blocks.

The host (0.3.75, comfy/ldm/modules/attention.py ``wrap_attn``) calls
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` wherever a model hands
transformer_options to ``optimized_attention`` (``dit_attention`` installs ours). What an attention call
does not say is which block it comes from and where its text and image tokens lie. Each family reaches its
blocks in one of eight ways (``DiTReach``, chosen in the family's registry module):

- ``host_block_marks``: the model sets ``transformer_options["block_type"]`` ("double" / "single") and
  ``["block_index"]`` before each block and offers ``("double_block", i)`` block replacements. The text
  length is the host's ``img_slice`` where it gives one (0.38.x), else measured from the text stream entering
  the first double block (a block replacement there writes it into the dict the model hands every block).
- ``joint_block_marks``: no block index (0.3.75); a block replacement on each chosen block runs the block with
  a copy of transformer_options that names it and carries its text and image token counts. A block may also
  run an image-only self-attention with the same options, told apart by its length.
- ``joint_and_single_block_marks``: no block index, double (joint) blocks whose text and image come in
  separate streams and single blocks that run on their concatenation: ``joint_block_marks`` on the double
  blocks; a block replacement on each chosen single block names it with the text length measured at the first
  double block (written there into the dict the model hands every block) and the rest of its input as image.
- ``video_block_marks``: no block index; a block replacement on each chosen block marks it with its token count;
  the first call of the block whose queries and keys both have that many tokens is its self-attention, every
  later call (the cross-attention to the text) goes to the previous override untouched.
- ``object_patch_marks``: no block index and no block replacement; an object patch on each chosen block's
  ``forward`` (the host's ``add_object_patch``, undone when the model is unpatched) names the block, and one on
  the module that first sees the image stream alone measures it; the text is the sequence less that stream.
- ``video_object_patch_marks``: no block index and no block replacement, video-only self-attention: an object
  patch on each chosen block's ``forward`` marks it as ``video_block_marks`` does, with the space-time token
  count of the block's input (every axis of it but the batch and the channels). Where the model runs its blocks
  without transformer_options (and they take them as a keyword), the patch hands them the forward's own.
- ``tapped_attention``: the attention is called without transformer_options, so no override reaches it: object
  patches on the chosen blocks' self-attention module read its queries, keys and values at its submodules and
  hand the input of its output projection the guided attention (``tapped_attention.py``).
- ``grid_object_patch_marks``: no block index and no block replacement, blocks at several resolutions on a
  ``[B, C, H, W]`` feature map whose attention takes the map's tokens as queries and ``cat(those tokens, text)`` as
  keys and values: an object patch on each chosen block's ``forward`` marks it with its input's ``(H, W)``, the
  token grid of its attention.

Where a module runs without transformer_options, the forward's own come from a context variable set by an
object patch on the diffusion model's ``forward`` (``record_forward_options``).

Token counts are always measured, never guessed; the latent's size comes from an APPLY_MODEL wrapper
(``dit_attention``), for the token grid.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable

from ..guidance_core.layer_spec import DiTBlock
from ..guidance_core.token_grid import patch_grid
from .compiled_model import outside_compiled
from .options import (
    GRID_BLOCK, GUIDANCE_OPTIONS, IMAGE_STREAM, JOINT_BLOCK, MARKED_BLOCK, TEXT_TOKENS, VIDEO_BLOCK, forward_options,
    guidance_options, running_forward,
)


class TokenOrder(enum.Enum):
    """Where the text is in a joint attention's sequence."""

    TEXT_FIRST = "text, then image"
    IMAGE_FIRST = "image, then text"
    VIDEO_ONLY = "video tokens only (the text comes in a separate cross-attention)"
    IMAGE_ONLY = "image tokens only (the text comes in a separate cross-attention)"
    IMAGE_QUERIES = "the image's tokens query; keys and values: the image's tokens, then the text's"


@dataclasses.dataclass(frozen=True)
class Located:
    """What an attention call's transformer_options say: the chosen block running (or None), its text tokens
    (None where unknown; negative ``-n`` where the text is the call's length less ``n``), and the mark our block
    replacement left (joint and video blocks)."""

    block: DiTBlock | None
    text_tokens: int | None = None
    mark: object = None


NOT_LOCATED = Located(None)


@dataclasses.dataclass(frozen=True)
class JointBlockMark:
    block: DiTBlock
    text_tokens: int
    image_tokens: int


@dataclasses.dataclass(frozen=True)
class GridBlockMark:
    """A chosen block running now, with the ``(h, w)`` grid of the feature map it was given: its attention's
    queries are that grid's tokens (row-major), its keys the same tokens followed by the text."""

    block: DiTBlock
    grid: tuple[int, int]


class VideoBlockMark:
    """A video DiT block running now: its space-time token count, and where its self-attention (the block's
    first attention call over that many queries and keys) stands: ``started`` once an override took it,
    ``handling`` while overrides are handling it. The overrides of chained nodes share the one mark the block
    runs with: an override below another sees each call the one above makes for the self-attention (one, or
    several for parts of its rows) as the self-attention too, and every later call as not."""

    def __init__(self, block: DiTBlock, tokens: int):
        self.block = block
        self.tokens = tokens
        self.started = False
        self.handling = 0

    def is_self_attention(self, length: int, key_length: int) -> bool:
        return length == self.tokens and key_length == self.tokens and (self.handling > 0 or not self.started)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTReach:
    """How attention guidance reaches the attention of one family's chosen blocks.

    ``mechanism`` says in words how the blocks are reached (for the docs); ``locate(transformer_options)`` reads an attention call's options; ``install(model, blocks)`` puts on the
    model (a clone) what lets ``locate`` name the chosen blocks; ``token_grid(patch size, latent size)`` is the
    generated image's token grid (``(frames, h, w)`` where ``frames``); ``text_length_site`` names, for
    messages, where the text length is measured; ``extra_image_tokens`` is the message where the image stream
    holds more tokens than the generated image's grid and they cannot be told apart (None where the extra
    tokens follow the image's, as reference latents do).
    """

    mechanism: str
    locate: Callable[[dict], Located]
    install: Callable[[object, list], None]
    token_order: TokenOrder = TokenOrder.TEXT_FIRST
    token_grid: Callable[[object, tuple], tuple] = patch_grid
    frames: bool = False
    text_length_site: str = "its first block"
    extra_image_tokens: str | None = None
    extra_tokens_follow: bool = False
    taps: "AttentionTaps | None" = None

    @property
    def image_first(self) -> bool:
        return self.token_order is TokenOrder.IMAGE_FIRST

    @property
    def video_only(self) -> bool:
        return self.token_order is TokenOrder.VIDEO_ONLY

    @property
    def no_text(self) -> bool:
        """The guided attention is over the image's or video's own tokens only."""
        return self.token_order in (TokenOrder.VIDEO_ONLY, TokenOrder.IMAGE_ONLY)

    @property
    def image_queries(self) -> bool:
        return self.token_order is TokenOrder.IMAGE_QUERIES


# the host's block replacements and object patches -------------------------------------------------------
def replace_block(model, block_name: str, index: int, run: Callable) -> None:
    """Put ``run(args, extra, previous_block)`` on the host's block replacement of one block, chained."""
    replacements = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    previous = replacements.get((block_name, index))
    # where the model is compiled, each of our frames here runs in Python and the block they run compiles
    # (compiled_model); a traced frame of ours would bake this forward's options into the compiled code
    run = outside_compiled(run, whole=False)

    def previous_block(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    previous_block = outside_compiled(previous_block, whole=False)

    def attention_guidance_block(args, extra):
        return run(args, extra, previous_block)

    model.set_model_patch_replace(outside_compiled(attention_guidance_block, whole=False), "dit", block_name, index)


def patch_block_forward(model, module: str, run: Callable) -> None:
    """An object patch on the ``forward`` of the diffusion model's ``module`` (e.g. ``layers.3``), chained:
    ``run(previous_forward, args, kwargs)``."""
    key = f"diffusion_model.{module}.forward"
    previous = model.get_model_object(key)  # the block's own forward, or an earlier node's patch
    run = outside_compiled(run, whole=False)  # as in replace_block

    def attention_guidance_forward(*args, **kwargs):
        return run(previous, args, kwargs)

    model.add_object_patch(key, outside_compiled(attention_guidance_forward, whole=False))


def _record_forward_options(previous, args, kwargs):
    options = kwargs.get("transformer_options")
    if options is None:
        return previous(*args, **kwargs)
    with running_forward(options):
        return previous(*args, **kwargs)


def record_forward_options(model) -> None:
    """An object patch on the diffusion model's ``forward`` that makes its transformer_options
    ``options.forward_options()`` while it runs (the host hands them to it as a keyword)."""
    key = "diffusion_model.forward"
    previous = model.get_model_object(key)
    if getattr(previous, "records_forward_options", False):
        return
    run = outside_compiled(_record_forward_options, whole=False)

    def attention_guidance_forward(*args, **kwargs):
        return run(previous, args, kwargs)

    attention_guidance_forward.records_forward_options = True
    model.add_object_patch(key, outside_compiled(attention_guidance_forward, whole=False))


def _with_ours(options: dict, **values) -> dict:
    return {**options, GUIDANCE_OPTIONS: {**options.get(GUIDANCE_OPTIONS, {}), **values}}


# host_block_marks --------------------------------------------------------------------------------------------
def _locate_host_marked(options: dict) -> Located:
    kind = options.get("block_type")
    if kind not in ("double", "single"):
        return NOT_LOCATED
    # the host's own img_slice [first image token, end] where it gives one (0.38.x), else ours
    image_slice = options.get("img_slice")
    if image_slice is not None and len(image_slice) == 2:
        text_tokens = int(image_slice[0])
    else:
        text_tokens = guidance_options(options).get(TEXT_TOKENS)
    # the host names blocks by kind and index; ours carry their module names, which do not count in equality
    return Located(DiTBlock(kind, options.get("block_index"), host_path="", diffusers_path=""), text_tokens)


def _stamp_text_tokens(args, extra, previous_block):
    options = args["transformer_options"]
    # in place: the model hands this same dict to every later block (as it does with block_index)
    options[GUIDANCE_OPTIONS] = {**options.get(GUIDANCE_OPTIONS, {}), TEXT_TOKENS: args["txt"].shape[1]}
    return previous_block(args, extra)


def _install_text_stamp(model, blocks) -> None:
    replace_block(model, "double_block", 0, _stamp_text_tokens)


def host_block_marks(*, token_order: TokenOrder = TokenOrder.TEXT_FIRST, frames: bool = False,
                     token_grid=patch_grid) -> DiTReach:
    return DiTReach(mechanism="the host's block_type / block_index marks; the text length from the host's img_slice "
                    "or measured at the first double block", locate=_locate_host_marked, install=_install_text_stamp, token_order=token_order,
                    token_grid=token_grid, frames=frames, text_length_site="its first double block")


# joint_block_marks -------------------------------------------------------------------------------------------
def _locate_joint(options: dict) -> Located:
    mark = guidance_options(options).get(JOINT_BLOCK)
    return Located(mark.block, mark.text_tokens, mark) if mark is not None else NOT_LOCATED


def _text_stream_tokens(args) -> int:
    text = args.get("txt")
    return 0 if text is None else text.shape[1]


def _mark_joint_block(block: DiTBlock, text_tokens_of: Callable[[dict], int] = _text_stream_tokens):
    def run(args, extra, previous_block):
        mark = JointBlockMark(block, text_tokens_of(args), args["img"].shape[1])
        return previous_block(dict(args, transformer_options=_with_ours(args["transformer_options"], **{JOINT_BLOCK: mark})),
                              extra)

    return run


def joint_block_marks(*, token_grid=patch_grid, token_order: TokenOrder = TokenOrder.TEXT_FIRST, frames: bool = False,
                      text_tokens_of: Callable[[dict], int] = _text_stream_tokens) -> DiTReach:
    """``text_tokens_of(args)``: the text tokens the block's attention takes, from its replacement's arguments
    (default: all of the ``txt`` stream's)."""

    def install(model, blocks) -> None:
        for block in blocks:
            replace_block(model, "double_block", block.index, _mark_joint_block(block, text_tokens_of))

    return DiTReach(mechanism="a block replacement on each chosen block names it and carries its text and image "
                    "token counts", locate=_locate_joint, install=install, token_grid=token_grid,
                    token_order=token_order, frames=frames, text_length_site="each chosen block")


# joint_and_single_block_marks --------------------------------------------------------------------------------
def _locate_joint_or_single(options: dict) -> Located:
    ours = guidance_options(options)
    mark = ours.get(JOINT_BLOCK)
    if mark is not None:
        return Located(mark.block, mark.text_tokens, mark)
    block = ours.get(MARKED_BLOCK)  # a single block run without the text length (see _mark_single_block)
    return Located(block) if block is not None else NOT_LOCATED


def _mark_single_block(block: DiTBlock):
    """Run a single block (its ``img`` is ``cat(text, image)``) with a copy of transformer_options that names it
    and carries its text and image token counts; where no text length was measured (another node replaced the
    first double block without running ours) it only names the block, and the handler says so."""

    def run(args, extra, previous_block):
        options = args["transformer_options"]
        text = guidance_options(options).get(TEXT_TOKENS)
        if text is None:
            ours = {MARKED_BLOCK: block}
        else:
            ours = {JOINT_BLOCK: JointBlockMark(block, text, args["img"].shape[1] - text)}
        return previous_block(dict(args, transformer_options=_with_ours(options, **ours)), extra)

    return run


def _install_joint_and_single_marks(model, blocks) -> None:
    for block in blocks:
        if block.kind == "single":
            replace_block(model, "single_block", block.index, _mark_single_block(block))
        else:
            replace_block(model, "double_block", block.index, _mark_joint_block(block))
    # last, so that it runs first: it writes the text length into the forward's own dict before a mark on the
    # first double block copies it
    replace_block(model, "double_block", 0, _stamp_text_tokens)


def joint_and_single_block_marks(*, token_grid=patch_grid) -> DiTReach:
    """Block replacements (``double_block`` with ``txt`` and ``img``, ``single_block`` with ``img`` = ``cat(text,
    image)``) that name each chosen block and carry its text and image token counts; the text first."""
    return DiTReach(mechanism="a block replacement on each chosen double or single block names it and carries its "
                    "text and image token counts; the text length of the single blocks is measured at the first "
                    "double block", locate=_locate_joint_or_single, install=_install_joint_and_single_marks,
                    token_grid=token_grid, text_length_site="its first double block")


# video_block_marks -------------------------------------------------------------------------------------------
def _locate_video(options: dict) -> Located:
    mark = guidance_options(options).get(VIDEO_BLOCK)
    return Located(mark.block, 0, mark) if mark is not None else NOT_LOCATED


def _mark_video_block(block: DiTBlock):
    def run(args, extra, previous_block):
        mark = VideoBlockMark(block, args["img"].shape[1])
        return previous_block(dict(args, transformer_options=_with_ours(args["transformer_options"], **{VIDEO_BLOCK: mark})),
                              extra)

    return run


def _install_video_marks(model, blocks) -> None:
    for block in blocks:
        replace_block(model, "double_block", block.index, _mark_video_block(block))


def video_block_marks() -> DiTReach:
    return DiTReach(mechanism="a block replacement on each chosen block marks it; its first attention over the "
                    "video tokens is the self-attention", locate=_locate_video, install=_install_video_marks, token_order=TokenOrder.VIDEO_ONLY,
                    frames=True, text_length_site="each chosen block")


# object_patch_marks ------------------------------------------------------------------------------------------
def _locate_object_marked(options: dict) -> Located:
    ours = guidance_options(options)
    block, image_stream = ours.get(MARKED_BLOCK), ours.get(IMAGE_STREAM)
    return Located(block, None if image_stream is None else -image_stream)


def _run_marked(options: dict, key: str, mark, previous, args, kwargs):
    """``previous(*args, **kwargs)`` with ``mark`` under our ``key`` in ``options``, in place (the dict is this
    forward's own, handed to every block, and what a block inside writes there must stay); the mark is taken off
    when it returns. Like the patches that call it, never traced where the model is compiled (``previous`` is)."""
    options[GUIDANCE_OPTIONS] = {**options.get(GUIDANCE_OPTIONS, {}), key: mark}
    try:
        return previous(*args, **kwargs)
    finally:
        options[GUIDANCE_OPTIONS] = {k: v for k, v in options[GUIDANCE_OPTIONS].items() if k != key}


_run_marked = outside_compiled(_run_marked, whole=False)


def _mark_block(block: DiTBlock):
    """Run the block with its transformer_options naming it. In place, as the host sets block_index: the
    dict is this forward's own, and what a block inside writes there (the image stream) must stay."""

    def run(previous, args, kwargs):
        options = kwargs.get("transformer_options")
        if options is None:
            return previous(*args, **kwargs)
        return _run_marked(options, MARKED_BLOCK, block, previous, args, kwargs)

    return run


def _stamp_image_stream(argument: str):
    """Write the token count of the module's first argument (``argument``) into the forward's
    transformer_options, in place: the model hands that same dict to every later block."""

    def run(previous, args, kwargs):
        options = kwargs.get("transformer_options")
        if options is not None:
            tokens = args[0] if args else kwargs[argument]
            options[GUIDANCE_OPTIONS] = {**options.get(GUIDANCE_OPTIONS, {}), IMAGE_STREAM: tokens.shape[1]}
        return previous(*args, **kwargs)

    return run


def object_patch_marks(*, measured_at: str, argument: str, token_order: TokenOrder = TokenOrder.TEXT_FIRST,
                       text_length_site: str, extra_image_tokens: str | None = None) -> DiTReach:
    """Object patches: one on the host module ``measured_at`` that measures the image stream from its
    ``argument``, one on each chosen block that names it."""

    def install(model, blocks) -> None:
        patch_block_forward(model, measured_at, _stamp_image_stream(argument))
        for block in blocks:
            patch_block_forward(model, block.host_name, _mark_block(block))

    return DiTReach(mechanism=f"object patches on each chosen block's forward name it; the image stream is "
                    f"measured at {measured_at}", locate=_locate_object_marked, install=install, token_order=token_order,
                    text_length_site=text_length_site, extra_image_tokens=extra_image_tokens)


# video_object_patch_marks ------------------------------------------------------------------------------------
def _batch_first_tokens(tokens) -> int:
    """Space-time tokens of a batch-first block input, ``[B, L, C]`` or ``[B, T, H, W, C]``."""
    return math.prod(tokens.shape[1:-1])


def _batch_fourth_tokens(tokens) -> int:
    """Space-time tokens of a ``[T, H, W, B, C]`` block input (the "THWBD" layout)."""
    return math.prod(tokens.shape[:3])


def _mark_video_block_forward(block: DiTBlock, count_tokens: Callable = _batch_first_tokens,
                              options_from_forward: bool = False):
    """Run the block with its transformer_options carrying a fresh ``VideoBlockMark`` (its input's space-time
    token count, ``count_tokens(input)``). In place, as ``_mark_block``: the dict is this
    forward's own; the mark is taken off when the block returns. ``options_from_forward``: where the block is
    called without transformer_options, it gets a copy of the forward's own."""

    def run(previous, args, kwargs):
        options = kwargs.get("transformer_options")
        if options is None and options_from_forward and forward_options() is not None:
            options = dict(forward_options())
            kwargs = {**kwargs, "transformer_options": options}
        tokens = args[0] if args else kwargs.get("x")
        if options is None or tokens is None:
            return previous(*args, **kwargs)
        mark = VideoBlockMark(block, count_tokens(tokens))
        return _run_marked(options, VIDEO_BLOCK, mark, previous, args, kwargs)

    return run


def video_object_patch_marks(*, batch_axis: int = 0, options_from_forward: bool = False,
                             extra_tokens_follow: bool = False) -> DiTReach:
    """Object patches on each chosen block's ``forward`` (which must take the video tokens first and
    transformer_options as a keyword) that mark it as ``video_block_marks`` does. ``batch_axis``: where the batch
    is in the block's input, 0 (``[B, L, C]`` / ``[B, T, H, W, C]``) or 3 (``[T, H, W, B, C]``).
    ``options_from_forward``: the model runs its blocks without transformer_options; each chosen block gets the
    forward's own. ``extra_tokens_follow``: see ``DiTReach``."""
    if batch_axis not in (0, 3):
        raise ValueError(f"video blocks take their batch first or fourth, not at axis {batch_axis}")
    count_tokens = _batch_first_tokens if batch_axis == 0 else _batch_fourth_tokens

    def install(model, blocks) -> None:
        if options_from_forward:
            record_forward_options(model)
        for block in blocks:
            patch_block_forward(model, block.host_name,
                                _mark_video_block_forward(block, count_tokens, options_from_forward))

    mechanism = ("object patches on each chosen block's forward mark it with its input's space-time token count; its "
                 "first attention over that many tokens is the self-attention")
    if options_from_forward:
        mechanism += "; the blocks, run without transformer_options, are handed the forward's own"
    return DiTReach(mechanism=mechanism, locate=_locate_video, install=install, token_order=TokenOrder.VIDEO_ONLY,
                    frames=True, text_length_site="each chosen block", extra_tokens_follow=extra_tokens_follow)


# tapped_attention --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionTaps:
    """Where a block's self-attention, which the host runs without transformer_options, can be read and guided.

    ``attention``: the self-attention module, under the block. ``recorded``: its submodules whose outputs are kept
    while it runs. ``qkv(module, recorded, args, kwargs)``: the queries, keys and values the host's attention takes,
    each ``[B, heads, L, D]``, from the recorded outputs and the arguments of the module's forward. ``output``: the
    submodule whose input is the attention's output (``[B, L, heads * D]``); the guided attention replaces it.
    ``check(module)``: a reason this module cannot be guided, or None.
    """

    attention: str
    recorded: tuple[str, ...]
    qkv: Callable
    output: str
    check: Callable[[object], str | None] = lambda module: None


def _install_nothing(model, blocks) -> None:
    return None


def tapped_attention(taps: AttentionTaps, *, token_grid=patch_grid) -> DiTReach:
    """The chosen blocks' self-attention (image tokens only), read at its submodules (``AttentionTaps``)."""
    return DiTReach(mechanism=f"the host calls its attention without transformer_options, so no override reaches "
                    f"it: object patches on each chosen block's self-attention ({taps.attention}) read its queries, "
                    f"keys and values at {', '.join(taps.recorded)} and hand its output projection ({taps.output}) "
                    "the guided attention", locate=lambda options: NOT_LOCATED, install=_install_nothing,
                    token_order=TokenOrder.IMAGE_ONLY, token_grid=token_grid, text_length_site="each chosen block",
                    taps=taps)


# grid_object_patch_marks -------------------------------------------------------------------------------------
def _locate_grid(options: dict) -> Located:
    mark = guidance_options(options).get(GRID_BLOCK)
    return Located(mark.block, 0, mark) if mark is not None else NOT_LOCATED


def _mark_grid_block(block: DiTBlock):
    """Run the block with its transformer_options carrying a ``GridBlockMark`` of its input's ``(H, W)``; in place,
    as ``_mark_block``, and taken off when the block returns."""

    def run(previous, args, kwargs):
        options = kwargs.get("transformer_options")
        feature_map = args[0] if args else kwargs.get("x")
        if options is None or feature_map is None or feature_map.ndim != 4:
            return previous(*args, **kwargs)
        mark = GridBlockMark(block, (int(feature_map.shape[-2]), int(feature_map.shape[-1])))
        return _run_marked(options, GRID_BLOCK, mark, previous, args, kwargs)

    return run


def measured_grid(latent_size, patch_size) -> tuple[int, ...]:
    """each chosen block's own (h, w), measured at its input (every level of the model has its own resolution)"""
    raise RuntimeError("Attention guidance: this model's token grids are measured at each chosen block, not derived "
                       "from the latent.")


def grid_object_patch_marks() -> DiTReach:
    """Object patches on each chosen block's ``forward`` (which must take a ``[B, C, H, W]`` feature map first and
    transformer_options as a keyword) that mark it with the map's ``(H, W)``; its attention calls whose queries are
    that many tokens are guided, their keys being those tokens followed by the text."""

    def install(model, blocks) -> None:
        for block in blocks:
            patch_block_forward(model, block.host_name, _mark_grid_block(block))

    return DiTReach(mechanism="object patches on each chosen block's forward mark it with its input's (h, w) grid; "
                    "its attention's queries are that grid's tokens, its keys those tokens and then the text",
                    locate=_locate_grid, install=install, token_order=TokenOrder.IMAGE_QUERIES,
                    token_grid=measured_grid, text_length_site="each chosen block")
