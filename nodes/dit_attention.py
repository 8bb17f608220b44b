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

- Z-Image and Lumina 2 (NextDiT, comfy/ldm/lumina/model.py) and HiDream (comfy/ldm/hidream/model.py) set
  no block index in 0.3.75 (the newest host marks NextDiT's main layers, not its refiners, and HiDream's
  blocks not at all) and take no block replacement; every block, the refiners included, hands
  transformer_options to the attention. An object patch on each chosen block's ``forward`` (the host's
  ``add_object_patch``, undone when the model is unpatched) runs the block with a copy of
  transformer_options that names it, on every host alike. NextDiT attends over ``cat(text, image)`` in its
  main ``layers`` (text padded, then the image's tokens, then their padding); HiDream over
  ``cat(image, text)`` in its double- and single-stream blocks (its text: T5, Llama's last layer and the
  Llama layer of that block).
- Video DiTs (Wan 2.x: comfy/ldm/wan/model.py, LTX-Video: comfy/ldm/lightricks/model.py; architecture
  "video"): 0.3.75 sets no block index in either. Each block runs a video-only self-attention over the
  space-time tokens, then a cross-attention to the text (Wan I2V: to the CLIP image embeddings, then the
  text), all with the same options. A block replacement on each chosen block marks it with its token count
  (``args["img"]``); the first call of the block whose queries and keys both have that many tokens is the
  self-attention, every later call goes to the previous override untouched.
- HunyuanVideo (comfy/ldm/hunyuan_video/model.py; architecture "hunyuan_video") runs Flux's double and
  single stream blocks with the same block_type / block_index and block replacements, but attends over
  ``cat(image, text)``: text after the image (``flipped_img_txt``), and reference-latent tokens before it.

Token counts are always measured, never guessed: MMDiT's from the block inputs; Flux's text length from
the text stream entering its first double block (a block replacement there writes it into the forward's
transformer_options, the dict Flux hands to every later block, as it does with ``block_index``);
NextDiT's image stream (image and padding tokens) from the input of its first noise refiner, HiDream's
image tokens from the image stream entering its first double-stream block (an object patch there writes
them into that same dict); the latent's size from an APPLY_MODEL wrapper, for the token grid.

How each architecture is reached is one entry of ``ARCHITECTURES`` (``DiTArchitecture``): how an attention
call names its block and text length, the token order, the token grid, and what to install on the model.
"""
from __future__ import annotations

import dataclasses
import math
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
MARKED_BLOCK = "dit_block"  # NextDiT, HiDream: the chosen block running now (a DiTBlock), set by our object patch
IMAGE_STREAM = "dit_image_stream"  # NextDiT, HiDream: image-stream tokens of this forward (NextDiT: with padding)
LATENT_FRAMES = "dit_latent_frames"  # T of a [B, C, T, H, W] latent this forward runs on
VIDEO_BLOCK = "dit_video_block"  # the video DiT block running now (a VideoBlockMark), set by our block replacement

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


class VideoBlockMark:
    """A video DiT block running now: its space-time token count, and whether its self-attention (the
    block's first attention call) has run yet."""

    def __init__(self, block: DiTBlock, tokens: int):
        self.block = block
        self.tokens = tokens
        self.self_attention_done = False


def _run_attention(func, *args, **kwargs):
    """What runs when no override was set: the host's own attention function."""
    return func(*args, **kwargs)


def _mmdit_grid(patch_size: int, latent_hw) -> tuple[int, int]:
    height, width = latent_hw  # MMDiT.cropped_pos_embed / unpatchify
    return (height + 1) // patch_size, (width + 1) // patch_size


def _padded_grid(patch_size: int, latent_hw) -> tuple[int, int]:
    # Flux._forward and Chroma._forward: (h + p // 2) // p, which is ceil(h / p) for their patch sizes
    # (1, 2); Chroma Radiance, NextDiT and HiDream pad the latent to the patch size first: ceil(h / p)
    height, width = latent_hw
    return -(-height // patch_size), -(-width // patch_size)


def token_grid(architecture: str, patch_size: int, latent_hw) -> tuple[int, int]:
    """The image token grid the model makes of an ``(H, W)`` latent (each pads to its patch size)."""
    return ARCHITECTURES[architecture].token_grid(patch_size, latent_hw)


def video_token_grid(patch_size, latent_size) -> tuple[int, ...]:
    """The space-time token grid a video DiT makes of a ``(T, H, W)`` latent (or ``(H, W)`` for a 2-D patch):
    each axis padded to its patch size (Wan: ``pad_to_patch_size``; HunyuanVideo and LTX-Video patch 1 in time)."""
    sizes = tuple(latent_size)[-len(patch_size):]
    return tuple(-(-size // patch) for size, patch in zip(sizes, patch_size))


class DiTAttention:
    """One attention call inside a chosen block, as a handler sees it.

    ``q``, ``k``, ``v`` are in the caller's layout (``[B, L, heads * D]``, or ``[B, heads, L, D]`` where the
    caller passed ``skip_reshape``); ``q_heads()`` etc. give ``[B, heads, L, D]``. ``chunks`` is the host's
    ``cond_or_uncond`` for these rows. ``joint`` is False only for SD3.5's image-only ``attn2``; text tokens
    come first, except where ``image_first`` (HiDream: the image stream, then the text).
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
    def image_first(self) -> bool:
        return ARCHITECTURES[self.architecture].image_first

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
                f"Attention guidance could not read the text length of this {self.architecture} forward at "
                f"{self.block.index_name}: another node replaced the model's first double block (Flux, Chroma), "
                "first noise refiner (Z-Image, Lumina 2) or first double-stream block (HiDream) without running "
                "ours. Apply the attention guidance node after that node."
            )
        return self._text_tokens

    def image_tokens_of_grid(self) -> slice:
        """Where the generated image's grid tokens are in the sequence: right after the text (SD3, Flux, NextDiT,
        whose reference latents follow the image), at the end of the image part where the image comes first
        (HiDream; HunyuanVideo, whose reference latents come before the image), or all of a video block's
        tokens."""
        grid = self.image_grid()
        count = math.prod(grid)
        if self.image_first:
            image_tokens = self.length - self.text_tokens
            return slice(image_tokens - count, image_tokens)
        if self.architecture == "video" and count != self.length:
            raise RuntimeError(
                f"Attention guidance: {self.block.index_name} attends over {self.length} tokens, not the "
                f"{'x'.join(map(str, grid))} video tokens of the latent: the model adds reference or context "
                "latents to the sequence, and SAG (its map) and SEG (its blur) cannot tell the video's own tokens "
                "apart there. Use PAG, or run without those latents."
            )
        return slice(self.text_tokens, self.text_tokens + count)

    def image_grid(self) -> tuple[int, ...]:
        """``(h, w)`` token grid of the generated image, ``(frames, h, w)`` on a video DiT (see
        ``image_tokens_of_grid``)."""
        latent_hw = guidance_options(self.options).get(LATENT_HW)
        if latent_hw is None:
            raise RuntimeError(f"Attention guidance: the latent size of this forward is unknown at {self.block.index_name}.")
        if ARCHITECTURES[self.architecture].frames:
            frames = guidance_options(self.options).get(LATENT_FRAMES)
            grid = video_token_grid(self.patch_size, latent_hw if frames is None else (frames, *latent_hw))
        else:
            grid = token_grid(self.architecture, self.patch_size, latent_hw)
        image_tokens = self.length - self.text_tokens
        if math.prod(grid) > image_tokens:
            raise RuntimeError(
                f"Attention guidance: {self.block.index_name} has {image_tokens} image tokens, fewer than the "
                f"{'x'.join(map(str, grid))} grid of the {tuple(latent_hw)} latent."
            )
        if self.architecture == "hidream" and image_tokens != math.prod(grid):
            # HiDream E1 puts its edit image beside the generated one (the latent concatenated along the width,
            # comfy/ldm/hidream/model.py), so the generated image's tokens are not one block of the sequence
            raise RuntimeError(
                f"Attention guidance: {self.block.index_name} has {image_tokens} image tokens, not the "
                f"{grid[0]}x{grid[1]} of the generated image: an edit image (HiDream E1) lies beside it, where SAG "
                "(its map) and SEG (its blur) cannot lay the tokens out on the image. Use PAG on this model, or "
                "SAG / SEG without the edit image."
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

    def with_queries(self, q_heads: torch.Tensor) -> "DiTAttention":
        """This call with other queries, given as ``[B, heads, L, D]``."""
        q = q_heads if self._values.get("skip_reshape") else q_heads.transpose(1, 2).reshape(self.q.shape)
        return DiTAttention(self._previous, self._func, dict(self._values, q=q), self._positional, self.block,
                            self.architecture, self.patch_size, self._text_tokens, self.joint)

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


def _locate_mmdit(options: dict):
    mark = guidance_options(options).get(MMDIT_BLOCK)
    return (mark.block, mark.text_tokens, mark) if mark is not None else (None, None, None)


def _locate_flux(options: dict):
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


def _locate_video(options: dict):
    """Wan, LTX-Video: the block our block replacement marked; no text in its self-attention."""
    mark = guidance_options(options).get(VIDEO_BLOCK)
    return (mark.block, 0, mark) if mark is not None else (None, None, None)


def _locate_marked(options: dict):
    """NextDiT, HiDream: the block our object patch named; the text is the sequence less the image stream,
    given as a negative count ``-image stream``."""
    ours = guidance_options(options)
    block, image_stream = ours.get(MARKED_BLOCK), ours.get(IMAGE_STREAM)
    return block, (None if image_stream is None else -image_stream), None


def _replace_block(model, block_name: str, index: int, run: Callable) -> None:
    """Put ``run(args, extra, previous_block)`` on the host's block replacement of one block, chained."""
    replacements = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    previous = replacements.get((block_name, index))

    def previous_block(args, extra):
        return previous(args, extra) if previous is not None else extra["original_block"](args)

    def attention_guidance_block(args, extra):
        return run(args, extra, previous_block)

    model.set_model_patch_replace(attention_guidance_block, "dit", block_name, index)


def _patch_block_forward(model, module: str, run: Callable) -> None:
    """An object patch on the ``forward`` of the diffusion model's ``module`` (e.g. ``layers.3``), chained:
    ``run(previous_forward, args, kwargs)``."""
    key = f"diffusion_model.{module}.forward"
    previous = model.get_model_object(key)  # the block's own forward, or an earlier node's patch

    def attention_guidance_forward(*args, **kwargs):
        return run(previous, args, kwargs)

    model.add_object_patch(key, attention_guidance_forward)


def _mark_block(block: DiTBlock):
    """Run the block with its transformer_options naming it. In place, as the host sets block_index: the
    dict is this forward's own, and what a block inside writes there (the image stream) must stay."""

    def run(previous, args, kwargs):
        options = kwargs.get("transformer_options")
        if options is None:
            return previous(*args, **kwargs)
        options[GUIDANCE_OPTIONS] = {**options.get(GUIDANCE_OPTIONS, {}), MARKED_BLOCK: block}
        try:
            return previous(*args, **kwargs)
        finally:
            options[GUIDANCE_OPTIONS] = {k: v for k, v in options[GUIDANCE_OPTIONS].items() if k != MARKED_BLOCK}

    return run


def _stamp_image_stream(argument: str):
    """Write the token count of the block's first argument (``argument``) into the forward's
    transformer_options, in place: the model hands that same dict to every later block."""

    def run(previous, args, kwargs):
        options = kwargs.get("transformer_options")
        if options is not None:
            tokens = args[0] if args else kwargs[argument]
            options[GUIDANCE_OPTIONS] = {**options.get(GUIDANCE_OPTIONS, {}), IMAGE_STREAM: tokens.shape[1]}
        return previous(*args, **kwargs)

    return run


def _mark_mmdit_block(block: DiTBlock):
    def run(args, extra, previous_block):
        options = args["transformer_options"]
        text = args.get("txt")
        mark = MMDiTBlockMark(block, 0 if text is None else text.shape[1], args["img"].shape[1])
        marked = {**options, GUIDANCE_OPTIONS: {**options.get(GUIDANCE_OPTIONS, {}), MMDIT_BLOCK: mark}}
        return previous_block(dict(args, transformer_options=marked), extra)

    return run


def _mark_video_block(block: DiTBlock):
    def run(args, extra, previous_block):
        options = args["transformer_options"]
        mark = VideoBlockMark(block, args["img"].shape[1])
        marked = {**options, GUIDANCE_OPTIONS: {**options.get(GUIDANCE_OPTIONS, {}), VIDEO_BLOCK: mark}}
        return previous_block(dict(args, transformer_options=marked), extra)

    return run


def _stamp_flux_text_tokens(args, extra, previous_block):
    options = args["transformer_options"]
    # in place: Flux hands this same dict to every later block (as it does with block_index)
    options[GUIDANCE_OPTIONS] = {**options.get(GUIDANCE_OPTIONS, {}), TEXT_TOKENS: args["txt"].shape[1]}
    return previous_block(args, extra)


def _install_mmdit(model, layout: DiTLayout, blocks: list[DiTBlock]) -> None:
    for block in blocks:
        _replace_block(model, "double_block", block.index, _mark_mmdit_block(block))


def _install_flux(model, layout: DiTLayout, blocks: list[DiTBlock]) -> None:
    _replace_block(model, "double_block", 0, _stamp_flux_text_tokens)


def _install_video(model, layout: DiTLayout, blocks: list[DiTBlock]) -> None:
    # Wan and LTX-Video offer their blocks as ("double_block", i) replacements
    for block in blocks:
        _replace_block(model, "double_block", block.index, _mark_video_block(block))


def _install_marks(measured_at: str, argument: str):
    """Object patches: one on the host module ``measured_at`` that measures the image stream from its
    ``argument``, one on each chosen block that names it."""

    def install(model, layout: DiTLayout, blocks: list[DiTBlock]) -> None:
        _patch_block_forward(model, measured_at, _stamp_image_stream(argument))
        for block in blocks:
            _patch_block_forward(model, block.host_name, _mark_block(block))

    return install


@dataclasses.dataclass(frozen=True)
class DiTArchitecture:
    """How attention guidance reaches the blocks of one DiT architecture (``DiTLayout.architecture``).

    ``locate(transformer_options)`` gives ``(block or None, text tokens or None, MMDiTBlockMark or None)`` for an
    attention call (a negative text count ``-n`` means the call's length less ``n``); ``install(model, layout,
    blocks)`` puts on the model (a clone) what lets ``locate`` name the chosen blocks; ``token_grid(patch size,
    (H, W))`` is the image's token grid, or ``frames`` where it is ``(frames, h, w)`` (``video_token_grid``);
    ``image_first`` where the image stream comes before the text.
    """

    locate: Callable[[dict], tuple]
    install: Callable[[object, DiTLayout, list], None]
    token_grid: Callable[[int, tuple], tuple] = _padded_grid
    image_first: bool = False
    frames: bool = False


ARCHITECTURES: dict[str, DiTArchitecture] = {
    "mmdit": DiTArchitecture(_locate_mmdit, _install_mmdit, _mmdit_grid),
    "flux": DiTArchitecture(_locate_flux, _install_flux),
    # NextDiT's first noise refiner runs on the image stream alone (its tokens and their padding)
    "nextdit": DiTArchitecture(_locate_marked, _install_marks("noise_refiner.0", "x")),
    # HiDream's first double-stream block takes the image stream alone (image_tokens)
    "hidream": DiTArchitecture(_locate_marked, _install_marks("double_stream_blocks.0", "image_tokens"),
                               image_first=True),
    "video": DiTArchitecture(_locate_video, _install_video, frames=True),
    # HunyuanVideo marks and replaces its blocks as Flux does, and attends over cat(image, text)
    "hunyuan_video": DiTArchitecture(_locate_flux, _install_flux, image_first=True, frames=True),
}


def _stamp_latent_size(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    ours = {**transformer_options.get(GUIDANCE_OPTIONS, {}), LATENT_HW: tuple(x.shape[-2:]),
            LATENT_FRAMES: x.shape[2] if x.ndim == 5 else None}
    return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, GUIDANCE_OPTIONS: ours}, **kwargs)


def _patch_size(diffusion_model):
    """The model's patch size: an int (SD3, Flux, Chroma, Qwen-Image) or one per latent axis (video DiTs)."""
    size = getattr(diffusion_model, "patch_size", None)
    if size is None and hasattr(diffusion_model, "patchifier"):  # LTX-Video patchifies in its patchifier
        size = diffusion_model.patchifier.patch_size
    return tuple(int(p) for p in size) if isinstance(size, (tuple, list)) else int(size)


def install_dit_handler(model, layout: DiTLayout, blocks: list[DiTBlock], handler: Handler, guard=None) -> None:
    """Run ``handler(call)`` for every attention call in ``blocks`` of ``model`` (a clone); it returns the
    call's output and must use ``call.run()`` (or ``call.split``) for every row it does not compute itself.
    With ``guard`` (a ``displacement.DisplacementGuard``) it keeps acting where a later override replaces ours."""
    architecture = layout.architecture
    reach = ARCHITECTURES[architecture]
    patch_size = _patch_size(model.get_model_object("diffusion_model"))
    chosen = frozenset(blocks)
    transformer_options = model.model_options.setdefault("transformer_options", {})

    def make_override(previous):
        def attention_guidance_override(func, *args, **kwargs):
            block, text_tokens, mark = reach.locate(kwargs.get("transformer_options") or {})
            if block not in chosen:
                return previous(func, *args, **kwargs)
            values = dict(zip(_PARAMETERS, args), **kwargs)
            call = DiTAttention(previous, func, values, len(args), block, architecture, patch_size, text_tokens, True)
            if text_tokens is not None and text_tokens < 0:  # the call's length less the image stream
                call = DiTAttention(previous, func, values, len(args), block, architecture, patch_size,
                                    call.length + text_tokens, True)
            if isinstance(mark, VideoBlockMark):
                # the block's first call with as many queries and keys as video tokens is its self-attention;
                # the cross-attention to the text (and to Wan I2V's image embeddings) that follows is left alone
                if mark.self_attention_done or call.length != mark.tokens or call.key_length != mark.tokens:
                    return previous(func, *args, **kwargs)
                mark.self_attention_done = True
                return handler(call)
            if mark is not None and call.length != mark.text_tokens + mark.image_tokens:
                if call.length != mark.image_tokens:
                    return previous(func, *args, **kwargs)  # not one of the block's self-attentions
                call = DiTAttention(previous, func, values, len(args), block, architecture, patch_size, 0, False)
            return handler(call)

        return attention_guidance_override

    previous = transformer_options.get(OVERRIDE, _run_attention)
    transformer_options[OVERRIDE] = make_override(previous) if guard is None else guard.override(make_override, previous)
    reach.install(model, layout, blocks)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, _stamp_latent_size)
