"""Which model family a node was given: the attention layout of every family the pack patches (UNets,
SD3's MMDiT, Flux, Chroma, Qwen-Image, Z-Image / Lumina 2, HiDream and the video DiTs Wan 2.x, HunyuanVideo and
LTX-Video) with each family's default layers, and a refusal naming the family and what is supported for every
other one."""
from __future__ import annotations

from comfy.ldm.chroma.model import Chroma
from comfy.ldm.flux.model import Flux
from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel
from comfy.ldm.hunyuan_video.model import HunyuanVideo
from comfy.ldm.lightricks import model as ltxv_model
from comfy.ldm.lumina.model import NextDiT
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
from comfy.ldm.wan import model as wan_model

from ..guidance_core.layer_spec import AttentionLayout, DiTLayout, scaled_block_range
from .unet_layout import UnsupportedModelError, model_family, unet_attention_layout

SUPPORTED_FAMILIES = (
    "SD1.x, SD2.x and SDXL-style UNets; SD3 / SD3.5 (MMDiT); Flux.1 dev / schnell / Kontext / Fill and "
    "Flux.2 (Flux); Chroma and Chroma Radiance; Qwen-Image and Qwen-Image-Edit; Z-Image (Turbo, base) and "
    "Lumina 2 (NextDiT); HiDream; Wan 2.1 / 2.2 (T2V, I2V, TI2V 5B); HunyuanVideo; LTX-Video"
)

# Default blocks of the video families, with where each comes from. No one has published PAG or SAG settings
# for these models; the blocks are those of their published attention-skip guidance.
_WAN_DEFAULTS = {"pag": "block.10", "sag": "block.10"}
_WAN_SOURCES = {
    "pag": "the skip-layer guidance block of kijai's Wan nodes (WanVideoSLG, SkipLayerGuidanceWanVideo: "
           "blocks '10'); no published PAG / STG setting for Wan",
    "sag": "no published SAG setting for Wan; the PAG default block",
}
_HUNYUAN_VIDEO_DEFAULTS = {"pag": "double.2", "sag": "double.2"}
_HUNYUAN_VIDEO_SOURCES = {
    "pag": "STG's HunyuanVideo command (junhahyung/STGuidance README: --stg-block-idx 2, STG-R, scale 2.0)",
    "sag": "no published SAG setting for HunyuanVideo; the PAG default block",
}
_LTXV_DEFAULTS = {"pag": "block.19", "sag": "block.19"}
_LTXV_SOURCES = {
    "pag": "STG's LTX-Video command (junhahyung/STGuidance README: --stg_block_idx 19, stg-a, scale 1.0)",
    "sag": "no published SAG setting for LTX-Video; the PAG default block",
}


def video_attention_layout(diffusion_model, family: str) -> DiTLayout | None:
    """The blocks of a video DiT the host runs (Wan 2.x, HunyuanVideo, LTX-Video), or None if it is not one."""
    # Wan 2.1 / 2.2 (T2V, I2V, FLF, Fun, VACE, camera, TI2V 5B, HuMo): WanModel and its subclasses hand their
    # blocks to ("double_block", i) replacements with the forward's transformer_options; S2V's replacement
    # gets no transformer_options (0.3.75), so the nodes cannot reach its attention
    s2v = getattr(wan_model, "WanModel_S2V", ())
    if isinstance(diffusion_model, wan_model.WanModel) and not isinstance(diffusion_model, s2v) \
            and len(diffusion_model.blocks):
        return DiTLayout(family, "video", {"block": len(diffusion_model.blocks)},
                         defaults=_WAN_DEFAULTS, default_sources=_WAN_SOURCES)
    if isinstance(diffusion_model, HunyuanVideo) and len(diffusion_model.double_blocks):
        return DiTLayout(family, "hunyuan_video", {"double": len(diffusion_model.double_blocks),
                                                   "single": len(diffusion_model.single_blocks)},
                         defaults=_HUNYUAN_VIDEO_DEFAULTS, default_sources=_HUNYUAN_VIDEO_SOURCES)
    if isinstance(diffusion_model, getattr(ltxv_model, "LTXVModel", ())) and len(diffusion_model.transformer_blocks):
        return DiTLayout(family, "video", {"block": len(diffusion_model.transformer_blocks)},
                         host_paths={"block": "transformer_blocks"}, diffusers_paths={"block": "transformer_blocks"},
                         defaults=_LTXV_DEFAULTS, default_sources=_LTXV_SOURCES)
    return None


