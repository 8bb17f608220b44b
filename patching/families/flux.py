"""Flux.1 (dev, schnell, Kontext, Fill), Flux.2, Chroma and Chroma Radiance: the host's ``Flux`` and ``Chroma``.

Both run double-stream blocks, then single-stream blocks, each with one attention over ``cat(text, image)``
(Kontext's reference latents after the generated image), and mark each block with ``block_type`` /
``block_index`` (comfy/ldm/flux/model.py, comfy/ldm/chroma/model.py ``forward_orig``), so they are reached by
the host's own marks (``dit_reach.host_block_marks``). The token grid is the latent's, padded to the patch
size.
"""
from __future__ import annotations

from comfy.ldm.chroma.model import Chroma
from comfy.ldm.flux.model import Flux

from ...guidance_core.layer_spec import BlockKind, DiTLayout, LayerDefault, Method
from ..dit_reach import host_block_marks
from .family import Family, KnownModel, published_defaults

# the host's model configs of Flux.1 (Kontext is "Flux"), whose 19 double blocks the published default names
FLUX1_CONFIGS = ("Flux", "FluxSchnell", "FluxInpaint")


def slg_defaults(kind: str, depth: int, family: str, *, published_here: bool) -> dict[Method, LayerDefault]:
    """ComfyUI's Skip Layer Guidance default for Flux.1 (SkipLayerGuidanceDiT double_layers "7, 8, 9" of 19
    double blocks): the default of every family whose double-stream blocks are this kind of block."""
    return published_defaults(kind, 7, 9, published_depth=19, depth=depth,
                              source="ComfyUI's Skip Layer Guidance (SkipLayerGuidanceDiT) default double blocks "
                              "7, 8, 9 for Flux.1", elsewhere=f"none published for {family}",
                              published_here=published_here)


def layout(config_name: str, double: int, single: int) -> DiTLayout:
    kinds = [BlockKind(name="double", count=double, host_path="double_blocks", diffusers_path="transformer_blocks"),
             BlockKind(name="single", count=single, host_path="single_blocks",
                       diffusers_path="single_transformer_blocks")]
    return DiTLayout(family=config_name, kinds=kinds,
                     defaults=slg_defaults("double", double, config_name, published_here=config_name in FLUX1_CONFIGS))


def recognise(diffusion_model, config_name: str) -> DiTLayout | None:
    if not isinstance(diffusion_model, (Flux, Chroma)):
        return None
    if any(block.flipped_img_txt for block in diffusion_model.double_blocks) or not len(diffusion_model.double_blocks):
        return None  # not this layout (image before text, or no double block to read the text length at)
    return layout(config_name, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))


FAMILY = Family(
    name="Flux",
    host_types=("Flux", "FluxSchnell", "FluxInpaint", "Flux2", "Chroma", "ChromaRadiance"),
    models="Flux.1 dev / schnell / Kontext / Fill and Flux.2 (Flux); Chroma and Chroma Radiance",
    recognise=recognise,
    reach=host_block_marks(),
    layer_examples="'double.7', 'single.20', 'single.0-9'",
    # image pixels per latent pixel (0.3.75's latent formats do not say): Flux.2's 128-channel latent is 1/16 of
    # the image (EmptyFlux2LatentImage), Chroma Radiance works in pixel space
    image_scales={"Flux2": 16, "ChromaRadiance": 1},
    known_models=(
        KnownModel(name="Flux.1 dev / schnell / Kontext (19 double, 38 single)", layout=lambda: layout("Flux", 19, 38)),
        KnownModel(name="Flux.2 dev (8 double, 48 single)", layout=lambda: layout("Flux2", 8, 48)),
        KnownModel(name="Chroma (19 double, 38 single)", layout=lambda: layout("Chroma", 19, 38)),
    ),
)
