"""The example workflows the way a user meets them, through the real ComfyUI server (no browser here;
tests/test_frontend.py opens them in the frontend).

Each ``example_workflows/*.json`` is a UI-format file as the pinned frontend exports it; the server lists
it as one of the pack's templates with its preview; it converts to API format as the frontend converts
it (``support.workflow_convert``); ``POST /prompt`` accepts it, with its model names mapped to tiny
stand-ins (``support.example_models``) and sizes and step counts made small (``support.examples``); the
examples of ``EXECUTED_EXAMPLES`` then run to a saved image. A workflow naming an input our node does
not have, or a value outside an input's range, fails.

Backwards compatibility: ``tests/workflow_compat/<version>/`` holds the examples as released and the
API prompt the frontend made of each then. Converted with today's node definitions they must mean the
same for our nodes (same inputs, same values; a new input only at its default) and still be accepted.
"""
import copy
import io
import json
import re
from importlib import metadata

import pytest
from PIL import Image

from support.example_models import EXAMPLE_MODEL_FILES
from support.real_architectures import meta_model
from support.examples import (CORE_CNR_ID, EXECUTED_EXAMPLES, OUR_NODE_PREFIX, at_test_size, compat_sets,
                              example_names, example_server_running, load_example, pack_metadata)
from support.server import ComfyServerError
from support.workflow_convert import (FRONTEND_ONLY_TYPES, WorkflowError, check_values, meaning_changes,
                                      ui_to_api, widget_layout)

EXPECTED_EXAMPLES = EXECUTED_EXAMPLES | {"sdxl_pag_cfg", "sd3_pag_cfg", "flux_dev_pag", "sdxl_seg_pag", "z_image_turbo_pag",
                                         "wan21_t2v_pag", "cosmos_predict2_anima_pag", "wan22_t2v_14b_pag_uncond",
                                         "mochi_seg_uncond", "pixart_sigma_pag"}
NAMES = example_names()
MODEL_LOADER_INPUTS = {"CheckpointLoaderSimple": ("ckpt_name",), "ControlNetLoader": ("control_net_name",),
                       "UNETLoader": ("unet_name",), "DualCLIPLoader": ("clip_name1", "clip_name2"),
                       "CLIPLoader": ("clip_name",), "VAELoader": ("vae_name",)}