def _ranges(indices: list[int]) -> str:
    """'0-12' for a run of consecutive indices, '0, 3, 5' otherwise."""
    if indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 1:
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(str(i) for i in indices)


def _spec(kind: str, first: int, last: int) -> str:
    return f"{kind}.{first}" if first == last else f"{kind}.{first}-{last}"


def _published(kind: str, first: int, last: int, published_depth: int, depth: int, source: str, elsewhere: str,
               published_here: bool = True):
    """Defaults from published blocks ``first``-``last`` of a ``published_depth``-block model, moved to this
    model's ``depth`` at the same relative depth (``scaled_block_range``); SAG takes the middle one of them.
    ``source`` says where they come from; ``elsewhere`` what they are on a model of another depth, or of
    another family (``published_here`` False)."""
    first, last = scaled_block_range(first, last, published_depth, depth)
    middle = (first + last) // 2
    if depth == published_depth:
        where = source if published_here else f"{elsewhere}: {source}"
    else:
        where = f"{elsewhere}: {source}, at the same relative depth"
    return ({"pag": _spec(kind, first, last), "sag": _spec(kind, middle, middle)},
            {"pag": where, "sag": f"none published for SAG; the middle block of PAG's default ({where})"})


FLUX1_FAMILIES = ("Flux", "FluxSchnell", "FluxInpaint")  # the host's model configs of Flux.1 (Kontext is "Flux")


def _flux_defaults(depth: int, family: str):
    # comfy_extras/nodes_slg.py SkipLayerGuidanceDiT: double_layers "7, 8, 9" (Flux.1's 19 double blocks)
    return _published("double", 7, 9, 19, depth, "ComfyUI's Skip Layer Guidance (SkipLayerGuidanceDiT) default "
                      "double blocks 7, 8, 9 for Flux.1", f"none published for {family}",
                      published_here=family in FLUX1_FAMILIES)


def _sd3_defaults(depth: int, sd35_medium: bool):
    if sd35_medium:
        # Stability AI's SD3.5 Medium skip-layer guidance layers; ComfyUI's SkipLayerGuidanceSD3 default "7, 8, 9"
        return _published("joint", 7, 9, 24, depth, "Stability AI's skip-layer guidance layers 7, 8, 9 for "
                          "SD3.5 Medium (ComfyUI's SkipLayerGuidanceSD3 default)", "another SD3.5 depth")
    return _published("joint", 13, 13, 24, depth, "diffusers' StableDiffusion3PAGPipeline example, "
                      "pag_applied_layers=['blocks.13'] on SD3 Medium", "none published for this depth (e.g. SD3.5 Large's 38 blocks)")


def _single_stream_defaults(depth: int, family: str):
    return _published("single", 13, 13, 24, depth, "diffusers' SD3 PAG block 13 of 24 (a stack of joint "
                      "text-image blocks like this one)", f"none published for {family}")


