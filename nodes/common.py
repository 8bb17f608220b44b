"""What the node faces share: their menu category and the layer inputs, whose examples come from the family
registry."""
from __future__ import annotations

from comfy_api.latest import io

from ..patching.families import FAMILIES
from ..patching.perturbed_uncond import PLACEMENT_TOOLTIP, Placement

CATEGORY = "model_patches/attention_guidance"


def _examples() -> str:
    return "; ".join(f"{family.name}: {family.layer_examples}" for family in FAMILIES if family.layer_examples)


def layers_input() -> io.String.Input:
    """The ``layers`` input of the nodes that perturb a batched copy (PAG, SEG): one default, one syntax."""
    return io.String.Input(
        "layers", default="auto", multiline=False,
        tooltip=(
            "Self-attention layers to perturb. 'auto': the model family's default (see the node docs), logged at "
            f"the first step. Or comma-separated names. {_examples()}. A wrong name lists the model's layers."
        ),
    )


def layer_input() -> io.String.Input:
    """SAG's ``layer`` input: one layer, same syntax."""
    return io.String.Input(
        "layer", default="auto", multiline=False,
        tooltip=(
            "The one self-attention layer whose map makes the mask. 'auto': the model family's default (UNets "
            f"'m0.0', the middle block's first transformer, diffusers' choice; see the node docs), logged at the "
            f"first step. Same syntax as PAG's layers. {_examples()}. A wrong name lists the model's layers."
        ),
    )


def window_inputs(method: str, outside: str) -> list[io.Float.Input]:
    """``start_percent`` and ``end_percent``: where in the sampling schedule ``method`` acts; ``outside`` says what
    the node skips outside the window."""
    return [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Sampling progress (of the model's noise range) where {method} starts."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                       tooltip=f"Sampling progress where {method} stops. Outside the window {outside}."),
    ]


def placement_input() -> io.Combo.Input:
    """PAG's and SEG's ``placement``: the last input, optional, so that workflows saved before it keep their
    meaning (the default is the behaviour they had)."""
    return io.Combo.Input("placement", options=Placement.options(), default=Placement.OWN_BRANCH.value,
                          optional=True, tooltip=PLACEMENT_TOOLTIP)
