"""When a guidance term is active: a window over the sampling schedule given in percent of the
model's own noise range (converted to sigmas by the host's ``percent_to_sigma``, as the host's
SkipLayerGuidance does), and validation of the window inputs."""
from __future__ import annotations

import math


def validate_percent_window(start_percent: float, end_percent: float) -> None:
    for name, value in (("start_percent", start_percent), ("end_percent", end_percent)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name} is {value}; it must be a number from 0.0 to 1.0.")
    if start_percent > end_percent:
        raise ValueError(
            f"start_percent ({start_percent}) is after end_percent ({end_percent}): the guidance would "
            "never be active. Set start_percent <= end_percent (0.0 to 1.0 covers every step)."
        )


def in_sigma_window(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """True while the sampler is between start (high noise) and end (low noise), both included."""
    return sigma_end <= sigma <= sigma_start
