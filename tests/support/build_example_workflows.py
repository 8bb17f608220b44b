#!/usr/bin/env python3
"""Build ``example_workflows/*.json`` in the real ComfyUI frontend, so that each file is exactly what the
pinned frontend exports, with a preview image (``<name>.jpg``, the template browser's thumbnail) and a
screenshot for the README (``docs/<name>.png``).

    .cache/venv/bin/python tests/support/build_example_workflows.py [NAME ...] [--freeze]

Needs ``python3 scripts/host.py setup`` (host, venv, Chromium, Playwright). It starts the test server
with the example models' stand-ins, opens the frontend in headless Chromium, and for each workflow
below creates the nodes with ``LiteGraph.createNode``, sets their widgets, connects them, adds the
registry properties (``cnr_id`` / ``ver``, which ComfyUI-Manager adds when it is installed), fits the
view and writes what Workflow > Export writes (``app.graphToPrompt().workflow`` and the view).

``--freeze`` also copies the examples, with the API prompt the frontend makes of each, to
``tests/workflow_compat/<pack version>/``: the workflows as released, which every later version of
the nodes must keep loading with the same meaning (tests/test_workflows.py).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.browser import ComfyPage, chromium_context  # noqa: E402
from support.examples import (COMPAT_DIR, CORE_CNR_ID, EXAMPLES_DIR, OUR_NODE_PREFIX,  # noqa: E402
                              example_server_running, load_example, pack_metadata)
from support.server import PACK_NAME as PACK_FOLDER, REPO  # noqa: E402

DOCS = REPO / "docs"
# The examples whose screenshots the README shows, and the template browser with the pack selected.
DOCS_SCREENSHOTS = ("sd15_pag_unconditional_cfg1", "sd15_sag_pag_chained", "sd15_controlnet_canny_empty_prompt_pag",
                    "sd15_sag_mask_preview", "flux_dev_pag", "z_image_turbo_pag")
TEMPLATE_BROWSER_SCREENSHOT = DOCS / "template_browser.png"
# The PAG node's page in the node docs panel, beside this example's graph.
NODE_DOCS_SCREENSHOT = DOCS / "node_docs_panel.png"
NODE_DOCS_EXAMPLE = "sd15_pag_unconditional_cfg1"
PREVIEW_PIXELS = 512
PREVIEW_MIN_SCALE = 0.7
SCREENSHOT_MARGIN = 40
UUID_NAMESPACE = uuid.UUID("6f1c2a52-4d5e-4f38-9a57-0d3c7b1e2a90")

SD15 = "v1-5-pruned-emaonly.safetensors"
SD15_INPAINTING = "sd-v1-5-inpainting.ckpt"
SDXL = "sd_xl_base_1.0.safetensors"
CANNY_CONTROLNET = "control_v11p_sd15_canny.safetensors"
SD3 = "sd3_medium_incl_clips.safetensors"
FLUX_DEV = "flux1-dev.safetensors"
FLUX_CLIP_L = "clip_l.safetensors"
FLUX_T5 = "t5xxl_fp16.safetensors"
FLUX_VAE = "ae.safetensors"
Z_IMAGE_TURBO = "z_image_turbo_bf16.safetensors"
Z_IMAGE_TEXT = "qwen_3_4b.safetensors"
WAN21_T2V_1_3B = "wan2.1_t2v_1.3B_fp16.safetensors"
WAN_UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN21_VAE = "wan_2.1_vae.safetensors"
COSMOS_PREDICT2_2B_T2I = "cosmos_predict2_2B_t2i.safetensors"
COSMOS_TEXT = "oldt5_xxl_fp8_e4m3fn_scaled.safetensors"
WAN22_T2V_HIGH_NOISE = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
WAN22_T2V_LOW_NOISE = "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
MOCHI = "mochi_preview_bf16.safetensors"
MOCHI_VAE = "mochi_vae.safetensors"
PIXART_SIGMA_1024 = "PixArt-Sigma-XL-2-1024-MS.pth"
SDXL_VAE = "sdxl_vae.safetensors"
NEGATIVE = "blurry, low quality, deformed, watermark, text"


@dataclass
class Node:
    key: str
    type: str
    pos: tuple
    widgets: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)  # input name -> (node key, output index)
    title: str | None = None
    size: tuple | None = None


@dataclass
class Workflow:
    name: str
    title: str
    note: str
    nodes: list


def note(pos=(20, 20), size=(400, 330)) -> Node:
    """The workflow's Note; its title and text are the Workflow's."""
    return Node("note", "Note", pos, size=size)


def text_encoders(positive: str, negative: str, y=300, clip=("ckpt", 1)) -> list[Node]:
    return [
        Node("positive", "CLIPTextEncode", (460, y), {"text": positive}, {"clip": clip}, title="Positive prompt", size=(400, 170)),
        Node("negative", "CLIPTextEncode", (460, y + 220), {"text": negative}, {"clip": clip}, title="Negative prompt", size=(400, 170)),
    ]


def sampler(model, positive, negative, latent, *, seed=42, steps=25, cfg=7.5, scheduler="normal", pos=(900, 20),
            sampler_name="euler") -> Node:
    return Node("sampler", "KSampler", pos,
                {"seed": seed, "control_after_generate": "fixed", "steps": steps, "cfg": cfg,
                 "sampler_name": sampler_name, "scheduler": scheduler, "denoise": 1.0},
                {"model": model, "positive": positive, "negative": negative, "latent_image": latent})


def decode_and_save(prefix: str, vae=("ckpt", 2), x=1240) -> list[Node]:
    return [
        Node("decode", "VAEDecode", (x, 20), {}, {"samples": ("sampler", 0), "vae": vae}),
        Node("save", "SaveImage", (x, 130), {"filename_prefix": prefix}, {"images": ("decode", 0)}, size=(420, 470)),
    ]


def checkpoint(name: str, pos=(20, 390)) -> Node:
    return Node("ckpt", "CheckpointLoaderSimple", pos, {"ckpt_name": name}, size=(380, 100))


def empty_latent(width: int, height: int, pos=(460, 740), node_type="EmptyLatentImage") -> Node:
    return Node("latent", node_type, pos, {"width": width, "height": height, "batch_size": 1})


def sag(pos=(460, 20), model=("ckpt", 0), **widgets) -> Node:
    return Node("sag", "AG_SelfAttentionGuidance", pos, widgets, {"model": model}, size=(380, 230))


def pag(pos=(460, 20), model=("ckpt", 0), key="pag", title=None, **widgets) -> Node:
    return Node(key, "AG_PerturbedAttentionGuidance", pos, widgets, {"model": model}, title=title, size=(380, 220))


def seg(pos=(460, 20), model=("ckpt", 0), key="seg", title=None, **widgets) -> Node:
    return Node(key, "AG_SmoothedEnergyGuidance", pos, widgets, {"model": model}, title=title, size=(380, 190))


def advanced_sampler(key: str, model, latent, *, add_noise: str, start: int, end: int, leftover: str, pos,
                     title: str, seed=42, steps=20, cfg=3.5, sampler_name="euler", scheduler="simple") -> Node:
    return Node(key, "KSamplerAdvanced", pos,
                {"add_noise": add_noise, "noise_seed": seed, "control_after_generate": "fixed", "steps": steps,
                 "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler, "start_at_step": start,
                 "end_at_step": end, "return_with_leftover_noise": leftover},
                {"model": model, "positive": ("positive", 0), "negative": ("negative", 0), "latent_image": latent},
                title=title, size=(320, 340))


COMPARE = ("Compare: the seed is fixed, so bypassing the guidance node (select it, Ctrl+B) and queueing "
           "again shows the same image without it.")


def workflows() -> list[Workflow]:
    return [
        Workflow(
            "sd15_sag", "SD1.5 + Self-Attention Guidance (SAG)",
            "Self-Attention Guidance (Hong et al., ICCV 2023) on Stable Diffusion 1.5, with CFG.\n\n"
            "Each step SAG blurs the predicted image where the middle block's self-attention looks most, "
            "lets the model denoise that blurred version and guides away from it: sharper structure and "
            "detail, at one extra model evaluation per step.\n\n"
            "Settings: diffusers' defaults (scale 0.75, blur sigma 1, threshold 1 = the mean attention, "
            "kernel 9, layer m0.0 = first transformer of the middle block). Raise the scale for a stronger "
            f"effect; tune threshold and layer with the SAG Mask Preview example.\n\n{COMPARE}\n\n"
            f"Model: {SD15} in models/checkpoints (any SD1.x/SD2.x checkpoint works).",
            [
                note(),
                checkpoint(SD15),
                sag(scale=0.75, blur_sigma=1.0, threshold=1.0, kernel_size=9, layer="m0.0",
                    start_percent=0.0, end_percent=1.0),
                *text_encoders("a photograph of an astronaut riding a horse on the moon, detailed, sharp focus", NEGATIVE),
                empty_latent(512, 512),
                sampler(("sag", 0), ("positive", 0), ("negative", 0), ("latent", 0), cfg=7.5),
                *decode_and_save("sd15_sag"),
            ],
        ),
        Workflow(
            "sd15_pag_unconditional_cfg1", "SD1.5 + PAG alone: empty prompt, CFG 1",
            "Perturbed-Attention Guidance (Ahn et al., ECCV 2024) without any prompt and without CFG: the "
            "paper's unconditional setting, where CFG cannot help at all.\n\n"
            "PAG makes a second prediction in which the middle block's self-attention map is replaced by "
            "the identity (each token sees only itself) and guides away from it. At CFG 1 ComfyUI skips "
            "the negative pass, so the cost is one extra evaluation of the positive per step.\n\n"
            "Settings from the paper's SD1.5 demo: PAG scale 5, layer m0 (paper index syntax: the first "
            "attention of the middle block; 'mid' is the same on SD1.5), CFG 1, 25 steps.\n\n"
            f"{COMPARE} Without PAG an empty prompt gives mostly shapeless images.\n\n"
            f"Model: {SD15} in models/checkpoints.",
            [
                note(),
                checkpoint(SD15),
                pag(scale=5.0, layers="m0", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0),
                Node("prompt", "CLIPTextEncode", (460, 300), {"text": ""}, {"clip": ("ckpt", 1)},
                     title="Empty prompt", size=(400, 170)),
                empty_latent(512, 512, pos=(460, 520)),
                sampler(("pag", 0), ("prompt", 0), ("prompt", 0), ("latent", 0), cfg=1.0),
                *decode_and_save("sd15_pag_unconditional"),
            ],
        ),
        Workflow(
            "sdxl_pag_cfg", "SDXL + PAG with CFG",
            "Perturbed-Attention Guidance on SDXL, added to ordinary classifier-free guidance.\n\n"
            "The perturbed prediction is batched with the positive and negative ones, so a step costs "
            "one more evaluation of the positive prompt.\n\n"
            "Settings from the SDXL demo the paper's authors published: layers 'mid' (every transformer "
            "block of the middle block), PAG scale 3 with CFG 4. PAG lets CFG stay low: fewer "
            "saturated colours, structure still holds.\n\n"
            f"{COMPARE}\n\nModel: {SDXL} in models/checkpoints.",
            [
                note(),
                checkpoint(SDXL),
                pag(scale=3.0, layers="mid", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0),
                *text_encoders("a cinematic photograph of a lighthouse on a cliff at dusk, waves, volumetric light", NEGATIVE),
                empty_latent(1024, 1024),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("latent", 0), cfg=4.0),
                *decode_and_save("sdxl_pag"),
            ],
        ),
        Workflow(
            "sdxl_seg_pag", "SDXL + SEG and PAG with CFG",
            "Smoothed Energy Guidance (Hong, NeurIPS 2024) and Perturbed-Attention Guidance chained on SDXL, "
            "added to classifier-free guidance.\n\n"
            "SEG blurs the queries of the middle block's self-attention in a copy of the positive prediction "
            "(a smoothed attention energy) and guides away from it; PAG does the same with the attention "
            "replaced by the identity. Both copies ride in the sampler's own forward: one forward of four "
            "chunks per step.\n\n"
            "Settings: each method's published SDXL values (SEG-SDXL: scale 3, layers 'mid', blur sigma 10, "
            "the paper's Table 1 setting; 10000 or more is the infinite blur, stronger; PAG: scale 3 on 'mid' "
            "with CFG 4). No settings for the pair are published: a starting point; lower the scales if the "
            f"image looks over-sharpened.\n\n{COMPARE} Bypass each node in turn to see its share.\n\n"
            f"Model: {SDXL} in models/checkpoints.",
            [
                note(),
                checkpoint(SDXL),
                seg(scale=3.0, blur_sigma=10.0, layers="mid", start_percent=0.0, end_percent=1.0),
                pag(pos=(460, 250), model=("seg", 0), scale=3.0, layers="mid", adaptive_scale=0.0,
                    start_percent=0.0, end_percent=1.0, rescale=0.0),
                *text_encoders("a cinematic photograph of a lighthouse on a cliff at dusk, waves, volumetric light",
                               NEGATIVE, y=500),
                empty_latent(1024, 1024, pos=(460, 940)),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("latent", 0), cfg=4.0),
                *decode_and_save("sdxl_seg_pag"),
            ],
        ),
        Workflow(
            "sd3_pag_cfg", "SD3 + PAG with CFG",
            "Perturbed-Attention Guidance on Stable Diffusion 3 (MMDiT), added to classifier-free "
            "guidance.\n\n"
            "In the chosen joint block the perturbed copy's image tokens attend only to themselves and "
            "to the prompt (diffusers' SD3 PAG processors; the paper's identity map on the image part). "
            "It is batched with the positive and negative predictions: one more evaluation of the "
            "positive prompt per step.\n\n"
            "Settings from diffusers' StableDiffusion3PAGPipeline example: layer joint.13 (diffusers' "
            "'blocks.13'), PAG scale 0.7, CFG 5, 28 steps.\n\n"
            f"{COMPARE}\n\nModel: {SD3} (SD3 Medium with its CLIP text encoders) in models/checkpoints. "
            "SD3.5 Large / Medium work the same; load their text encoders with TripleCLIPLoader.",
            [
                note(),
                checkpoint(SD3),
                pag(scale=0.7, layers="joint.13", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0),
                *text_encoders("a cat holding a sign that says hello world", NEGATIVE),
                empty_latent(1024, 1024, node_type="EmptySD3LatentImage"),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("latent", 0), steps=28, cfg=5.0,
                        scheduler="sgm_uniform"),
                *decode_and_save("sd3_pag"),
            ],
        ),
        Workflow(
            "flux_dev_pag", "Flux.1 dev + PAG (CFG 1)",
            "Perturbed-Attention Guidance on Flux.1 dev. Flux dev is guidance-distilled: it runs at CFG 1 "
            "with its own guidance value (Flux Guidance), so ComfyUI evaluates only the positive prompt, "
            "and PAG adds one evaluation of a perturbed copy of it per step.\n\n"
            "In each chosen double block the perturbed copy's image tokens attend only to themselves and "
            "to the prompt.\n\n"
            "Settings: there are no published PAG settings for Flux (diffusers has no Flux PAG). The "
            "blocks are those ComfyUI's Skip Layer Guidance node uses by default (double blocks 7-9), "
            "PAG scale 2; treat them as a starting point and lower the scale if colours burn. Flux "
            "Guidance 3.5, 20 steps, CFG 1.\n\n"
            f"{COMPARE}\n\nModels: {FLUX_DEV} in models/diffusion_models, {FLUX_CLIP_L} and {FLUX_T5} "
            f"in models/text_encoders, {FLUX_VAE} in models/vae.",
            [
                note(size=(400, 400)),
                Node("unet", "UNETLoader", (20, 480), {"unet_name": FLUX_DEV, "weight_dtype": "default"}, size=(380, 90)),
                Node("clip", "DualCLIPLoader", (20, 610),
                     {"clip_name1": FLUX_CLIP_L, "clip_name2": FLUX_T5, "type": "flux"}, size=(380, 130)),
                Node("vae", "VAELoader", (20, 780), {"vae_name": FLUX_VAE}, size=(380, 60)),
                pag(model=("unet", 0), scale=2.0, layers="double.7-9", adaptive_scale=0.0, start_percent=0.0,
                    end_percent=1.0, rescale=0.0),
                Node("positive", "CLIPTextEncode", (460, 300),
                     {"text": "a red fox in a snowy birch forest at sunrise, detailed fur, soft light"},
                     {"clip": ("clip", 0)}, title="Positive prompt", size=(400, 170)),
                Node("guidance", "FluxGuidance", (460, 520), {"guidance": 3.5}, {"conditioning": ("positive", 0)}),
                Node("negative", "CLIPTextEncode", (460, 640), {"text": ""}, {"clip": ("clip", 0)},
                     title="Negative (unused at CFG 1)", size=(400, 130)),
                empty_latent(1024, 1024, pos=(460, 820), node_type="EmptySD3LatentImage"),
                sampler(("pag", 0), ("guidance", 0), ("negative", 0), ("latent", 0), steps=20, cfg=1.0,
                        scheduler="simple"),
                *decode_and_save("flux_dev_pag", vae=("vae", 0)),
            ],
        ),
        Workflow(
            "z_image_turbo_pag", "Z-Image Turbo + PAG (CFG 1)",
            "Perturbed-Attention Guidance on Z-Image Turbo. Turbo is distilled to sample in 8-9 steps at "
            "CFG 1, so ComfyUI evaluates only the positive prompt, and PAG adds one evaluation of a "
            "perturbed copy of it per step.\n\n"
            "In each chosen main layer the perturbed copy's image tokens attend only to themselves and to "
            "the prompt. layers 'auto' is Z-Image's default, layers.16 (nothing is published for PAG on "
            "Z-Image: SD3's published block at the same relative depth; the log names it at the first "
            "step); PAG scale 3. Treat both as a starting point.\n\n"
            "Sampler settings of ComfyUI's own Z-Image Turbo template: 9 steps, CFG 1, res_multistep, "
            "simple, shift 3 (ModelSamplingAuraFlow), negative zeroed.\n\n"
            f"{COMPARE}\n\nModels: {Z_IMAGE_TURBO} in models/diffusion_models, {Z_IMAGE_TEXT} in "
            f"models/text_encoders, {FLUX_VAE} in models/vae.",
            [
                note(size=(400, 400)),
                Node("unet", "UNETLoader", (20, 480), {"unet_name": Z_IMAGE_TURBO, "weight_dtype": "default"},
                     size=(380, 90)),
                Node("clip", "CLIPLoader", (20, 610), {"clip_name": Z_IMAGE_TEXT, "type": "lumina2", "device": "default"},
                     size=(380, 110)),
                Node("vae", "VAELoader", (20, 760), {"vae_name": FLUX_VAE}, size=(380, 60)),
                Node("shift", "ModelSamplingAuraFlow", (460, 20), {"shift": 3.0}, {"model": ("unet", 0)}),
                pag(pos=(460, 130), model=("shift", 0), scale=3.0, layers="auto", adaptive_scale=0.0,
                    start_percent=0.0, end_percent=1.0, rescale=0.0),
                Node("positive", "CLIPTextEncode", (460, 380),
                     {"text": "a red fox in a snowy birch forest at sunrise, detailed fur, soft light"},
                     {"clip": ("clip", 0)}, title="Positive prompt", size=(400, 170)),
                Node("negative", "ConditioningZeroOut", (460, 600), {}, {"conditioning": ("positive", 0)},
                     title="Negative (unused at CFG 1)"),
                empty_latent(1024, 1024, pos=(460, 700), node_type="EmptySD3LatentImage"),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("latent", 0), steps=9, cfg=1.0,
                        scheduler="simple", sampler_name="res_multistep"),
                *decode_and_save("z_image_turbo_pag", vae=("vae", 0)),
            ],
        ),
        Workflow(
            "sd15_sag_pag_chained", "SD1.5: SAG and PAG chained",
            "Self-Attention Guidance and Perturbed-Attention Guidance on one model: chain the nodes. Each "
            "adds its own term to the guided prediction (SAG from the negative branch's blurred "
            "prediction, PAG from the perturbed positive), and each patch keeps the other's attention "
            "hooks, so the order of the two nodes does not change the result.\n\n"
            "Cost per step: CFG's two evaluations, one for PAG (batched with them) and one for SAG.\n\n"
            "Settings: SAG 0.75 (defaults), PAG 3 on 'mid' with CFG 4.\n\n"
            f"Bypass either node (Ctrl+B) to see what the other does alone.\n\nModel: {SD15} in models/checkpoints.",
            [
                note(),
                checkpoint(SD15),
                sag(scale=0.75, blur_sigma=1.0, threshold=1.0, kernel_size=9, layer="m0.0",
                    start_percent=0.0, end_percent=1.0),
                pag(pos=(900, 20), model=("sag", 0), scale=3.0, layers="mid", adaptive_scale=0.0,
                    start_percent=0.0, end_percent=1.0, rescale=0.0),
                *text_encoders("a cozy reading nook with a large window, rain outside, warm lamp light", NEGATIVE),
                empty_latent(512, 512),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("latent", 0), cfg=4.0, pos=(900, 290)),
                *decode_and_save("sd15_sag_pag", x=1340),
            ],
        ),
        Workflow(
            "sd15_controlnet_canny_empty_prompt_pag", "SD1.5 ControlNet (canny), empty prompt + PAG",
            "The paper's highlight: ControlNet with an empty prompt and no CFG. The edges fix the "
            "layout, but without a prompt SD1.5 fills it with mush; PAG alone restores plausible "
            "content and texture.\n\n"
            "Settings from the authors' ControlNet demo: PAG scale 4 on m0 (the middle block), CFG 1 "
            "(no CFG), empty prompt for both sides.\n\n"
            "Put your picture into ComfyUI's input folder and pick it in Load Image (example.png ships "
            "with ComfyUI); the Preview shows the canny edges.\n\n"
            f"Models: {SD15} in models/checkpoints, {CANNY_CONTROLNET} in models/controlnet.",
            [
                note(size=(400, 350)),
                checkpoint(SD15, pos=(20, 410)),
                pag(scale=4.0, layers="m0", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0),
                Node("prompt", "CLIPTextEncode", (460, 280), {"text": ""}, {"clip": ("ckpt", 1)},
                     title="Empty prompt", size=(400, 130)),
                Node("image", "LoadImage", (20, 560), {"image": "example.png"}, size=(380, 360)),
                Node("canny", "Canny", (460, 460), {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": ("image", 0)}),
                Node("edges", "PreviewImage", (460, 600), {}, {"images": ("canny", 0)}, size=(400, 330)),
                Node("controlnet_model", "ControlNetLoader", (900, 460), {"control_net_name": CANNY_CONTROLNET}, size=(380, 60)),
                Node("controlnet", "ControlNetApplyAdvanced", (900, 560),
                     {"strength": 1.0, "start_percent": 0.0, "end_percent": 1.0},
                     {"positive": ("prompt", 0), "negative": ("prompt", 0), "control_net": ("controlnet_model", 0),
                      "image": ("canny", 0)}),
                empty_latent(512, 512, pos=(900, 780)),
                sampler(("pag", 0), ("controlnet", 0), ("controlnet", 1), ("latent", 0), cfg=1.0),
                *decode_and_save("sd15_controlnet_pag", x=1340),
            ],
        ),
        Workflow(
            "sd15_inpainting_pag", "SD1.5 inpainting + PAG",
            "Perturbed-Attention Guidance with an inpainting checkpoint: the masked area is repainted "
            "with more coherent structure and fewer seams.\n\n"
            "Load an image, right-click Load Image > Open in MaskEditor and paint the area to repaint "
            "(or load a PNG whose transparent pixels are the mask). VAE Encode (for Inpainting) hands "
            "the mask to the inpainting model.\n\n"
            "Settings from the authors' inpainting demo: PAG scale 3 on u0 (the first attention of the "
            "up path, index syntax), with CFG 7.5.\n\n"
            f"Model: {SD15_INPAINTING} (runwayml's SD1.5 inpainting) in models/checkpoints.",
            [
                note(),
                checkpoint(SD15_INPAINTING),
                pag(scale=3.0, layers="u0", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0),
                *text_encoders("a vase of sunflowers on a wooden table", NEGATIVE),
                Node("image", "LoadImage", (20, 540), {"image": "inpaint_example.png"}, size=(380, 360)),
                Node("encode", "VAEEncodeForInpaint", (460, 740), {"grow_mask_by": 6},
                     {"pixels": ("image", 0), "vae": ("ckpt", 2), "mask": ("image", 1)}),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("encode", 0), cfg=7.5),
                *decode_and_save("sd15_inpainting_pag"),
            ],
        ),
        Workflow(
            "sd15_sag_mask_preview", "SD1.5: see the SAG mask",
            "SAG Mask Preview shows the region Self-Attention Guidance blurs at one step of the "
            "sampler: white = blurred and guided, black = untouched. Use it to tune the SAG node's "
            "threshold (higher = smaller mask) and layer by eye.\n\n"
            "The seed and the number of steps are shared with the KSampler through the two primitive "
            "nodes; keep the preview's cfg and scheduler equal to the sampler's, so that the preview "
            "matches the run. 'step' picks the step (0 = first; the mask follows the image as it "
            "forms).\n\n"
            f"Model: {SD15} in models/checkpoints.",
            [
                note(size=(400, 360)),
                checkpoint(SD15, pos=(20, 420)),
                sag(scale=0.75, blur_sigma=1.0, threshold=1.0, kernel_size=9, layer="m0.0",
                    start_percent=0.0, end_percent=1.0),
                *text_encoders("a bowl of fruit on a kitchen table, morning light", NEGATIVE),
                empty_latent(512, 512),
                Node("seed", "PrimitiveNode", (460, 900), title="seed"),
                Node("steps", "PrimitiveNode", (460, 1040), title="steps"),
                sampler(("sag", 0), ("positive", 0), ("negative", 0), ("latent", 0), cfg=7.5,
                        pos=(900, 20)),
                Node("preview_mask", "AG_SAGMaskPreview", (900, 360),
                     {"control_after_generate": "fixed", "step": 0, "cfg": 7.5, "scheduler": "normal"},
                     {"model": ("sag", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                      "latent_image": ("latent", 0)}, size=(380, 240)),
                Node("mask_image", "PreviewImage", (900, 640), {}, {"images": ("preview_mask", 1)},
                     title="SAG mask", size=(380, 400)),
                *decode_and_save("sd15_sag_mask_preview", x=1340),
            ],
        ),
        Workflow(
            "wan21_t2v_pag", "Wan 2.1 T2V 1.3B + PAG (video)",
            "Perturbed-Attention Guidance on a video model, Wan 2.1 text-to-video 1.3B, added to CFG.\n\n"
            "In the chosen block the perturbed copy's self-attention is the identity: every space-time token "
            "of every frame attends only to itself (the attention form of Spatiotemporal Skip Guidance, STG); "
            "the block's cross-attention to the prompt is untouched. ComfyUI's Skip Layer Guidance skips the "
            "whole block instead. The copy is batched with the positive and negative predictions where memory "
            "allows.\n\n"
            "Settings: there are no published PAG settings for Wan. Block 10 (block.10, diffusers' blocks.10) "
            "is the block kijai's Wan skip-layer guidance uses by default; STG recommends scales up to 2 on "
            "video, here 1.5. The rest is ComfyUI's Wan 2.1 example: 832x480, 33 frames, shift 8, CFG 6, "
            "30 steps of uni_pc / simple, saved at 16 fps.\n\n"
            f"{COMPARE}\n\nModels: {WAN21_T2V_1_3B} in models/diffusion_models, {WAN_UMT5} in "
            f"models/text_encoders, {WAN21_VAE} in models/vae.",
            [
                note(size=(400, 420)),
                Node("unet", "UNETLoader", (20, 480), {"unet_name": WAN21_T2V_1_3B, "weight_dtype": "default"},
                     size=(380, 90)),
                Node("clip", "CLIPLoader", (20, 610), {"clip_name": WAN_UMT5, "type": "wan"}, size=(380, 110)),
                Node("vae", "VAELoader", (20, 760), {"vae_name": WAN21_VAE}, size=(380, 60)),
                Node("shift", "ModelSamplingSD3", (460, 20), {"shift": 8.0}, {"model": ("unet", 0)}),
                pag(pos=(460, 120), model=("shift", 0), scale=1.5, layers="block.10", adaptive_scale=0.0,
                    start_percent=0.0, end_percent=1.0, rescale=0.0),
                Node("positive", "CLIPTextEncode", (460, 380),
                     {"text": "a red fox trotting through fresh snow in a birch forest, morning light, the camera "
                              "tracking beside it"},
                     {"clip": ("clip", 0)}, title="Positive prompt", size=(400, 170)),
                Node("negative", "CLIPTextEncode", (460, 600), {"text": NEGATIVE + ", static, still frame"},
                     {"clip": ("clip", 0)}, title="Negative prompt", size=(400, 130)),
                Node("latent", "EmptyHunyuanLatentVideo", (460, 780),
                     {"width": 832, "height": 480, "length": 33, "batch_size": 1}, title="Empty video latent"),
                Node("sampler", "KSampler", (900, 20),
                     {"seed": 42, "control_after_generate": "fixed", "steps": 30, "cfg": 6.0,
                      "sampler_name": "uni_pc", "scheduler": "simple", "denoise": 1.0},
                     {"model": ("pag", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                      "latent_image": ("latent", 0)}),
                Node("decode", "VAEDecode", (1240, 20), {}, {"samples": ("sampler", 0), "vae": ("vae", 0)}),
                Node("save", "SaveAnimatedWEBP", (1240, 130),
                     {"filename_prefix": "wan21_t2v_pag", "fps": 16.0, "lossless": False, "quality": 90,
                      "method": "default"},
                     {"images": ("decode", 0)}, size=(420, 470)),
            ],
        ),
        Workflow(
            "cosmos_predict2_anima_pag", "Cosmos Predict2 2B T2I (Anima's architecture) + PAG",
            "Perturbed-Attention Guidance on Cosmos Predict2 2B Text2Image, the architecture Anima is built on, "
            "added to CFG.\n\n"
            "In the chosen block the perturbed copy's self-attention is the identity: every image token attends "
            "only to itself; the block's cross-attention to the prompt is untouched. The copy is batched with "
            "the positive and negative predictions where memory allows.\n\n"
            "Settings: nothing is published for PAG on Cosmos. layers 'auto' is the pack's default for the 2B "
            "model's 28 blocks, block.7 (Wan's skip-layer guidance block 10 of 40 at the same relative depth; "
            "the log names it at the first step); PAG scale 3, the paper's. Treat both as a starting point. "
            "Sampler: 1024x1024, CFG 4, 35 steps of euler / simple.\n\n"
            "Anima: load its diffusion model and its own text encoder in place of these; the PAG node and its "
            "settings stay as they are (same blocks, same default).\n\n"
            f"{COMPARE}\n\nModels: {COSMOS_PREDICT2_2B_T2I} in models/diffusion_models, {COSMOS_TEXT} in "
            f"models/text_encoders, {WAN21_VAE} in models/vae.",
            [
                note(size=(400, 440)),
                Node("unet", "UNETLoader", (20, 500), {"unet_name": COSMOS_PREDICT2_2B_T2I, "weight_dtype": "default"},
                     size=(380, 90)),
                Node("clip", "CLIPLoader", (20, 630), {"clip_name": COSMOS_TEXT, "type": "cosmos", "device": "default"},
                     size=(380, 110)),
                Node("vae", "VAELoader", (20, 780), {"vae_name": WAN21_VAE}, size=(380, 60)),
                pag(pos=(460, 20), model=("unet", 0), scale=3.0, layers="auto", adaptive_scale=0.0,
                    start_percent=0.0, end_percent=1.0, rescale=0.0),
                Node("positive", "CLIPTextEncode", (460, 270),
                     {"text": "a red fox in a snowy birch forest at sunrise, detailed fur, soft light"},
                     {"clip": ("clip", 0)}, title="Positive prompt", size=(400, 170)),
                Node("negative", "CLIPTextEncode", (460, 490), {"text": NEGATIVE}, {"clip": ("clip", 0)},
                     title="Negative prompt", size=(400, 130)),
                empty_latent(1024, 1024, pos=(460, 670), node_type="EmptySD3LatentImage"),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("latent", 0), steps=35, cfg=4.0,
                        scheduler="simple"),
                *decode_and_save("cosmos_predict2_anima_pag", vae=("vae", 0)),
            ],
        ),
        Workflow(
            "wan22_t2v_14b_pag_uncond", "Wan 2.2 14B T2V, both experts + PAG (uncond branch, no extra pass)",
            "Perturbed-Attention Guidance on Wan 2.2 14B text-to-video, one PAG node on each of its two experts, "
            "with placement 'uncond branch': no pass beyond CFG's own.\n\n"
            "Wan 2.2 14B is two models of one architecture (Wan 2.1 14B's 40 blocks): the high-noise expert makes "
            "the first steps (layout, motion), the low-noise expert the last ones (detail). As in ComfyUI's Wan 2.2 "
            "template each is loaded and shifted on a chain of its own; the high-noise sampler runs steps 0-10 of "
            "20 and hands its latent, noise left in, to the low-noise sampler for steps 10-20. A node patches only "
            "the model it is given, so each expert has its own PAG node.\n\n"
            "Placement 'uncond branch': CFG's own negative prediction is made with the identity self-attention in "
            "the chosen block (every space-time token attends only to itself; the cross-attention to the prompt "
            "is untouched), and CFG guides away from it: result = perturbed negative + CFG x (positive - "
            "perturbed negative). No copy is batched, so a step costs what CFG costs. The PAG scale only switches "
            "it on (0 is off); CFG sets the strength. At CFG 1 there is no negative and this placement does "
            "nothing (the log says so): use 'own branch' there.\n\n"
            "Settings: the sampler settings of ComfyUI's Wan 2.2 14B T2V template (640x640, 81 frames, shift 8 "
            "on both experts, 20 steps of euler / simple at CFG 3.5, the switch at step 10), saved at 16 fps. "
            "Nothing is published for PAG on Wan 2.2: layers 'auto' is block.10 on both experts (the skip-layer "
            "guidance block of kijai's Wan nodes), scale 3 only switches it on. A starting point, not a published "
            "setting.\n\n"
            "Compare: the seed is fixed, so bypassing both PAG nodes (select them, Ctrl+B) and queueing again "
            "shows the same video without guidance; bypass one to see the other expert's share.\n\n"
            f"Models: {WAN22_T2V_HIGH_NOISE} and {WAN22_T2V_LOW_NOISE} in models/diffusion_models, {WAN_UMT5} in "
            f"models/text_encoders, {WAN21_VAE} in models/vae.",
            [
                note(size=(400, 700)),
                Node("unet_high", "UNETLoader", (20, 760), {"unet_name": WAN22_T2V_HIGH_NOISE, "weight_dtype": "default"},
                     title="High-noise expert", size=(380, 90)),
                Node("unet_low", "UNETLoader", (20, 880), {"unet_name": WAN22_T2V_LOW_NOISE, "weight_dtype": "default"},
                     title="Low-noise expert", size=(380, 90)),
                Node("clip", "CLIPLoader", (20, 1000), {"clip_name": WAN_UMT5, "type": "wan", "device": "default"},
                     size=(380, 110)),
                Node("vae", "VAELoader", (20, 1140), {"vae_name": WAN21_VAE}, size=(380, 60)),
                Node("shift_high", "ModelSamplingSD3", (460, 20), {"shift": 8.0}, {"model": ("unet_high", 0)},
                     title="Shift (high-noise)"),
                pag(pos=(460, 120), model=("shift_high", 0), key="pag_high", title="PAG (high-noise expert)",
                    scale=3.0, layers="auto", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0,
                    placement="uncond branch"),
                Node("shift_low", "ModelSamplingSD3", (460, 380), {"shift": 8.0}, {"model": ("unet_low", 0)},
                     title="Shift (low-noise)"),
                pag(pos=(460, 480), model=("shift_low", 0), key="pag_low", title="PAG (low-noise expert)",
                    scale=3.0, layers="auto", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0,
                    placement="uncond branch"),
                Node("positive", "CLIPTextEncode", (460, 740),
                     {"text": "a red fox trotting through fresh snow in a birch forest, morning light, the camera "
                              "tracking beside it"},
                     {"clip": ("clip", 0)}, title="Positive prompt", size=(400, 170)),
                Node("negative", "CLIPTextEncode", (460, 960), {"text": NEGATIVE + ", static, still frame"},
                     {"clip": ("clip", 0)}, title="Negative prompt", size=(400, 130)),
                Node("latent", "EmptyHunyuanLatentVideo", (460, 1140),
                     {"width": 640, "height": 640, "length": 81, "batch_size": 1}, title="Empty video latent"),
                advanced_sampler("sampler_high", ("pag_high", 0), ("latent", 0), add_noise="enable", start=0, end=10,
                                 leftover="enable", pos=(900, 20), title="High-noise sampler (steps 0-10)"),
                advanced_sampler("sampler_low", ("pag_low", 0), ("sampler_high", 0), add_noise="disable", start=10,
                                 end=10000, leftover="disable", pos=(900, 400), title="Low-noise sampler (steps 10-end)"),
                Node("decode", "VAEDecode", (1260, 20), {}, {"samples": ("sampler_low", 0), "vae": ("vae", 0)}),
                Node("save", "SaveAnimatedWEBP", (1260, 130),
                     {"filename_prefix": "wan22_t2v_14b_pag_uncond", "fps": 16.0, "lossless": False, "quality": 90,
                      "method": "default"},
                     {"images": ("decode", 0)}, size=(420, 470)),
            ],
        ),
        Workflow(
            "mochi_seg_uncond", "Mochi 1 preview + SEG (uncond branch, no extra pass)",
            "Smoothed Energy Guidance on Mochi 1 preview, a text-to-video model, with placement 'uncond branch': "
            "no pass beyond CFG's own.\n\n"
            "In the chosen block of Mochi's 48 joint video-text blocks, CFG's own negative prediction is made with "
            "blurred queries of the video tokens, frame by frame (the text tokens are untouched); at the infinite "
            "blur every video query is the mean query of its frame. CFG then guides away from that smoothed prediction: result = blurred "
            "negative + CFG x (positive - blurred negative). No copy is batched, so a step costs what CFG costs. "
            "The SEG scale only switches it on (0 is off); CFG and the blur set the strength. At CFG 1 there is no "
            "negative and this placement does nothing (the log says so): use 'own branch' there.\n\n"
            "Settings: CFG 4.5, as in Genmo's example command for Mochi 1 preview; 848x480, its native size. Nothing is "
            "published for SEG on Mochi: layers 'auto' is block.35 (the layer the Spatiotemporal Skip Guidance "
            "authors published for Mochi), blur sigma 10000 the infinite blur (SEG's default), scale 3 only "
            "switches it on; 37 frames, 30 steps of euler / simple and 30 fps are starting points too, not "
            "published settings. Lower the blur sigma (10, 5, 2) for a weaker effect.\n\n"
            f"{COMPARE}\n\nModels: {MOCHI} in models/diffusion_models, {FLUX_T5} in models/text_encoders, "
            f"{MOCHI_VAE} in models/vae.",
            [
                note(size=(400, 560)),
                Node("unet", "UNETLoader", (20, 620), {"unet_name": MOCHI, "weight_dtype": "default"}, size=(380, 90)),
                Node("clip", "CLIPLoader", (20, 750), {"clip_name": FLUX_T5, "type": "mochi", "device": "default"},
                     size=(380, 110)),
                Node("vae", "VAELoader", (20, 900), {"vae_name": MOCHI_VAE}, size=(380, 60)),
                seg(pos=(460, 20), model=("unet", 0), scale=3.0, blur_sigma=10000.0, layers="auto",
                    start_percent=0.0, end_percent=1.0, placement="uncond branch"),
                Node("positive", "CLIPTextEncode", (460, 270),
                     {"text": "a paper boat drifting down a rain-filled gutter, ripples and reflections, close-up, "
                              "the camera following it"},
                     {"clip": ("clip", 0)}, title="Positive prompt", size=(400, 170)),
                Node("negative", "CLIPTextEncode", (460, 490), {"text": NEGATIVE + ", static, still frame"},
                     {"clip": ("clip", 0)}, title="Negative prompt", size=(400, 130)),
                Node("latent", "EmptyMochiLatentVideo", (460, 670),
                     {"width": 848, "height": 480, "length": 37, "batch_size": 1}, title="Empty video latent"),
                Node("sampler", "KSampler", (900, 20),
                     {"seed": 42, "control_after_generate": "fixed", "steps": 30, "cfg": 4.5,
                      "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
                     {"model": ("seg", 0), "positive": ("positive", 0), "negative": ("negative", 0),
                      "latent_image": ("latent", 0)}),
                Node("decode", "VAEDecode", (1240, 20), {}, {"samples": ("sampler", 0), "vae": ("vae", 0)}),
                Node("save", "SaveAnimatedWEBP", (1240, 130),
                     {"filename_prefix": "mochi_seg_uncond", "fps": 30.0, "lossless": False, "quality": 90,
                      "method": "default"},
                     {"images": ("decode", 0)}, size=(420, 470)),
            ],
        ),
        Workflow(
            "pixart_sigma_pag", "PixArt Sigma XL-2 1024-MS + PAG",
            "Perturbed-Attention Guidance on PixArt Sigma XL-2 1024-MS, added to CFG.\n\n"
            "In the chosen block the perturbed copy's self-attention is the identity: every image token attends "
            "only to itself; the block's cross-attention to the T5 prompt is untouched. The copy is batched with "
            "the positive and negative predictions where memory allows. ComfyUI runs PixArt's self-attention "
            "without the hooks other models have, so the node computes the chosen block's attention once more per "
            "step.\n\n"
            "Settings: layers 'auto' is PixArt's default, block.14 of its 28 blocks, the block of diffusers' "
            "PixArt-Sigma PAG example (PixArtSigmaPAGPipeline, which uses PAG scale 4; the log names the block at "
            "the first step). PAG scale 3, the paper's, with CFG 4.5, the PixArt Sigma pipeline's default; "
            "20 steps of dpmpp_2m / normal, the DPM-Solver++ 2M of its default scheduler (no Karras sigmas), "
            "1024x1024. Nothing here is tuned: a starting point.\n\n"
            f"{COMPARE}\n\nModels: {PIXART_SIGMA_1024} in models/diffusion_models (a safetensors conversion of it "
            f"loads the same), {FLUX_T5} in models/text_encoders, {SDXL_VAE} in models/vae.",
            [
                note(size=(400, 440)),
                Node("unet", "UNETLoader", (20, 500), {"unet_name": PIXART_SIGMA_1024, "weight_dtype": "default"},
                     size=(380, 90)),
                Node("clip", "CLIPLoader", (20, 630), {"clip_name": FLUX_T5, "type": "pixart", "device": "default"},
                     size=(380, 110)),
                Node("vae", "VAELoader", (20, 780), {"vae_name": SDXL_VAE}, size=(380, 60)),
                pag(pos=(460, 20), model=("unet", 0), scale=3.0, layers="auto", adaptive_scale=0.0,
                    start_percent=0.0, end_percent=1.0, rescale=0.0),
                Node("positive", "CLIPTextEncode", (460, 270),
                     {"text": "an insect robot preparing a delicious meal, anime style"},
                     {"clip": ("clip", 0)}, title="Positive prompt", size=(400, 170)),
                Node("negative", "CLIPTextEncode", (460, 490), {"text": NEGATIVE}, {"clip": ("clip", 0)},
                     title="Negative prompt", size=(400, 130)),
                empty_latent(1024, 1024, pos=(460, 670)),
                sampler(("pag", 0), ("positive", 0), ("negative", 0), ("latent", 0), steps=20, cfg=4.5,
                        sampler_name="dpmpp_2m", scheduler="normal"),
                *decode_and_save("pixart_sigma_pag", vae=("vae", 0)),
            ],
        ),
    ]


# Primitive nodes: (primitive key) -> [(target key, widget name)], and the values they hold. INT only:
# comfyui-frontend-package 1.32.9 reloads a FLOAT PrimitiveNode with precision 0 (7.5 comes back as 8).
PRIMITIVES = {
    "sd15_sag_mask_preview": {
        "seed": ([("sampler", "seed"), ("preview_mask", "seed")], [42, "fixed"]),
        "steps": ([("sampler", "steps"), ("preview_mask", "steps")], [25]),
    },
}

BUILD_GRAPH_JS = """
async ({spec, primitives, properties, graphId}) => {
    const app = window.app, LG = window.LiteGraph;
    await app.loadGraphData({nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4,
                             last_node_id: 0, last_link_id: 0}, true, false, null);
    const made = {};
    for (const n of spec.nodes) {
        const node = LG.createNode(n.type);
        if (!node) throw new Error(`the frontend cannot create ${n.type}`);
        node.pos = [n.pos[0], n.pos[1]];
        app.graph.add(node);
        if (n.title) node.title = n.title;
        for (const [name, value] of Object.entries(n.widgets)) {
            const widget = (node.widgets || []).find(w => w.name === name);
            if (!widget) throw new Error(`${n.type} has no widget ${name}`);
            widget.value = value;
        }
        if (n.size) node.size = [n.size[0], n.size[1]];
        made[n.key] = node;
    }
    for (const n of spec.nodes) {
        for (const [input, [fromKey, slot]] of Object.entries(n.inputs)) {
            const target = made[n.key], source = made[fromKey];
            const index = target.findInputSlot(input);
            if (index < 0) throw new Error(`${n.type} has no input ${input}`);
            if (!source.connect(slot, target, index)) throw new Error(`cannot connect ${fromKey}:${slot} -> ${n.key}.${input}`);
        }
    }
    for (const [key, [targets, values]] of Object.entries(primitives)) {
        const primitive = made[key];
        for (const [targetKey, widgetName] of targets) {
            const target = made[targetKey];
            const index = target.findInputSlot(widgetName);
            if (index < 0) throw new Error(`${targetKey} has no widget input ${widgetName}`);
            if (!primitive.connect(0, target, index)) throw new Error(`cannot connect primitive ${key} -> ${targetKey}.${widgetName}`);
        }
        values.forEach((value, i) => { primitive.widgets[i].value = value; });
        primitive.applyToGraph?.();
    }
    for (const node of app.graph.nodes) {
        const own = properties[node.type];
        if (own) Object.assign(node.properties, own);
    }
    app.graph.id = graphId;
    app.graph.setDirtyCanvas(true, true);
}
"""

EXPORT_TEXT_JS = """
async () => {
    const p = await window.app.graphToPrompt();
    const [x, y] = window.app.canvas.ds.offset;
    p.workflow.extra ??= {};
    p.workflow.extra.ds = {scale: window.app.canvas.ds.scale, offset: [x, y]};
    return [JSON.stringify(p.workflow, null, 2), JSON.stringify(p.output)];
}
"""


def registry_properties(object_info: dict, pack: dict, core_version: str) -> dict:
    """``cnr_id`` / ``ver`` per node type, as ComfyUI-Manager stamps them on nodes it creates."""
    properties = {}
    for node_type, info in object_info.items():
        if node_type.startswith(OUR_NODE_PREFIX):
            properties[node_type] = {"cnr_id": pack["name"], "ver": pack["version"]}
        elif str(info.get("python_module", "")).split(".")[0] in ("nodes", "comfy_extras"):
            properties[node_type] = {"cnr_id": CORE_CNR_ID, "ver": core_version}
    return properties


def spec_json(workflow: Workflow) -> dict:
    nodes = []
    for node in workflow.nodes:
        widgets = dict(node.widgets)
        title = node.title
        if node.type == "Note":
            widgets, title = {"text": workflow.note}, workflow.title
        nodes.append({"key": node.key, "type": node.type, "pos": list(node.pos), "widgets": widgets,
                      "inputs": {k: list(v) for k, v in node.inputs.items()}, "title": title,
                      "size": list(node.size) if node.size else None})
    return {"nodes": nodes}


GRAPH_BOUNDS_JS = """
(types) => {
    const nodes = window.app.graph.nodes.filter(n => !types || types.some(t => n.type.startsWith(t)));
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        const [x, y, w, h] = n.boundingRect;
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    return [x0, y0, x1, y1];
}
"""

SCREEN_RECT_JS = """
([x0, y0, x1, y1]) => {
    const ds = window.app.canvas.ds;
    const [ax, ay] = ds.convertOffsetToCanvas([x0, y0]);
    const [bx, by] = ds.convertOffsetToCanvas([x1, y1]);
    const r = window.app.canvas.canvas.getBoundingClientRect();
    return [r.left + ax, r.top + ay, bx - ax, by - ay];
}
"""

CENTER_VIEW_JS = """
([cx, cy, scale]) => {
    const canvas = window.app.canvas, r = canvas.canvas.getBoundingClientRect();
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = r.width / (2 * scale) - cx;
    canvas.ds.offset[1] = r.height / (2 * scale) - cy;
    canvas.setDirty(true, true);
    canvas.draw(true, true);
}
"""


def graph_screenshot(page) -> bytes:
    """The fitted graph, cropped to its nodes (the README screenshots)."""
    page.fit_view()
    x, y, w, h = page.page.evaluate(SCREEN_RECT_JS, page.page.evaluate(GRAPH_BOUNDS_JS, None))
    m = SCREENSHOT_MARGIN
    viewport = page.page.viewport_size
    left, top = max(0, x - m), max(0, y - m)
    clip = {"x": left, "y": top, "width": min(viewport["width"], x + w + m) - left,
            "height": min(viewport["height"], y + h + m) - top}
    return page.page.screenshot(clip=clip)


def preview_jpeg(page, path: Path) -> None:
    """The template browser's thumbnail: a square around the pack's nodes, zoomed to be readable."""
    from PIL import Image

    x0, y0, x1, y1 = page.page.evaluate(GRAPH_BOUNDS_JS, [OUR_NODE_PREFIX])
    side = max(x1 - x0, y1 - y0) + 2 * SCREENSHOT_MARGIN
    # Below about 0.6 LiteGraph draws nodes without text; crop rather than zoom out that far.
    scale = max(PREVIEW_MIN_SCALE, min(1.25, PREVIEW_PIXELS / side))
    page.page.evaluate(CENTER_VIEW_JS, [(x0 + x1) / 2, (y0 + y1) / 2, scale])
    page.settle()
    viewport = page.page.viewport_size
    clip = {"x": (viewport["width"] - PREVIEW_PIXELS) / 2, "y": (viewport["height"] - PREVIEW_PIXELS) / 2,
            "width": PREVIEW_PIXELS, "height": PREVIEW_PIXELS}
    image = Image.open(io.BytesIO(page.page.screenshot(clip=clip))).convert("RGB")
    image.save(path, "JPEG", quality=85, optimize=True)


def template_browser_screenshot(page, path: Path) -> None:
    page.command("Comfy.BrowseTemplates")
    dialog = page.page.locator(".p-dialog")
    dialog.get_by_text(PACK_FOLDER, exact=True).click()
    page.page.wait_for_function(
        "() => [...document.querySelectorAll('.p-dialog img')].filter(i => i.complete && i.naturalWidth > 0).length >= 4")
    page.settle(800)
    dialog.first.screenshot(path=str(path))
    page.close_dialogs()


def node_docs_screenshot(page, path: Path) -> None:
    page.load_workflow(load_example(NODE_DOCS_EXAMPLE), f"{NODE_DOCS_EXAMPLE}.json")
    page.fit_view()
    page.select_node(next(n["id"] for n in page.node_states() if n["type"] == "AG_PerturbedAttentionGuidance"))
    page.toggle_node_docs()
    page.page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": 1100, "height": page.page.viewport_size["height"]})
    page.toggle_node_docs()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="only these workflows (default: all)")
    parser.add_argument("--freeze", action="store_true", help="copy the examples to tests/workflow_compat/<version>/")
    options = parser.parse_args(argv)
    chosen = [w for w in workflows() if not options.names or w.name in options.names]
    unknown = set(options.names) - {w.name for w in workflows()}
    if unknown:
        sys.exit(f"unknown workflow(s): {', '.join(sorted(unknown))}")
    pack = pack_metadata()
    EXAMPLES_DIR.mkdir(exist_ok=True)
    DOCS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ag_build_examples_") as tmp:
        tmp = Path(tmp)
        with example_server_running(tmp / "server") as server, chromium_context(tmp / "profile") as context:
            object_info = server.object_info()
            core_version = server.get_json("/system_stats")["system"]["comfyui_version"]
            properties = registry_properties(object_info, pack, core_version)
            page = ComfyPage.open(context, server.url)
            api_prompts = {}
            page.page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.Graph.CanvasInfo', false) }")
            page.set_focus_mode(True)
            for workflow in chosen:
                spec = spec_json(workflow)
                page.page.evaluate(BUILD_GRAPH_JS, {
                    "spec": spec, "primitives": PRIMITIVES.get(workflow.name, {}), "properties": properties,
                    "graphId": str(uuid.uuid5(UUID_NAMESPACE, workflow.name)),
                })
                page.settle()
                page.fit_view()
                built_text, built_output = page.page.evaluate(EXPORT_TEXT_JS)
                # Written is the export of the built graph loaded again: what a user who opens the file and
                # saves it gets (the frontend adds e.g. empty widgets_values on load), so the file is a fixed
                # point of load + export, and it must make the same prompt as the graph that was built.
                page.load_workflow(json.loads(built_text), f"{workflow.name}.json")
                text, output = page.page.evaluate(EXPORT_TEXT_JS)
                if json.loads(output) != json.loads(built_output):
                    sys.exit(f"{workflow.name}: the frontend makes another prompt after reloading the export:\n"
                             f"built:    {built_output}\nreloaded: {output}")
                (EXAMPLES_DIR / f"{workflow.name}.json").write_text(text + "\n", encoding="utf-8")
                api_prompts[workflow.name] = json.loads(output)
                if workflow.name in DOCS_SCREENSHOTS:
                    (DOCS / f"{workflow.name}.png").write_bytes(graph_screenshot(page))
                preview_jpeg(page, EXAMPLES_DIR / f"{workflow.name}.jpg")
                print(f"wrote example_workflows/{workflow.name}.json and .jpg", flush=True)
            page.set_focus_mode(False)
            node_docs_screenshot(page, NODE_DOCS_SCREENSHOT)
            print(f"wrote {NODE_DOCS_SCREENSHOT.relative_to(REPO)}", flush=True)
            template_browser_screenshot(page, TEMPLATE_BROWSER_SCREENSHOT)
            print(f"wrote {TEMPLATE_BROWSER_SCREENSHOT.relative_to(REPO)}", flush=True)
            errors = [line for line in page.console if line.startswith("pageerror")]
            if errors:
                print("page errors while building:\n" + "\n".join(errors), file=sys.stderr)
    if options.freeze:
        freeze(pack["version"], [w.name for w in chosen], api_prompts)


def freeze(version: str, names: list[str], api_prompts: dict) -> None:
    target = COMPAT_DIR / version
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(EXAMPLES_DIR / f"{name}.json", target / f"{name}.json")
    meaning_path = target / "api_prompts.json"
    meaning = json.loads(meaning_path.read_text(encoding="utf-8")) if meaning_path.exists() else {}
    meaning.update(api_prompts)
    meaning_path.write_text(json.dumps(meaning, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"froze {len(names)} workflow(s) into {target.relative_to(REPO)}")


if __name__ == "__main__":
    os.environ.setdefault("COMFYUI_PATH", str(REPO / ".cache" / "comfyui"))
    main()
