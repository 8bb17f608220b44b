"""The layers a node uses on a model, resolved from its input (``auto`` = the family's default), and the
log line that says which they are at the first guided step of each run."""
from __future__ import annotations

import logging

from ..guidance_core.layer_spec import DiTLayout, describe_sites


def family_name(layout) -> str:
    return layout.family if isinstance(layout, DiTLayout) else "UNet"


def layers_in_use(node: str, input_name: str, spec: str, resolved: str, layout, sites, kind: str) -> str:
    """'Perturbed-Attention Guidance on this Flux model: layers 'auto' = double.7-9 (the family's default:
    <source>).'"""
    line = f"{node} on this {family_name(layout)} model: {input_name} '{spec}' = {describe_sites(sites)}"
    if resolved != spec:
        line += f" (the family's default, from {layout.default_source(kind)})"
    return line + "."


def log_once_per_run(run: dict, line: str) -> None:
    """Log ``line`` the first time in this run (``run`` is emptied when the run ends)."""
    if not run.get("layers_logged"):
        run["layers_logged"] = True
        logging.info(line)
