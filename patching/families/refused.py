"""The host's image and video model types the nodes refuse, and why (0.3.75), for their error message.

Each is refused because no attention override can reach its self-attention, or because the pack's handlers do not
model the attention it has; every other model the registry does not recognise gets the general refusal.
"""
from __future__ import annotations

_NO_OPTIONS = ("its attention is called without transformer_options in this host (0.3.75), so no attention "
               "override reaches it")

# the host's model config name -> why the nodes cannot guide it
REFUSED: dict[str, str] = {
    "WAN22_S2V": "its blocks are run without transformer_options (their block replacement gets none either) in this "
                 "host (0.3.75), so no attention override reaches their self-attention",
    "HunyuanDiT": _NO_OPTIONS,
    "HunyuanDiT1": _NO_OPTIONS,
    "PixArtAlpha": _NO_OPTIONS + " (its blocks are not handed transformer_options)",
    "PixArtSigma": _NO_OPTIONS + " (its blocks are not handed transformer_options)",
}
