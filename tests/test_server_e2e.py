"""End to end through the real ComfyUI server: the PAG node's definition as the frontend sees it, each
node's docs page where the frontend fetches it, a checkpoint -> PAG -> KSampler -> VAEDecode -> SaveImage
graph over HTTP, and a bad layer reported as an execution error. Uses the tiny random SD1.5 checkpoint,
on the CPU."""
import io
import re
import struct

import pytest
from PIL import Image

from support.server import comfy_server, tiny_checkpoint  # noqa: F401  (comfy_server is a fixture)

PAG = "AG_PerturbedAttentionGuidance"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pag_graph(checkpoint_name: str, **pag_inputs) -> dict:
    pag = {"model": ["1", 0], "scale": 3.0, "layers": "mid", "adaptive_scale": 0.0,
           "start_percent": 0.0, "end_percent": 1.0, "rescale": 0.0}
    pag.update(pag_inputs)
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
        "2": {"class_type": PAG, "inputs": pag},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red fox in the snow"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": 7, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "ag_e2e_pag"}},
    }


@pytest.fixture(scope="module")
def checkpoint_name():
    return tiny_checkpoint().name


def png_size(data: bytes) -> tuple:
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_object_info_describes_pag_node(comfy_server):
    info = comfy_server.object_info()
    assert PAG in info, f"{PAG} is not registered; the server log says:\n{comfy_server.log_tail()}"
    node = info[PAG]
    assert node["display_name"] == "Perturbed-Attention Guidance (PAG)"
    assert node["category"] == "model_patches/attention_guidance"
    assert node["output"] == ["MODEL"]
    assert node["input_order"]["required"] == [
        "model", "scale", "layers", "adaptive_scale", "start_percent", "end_percent", "rescale"]
    required = node["input"]["required"]
    assert required["model"][0] == "MODEL"
    expected = {"scale": ("FLOAT", 3.0), "layers": ("STRING", "auto"), "adaptive_scale": ("FLOAT", 0.0),
                "start_percent": ("FLOAT", 0.0), "end_percent": ("FLOAT", 1.0), "rescale": ("FLOAT", 0.0)}
    for name, (kind, default) in expected.items():
        assert required[name][0] == kind, name
        assert required[name][1]["default"] == default, name
    assert comfy_server.object_info(PAG)[PAG] == node


def test_pag_graph_saves_a_64px_png_and_changes_the_image(comfy_server, checkpoint_name):
    guided = comfy_server.require_success(comfy_server.run_prompt(pag_graph(checkpoint_name, scale=3.0)))
    images = comfy_server.output_images(guided)
    assert len(images) == 1 and images[0]["type"] == "output"
    png = comfy_server.fetch_image(images[0])
    assert png_size(png) == (64, 64)

    plain = comfy_server.require_success(comfy_server.run_prompt(pag_graph(checkpoint_name, scale=0.0)))
    plain_png = comfy_server.fetch_image(comfy_server.output_images(plain)[0])
    assert png_size(plain_png) == (64, 64)
    guided_pixels = Image.open(io.BytesIO(png)).convert("RGB").tobytes()
    plain_pixels = Image.open(io.BytesIO(plain_png)).convert("RGB").tobytes()
    assert guided_pixels != plain_pixels, "PAG at scale 3 produced the same image as scale 0 through the server"


def test_unknown_layer_fails_with_an_execution_error_naming_it(comfy_server, checkpoint_name):
    entry = comfy_server.run_prompt(pag_graph(checkpoint_name, layers="u99"))
    assert entry["status"]["status_str"] == "error"
    error = comfy_server.execution_error(entry)
    assert error is not None, entry["status"]
    assert error["node_type"] == PAG
    assert "u99" in error["exception_message"]


def documented(page: str, section: str) -> dict:
    """``{name: default or None}`` from the list under ``## <section>`` of a docs page, whose lines read
    ``- **name** (default): ...`` or ``- **a**, **b**: ...``."""
    found = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", page, re.M | re.S)
    names = {}
    for entry, default in re.findall(r"^- ((?:\*\*\w+\*\*(?:, )?)+)(?: \((.+?)\))?:", found.group(1) if found else "", re.M):
        for name in re.findall(r"\*\*(\w+)\*\*", entry):
            names[name] = default.strip("`") if default else None
    return names


def test_every_node_has_a_docs_page_with_its_inputs_and_defaults_where_the_frontend_fetches_it(comfy_server):
    info = comfy_server.object_info()
    module = info[PAG]["python_module"]
    ours = {name: node for name, node in info.items() if node.get("python_module") == module}
    assert set(ours) == {PAG, "AG_SelfAttentionGuidance", "AG_SAGMaskPreview", "AG_SmoothedEnergyGuidance"}
    # the frontend (1.32) asks /extensions/<the folder in python_module "custom_nodes.<folder>">/docs/<node>.md
    folder = module.split(".")[1]
    for name, node in ours.items():
        page = comfy_server.request(f"/extensions/{folder}/docs/{name}.md").decode("utf-8")
        assert page.startswith(f"# {node['display_name']}\n"), name
        inputs = {**node["input"]["required"], **node["input"].get("optional", {})}
        documented_inputs = documented(page, "Inputs")
        assert set(documented_inputs) == set(inputs), name
        # a MODEL patch's one output needs no list; anything else lists its outputs by name
        if node["output"] != ["MODEL"]:
            assert list(documented(page, "Outputs")) == node["output_name"], name
        for input_name, default in documented_inputs.items():
            if default is None:
                continue
            schema_default = inputs[input_name][1]["default"]
            assert (float(default) == schema_default if isinstance(schema_default, (int, float))
                    else default == schema_default), (name, input_name, default, schema_default)
