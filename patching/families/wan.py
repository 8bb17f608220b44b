"""Wan 2.1 / 2.2 (T2V, I2V, FLF, Fun, VACE, camera, TI2V 5B, HuMo, Animate): the host's ``WanModel`` and subclasses
(comfy/ldm/wan/model.py, model_animate.py).

Each block runs a video-only self-attention over the space-time tokens, then a cross-attention to the text
(I2V: to the CLIP image embeddings, then the text), all with the same options; 0.3.75 sets no block index, so
a block replacement marks each chosen block (``dit_reach.video_block_marks``). S2V, whose blocks run without
transformer_options, is a family of its own (``wan_s2v``). Animate is
Wan's I2V blocks with pose latents added to the patch embedding and a face adapter after every fifth block, whose
attention to the face motion is not handed transformer_options (and is a cross-attention): its blocks are reached
as every Wan model's.
"""
from __future__ import annotations

from comfy.ldm.wan import model as wan_model

from ...guidance_core.layer_spec import BlockKind, DiTLayout, LayerDefault, Method
from ..dit_reach import video_block_marks
from .family import Family, KnownModel

# No one has published PAG or SAG settings for Wan; the block is that of its published attention-skip guidance.
DEFAULTS = {
    Method.PAG: LayerDefault(spec="block.10", source="the skip-layer guidance block of kijai's Wan nodes (WanVideoSLG, "
                             "SkipLayerGuidanceWanVideo: blocks '10'); no published PAG / STG setting for Wan"),
    Method.SAG: LayerDefault(spec="block.10", source="no published SAG setting for Wan; the PAG default block"),
}


def layout(config_name: str, depth: int, defaults=DEFAULTS) -> DiTLayout:
    """Wan's blocks (also Wan S2V's, with its own ``defaults``)."""
    kinds = [BlockKind(name="block", count=depth, host_path="blocks", diffusers_path="blocks", diffusers_attention="attn1")]
    return DiTLayout(family=config_name, kinds=kinds, defaults=defaults)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    s2v = getattr(wan_model, "WanModel_S2V", ())
    if not isinstance(diffusion_model, wan_model.WanModel) or isinstance(diffusion_model, s2v) \
            or not len(diffusion_model.blocks):
        return None
    return layout(config_name, len(diffusion_model.blocks))


FAMILY = Family(
    name="Wan",
    host_types=("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Vace", "WAN21_Camera", "WAN22_T2V", "WAN21_HuMo",
                "WAN22_Camera", "WAN22_Animate"),
    models="Wan 2.1 / 2.2 (T2V, I2V, TI2V 5B, Animate)",
    recognise=recognise,
    reach=video_block_marks(),
    layer_examples="'block.10' or 'blocks.10'",
    # the Wan 2.2 VAE's 48-channel latent is 1/16 of the image (Wan22ImageToVideoLatent)
    image_scales={"Wan22": 16},
    known_models=(KnownModel(name="Wan 2.1 T2V 1.3B (30 blocks)", layout=lambda: layout("WAN21_T2V", 30)),
                  KnownModel(name="Wan 2.1 / 2.2 14B, Wan 2.2 Animate 14B (40 blocks)",
                             layout=lambda: layout("WAN21_T2V", 40))),
    notes=("Wan 2.2 Animate: the reference image's latent frame and the pose latents are part of the video's tokens "
           "and guided with them; the face adapter's attention to the face motion is not guided.",),
)
