"""The node faces: one module per node (schema, validation into a settings value, execute). The glue into the
host is in ``patching``."""
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
