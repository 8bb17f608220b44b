"""HiDream (I1, E1): the host's ``HiDreamImageTransformer2DModel`` (comfy/ldm/hidream/model.py).

Double-stream blocks over ``cat(image, text)`` (its text: T5, Llama's last layer and the Llama layer of that
block), then single-stream blocks over the same joint sequence: the image comes first. 0.3.75 sets no block
index and offers no block replacement, so object patches name the chosen blocks and measure the image stream
at the first double-stream block (``dit_reach.object_patch_marks``).
"""
from __future__ import annotations

from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel

from ...guidance_core.layer_spec import BlockKind, DiTLayout
from ..dit_reach import TokenOrder, object_patch_marks
from .family import Family, KnownModel
from .flux import slg_defaults


def layout(config_name: str, double: int, single: int) -> DiTLayout:
    kinds = [BlockKind(name="double", count=double, host_path="double_stream_blocks",
                       diffusers_path="double_stream_blocks", diffusers_attention="block.attn1"),
             BlockKind(name="single", count=single, host_path="single_stream_blocks",
                       diffusers_path="single_stream_blocks", diffusers_attention="block.attn1")]
    return DiTLayout(family=config_name, kinds=kinds, defaults=slg_defaults("double", double, config_name,
                                                                           published_here=False))


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, HiDreamImageTransformer2DModel) or not len(diffusion_model.double_stream_blocks):
        return None
    return layout(config_name, len(diffusion_model.double_stream_blocks), len(diffusion_model.single_stream_blocks))


FAMILY = Family(
    name="HiDream",
    host_types=("HiDream",),
    models="HiDream I1 (full, dev, fast) and E1",
    recognise=recognise,
    reach=object_patch_marks(
        measured_at="double_stream_blocks.0", argument="image_tokens", token_order=TokenOrder.IMAGE_FIRST,
        text_length_site="its first double-stream block",
        # E1 puts its edit image beside the generated one (the latent concatenated along the width), so the
        # generated image's tokens are not one block of the sequence
        extra_image_tokens="an edit image (HiDream E1) lies beside it, where SAG (its map) and SEG (its blur) cannot "
                           "lay the tokens out on the image. Use PAG on this model, or SAG / SEG without the edit image."),
    layer_examples="'double.8'",
    known_models=(KnownModel(name="HiDream I1 (16 double, 32 single)", layout=lambda: layout("HiDream", 16, 32)),),
    notes=("HiDream E1 (an edit image beside the generated one): PAG works; SAG and SEG stop with a message, since "
           "the generated image's tokens are not one block of the sequence.",),
)
