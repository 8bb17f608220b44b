"""ComfyUI's interrupt in the middle of sampling, through the real server: the patched model the host
keeps cached from the interrupted run samples the same image as a fresh uninterrupted run with the
same seed, and the unpatched model it came from samples as before. Tiny random SD1.5 checkpoint, CPU."""
import asyncio
import io
import json

import aiohttp
import pytest
from PIL import Image

from support.server import comfy_server, tiny_checkpoint  # noqa: F401  (comfy_server is a fixture)

STEPS = 8
SEED = 11


def guided_graph(checkpoint_name: str, sag_layer: str, pag_layers: str, prefix: str) -> dict:
    """checkpoint -> SAG -> PAG -> KSampler -> VAEDecode -> SaveImage. On SD1.5 the layer spellings
    'm0.0'/'mid' and 'mid'/'m0' name the same site, so two spellings give two graphs the host caches
    apart (fresh patch nodes) with the same meaning."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "2": {"class_type": "AG_SelfAttentionGuidance", "inputs": {
            "model": ["1", 0], "scale": 0.75, "blur_sigma": 1.0, "threshold": 1.0, "kernel_size": 9,
            "layer": sag_layer, "start_percent": 0.0, "end_percent": 1.0}},
        "3": {"class_type": "AG_PerturbedAttentionGuidance", "inputs": {
            "model": ["2", 0], "scale": 3.0, "layers": pag_layers, "adaptive_scale": 0.0,
            "start_percent": 0.0, "end_percent": 1.0, "rescale": 0.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red fox in the snow"}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": SEED, "steps": STEPS, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
    }


def plain_graph(checkpoint_name: str, sampler_node: str, prefix: str) -> dict:
    """The unpatched model sampled by KSampler or by KSamplerAdvanced set to the same run (the host
    caches the two apart, so both really sample)."""
    if sampler_node == "KSampler":
        sampler = {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": SEED, "steps": 3, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0],
            "denoise": 1.0}}
    else:
        sampler = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "add_noise": "enable", "noise_seed": SEED, "steps": 3, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["4", 0], "negative": ["5", 0],
            "latent_image": ["6", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}}
    graph = guided_graph(checkpoint_name, "m0.0", "mid", prefix)
    for node_id in ("2", "3"):
        del graph[node_id]
    graph["7"] = sampler
    return graph


@pytest.fixture(scope="module")
def checkpoint_name():
    return tiny_checkpoint().name


def pixels(server, entry) -> bytes:
    (image,) = server.output_images(server.require_success(entry))
    return Image.open(io.BytesIO(server.fetch_image(image))).convert("RGB").tobytes()


async def _queue_and_interrupt(server, graph: dict, at_step: int) -> tuple[str, int]:
    """Queue ``graph``, POST /interrupt once the sampler reports step ``at_step`` on the websocket;
    returns the prompt id and the last step reported before the interrupt."""
    ws_url = server.url.replace("http://", "ws://") + f"/ws?clientId={server.client_id}"
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url) as ws:
            async with session.post(server.url + "/prompt", json={"prompt": graph, "client_id": server.client_id}) as r:
                prompt_id = (await r.json())["prompt_id"]
            step = 0
            while step < at_step:
                message = await asyncio.wait_for(ws.receive(), timeout=120)
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                event = json.loads(message.data)
                if event["type"] == "progress" and event["data"].get("prompt_id") == prompt_id:
                    step = event["data"]["value"]
            async with session.post(server.url + "/interrupt", json={}) as r:
                assert r.status == 200
            return prompt_id, step


def test_an_interrupted_run_leaves_nothing_behind(comfy_server, checkpoint_name):
    server = comfy_server
    plain_before = pixels(server, server.run_prompt(plain_graph(checkpoint_name, "KSampler", "ag_plain_before")))
    # a fresh, uninterrupted run
    reference = pixels(server, server.run_prompt(guided_graph(checkpoint_name, "mid", "m0", "ag_reference")))

    graph = guided_graph(checkpoint_name, "m0.0", "mid", "ag_interrupted")
    prompt_id, step = asyncio.run(_queue_and_interrupt(server, graph, at_step=STEPS // 3))
    entry = server.wait_for_history(prompt_id)
    events = [event for event, _ in entry["status"]["messages"]]
    assert entry["status"]["status_str"] == "error" and "execution_interrupted" in events, events
    assert STEPS // 3 <= step < STEPS

    # the same graph again: the host reuses the patch nodes' cached models from the interrupted run
    again = server.run_prompt(graph)
    cached = next(data["nodes"] for event, data in again["status"]["messages"] if event == "execution_cached")
    assert {"2", "3"} <= set(cached)
    assert pixels(server, again) == reference
    # and the unpatched model samples as it did before any of it
    assert pixels(server, server.run_prompt(plain_graph(checkpoint_name, "KSamplerAdvanced", "ag_plain_after"))) == plain_before
    assert plain_before != reference
