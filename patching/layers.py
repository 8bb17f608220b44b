"""The model a node was given and the layers it acts on there: the family (from the registry), the spec its
input stands for (``auto`` = the family's default), the sites that spec names, and the line that says which
they are at the first guided step of each run."""
from __future__ import annotations

import dataclasses

from ..guidance_core.layer_spec import DiTLayout, LayerSpecError, Method, describe_sites
from .dit_attention import DiTModel, patch_size_of
from .families import Recognised, UnsupportedModelError, recognise

__all__ = ["ChosenLayers", "UnsupportedModelError", "choose_layers", "dit_model"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChosenLayers:
    """The layers one node acts on: ``spec`` as the user wrote it, ``resolved`` the spec it stands for,
    ``sites`` what it names (UNet ``AttentionSite``s or ``DiTBlock``s), and the model they belong to."""

    model: Recognised
    spec: str
    resolved: str
    sites: tuple
    in_use: str  # "Perturbed-Attention Guidance on this Flux model: layers 'auto' = double.7-9 (...)."

    @property
    def on_dit(self) -> bool:
        return isinstance(self.model.layout, DiTLayout)


def choose_layers(model, *, node: str, input_name: str, spec: str, method: Method, label: str,
                  single: bool = False) -> ChosenLayers:
    """The layers ``spec`` names on ``model`` for a node of ``method``; an error starting with ``label`` (e.g.
    "PAG layers") where it names nothing, or, with ``single``, more than one layer."""
    recognised = recognise(model, node)
    layout = recognised.layout
    resolved = layout.resolve(spec, method)
    try:
        sites = layout.select(resolved)
    except LayerSpecError as error:
        raise LayerSpecError(f"{label}: {error}") from None
    if single and len(sites) != 1:
        names = ", ".join(site.index_name for site in sites)
        raise LayerSpecError(
            f"{label}: '{resolved}' selects {len(sites)} self-attention layers ({names}), but SAG records "
            f"the map of one layer. Name one of them, e.g. '{sites[0].index_name}' "
            f"('auto' is this model's default, {layout.default_layers(method)}). This model has:\n{layout.describe()}"
        )
    family = layout.family if isinstance(layout, DiTLayout) else "UNet"
    line = f"{node} on this {family} model: {input_name} '{spec}' = {describe_sites(sites)}"
    if resolved != spec:
        line += f" (the family's default, from {layout.default_source(method)})"
    return ChosenLayers(model=recognised, spec=spec, resolved=resolved, sites=tuple(sites), in_use=line + ".")


def dit_model(model, chosen: ChosenLayers) -> DiTModel:
    """What the DiT handlers need of ``model`` (a DiT of ``chosen``'s family)."""
    return DiTModel(family=chosen.model.layout.family, reach=chosen.model.family.reach,
                    patch_size=patch_size_of(model.get_model_object("diffusion_model")))

