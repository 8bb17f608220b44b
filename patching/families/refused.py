"""The host's model types the nodes refuse with a reason of their own (0.3.75), for their error message: those that
make audio or 3-D shapes. Every other model the registry does not recognise gets the general refusal.
"""
from __future__ import annotations

_NOT_IMAGES = ("it makes audio or 3-D shapes, not images or video: the nodes' perturbations (and SAG's and SEG's "
               "token grids) are defined on an image's or a video's tokens")

# the host's model config name -> why the nodes cannot guide it
REFUSED: dict[str, str] = {
    "StableAudio": _NOT_IMAGES,
    "ACEStep": _NOT_IMAGES,
    "Hunyuan3Dv2": _NOT_IMAGES,
    "Hunyuan3Dv2mini": _NOT_IMAGES,
    "Hunyuan3Dv2_1": _NOT_IMAGES,
}
