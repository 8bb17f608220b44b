"""A node's start/end percent window, decided per step without stalling the GPU where it can be.

The sampler hands calc_cond_batch and the post-CFG functions its sigma as a tensor on the model's
device. Reading it (``float(sigma)``, ``.item()``) makes the CPU wait until the GPU has run every
kernel queued before: in the post-CFG function that is the whole forward just launched, so the next
kernels are launched only after the GPU ran dry. The host's ``percent_to_sigma`` reads a device
buffer with ``.item()`` too (ModelSamplingDiscrete, 0.3.75). So:

- the window's sigmas are converted once per sampling run, not at every call;
- a window over the whole schedule (the default 0 to 1) is known to hold every sigma without
  reading it;
- otherwise the sigma is read once per step, at the step's first call (calc_cond_batch, before the
  forward is launched), and the post-CFG function reuses that value: the host hands both the same
  tensor object (comfy.samplers.sampling_function, 0.3.75).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..guidance_core.schedule import in_sigma_window
from .run_state import RunState, clear_after_sampling


@dataclasses.dataclass
class WindowRun(RunState):
    """What a window caches in one sampling run: its bounds in sigma with the model sampling they were converted
    by, and the values computed for the last step's sigma tensor."""

    bounds: tuple | None = None  # (model_sampling, sigma at start_percent, sigma at end_percent)
    step_sigma: object = None
    step_values: dict = dataclasses.field(default_factory=dict)


class SigmaWindow:
    def __init__(self, model, start_percent: float, end_percent: float):
        """Installed on ``model`` (the node's clone), whose sampling runs clear what it caches."""
        self.start_percent = start_percent
        self.end_percent = end_percent
        self.run = WindowRun()
        clear_after_sampling(model, self.run)

    @property
    def whole_schedule(self) -> bool:
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def bounds(self, model_sampling) -> tuple[float, float]:
        """(sigma at start_percent, sigma at end_percent) by the model's own conversion, once per run."""
        cached = self.run.bounds
        if cached is None or cached[0] is not model_sampling:
            cached = (model_sampling, model_sampling.percent_to_sigma(self.start_percent),
                      model_sampling.percent_to_sigma(self.end_percent))
            self.run.bounds = cached
        return cached[1], cached[2]

    def per_step(self, sigma, name: str, compute: Callable[[], object]):
        """``compute()`` once per sigma tensor (one step's calls share it), cached under ``name``."""
        if self.run.step_sigma is not sigma:
            self.run.step_sigma, self.run.step_values = sigma, {}
        values = self.run.step_values
        if name not in values:
            values[name] = compute()
        return values[name]

    def sigma_value(self, sigma) -> float:
        """The step's sigma as a Python float: read from the device once per step."""
        return self.per_step(sigma, "sigma", lambda: float(sigma.flatten()[0]))

    def contains(self, model_sampling, sigma) -> bool:
        """True while the sampler is inside the window (both ends included)."""
        if self.whole_schedule:
            return True
        return in_sigma_window(self.sigma_value(sigma), *self.bounds(model_sampling))
