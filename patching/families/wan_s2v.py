"""Wan 2.2 S2V (speech to video): the host's ``WanModel_S2V`` (comfy/ldm/wan/model.py).

Wan's blocks, each a video-only self-attention over the space-time tokens and a cross-attention to the text, with
the reference image's latent and the packed motion frames appended after the video's own tokens, and an audio
injector after some blocks. The host (0.3.75) runs the blocks without transformer_options (and its block
replacements get none), so an object patch on each chosen block's forward hands it the forward's own, marked as
every video block is (``dit_reach.video_object_patch_marks``); the block passes them to its attention, which the
override then reaches. PAG perturbs all of the self-attention's tokens; SEG blurs, and SAG maps, the video's own
``(frames, h, w)`` grid (2x2 spatial patches), which comes first.
"""
from __future__ import annotations

from comfy.ldm.wan import model as wan_model

from ...guidance_core.layer_spec import DiTLayout, LayerDefault, Method
from ..dit_reach import video_object_patch_marks
from . import wan
from .family import Family, KnownModel

# No one has published PAG or SAG settings for Wan S2V; the block is that of Wan's published attention-skip guidance.
DEFAULTS = {
    Method.PAG: LayerDefault(spec="block.10", source="Wan's skip-layer guidance block (kijai's WanVideoSLG, "
                             "SkipLayerGuidanceWanVideo: blocks '10' of the 14B models' 40); no published PAG / STG "
                             "setting for Wan S2V"),
    Method.SAG: LayerDefault(spec="block.10", source="no published SAG setting for Wan S2V; the PAG default block"),
}


def layout(config_name: str, depth: int) -> DiTLayout:
    return wan.layout(config_name, depth, DEFAULTS)


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    s2v = getattr(wan_model, "WanModel_S2V", None)
    if s2v is None or not isinstance(diffusion_model, s2v) or not len(diffusion_model.blocks):
        return None
    return layout(config_name, len(diffusion_model.blocks))


FAMILY = Family(
    name="Wan S2V",
    host_types=("WAN22_S2V",),
    models="Wan 2.2 S2V (speech to video)",
    recognise=recognise,
    reach=video_object_patch_marks(options_from_forward=True, extra_tokens_follow=True),
    layer_examples="'block.10' or 'blocks.10'",
    known_models=(KnownModel(name="Wan 2.2 S2V 14B (40 blocks)", layout=lambda: layout("WAN22_S2V", 40)),),
    notes=("The reference image's latent and the motion frames follow the video's tokens in each self-attention: "
           "PAG perturbs them with the video's; SEG blurs, and SAG maps, the video's own tokens only.",
           "The audio injector's attention to the audio features is not guided."),
)
