"""The host's image and video model types the nodes refuse, and why (0.3.75), for their error message.

Each is refused because no attention override can reach its self-attention, or because the pack's handlers do not
model the attention it has; every other model the registry does not recognise gets the general refusal.
"""
from __future__ import annotations

# the host's model config name -> why the nodes cannot guide it
REFUSED: dict[str, str] = {
    "Stable_Cascade_C": "its attention blocks attend from the image tokens to the image and text tokens together, at "
                        "several resolutions, with no block marked by the host; the nodes do not model that attention "
                        "yet",
    "Stable_Cascade_B": "its attention blocks attend from the image tokens to the image and text tokens together, at "
                        "several resolutions, with no block marked by the host; the nodes do not model that attention "
                        "yet",
}
