"""The example workflows in the real ComfyUI frontend (the pinned ``comfyui-frontend-package``, served by
the real server) in headless Chromium, as a user sees them.

For every example: it opens from the pack's entry in the template browser or as the template browser
loads it, no missing-node dialog appears, every node is a registered type without errors, our nodes
carry their widgets with the file's values, the frontend's own ``graphToPrompt`` makes exactly the
prompt ``support.workflow_convert`` makes (also with our nodes bypassed or muted and through a legacy
Reroute node), and exporting it again gives the file back. Queueing the SD1.5 PAG example from the
Run button shows the saved image on its Save Image node. The released copies in
``tests/workflow_compat/`` load without missing nodes and the frontend still makes the recorded prompt.

Screenshots of each loaded workflow go to ``tests/artifacts/frontend/``.

Needs Chromium and the Python package playwright (``python3 scripts/host.py setup`` installs both);
``AG_SKIP_BROWSER_TESTS=1`` skips this module on machines without them.
"""
import copy
import json
import os
import re
from importlib import metadata

import pytest

from support.browser import MISSING_NODES_DIALOG, ComfyPage, browser_missing_reason, chromium_context
from support.examples import (OUR_NODE_PREFIX, TEST_SIZE, TEST_STEPS, UI_QUEUED_EXAMPLE, compat_sets,
                              example_names, example_server_running, load_example)
from support.server import REPO
from support.workflow_convert import MODE_BYPASS, MODE_NEVER, meaning_changes, ui_to_api, widget_layout

ARTIFACTS = REPO / "tests" / "artifacts" / "frontend"
NAMES = example_names()
QUEUE_TIMEOUT_MS = 240_000


@pytest.fixture(scope="module", autouse=True)
def browser_available():
    """A missing browser fails these tests (each one, not the whole suite), unless skipping is asked for."""
    reason = browser_missing_reason()
    if reason is None:
        return
    if os.environ.get("AG_SKIP_BROWSER_TESTS") == "1":
        pytest.skip(f"AG_SKIP_BROWSER_TESTS=1 and {reason}")
    pytest.fail(f"The browser tests cannot run: {reason}. Set AG_SKIP_BROWSER_TESTS=1 to skip them.", pytrace=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory, browser_available):
    with example_server_running(tmp_path_factory.mktemp("frontend_server")) as running:
        yield running


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def comfy(server, tmp_path_factory):
    with chromium_context(tmp_path_factory.mktemp("chromium_profile")) as context:
        page = ComfyPage.open(context, server.url)
        yield page


@pytest.fixture
def loaded(comfy):
    """Loads a workflow after closing whatever the previous test left open."""
    def load(workflow: dict, name: str):
        comfy.close_dialogs()
        comfy.load_workflow(workflow, name)
        return comfy
    return load


def without_view(workflow: dict) -> dict:
    stripped = copy.deepcopy(workflow)
    stripped.get("extra", {}).pop("ds", None)
    return stripped


def assert_loaded_cleanly(comfy: ComfyPage, workflow: dict, object_info: dict, name: str) -> None:
    dialogs = comfy.open_dialogs()
    assert not [d for d in dialogs if d["id"] == "global-missing-nodes"], dialogs
    assert dialogs == [], f"{name}: a dialog opened on load: {dialogs}"
    states = {state["id"]: state for state in comfy.node_states()}
    assert sorted(states) == sorted(node["id"] for node in workflow["nodes"])
    for node in workflow["nodes"]:
        state = states[node["id"]]
        assert state["registered"] and not state["has_errors"], (name, state)
        if not node["type"].startswith(OUR_NODE_PREFIX):
            continue
        layout = widget_layout(object_info[node["type"]])
        assert [w["name"] for w in state["widgets"]] == [w.name for w in layout], (name, state["widgets"])
        assert not any(w["hidden"] for w in state["widgets"]), state["widgets"]
        assert [w["value"] for w in state["widgets"]] == node["widgets_values"], (name, node["type"])
        assert state["size"][0] > 200 and state["size"][1] > 30 * len(layout), state


def test_the_page_runs_the_pinned_frontend(comfy):
    assert comfy.frontend_version() == metadata.version("comfyui_frontend_package")