def dit_attention_layout(model) -> DiTLayout | None:
    """The transformer blocks of a supported DiT, or None if the model is not one."""
    diffusion_model = model.get_model_object("diffusion_model")
    family = model_family(model)
    if isinstance(diffusion_model, MMDiT) and getattr(diffusion_model, "joint_blocks", None) is not None:
        blocks = diffusion_model.joint_blocks
        dual = [i for i, block in enumerate(blocks) if block.x_block.x_block_self_attn]
        notes = {}
        if dual:
            notes["joint"] = (f"blocks {_ranges(dual)} also have SD3.5's image-only self-attention (attn2), "
                              "guided together with their joint attention")
        defaults, sources = _sd3_defaults(len(blocks), bool(dual))
        return DiTLayout(family, "mmdit", {"joint": len(blocks)}, notes, defaults=defaults, default_sources=sources)
    # Chroma (and its pixel-space Chroma Radiance) runs Flux's double and single stream blocks in Flux's
    # order, with the same block_type / block_index and block replacements (comfy/ldm/chroma/model.py)
    if isinstance(diffusion_model, (Flux, Chroma)):
        if any(block.flipped_img_txt for block in diffusion_model.double_blocks) or not len(diffusion_model.double_blocks):
            return None  # not Flux's layout (image before text, or no double block to read the text length at)
        defaults, sources = _flux_defaults(len(diffusion_model.double_blocks), family)
        return DiTLayout(family, "flux", {"double": len(diffusion_model.double_blocks),
                                          "single": len(diffusion_model.single_blocks)},
                         defaults=defaults, default_sources=sources)
    # Qwen-Image (comfy/ldm/qwen_image/model.py) marks its dual-stream transformer_blocks as Flux marks its
    # double blocks (block_type "double", block_index, ("double_block", i) replacements with the text
    # stream) and attends over cat(text, image) in each; edit models append reference latents' tokens
    if isinstance(diffusion_model, QwenImageTransformer2DModel) and len(diffusion_model.transformer_blocks):
        defaults, sources = _flux_defaults(len(diffusion_model.transformer_blocks), family)
        return DiTLayout(family, "flux", {"double": len(diffusion_model.transformer_blocks)},
                         host_paths={"double": "transformer_blocks"}, defaults=defaults, default_sources=sources)
    # Z-Image and Lumina 2 (comfy/ldm/lumina/model.py NextDiT): the main `layers` attend over cat(text,
    # image); the context and noise refiners before them see the text or the image alone and are not guided
    if isinstance(diffusion_model, NextDiT) and len(diffusion_model.layers) and len(diffusion_model.noise_refiner):
        attention = "attention" if family == "ZImage" else "attn"  # diffusers' ZImage / Lumina2 transformer blocks
        defaults, sources = _single_stream_defaults(len(diffusion_model.layers), family)
        return DiTLayout(family, "nextdit", {"single": len(diffusion_model.layers)},
                         host_paths={"single": "layers"}, diffusers_paths={"single": "layers"},
                         diffusers_attention={"single": attention}, defaults=defaults, default_sources=sources)
    # HiDream (comfy/ldm/hidream/model.py): double-stream blocks over cat(image, text), then single-stream
    # blocks over the same joint sequence
    if isinstance(diffusion_model, HiDreamImageTransformer2DModel) and len(diffusion_model.double_stream_blocks):
        defaults, sources = _flux_defaults(len(diffusion_model.double_stream_blocks), family)
        paths = {"double": "double_stream_blocks", "single": "single_stream_blocks"}
        return DiTLayout(family, "hidream", {"double": len(diffusion_model.double_stream_blocks),
                                             "single": len(diffusion_model.single_stream_blocks)},
                         host_paths=paths, diffusers_paths=paths,
                         diffusers_attention={"double": "block.attn1", "single": "block.attn1"},
                         defaults=defaults, default_sources=sources)
    return video_attention_layout(diffusion_model, family)


def attention_layout(model, node_name: str) -> AttentionLayout | DiTLayout:
    """The self-attention layout of a ModelPatcher's model, or a clear error for a family we can't patch."""
    layout = dit_attention_layout(model)
    if layout is not None:
        return layout
    diffusion_model = model.get_model_object("diffusion_model")
    if isinstance(diffusion_model, UNetModel):
        return unet_attention_layout(model, node_name)
    raise UnsupportedModelError(
        f"{node_name} cannot patch this model: it is a {model_family(model)} model "
        f"({type(diffusion_model).__name__}), whose self-attention the node cannot reach, so it would do "
        f"nothing. Supported: {SUPPORTED_FAMILIES}. Remove the node for this model."
    )
