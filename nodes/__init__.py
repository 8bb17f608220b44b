"""Node schemas and the glue into the host's ModelPatcher: the only code that imports comfy."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .pag import PerturbedAttentionGuidance
from .sag import SelfAttentionGuidance
from .sag_preview import SAGMaskPreview
from .seg import SmoothedEnergyGuidance


class AttentionGuidanceExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [PerturbedAttentionGuidance, SelfAttentionGuidance, SAGMaskPreview, SmoothedEnergyGuidance]
