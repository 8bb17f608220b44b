"""Our handlers inside the attention of chosen DiT blocks, through the host's attention override.

The host (0.3.75, comfy/ldm/modules/attention.py ``wrap_attn``) calls
``transformer_options["optimized_attention_override"](func, *args, **kwargs)`` instead of its attention
function ``func`` wherever a model hands transformer_options to ``optimized_attention``. The slot holds
one function: we keep the override the model had when the node ran and call it (or ``func``) for
every call and every row we do not compute ourselves, so overrides chain.

Where a call comes from:

- Flux and Chroma (comfy/ldm/flux/model.py, comfy/ldm/chroma/model.py ``forward_orig``) set
  ``transformer_options["block_type"]`` ("double" / "single") and ``["block_index"]`` before each
  block; each block has one attention, over ``cat(text, image)`` (image tokens include Kontext
  reference latents after the generated image). 0.38.x also sets ``["img_slice"]`` = ``[text tokens,
  end]``, which is used where present.
- SD3's MMDiT (comfy/ldm/modules/diffusionmodules/mmdit.py) sets no block index in 0.3.75. A block
  replacement (``patches_replace["dit"][("double_block", i)]``) on each chosen block runs the original
  block with a copy of transformer_options that names the block and carries its text and image token
  counts from the block's inputs. Its joint attention runs over ``cat(text, image)``; SD3.5 Medium blocks
  also run an image-only self-attention (``attn2``) with the same options, told apart by its length.

Token counts are always measured, never guessed: MMDiT's from the block inputs; Flux's text length from
the host's ``img_slice`` where it gives one, else from the text stream entering its first double block (a block replacement there writes it into the forward's
transformer_options, the dict Flux hands to every later block, as it does with ``block_index``); the
latent's size from an APPLY_MODEL wrapper, for the token grid.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import comfy.patcher_extension
import torch

from ..guidance_core.layer_spec import DiTBlock, DiTLayout
from ..guidance_core.rows import chunk_rows, split_by_chunk
from .attention_sites import GUIDANCE_OPTIONS, chunk_ids, guidance_options, options_for_chunks
from .batched_pass import WRAPPER_KEY

OVERRIDE = "optimized_attention_override"
# Keys under transformer_options[GUIDANCE_OPTIONS]:
MMDIT_BLOCK = "dit_mmdit_block"  # the MMDiT block running now (an MMDiTBlockMark), set by our block replacement
TEXT_TOKENS = "dit_text_tokens"  # Flux: text tokens of this forward
LATENT_HW = "dit_latent_hw"  # (H, W) of the latent this forward runs on

# The host attention functions' parameters (attention_pytorch and the others, 0.3.75), positional order. Any
# other keyword goes through to the previous override untouched; newer hosts add ``scale`` (the factor of QK^T)
# and ``enable_gqa`` (fewer k/v heads than q heads), which our own computations honour, and
# ``low_precision_attention`` (0.38.x).
_PARAMETERS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


@dataclasses.dataclass(frozen=True)
class MMDiTBlockMark:
    block: DiTBlock
    text_tokens: int
    image_tokens: int


def _run_attention(func, *args, **kwargs):
    """What runs when no override was set: the host's own attention function."""
    return func(*args, **kwargs)


