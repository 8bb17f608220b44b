"""State that lives for one sampling run of a patched model, and is dropped when the run ends."""
from __future__ import annotations

import dataclasses
import logging

import comfy.patcher_extension

# the key of every wrapper and callback the pack adds to a ModelPatcher
WRAPPER_KEY = "attention_guidance"


@dataclasses.dataclass
class RunState:
    """State of one sampling run, as typed fields; ``clear`` puts every field back to its default."""

    def clear(self) -> None:
        for field in dataclasses.fields(self):
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            setattr(self, field.name, default)


def clear_after_sampling(model, state) -> None:
    """Empty ``state`` (a dict or a ``RunState``) when the host's sampler finishes, also when a step raised or was interrupted:
    the host runs ON_CLEANUP callbacks in CFGGuider.outer_sample's ``finally`` (0.3.75)."""
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, lambda patcher: state.clear())


@dataclasses.dataclass
class GuidanceRun(RunState):
    """What a guidance node notes in one run: the layers in use logged, one of its layers reached (perturbed rows
    computed), the first guided step checked for that, a warning given, a guider that does not evaluate
    ``[positive, negative]`` seen."""

    layers_logged: bool = False
    reached: bool = False
    checked: bool = False
    warned: bool = False
    other_guider: bool = False


def log_once_per_run(run: GuidanceRun, line: str) -> None:
    """Log ``line`` the first time in this run (``run`` is cleared when the run ends)."""
    if not run.layers_logged:
        run.layers_logged = True
        logging.info(line)
