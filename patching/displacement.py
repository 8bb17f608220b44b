"""Keeps a node's attention handlers acting where something applied after it replaced them, and says so.

The attention override (``transformer_options["optimized_attention_override"]``) holds one function, and the
host's attn1 replacement one per key. Something applied after a node may put its own there without calling
the node's: ``ModelPatcher.set_model_optimized_attention`` (0.38.x, used by its Model Attention Backend node)
installs an override that never calls the previous one, another pack's attn1 replacement may do the same, and
0.38.x's BlockSparseAttention re-installs its override above whatever is there at every step (from an
ON_PREPARE_STATE callback) and computes eligible calls itself. The guidance would then silently do nothing.

At every forward that carries rows the node tagged for itself (``tagged``), an APPLY_MODEL wrapper looks at
what occupies each of the node's slots. Where the node's handler cannot be reached from there through this
pack's handlers (which all call the one before), it runs the node's handler above the occupant for that
forward only, calling the occupant for every row and call the node does not compute itself: the same as if
the node had been applied last. A handler nested under another of the same node's passes straight through,
so nothing is computed twice when the occupant does call it. Where the occupant never called the node's own
handler in that forward, it did not chain, and the node logs one warning per run that names it.
"""
from __future__ import annotations

import contextvars
import logging
import threading
import uuid
from typing import Callable

import comfy.patcher_extension

from .compiled_model import outside_compiled
from .options import DISPLACEMENT_PROBES, GUIDANCE_OPTIONS, guidance_options
from .run_state import clear_after_sampling

OVERRIDE = "optimized_attention_override"
GUARD_KEY = "attention_guidance_displacement"
# attributes on every handler a guard makes: the node it belongs to, and the function it calls for the rest
_OWNER = "attention_guidance_owner"
_PREVIOUS = "attention_guidance_previous"

# The nodes whose handler runs on the current call stack (per thread: the host may run forwards in worker threads).
_HANDLING: contextvars.ContextVar[frozenset] = contextvars.ContextVar("attention_guidance_handling", default=frozenset())


def _override_options(args, kwargs) -> dict:
    return kwargs.get("transformer_options") or {}


def _attn1_options(args, kwargs) -> dict:
    return args[3] if len(args) > 3 else kwargs.get("extra_options", {})


def _name(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


class DisplacementGuard:
    """One per node instance, installed on the node's clone: ``node`` names it in the warning; ``tagged(options)``
    says whether a forward's transformer_options carry rows the node computes itself."""

    def __init__(self, model, node: str, tagged: Callable[[dict], bool]):
        self.node = node
        self.tagged = tagged
        self.key = uuid.uuid4().hex
        self.override_factory = None
        self.attn1_factories: dict = {}  # (block, id, transformer index) -> make_handler
        self.run: dict = {}  # this sampling run: "warned"
        self._lock = threading.Lock()
        clear_after_sampling(model, self.run)
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, GUARD_KEY, self._apply_model)

    # making the node's handlers -------------------------------------------------------------------------
    def _chained(self, make_handler, previous, options_of, probed: bool):
        handler = make_handler(previous)
        key = self.key

        def attention_guidance_handler(*args, **kwargs):
            if probed:
                probe = guidance_options(options_of(args, kwargs)).get(DISPLACEMENT_PROBES, {}).get(key)
                if probe is not None:
                    probe.append(True)
            handling = _HANDLING.get()
            if key in handling:  # under this node's own handler, put above the occupant of its slot
                return previous(*args, **kwargs)
            token = _HANDLING.set(handling | {key})
            try:
                return handler(*args, **kwargs)
            finally:
                _HANDLING.reset(token)

        # run by Python where the model is compiled, so that it reads this forward's options (compiled_model)
        kept = outside_compiled(attention_guidance_handler)
        setattr(kept, _OWNER, key)
        setattr(kept, _PREVIOUS, previous)
        return kept

    def override(self, make_override, previous):
        """The node's attention override, ``make_override(previous)`` (called as ``(func, *args, **kwargs)``)."""
        self.override_factory = make_override
        return self._chained(make_override, previous, _override_options, probed=True)

    def attn1(self, make_handler, previous, sites):
        """The node's attn1 replacement ``make_handler(previous)`` for ``sites``: ``(block, id, transformer
        index)`` keys whose attention it must reach."""
        for site in sites:
            self.attn1_factories[site] = make_handler
        return self._chained(make_handler, previous, _attn1_options, probed=True)

    # at run time ------------------------------------------------------------------------------------------
    def _reaches_node(self, function) -> bool:
        for _ in range(256):  # a chain of this pack's handlers; anything else ends it
            if function is None:
                return False
            if getattr(function, _OWNER, None) == self.key:
                return True
            function = getattr(function, _PREVIOUS, None)
        return False

    def _displaced(self, options: dict) -> tuple[dict, list[str]]:
        """``options`` with the node's handlers above every occupant that does not reach them, and what was displaced."""
        displaced = []
        if self.override_factory is not None:
            current = options.get(OVERRIDE)
            if current is not None and not self._reaches_node(current):
                options = {**options, OVERRIDE: self._chained(self.override_factory, current, _override_options, False)}
                displaced.append(f"its attention override (optimized_attention_override) by {_name(current)}")
        replacements = options.get("patches_replace", {}).get("attn1", {})
        above = {}
        for site, make_handler in self.attn1_factories.items():
            key = site if site in replacements else site[:2]
            current = replacements.get(key)
            if current is not None and not self._reaches_node(current):
                above[site] = self._chained(make_handler, current, _attn1_options, False)
                displaced.append(f"its attn1 replacement at {site[0]} block {site[1]}, transformer {site[2]} "
                                 f"by {_name(current)}")
        if above:
            patches_replace = options.get("patches_replace", {})
            options = {**options, "patches_replace": {**patches_replace, "attn1": {**replacements, **above}}}
        return options, displaced

    def _apply_model(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if not self.tagged(transformer_options):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        options, displaced = self._displaced(transformer_options)
        if not displaced:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        reached: list = []
        ours = guidance_options(options)
        options = {**options, GUIDANCE_OPTIONS: {**ours, DISPLACEMENT_PROBES: {**ours.get(DISPLACEMENT_PROBES, {}), self.key: reached}}}
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        if not reached:
            self._warn_once(displaced)
        return out

    def _warn_once(self, displaced: list[str]) -> None:
        with self._lock:
            if self.run.get("warned"):
                return
            self.run["warned"] = True
        logging.warning(
                "%s: a node applied after it replaced %s without calling it, which would switch the guidance off. "
                "For this run the guidance runs above it in its own passes and leaves every other attention to it, "
                "as if the guidance node had been applied last: apply attention guidance after that node to keep "
                "this order and silence this message.", self.node, "; ".join(displaced))
