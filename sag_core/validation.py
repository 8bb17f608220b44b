"""Checks of the SAG node's numeric inputs, with messages that name the input, its range and the fix."""
import math

from .blur import validate_kernel_size, validate_sigma


def _finite_number(value, name, hint):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number (got {value!r}); {hint}")


def validate_sag_inputs(scale, blur_sigma, threshold, kernel_size):
    """Raise ``ValueError`` for SAG settings that are not usable.

    - ``scale``: any finite number (0 disables SAG; negative values push towards the blurred image).
    - ``blur_sigma``: finite, >= 0 (0 disables the blur, and with it SAG's effect).
    - ``threshold``: finite, >= 0; compared with the per-key attention mass, whose mean is 1.0.
    - ``kernel_size``: odd integer >= 1.
    """
    _finite_number(scale, "scale", "use e.g. 0.5 (0 turns SAG off).")
    validate_sigma(blur_sigma, "blur_sigma")
    _finite_number(threshold, "threshold", "use 1.0, the mean attention a token receives.")
    if threshold < 0:
        raise ValueError(
            f"threshold must be >= 0 (got {threshold}); the attention mass of a token is never negative, "
            "so use 1.0 (tokens with above-average attention) or a value near it."
        )
    validate_kernel_size(kernel_size)
