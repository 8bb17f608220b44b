"""Our handlers inside the attention of chosen DiT blocks, through the host's attention override.

The host (0.3.75, comfy/ldm/modules/attention.py ``wrap_attn``) calls
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` instead of its attention
function ``func`` wherever a model hands transformer_options to ``optimized_attention``. The slot holds
one function: we keep the override the model had when the node ran and call it (or ``func``) for
every call and every row we do not compute ourselves, so overrides chain. Which block a call comes from,
and where its text and image tokens lie, the family's ``dit_reach.DiTReach`` says.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import comfy.patcher_extension
import torch

from ..guidance_core.layer_spec import DiTBlock
from ..guidance_core.rows import chunk_rows, split_by_chunk
from .compiled_model import keep_apart_when_compiled, outside_compiled
from .dit_reach import DiTReach, GridBlockMark, JointBlockMark, VideoBlockMark
from .options import GUIDANCE_OPTIONS, LATENT_FRAMES, LATENT_HW, chunk_ids, guidance_options, options_for_chunks
from .run_state import WRAPPER_KEY

OVERRIDE = "optimized_attention_override"

# The host attention functions' parameters (attention_pytorch and the others, 0.3.75), positional order. Any
# other keyword goes through to the previous override untouched; newer hosts add ``scale`` (the factor of QK^T)
# and ``enable_gqa`` (fewer k/v heads than q heads), which our own computations honour, and
# ``low_precision_attention`` (0.38.x).
_PARAMETERS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _run_attention(func, *args, **kwargs):
    """What runs when no override was set: the host's own attention function."""
    return func(*args, **kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTModel:
    """What a handler needs to know of the model it runs in: its family's name (for messages), how the
    family's blocks are reached (token order, grid rule) and its patch size (an int, or one per latent axis)."""

    family: str
    reach: DiTReach
    patch_size: object


class DiTAttention:
    """One attention call inside a chosen block, as a handler sees it.

    ``q``, ``k``, ``v`` are in the caller's layout (``[B, L, heads * D]``, or ``[B, heads, L, D]`` where the
    caller passed ``skip_reshape``); ``q_heads()`` etc. give ``[B, heads, L, D]``. ``chunks`` is the host's
    ``cond_or_uncond`` for these rows. ``joint`` is False only for a block's image-only self-attention; text
    tokens come first, except where the family's token order puts the image first. Where only the image's tokens
    query (``image_queries``), ``q`` holds them alone and ``k``, ``v`` the same tokens followed by the text's;
    ``grid`` is then the token grid measured at the block.
    """

    def __init__(self, previous, func, values: dict, positional: int, *, block: DiTBlock, model: DiTModel,
                 text_tokens: int | None, joint: bool, grid: tuple[int, ...] | None = None):
        self._previous = previous
        self._func = func
        self._values = values
        self._positional = positional
        self.block = block
        self.model = model
        self._text_tokens = text_tokens
        self.joint = joint
        self._grid = grid

    def _with(self, **changes) -> "DiTAttention":
        fields = {"values": self._values, "block": self.block, "model": self.model, "text_tokens": self._text_tokens,
                  "joint": self.joint, "grid": self._grid, **changes}
        values = fields.pop("values")
        return DiTAttention(self._previous, self._func, values, self._positional, **fields)

    # what the call carries ---------------------------------------------------------------------------
    @property
    def q(self) -> torch.Tensor:
        return self._values["q"]

    @property
    def k(self) -> torch.Tensor:
        return self._values["k"]

    @property
    def v(self) -> torch.Tensor:
        return self._values["v"]

    @property
    def heads(self) -> int:
        return self._values["heads"]

    @property
    def mask(self):
        return self._values.get("mask")

    @property
    def scale(self) -> float | None:
        """The factor of ``QK^T`` where the caller gives one (``scale``), else None: ``1 / sqrt(D)``."""
        return self._values.get("scale")

    @property
    def image_first(self) -> bool:
        return self.model.reach.image_first

    @property
    def image_queries(self) -> bool:
        """True where the queries are the image's tokens alone and the keys those tokens, then the text."""
        return self.model.reach.image_queries

    @property
    def options(self) -> dict:
        """The call's transformer_options."""
        return self._values.get("transformer_options") or {}

    @property
    def chunks(self) -> list:
        return chunk_ids(self.options)

    @property
    def length(self) -> int:
        return self.q.shape[2] if self._values.get("skip_reshape") else self.q.shape[1]

    @property
    def key_length(self) -> int:
        return self.k.shape[2] if self._values.get("skip_reshape") else self.k.shape[1]

    @property
    def text_tokens(self) -> int:
        if self._text_tokens is None:
            raise RuntimeError(
                f"Attention guidance could not read the text length of this {self.model.family} forward at "
                f"{self.block.index_name}: another node replaced {self.model.reach.text_length_site} of the model, "
                "where the guidance measures it, without running ours. Apply the attention guidance node after "
                "that node."
            )
        return self._text_tokens

    def image_tokens_of_grid(self) -> slice:
        """Where the generated image's grid tokens are in the sequence: right after the text (reference latents
        follow the image), at the end of the image part where the image comes first (reference latents come
        before it), all of a video block's tokens, or all the queries (and as many keys) where only the image
        queries."""
        grid = self.image_grid()
        count = math.prod(grid)
        if self.image_first:
            image_tokens = self.length - self.text_tokens
            return slice(image_tokens - count, image_tokens)
        if self.model.reach.no_text and count != self.length:
            if self.model.reach.extra_tokens_follow and count < self.length:
                return slice(0, count)  # reference or motion latents after the video's own tokens
            raise RuntimeError(
                f"Attention guidance: {self.block.index_name} attends over {self.length} tokens, not the "
                f"{'x'.join(map(str, grid))} tokens of the latent: the model adds reference or context "
                "latents to the sequence, and SAG (its map) and SEG (its blur) cannot tell the latent's own tokens "
                "apart there. Use PAG, or run without those latents."
            )
        return slice(self.text_tokens, self.text_tokens + count)

    def image_grid(self) -> tuple[int, ...]:
        """``(h, w)`` token grid of the generated image, ``(frames, h, w)`` on a video DiT (see
        ``image_tokens_of_grid``); the grid measured at the block where the family's blocks have their own."""
        if self._grid is not None:
            return self._grid
        ours = guidance_options(self.options)
        latent_hw = ours.get(LATENT_HW)
        if latent_hw is None:
            raise RuntimeError(f"Attention guidance: the latent size of this forward is unknown at {self.block.index_name}.")
        frames = ours.get(LATENT_FRAMES) if self.model.reach.frames else None
        grid = self.model.reach.token_grid(latent_hw if frames is None else (frames, *latent_hw), self.model.patch_size)
        image_tokens = self.length - self.text_tokens
        if math.prod(grid) > image_tokens:
            raise RuntimeError(
                f"Attention guidance: {self.block.index_name} has {image_tokens} image tokens, fewer than the "
                f"{'x'.join(map(str, grid))} grid of the {tuple(latent_hw)} latent."
            )
        if self.model.reach.extra_image_tokens is not None and image_tokens != math.prod(grid):
            raise RuntimeError(
                f"Attention guidance: {self.block.index_name} has {image_tokens} image tokens, not the "
                f"{'x'.join(map(str, grid))} of the generated image: {self.model.reach.extra_image_tokens}"
            )
        return grid

    def to_heads(self, t: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        if self._values.get("skip_reshape"):
            return t
        # [B, L, heads * D]; some callers hand v over as [B, L, heads, D]
        return t.reshape(t.shape[0], t.shape[1], heads or self.heads, -1).transpose(1, 2)

    def q_heads(self):
        return self.to_heads(self.q)

    def _kv_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``k`` or ``v`` as ``[B, heads, L, D]``. With ``enable_gqa`` a call may give fewer k/v heads, each
        shared by ``heads / kv_heads`` consecutive query heads (torch's scaled_dot_product_attention)."""
        if not self._values.get("enable_gqa"):
            return self.to_heads(t)
        kv_heads = self.k.shape[1] if self._values.get("skip_reshape") else self.k.shape[-1] // self.q_heads().shape[-1]
        grouped = self.to_heads(t, kv_heads)
        if self.heads % grouped.shape[1]:
            raise RuntimeError(f"Attention guidance: {self.heads} query heads cannot share {grouped.shape[1]} k/v heads.")
        return grouped.repeat_interleave(self.heads // grouped.shape[1], dim=1)

    def k_heads(self):
        return self._kv_heads(self.k)

    def v_heads(self):
        return self._kv_heads(self.v)

    def with_queries(self, q_heads: torch.Tensor) -> "DiTAttention":
        """This call with other queries, given as ``[B, heads, L, D]``."""
        q = q_heads if self._values.get("skip_reshape") else q_heads.transpose(1, 2).reshape(self.q.shape)
        return self._with(values=dict(self._values, q=q))

    def from_heads(self, out: torch.Tensor) -> torch.Tensor:
        """``[B, heads, L, D]`` in the layout the caller expects back."""
        if self._values.get("skip_output_reshape"):
            return out
        batch, heads, length, dim = out.shape
        return out.transpose(1, 2).reshape(batch, length, heads * dim)

    # computing --------------------------------------------------------------------------------------
    def run(self) -> torch.Tensor:
        """What this call computes without our handler: the previous override or the host's attention."""
        values = dict(self._values)
        args = tuple(values.pop(name) for name in _PARAMETERS[: self._positional])
        return self._previous(self._func, *args, **values)

    def part(self, q, k, v, positions: list[int]) -> "DiTAttention":
        """This call restricted to the chunks at ``positions`` (``q``, ``k``, ``v`` already restricted)."""
        values = dict(self._values, q=q, k=k, v=v)
        if positions != list(range(len(self.chunks))):
            values["transformer_options"] = options_for_chunks(self.options, positions)
            mask = self.mask
            if mask is not None and mask.ndim >= 3 and mask.shape[0] == self.q.shape[0] and mask.shape[0] > 1:
                values["mask"] = mask[chunk_rows(self.chunks, positions, mask.shape[0], mask.device)]
        return self._with(values=values)

    def split(self, selected: Callable[[int], bool], on_selected: Callable[["DiTAttention"], torch.Tensor],
              on_rest: Callable[["DiTAttention"], torch.Tensor]) -> torch.Tensor:
        """``on_selected`` for the rows of the chunks whose cond id is ``selected``, ``on_rest`` for the others."""
        return split_by_chunk(
            self.q, self.k, self.v, self.chunks, selected,
            lambda q, k, v, positions: on_selected(self.part(q, k, v, positions)),
            lambda q, k, v, positions: on_rest(self.part(q, k, v, positions)),
        )


Handler = Callable[[DiTAttention], torch.Tensor]


def _stamp_latent_size(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    ours = {**transformer_options.get(GUIDANCE_OPTIONS, {}), LATENT_HW: tuple(x.shape[-2:]),
            LATENT_FRAMES: x.shape[2] if x.ndim == 5 else None}
    return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, GUIDANCE_OPTIONS: ours}, **kwargs)


def install_dit_handler(model, dit: DiTModel, blocks: list[DiTBlock], handler: Handler, guard=None) -> None:
    """Run ``handler(call)`` for every attention call in ``blocks`` of ``model`` (a clone); it returns the
    call's output and must use ``call.run()`` (or ``call.split``) for every row it does not compute itself.
    With ``guard`` (a ``displacement.DisplacementGuard``) it keeps acting where a later override replaces ours."""
    reach = dit.reach
    chosen = {block: block for block in blocks}
    transformer_options = model.model_options.setdefault("transformer_options", {})
    if reach.taps is not None:  # no override reaches this family's attention
        from .tapped_attention import install_tapped_handler

        keep_apart_when_compiled(model)
        install_tapped_handler(model, dit, blocks, handler, transformer_options.get(OVERRIDE, _run_attention))
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _stamp_latent_size)
        return

    def make_override(previous):
        def attention_guidance_override(func, *args, **kwargs):
            located = reach.locate(kwargs.get("transformer_options") or {})
            block = chosen.get(located.block) if located.block is not None else None
            if block is None:
                return previous(func, *args, **kwargs)
            values = dict(zip(_PARAMETERS, args), **kwargs)
            call = DiTAttention(previous, func, values, len(args), block=block, model=dit,
                                text_tokens=located.text_tokens, joint=True)
            if located.text_tokens is not None and located.text_tokens < 0:  # the call's length less the image stream
                call = call._with(text_tokens=call.length + located.text_tokens)
            mark = located.mark
            if isinstance(mark, VideoBlockMark):
                # the block's first call with as many queries and keys as video tokens is its self-attention;
                # the cross-attention to the text (and to image embeddings) that follows is left alone
                if not mark.is_self_attention(call.length, call.key_length):
                    return previous(func, *args, **kwargs)
                mark.started = True
                mark.handling += 1
                try:
                    return handler(call)
                finally:
                    mark.handling -= 1
            if isinstance(mark, GridBlockMark):
                # the block's attention: as many queries as its input has pixels, keys those and then the text
                if call.length != math.prod(mark.grid) or call.key_length < call.length:
                    return previous(func, *args, **kwargs)
                return handler(call._with(text_tokens=0, grid=mark.grid))
            if isinstance(mark, JointBlockMark) and call.length != mark.text_tokens + mark.image_tokens:
                if call.length != mark.image_tokens:
                    return previous(func, *args, **kwargs)  # not one of the block's self-attentions
                call = call._with(text_tokens=0, joint=False)  # the block's image-only self-attention
            return handler(call)

        return attention_guidance_override

    previous = transformer_options.get(OVERRIDE, _run_attention)
    keep_apart_when_compiled(model)
    transformer_options[OVERRIDE] = (outside_compiled(make_override(previous)) if guard is None
                                     else guard.override(make_override, previous))
    reach.install(model, blocks)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _stamp_latent_size)


def patch_size_of(diffusion_model):
    """The model's patch size: an int, or one per latent axis (video DiTs; a patchifier's where the model has one;
    ``(patch_temporal, patch_spatial, patch_spatial)`` where the model names its two patch sizes so; None where it
    says none, as a model whose blocks' grids are measured)."""
    size = getattr(diffusion_model, "patch_size", None)
    if size is None and hasattr(diffusion_model, "patchifier"):
        size = diffusion_model.patchifier.patch_size
    if size is None and hasattr(diffusion_model, "patch_spatial") and hasattr(diffusion_model, "patch_temporal"):
        spatial = int(diffusion_model.patch_spatial)
        size = (int(diffusion_model.patch_temporal), spatial, spatial)
    if size is None:
        return None
    return tuple(int(p) for p in size) if isinstance(size, (tuple, list)) else int(size)