def test_the_template_browser_lists_the_pack_with_previews_and_opens_an_example(comfy, object_info):
    comfy.close_dialogs()
    comfy.command("Comfy.BrowseTemplates")
    dialog = comfy.page.locator(".p-dialog")
    pack_entries = dialog.get_by_text("attention_guidance", exact=True)
    assert pack_entries.count() >= 1, "the template browser has no entry for the pack"
    pack_entries.first.click()
    # The browser renders a card's preview only once the card is scrolled into view (two rows fit).
    comfy.page.wait_for_function(
        "(n) => { const loaded = i => i && i.complete && i.naturalWidth > 0;"
        " const cards = [...document.querySelectorAll('.p-dialog [data-testid^=\"template-workflow-\"]')];"
        " const waiting = cards.filter(c => c.querySelector('[data-testid^=\"template-workflow-\"]') === null"
        "                                  && !loaded(c.querySelector('img')));"
        " if (waiting.length) waiting[0].scrollIntoView({block: 'center'});"
        " return [...document.querySelectorAll('.p-dialog img')].filter(loaded).length >= n; }",
        arg=len(NAMES), timeout=60_000)
    shown = comfy.page.evaluate("() => [...document.querySelectorAll('.p-dialog img')]"
                                ".filter(i => i.complete && i.naturalWidth > 0).map(i => i.alt)")
    assert sorted(shown) == NAMES
    comfy.screenshot(ARTIFACTS / "template_browser.png")
    dialog.locator(f'[data-testid="template-workflow-{UI_QUEUED_EXAMPLE}"]').click()
    comfy.page.wait_for_function("() => document.querySelectorAll('.p-dialog').length === 0", timeout=30_000)
    comfy.settle(600)
    assert_loaded_cleanly(comfy, load_example(UI_QUEUED_EXAMPLE), object_info, UI_QUEUED_EXAMPLE)


@pytest.mark.parametrize("name", NAMES)
def test_example_loads_renders_and_converts_as_the_frontend_converts_it(name, loaded, object_info):
    workflow = load_example(name)
    comfy = loaded(workflow, f"{name}.json")
    comfy.screenshot(ARTIFACTS / f"{name}.png")
    assert_loaded_cleanly(comfy, workflow, object_info, name)
    assert comfy.graph_to_prompt()["output"] == ui_to_api(workflow, object_info)
    assert without_view(comfy.export_workflow()) == without_view(workflow), f"{name} changes when exported again"


@pytest.mark.parametrize("mode", [MODE_BYPASS, MODE_NEVER], ids=["bypassed", "muted"])
@pytest.mark.parametrize("name", ["sd15_sag_pag_chained", "sd15_sag_mask_preview"])
def test_converter_agrees_with_the_frontend_when_our_nodes_are_switched_off(name, mode, loaded, object_info):
    workflow = load_example(name)
    for node in workflow["nodes"]:
        if node["type"].startswith(OUR_NODE_PREFIX):
            node["mode"] = mode
    comfy = loaded(workflow, f"{name}_mode{mode}.json")
    assert comfy.open_dialogs() == []
    expected = ui_to_api(workflow, object_info)
    assert not any(e["class_type"].startswith(OUR_NODE_PREFIX) for e in expected.values())
    assert comfy.graph_to_prompt()["output"] == expected


def with_legacy_reroute(workflow: dict) -> dict:
    """The checkpoint's VAE routed through an old-style Reroute node, as workflows saved before the
    frontend's native reroutes have it."""
    workflow = copy.deepcopy(workflow)
    nodes = {node["id"]: node for node in workflow["nodes"]}
    link = next(link for link in workflow["links"] if link[5] == "VAE")
    link_id, origin, origin_slot, target, target_slot, _ = link
    reroute_id = workflow["last_node_id"] + 1
    new_link = workflow["last_link_id"] + 1
    x, y = nodes[target]["pos"]
    workflow["nodes"].append({
        "id": reroute_id, "type": "Reroute", "pos": [x - 120, y + 60], "size": [75, 26], "flags": {},
        "order": len(workflow["nodes"]), "mode": 0,
        "inputs": [{"name": "", "type": "*", "link": link_id}],
        "outputs": [{"name": "", "type": "VAE", "links": [new_link]}],
        "properties": {"showOutputText": False, "horizontal": False},
    })
    link[3], link[4] = reroute_id, 0
    workflow["links"].append([new_link, reroute_id, 0, target, target_slot, "VAE"])
    nodes[target]["inputs"][target_slot]["link"] = new_link
    workflow["last_node_id"], workflow["last_link_id"] = reroute_id, new_link
    return workflow


def test_converter_agrees_with_the_frontend_through_a_legacy_reroute(loaded, object_info):
    workflow = with_legacy_reroute(load_example("sd15_sag"))
    expected = ui_to_api(workflow, object_info)
    assert expected == ui_to_api(load_example("sd15_sag"), object_info)
    comfy = loaded(workflow, "sd15_sag_legacy_reroute.json")
    assert comfy.open_dialogs() == []
    assert comfy.graph_to_prompt()["output"] == expected


