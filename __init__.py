"""Attention Guidance: Self-Attention Guidance (SAG), Perturbed-Attention Guidance (PAG) and Smoothed Energy
Guidance (SEG) for ComfyUI.

ComfyUI imports this file when the folder sits in ``ComfyUI/custom_nodes/``. The node classes are
imported lazily inside ``comfy_entrypoint`` so that the plain-torch cores (``guidance_core``,
``pag_core``, ``sag_core``, ``seg_core``) can be imported and unit-tested without the host.
The host serves ``example_workflows/`` next to this file as the pack's workflow templates, and
``web/`` as its frontend folder: ``web/docs/<node id>.md`` is the page the frontend's node docs panel
shows for that node.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import AttentionGuidanceExtension

    return AttentionGuidanceExtension()