def token_grid(architecture: str, patch_size: int, latent_hw) -> tuple[int, int]:
    """The image token grid the model makes of an ``(H, W)`` latent (each pads to its patch size)."""
    height, width = latent_hw
    if architecture == "mmdit":  # MMDiT.cropped_pos_embed / unpatchify
        return (height + 1) // patch_size, (width + 1) // patch_size
    # Flux._forward and Chroma._forward: (h + p // 2) // p, which is ceil(h / p) for their patch sizes
    # (1, 2); Chroma Radiance pads its pixels to the patch size (16) first: ceil(h / p)
    return -(-height // patch_size), -(-width // patch_size)


class DiTAttention:
    """One attention call inside a chosen block, as a handler sees it.

    ``q``, ``k``, ``v`` are in the caller's layout (``[B, L, heads * D]``, or ``[B, heads, L, D]`` where the
    caller passed ``skip_reshape``); ``q_heads()`` etc. give ``[B, heads, L, D]``. ``chunks`` is the host's
    ``cond_or_uncond`` for these rows. ``joint`` is False only for SD3.5's image-only ``attn2``; text tokens
    come first.
    """

    def __init__(self, previous, func, values: dict, positional: int, block: DiTBlock, architecture: str,
                 patch_size: int, text_tokens: int | None, joint: bool):
        self._previous = previous
        self._func = func
        self._values = values
        self._positional = positional
        self.block = block
        self.architecture = architecture
        self.patch_size = patch_size
        self._text_tokens = text_tokens
        self.joint = joint

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
    def text_tokens(self) -> int:
        if self._text_tokens is None:
            raise RuntimeError(
                f"Attention guidance could not read the text length of this Flux / Chroma forward at "
                f"{self.block.index_name}: another node replaced the model's first double block without running "
                "ours. Apply the attention guidance node after that node."
            )
        return self._text_tokens

    def image_grid(self) -> tuple[int, int]:
        """``(h, w)`` token grid of the generated image: its tokens are the first ``h * w`` after the text."""
        latent_hw = guidance_options(self.options).get(LATENT_HW)
        if latent_hw is None:
            raise RuntimeError(f"Attention guidance: the latent size of this forward is unknown at {self.block.index_name}.")
        grid = token_grid(self.architecture, self.patch_size, latent_hw)
        image_tokens = self.length - self.text_tokens
        if grid[0] * grid[1] > image_tokens:
            raise RuntimeError(
                f"Attention guidance: {self.block.index_name} has {image_tokens} image tokens, fewer than the "
                f"{grid[0]}x{grid[1]} grid of the {tuple(latent_hw)} latent."
            )
        return grid

    def to_heads(self, t: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        if self._values.get("skip_reshape"):
            return t
        # [B, L, heads * D]; MMDiT hands v over as [B, L, heads, D] (mmdit.py split_qkv)
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
        return DiTAttention(self._previous, self._func, values, self._positional, self.block, self.architecture,
                            self.patch_size, self._text_tokens, self.joint)

    def split(self, selected: Callable[[int], bool], on_selected: Callable[["DiTAttention"], torch.Tensor],
              on_rest: Callable[["DiTAttention"], torch.Tensor]) -> torch.Tensor:
        """``on_selected`` for the rows of the chunks whose cond id is ``selected``, ``on_rest`` for the others."""
        return split_by_chunk(
            self.q, self.k, self.v, self.chunks, selected,
            lambda q, k, v, positions: on_selected(self.part(q, k, v, positions)),
            lambda q, k, v, positions: on_rest(self.part(q, k, v, positions)),
        )


Handler = Callable[[DiTAttention], torch.Tensor]


def _locate(architecture: str, options: dict):
    """(block, text tokens or None, mark) of the attention call with these transformer_options."""
    if architecture == "mmdit":
        mark = guidance_options(options).get(MMDIT_BLOCK)
        return (mark.block, mark.text_tokens, mark) if mark is not None else (None, None, None)
    kind = options.get("block_type")
    if kind not in ("double", "single"):
        return None, None, None
    return DiTBlock(kind, options.get("block_index")), _flux_text_tokens(options), None


def _flux_text_tokens(options: dict) -> int | None:
    """The text tokens before the image in this Flux-style joint attention: the host's own ``img_slice``
    ``[first image token, end]`` where it gives one (0.38.x), else ours measured at the first double block."""
    image_slice = options.get("img_slice")
    if image_slice is not None and len(image_slice) == 2:
        return int(image_slice[0])
    return guidance_options(options).get(TEXT_TOKENS)


def _replace_block(model, block_name: str, index: int, run: Callable) -> None:
    """Put ``run(args, extra, previous_block)`` on the host's block replacement of one block, chained."""
    replacements = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    previous = replacements.get((block_name, index))

    def previous_block(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def attention_guidance_block(args, extra):
        return run(args, extra, previous_block)

    model.set_model_patch_replace(attention_guidance_block, "dit", block_name, index)


def _mark_mmdit_block(block: DiTBlock):
    def run(args, extra, previous_block):
        options = args["transformer_options"]
        text = args.get("txt")
        mark = MMDiTBlockMark(block, 0 if text is None else text.shape[1], args["img"].shape[1])
        marked = {**options, GUIDANCE_OPTIONS: {**options.get(GUIDANCE_OPTIONS, {}), MMDIT_BLOCK: mark}}
        return previous_block(dict(args, transformer_options=marked), extra)

    return run


def _stamp_flux_text_tokens(args, extra, previous_block):
    options = args["transformer_options"]
    # in place: Flux hands this same dict to every later block (as it does with block_index)
    options[GUIDANCE_OPTIONS] = {**options.get(GUIDANCE_OPTIONS, {}), TEXT_TOKENS: args["txt"].shape[1]}
    return previous_block(args, extra)


def _stamp_latent_size(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    ours = {**transformer_options.get(GUIDANCE_OPTIONS, {}), LATENT_HW: tuple(x.shape[-2:])}
    return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, GUIDANCE_OPTIONS: ours}, **kwargs)


def install_dit_handler(model, layout: DiTLayout, blocks: list[DiTBlock], handler: Handler, guard=None) -> None:
    """Run ``handler(call)`` for every attention call in ``blocks`` of ``model`` (a clone); it returns the
    call's output and must use ``call.run()`` (or ``call.split``) for every row it does not compute itself.
    With ``guard`` (a ``displacement.DisplacementGuard``) it keeps acting where a later override replaces ours."""
    architecture = layout.architecture
    patch_size = int(model.get_model_object("diffusion_model").patch_size)
    chosen = frozenset(blocks)
    transformer_options = model.model_options.setdefault("transformer_options", {})

    def make_override(previous):
        def attention_guidance_override(func, *args, **kwargs):
            block, text_tokens, mark = _locate(architecture, kwargs.get("transformer_options") or {})
            if block not in chosen:
                return previous(func, *args, **kwargs)
            values = dict(zip(_PARAMETERS, args), **kwargs)
            call = DiTAttention(previous, func, values, len(args), block, architecture, patch_size, text_tokens, True)
            if mark is not None and call.length != mark.text_tokens + mark.image_tokens:
                if call.length != mark.image_tokens:
                    return previous(func, *args, **kwargs)  # not one of the block's self-attentions
                call = DiTAttention(previous, func, values, len(args), block, architecture, patch_size, 0, False)
            return handler(call)

        return attention_guidance_override

    previous = transformer_options.get(OVERRIDE, _run_attention)
    transformer_options[OVERRIDE] = make_override(previous) if guard is None else guard.override(make_override, previous)
    if architecture == "mmdit":
        for block in blocks:
            _replace_block(model, "double_block", block.index, _mark_mmdit_block(block))
    else:
        _replace_block(model, "double_block", 0, _stamp_flux_text_tokens)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _stamp_latent_size)