# The architecture of each model file the examples load their MODEL from (support/real_architectures.py);
# the inpainting UNet differs from SD1.5's only in its input channels.
MODEL_ARCHITECTURES = {
    "v1-5-pruned-emaonly.safetensors": "sd15", "sd-v1-5-inpainting.ckpt": "sd15",
    "sd_xl_base_1.0.safetensors": "sdxl", "sd3_medium_incl_clips.safetensors": "sd3_medium",
    "flux1-dev.safetensors": "flux_dev", "z_image_turbo_bf16.safetensors": "z_image",
    "wan2.1_t2v_1.3B_fp16.safetensors": "wan21_t2v_1.3b",
    "cosmos_predict2_2B_t2i.safetensors": "cosmos_predict2_2b",
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "wan22_t2v_14b",
    "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors": "wan22_t2v_14b",
    "mochi_preview_bf16.safetensors": "mochi_preview",
    "PixArt-Sigma-XL-2-1024-MS.pth": "pixart_sigma_xl2_1024",
}
MODEL_OUTPUT_LOADERS = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name"}
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")
COMPAT_CASES = [
    pytest.param(folder, path.stem, id=f"{folder.name}/{path.stem}")
    for folder in compat_sets() for path in sorted(folder.glob("*.json")) if path.name != "api_prompts.json"
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with example_server_running(tmp_path_factory.mktemp("example_workflows")) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


def version_tuple(text: str) -> tuple:
    return tuple(int(part) for part in text.split("."))


def test_every_example_of_the_issue_is_there():
    assert set(NAMES) == EXPECTED_EXAMPLES


def test_the_server_lists_the_examples_as_the_packs_templates_with_previews(server):
    templates = server.get_json("/workflow_templates")
    packs = [pack for pack, names in templates.items() if sorted(names) == NAMES]
    assert len(packs) == 1, f"no pack lists exactly the examples: {templates}"
    for name in NAMES:
        served = json.loads(server.request(f"/api/workflow_templates/{packs[0]}/{name}.json"))
        assert served == load_example(name)
        preview = Image.open(io.BytesIO(server.request(f"/api/workflow_templates/{packs[0]}/{name}.jpg")))
        assert preview.format == "JPEG" and min(preview.size) >= 256, (name, preview.format, preview.size)


@pytest.mark.parametrize("name", NAMES)
def test_example_is_a_frontend_export_with_a_titled_note(name, object_info):
    workflow = load_example(name)
    pack = pack_metadata()
    assert workflow["version"] == 0.4
    assert workflow["extra"]["frontendVersion"] == metadata.version("comfyui_frontend_package")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"]) and workflow["last_node_id"] == max(nodes)

    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"], (link_id, origin)
        target_input = nodes[target]["inputs"][target_slot]
        assert target_input["link"] == link_id and target_input["type"] == link_type, (link_id, target_input)
    linked = {i["link"] for n in workflow["nodes"] for i in n.get("inputs", []) if i.get("link") is not None}
    assert linked == {link[0] for link in workflow["links"]}

    notes = [node for node in workflow["nodes"] if node["type"] == "Note"]
    assert len(notes) == 1 and notes[0].get("title") and len(notes[0]["widgets_values"][0]) > 200

    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY_TYPES:
            continue
        properties = node["properties"]
        if node["type"].startswith(OUR_NODE_PREFIX):
            assert properties["Node name for S&R"] == node["type"]
            assert properties["cnr_id"] == pack["name"]
            assert version_tuple(properties["ver"]) <= version_tuple(pack["version"])
        else:
            assert properties["cnr_id"] == CORE_CNR_ID and SEMVER.match(properties["ver"]), (node["type"], properties)
        if node["type"] in MODEL_LOADER_INPUTS:
            layout = [w.name for w in widget_layout(object_info[node["type"]])]
            for widget in MODEL_LOADER_INPUTS[node["type"]]:
                model = node["widgets_values"][layout.index(widget)]
                assert model in EXAMPLE_MODEL_FILES, f"{name}: {model} has no stand-in in support/example_models.py"
    assert any(node["type"].startswith(OUR_NODE_PREFIX) for node in workflow["nodes"])


def png_size(data: bytes) -> tuple:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image.size


@pytest.mark.parametrize("name", NAMES)
def test_example_converts_is_accepted_by_the_server_and_runs(name, server, object_info):
    prompt = ui_to_api(load_example(name), object_info)
    check_values(prompt, object_info)
    assert any(entry["class_type"].startswith(OUR_NODE_PREFIX) for entry in prompt.values())
    entry = server.run_prompt(at_test_size(prompt))  # raises with the server's node_errors when rejected
    if name not in EXECUTED_EXAMPLES:
        # Accepted by validation; what ran is an SD1.5-layout stand-in, so its outcome says nothing.
        return
    server.require_success(entry)
    images = server.output_images(entry)
    saved = [image for image in images if image["type"] == "output"]
    assert saved, f"{name} saved no image: {images}"
    for image in images:
        assert png_size(server.fetch_image(image)) == (64, 64), image


def model_file_of(prompt: dict, node_id: str) -> str:
    """The model file a node's MODEL input comes from, through any chain of MODEL patches."""
    entry = prompt[node_id]
    while entry["class_type"] not in MODEL_OUTPUT_LOADERS:
        source, _ = entry["inputs"]["model"]
        entry = prompt[source]
    return entry["inputs"][MODEL_OUTPUT_LOADERS[entry["class_type"]]]


def full_size_model(prompt: dict, node_id: str):
    """The full-size model (meta device) that reaches ``node_id``."""
    return meta_model(MODEL_ARCHITECTURES[model_file_of(prompt, node_id)])


def full_size_layout(prompt: dict, node_id: str):
    """The nodes' own layout of the full-size model (meta device) that reaches ``node_id``."""
    from attention_guidance.patching.families import recognise

    return recognise(full_size_model(prompt, node_id), prompt[node_id]["class_type"]).layout


@pytest.mark.parametrize("name", NAMES)
def test_example_layers_exist_in_the_full_size_model_it_loads(name, object_info):
    """The stand-ins are tiny, so an example's layer spec is checked here against the real architecture
    of the file it names (built on the meta device), with the nodes' own layout code."""
    from attention_guidance.guidance_core.layer_spec import Method
    from attention_guidance.patching.layers import choose_layers

    prompt = ui_to_api(load_example(name), object_info)
    checked = 0
    for node_id, entry in prompt.items():
        if entry["class_type"] in ("AG_PerturbedAttentionGuidance", "AG_SmoothedEnergyGuidance"):
            layout = full_size_layout(prompt, node_id)
            kind = "pag" if entry["class_type"] == "AG_PerturbedAttentionGuidance" else "seg"
            assert layout.select(layout.resolve(entry["inputs"]["layers"], kind))
        elif entry["class_type"] == "AG_SelfAttentionGuidance":
            choose_layers(full_size_model(prompt, node_id), node=entry["class_type"], input_name="layer",
                          spec=entry["inputs"]["layer"], method=Method.SAG, label="SAG layer", single=True)
        else:
            continue
        checked += 1
    assert checked


SAMPLERS = ("KSampler", "KSamplerAdvanced")


def model_chain(prompt: dict, node_id: str) -> list[str]:
    """The nodes a node's MODEL input comes through, nearest first, back to its loader."""
    chain = []
    entry = prompt[node_id]
    while isinstance(entry["inputs"].get("model"), list):
        chain.append(entry["inputs"]["model"][0])
        entry = prompt[chain[-1]]
    return chain


@pytest.mark.parametrize("name", NAMES)
def test_an_uncond_placement_reaches_only_samplers_with_cfg_above_1(name, object_info):
    """Placement 'uncond branch' perturbs CFG's negative, which does not exist at CFG 1."""
    prompt = ui_to_api(load_example(name), object_info)
    for node_id, entry in prompt.items():
        if entry["class_type"] in SAMPLERS and any(prompt[i]["inputs"].get("placement") == "uncond branch"
                                                   for i in model_chain(prompt, node_id)):
            assert entry["inputs"]["cfg"] > 1, (name, node_id, entry["inputs"]["cfg"])


def test_the_wan22_example_patches_each_expert_with_its_own_pag_node(object_info):
    """Issue #25: Wan 2.2 14B's high-noise and low-noise experts, each patched by its own node, sampled in turn."""
    prompt = ui_to_api(load_example("wan22_t2v_14b_pag_uncond"), object_info)
    samplers = sorted((i for i, e in prompt.items() if e["class_type"] == "KSamplerAdvanced"),
                      key=lambda i: prompt[i]["inputs"]["start_at_step"])
    assert len(samplers) == 2
    high, low = (prompt[i]["inputs"] for i in samplers)
    assert low["latent_image"][0] == samplers[0]  # the low-noise expert continues the high-noise one's latent
    assert (high["end_at_step"], high["return_with_leftover_noise"]) == (low["start_at_step"], "enable")
    assert low["add_noise"] == "disable" and low["end_at_step"] >= low["steps"]
    guided = []
    for sampler_id in samplers:
        chain = model_chain(prompt, sampler_id)
        pags = [i for i in chain if prompt[i]["class_type"] == "AG_PerturbedAttentionGuidance"]
        assert len(pags) == 1 and prompt[pags[0]]["inputs"]["placement"] == "uncond branch"
        assert any(prompt[i]["class_type"] == "ModelSamplingSD3" for i in chain)
        guided.append((pags[0], model_file_of(prompt, sampler_id)))
    (high_pag, high_file), (low_pag, low_file) = guided
    assert high_pag != low_pag
    assert "high_noise" in high_file and "low_noise" in low_file


def test_a_layer_the_model_does_not_have_is_found_by_that_check(object_info):
    from attention_guidance.guidance_core.layer_spec import LayerSpecError

    prompt = ui_to_api(load_example("sd3_pag_cfg"), object_info)
    (pag_id,) = [i for i, e in prompt.items() if e["class_type"] == "AG_PerturbedAttentionGuidance"]
    with pytest.raises(LayerSpecError, match="joint.24"):
        full_size_layout(prompt, pag_id).select("joint.24")  # SD3 Medium has joint blocks 0-23


def test_a_widget_value_for_an_input_our_node_does_not_have_fails(object_info):
    workflow = load_example("sd15_pag_unconditional_cfg1")
    node = next(n for n in workflow["nodes"] if n["type"] == "AG_PerturbedAttentionGuidance")
    node["widgets_values"] += ["own branch", 0.5]  # placement (saved before it existed), then one value too many
    with pytest.raises(WorkflowError, match=r"names an input this node does not have"):
        ui_to_api(workflow, object_info)


def test_a_linked_input_our_node_does_not_have_fails(object_info):
    workflow = load_example("sd15_sag")
    node = next(n for n in workflow["nodes"] if n["type"] == "AG_SelfAttentionGuidance")
    node["inputs"][0]["name"] = "unet"
    with pytest.raises(WorkflowError, match=r"input 'unet' does not exist on AG_SelfAttentionGuidance"):
        ui_to_api(workflow, object_info)


def test_a_value_out_of_range_fails_here_and_on_the_server(server, object_info):
    workflow = load_example("sd15_pag_unconditional_cfg1")
    node = next(n for n in workflow["nodes"] if n["type"] == "AG_PerturbedAttentionGuidance")
    node["widgets_values"][0] = 250.0  # scale; its maximum is 100
    prompt = at_test_size(ui_to_api(workflow, object_info))
    with pytest.raises(WorkflowError, match=r"input 'scale': 250.0 is above its maximum"):
        check_values(prompt, object_info)
    with pytest.raises(ComfyServerError, match=r"value_bigger_than_max"):
        server.queue_prompt(prompt)


def test_an_unknown_node_type_fails(object_info):
    workflow = load_example("sd15_sag")
    node = next(n for n in workflow["nodes"] if n["type"] == "AG_SelfAttentionGuidance")
    node["type"] = "SelfAttentionGuidanceRenamed"
    with pytest.raises(WorkflowError, match=r"no node type 'SelfAttentionGuidanceRenamed'"):
        ui_to_api(workflow, object_info)


# --------------------------------------------------------------------------------------------------
# Backwards compatibility


def test_the_current_examples_are_frozen_for_the_current_version():
    """Every release's examples are kept; freeze them with build_example_workflows.py --freeze."""
    version = pack_metadata()["version"]
    folders = {folder.name: folder for folder in compat_sets()}
    how = "run `.cache/venv/bin/python tests/support/build_example_workflows.py --freeze` (CONTRIBUTING.md: Backwards compatibility of node inputs)"
    assert version in folders, f"tests/workflow_compat/{version}/ is missing: {how}"
    frozen = sorted(path.stem for path in folders[version].glob("*.json") if path.name != "api_prompts.json")
    assert frozen == NAMES, f"the kept set of {version} is not the current examples: {how}"


@pytest.mark.parametrize("folder, name", COMPAT_CASES)
def test_a_released_workflow_keeps_its_meaning_and_is_accepted(folder, name, server, object_info):
    workflow = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    recorded = json.loads((folder / "api_prompts.json").read_text(encoding="utf-8"))[name]
    prompt = ui_to_api(workflow, object_info)
    assert meaning_changes(recorded, prompt, object_info, OUR_NODE_PREFIX) == []
    check_values(prompt, object_info)
    server.queue_prompt(at_test_size(prompt))


def _compat_case(object_info, name="sd15_sag_pag_chained"):
    folder = compat_sets()[0]
    workflow = json.loads((folder / f"{name}.json").read_text(encoding="utf-8"))
    recorded = json.loads((folder / "api_prompts.json").read_text(encoding="utf-8"))[name]
    return workflow, recorded, copy.deepcopy(object_info)


def test_an_input_inserted_before_existing_widgets_breaks_released_workflows(object_info):
    """The rule the compatibility test enforces: widget values are positional, so a new widget input in
    the middle shifts every value after it."""
    workflow, recorded, changed = _compat_case(object_info)
    pag = changed["AG_PerturbedAttentionGuidance"]
    pag["input"]["required"]["strength"] = ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0}]
    pag["input_order"]["required"].insert(1, "strength")
    changes = meaning_changes(recorded, ui_to_api(workflow, changed), changed, OUR_NODE_PREFIX)
    assert any("'layers'" in change for change in changes), changes


def test_an_input_appended_with_a_neutral_default_keeps_released_workflows(object_info):
    workflow, recorded, changed = _compat_case(object_info)
    sag = changed["AG_SelfAttentionGuidance"]
    sag["input"]["optional"] = {"noise_mix": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0}]}
    sag["input_order"]["optional"] = ["noise_mix"]
    prompt = ui_to_api(workflow, changed)
    assert meaning_changes(recorded, prompt, changed, OUR_NODE_PREFIX) == []
    assert any(entry["inputs"].get("noise_mix") == 0.0 for entry in prompt.values())


def test_a_renamed_input_breaks_released_workflows(object_info):
    workflow, recorded, changed = _compat_case(object_info)
    sag = changed["AG_SelfAttentionGuidance"]
    order = sag["input_order"]["required"]
    order[order.index("blur_sigma")] = "sigma"
    sag["input"]["required"]["sigma"] = sag["input"]["required"].pop("blur_sigma")
    changes = meaning_changes(recorded, ui_to_api(workflow, changed), changed, OUR_NODE_PREFIX)
    assert any("'blur_sigma'" in change and "gone" in change for change in changes), changes
