"""What the registry holds for one model family, and the helpers family modules share."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from ...guidance_core.layer_spec import AttentionLayout, DiTLayout, LayerDefault, Method, scaled_block_range
from ..dit_reach import DiTReach

Layout = AttentionLayout | DiTLayout


@dataclasses.dataclass(frozen=True, kw_only=True)
class KnownModel:
    """A published model of the family, for the docs: its name and its layout at its real block counts."""

    name: str
    layout: Callable[[], Layout]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """Everything the pack knows about one model family (or group of families sharing one block layout).

    ``recognise(diffusion_model, config_name)`` gives the layout of a model of this family (its blocks, their
    names, the default layers per method with their sources), or None for any other model; ``config_name`` is
    the host's model config class name (e.g. "SDXL"). ``reach`` says how the attention override finds the
    chosen blocks of a DiT (None: a UNet, reached through attn1 replacements). ``host_types`` are the host's
    model config names of the family (for the docs; recognition goes by the diffusion model's class). ``layer_examples`` are layer
    specs shown in the nodes' tooltips; ``image_scales`` gives image pixels per latent pixel for latent formats
    (by class name) where that is not 8 and the host's format does not say; ``known_models`` and ``notes`` feed
    docs/model-families.md.
    """

    name: str
    models: str
    host_types: tuple[str, ...]
    recognise: Callable[[object, str], Layout | None]
    reach: DiTReach | None = None
    layer_examples: str = ""
    image_scales: Mapping[str, int] = dataclasses.field(default_factory=dict)
    known_models: tuple[KnownModel, ...] = ()
    notes: tuple[str, ...] = ()


def spec(kind: str, first: int, last: int) -> str:
    return f"{kind}.{first}" if first == last else f"{kind}.{first}-{last}"


def published_defaults(kind: str, first: int, last: int, *, published_depth: int, depth: int, source: str,
                       elsewhere: str, published_here: bool = True) -> dict[Method, LayerDefault]:
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
    return {Method.PAG: LayerDefault(spec=spec(kind, first, last), source=where),
            Method.SAG: LayerDefault(spec=spec(kind, middle, middle),
                                     source=f"none published for SAG; the middle block of PAG's default ({where})")}


def ranges(indices: list[int]) -> str:
    """'0-12' for a run of consecutive indices, '0, 3, 5' otherwise."""
    if indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 1:
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(str(i) for i in indices)