def test_a_workflow_with_an_unknown_node_shows_the_missing_node_dialog(loaded):
    """The check the examples pass is able to fail: a renamed node id brings up the dialog."""
    workflow = load_example(UI_QUEUED_EXAMPLE)
    for node in workflow["nodes"]:
        if node["type"].startswith(OUR_NODE_PREFIX):
            node["type"] = "AG_RenamedGuidanceNode"
    comfy = loaded(workflow, "renamed.json")
    comfy.page.wait_for_selector(MISSING_NODES_DIALOG, timeout=20_000)
    dialogs = comfy.open_dialogs()
    assert any(d["id"] == "global-missing-nodes" and "AG_RenamedGuidanceNode" in d["text"] for d in dialogs), dialogs
    comfy.screenshot(ARTIFACTS / "negative_control_missing_node.png")
    comfy.close_dialogs()


@pytest.mark.parametrize("folder", compat_sets(), ids=lambda folder: folder.name)
def test_released_workflows_still_load_and_mean_the_same_in_the_frontend(folder, loaded, object_info):
    recorded = json.loads((folder / "api_prompts.json").read_text(encoding="utf-8"))
    for path in sorted(folder.glob("*.json")):
        if path.name == "api_prompts.json":
            continue
        workflow = json.loads(path.read_text(encoding="utf-8"))
        comfy = loaded(workflow, path.name)
        assert [d for d in comfy.open_dialogs() if d["id"] == "global-missing-nodes"] == [], path.name
        output = comfy.graph_to_prompt()["output"]
        assert meaning_changes(recorded[path.stem], output, object_info, OUR_NODE_PREFIX) == [], path.name


def test_queueing_the_sd15_example_from_the_run_button_shows_the_image(loaded, server):
    workflow = load_example(UI_QUEUED_EXAMPLE)
    comfy = loaded(workflow, f"{UI_QUEUED_EXAMPLE}.json")
    by_type = {node["type"]: node["id"] for node in workflow["nodes"]}
    # What a user would do on a CPU: a small image, few steps.
    comfy.set_widget(by_type["EmptyLatentImage"], "width", TEST_SIZE)
    comfy.set_widget(by_type["EmptyLatentImage"], "height", TEST_SIZE)
    comfy.set_widget(by_type["KSampler"], "steps", TEST_STEPS)
    save_id = by_type["SaveImage"]
    assert comfy.node_image_sizes(save_id) == []
    comfy.click_queue()
    comfy.page.wait_for_function(
        "(id) => (window.app.graph.getNodeById(id).imgs || []).some(i => i.complete && i.naturalWidth > 0)",
        arg=save_id, timeout=QUEUE_TIMEOUT_MS)
    assert comfy.node_image_sizes(save_id) == [[TEST_SIZE, TEST_SIZE]]
    assert comfy.open_dialogs() == []
    comfy.screenshot(ARTIFACTS / f"{UI_QUEUED_EXAMPLE}_queued.png")
    history = server.get_json("/history")
    finished = [entry for entry in history.values()
                if any(v["class_type"] == "AG_PerturbedAttentionGuidance" for v in entry["prompt"][2].values())]
    assert finished and all(entry["status"]["status_str"] == "success" for entry in finished)


def test_the_node_docs_panel_shows_each_of_our_nodes_page(comfy, object_info):
    # the frontend falls back to the node's description when it finds no page: the page's own sections
    # and the first line of its text are what tell them apart
    ours = sorted(name for name in object_info if name.startswith(OUR_NODE_PREFIX))
    assert ours == ["AG_PerturbedAttentionGuidance", "AG_SAGMaskPreview", "AG_SelfAttentionGuidance",
                    "AG_SmoothedEnergyGuidance"]
    comfy.close_dialogs()
    comfy.load_workflow({"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [],
                         "config": {}, "extra": {}, "version": 0.4}, "docs.json")
    for name in ours:
        comfy.select_node(comfy.add_node(name))
        text = comfy.toggle_node_docs()
        assert comfy.toggle_node_docs() == ""
        page = (REPO / "web" / "docs" / f"{name}.md").read_text(encoding="utf-8")
        first_sentence = re.sub(r"[*`]", "", page.split("\n\n")[1].split(".")[0].replace("\n", " "))
        assert text.startswith(object_info[name]["display_name"]), (name, text[:200])
        assert first_sentence in text.replace("\n", " "), (name, text[:400])
        assert "Good to know" in text and "Inputs" in text, name
