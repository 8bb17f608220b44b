"""The example workflows in the real ComfyUI frontend, served by the real server, in headless Chromium,
as a user sees them. Every test runs on each frontend of ``support.frontends.frontends_under_test()``:
the host's pinned ``comfyui-frontend-package`` (1.32.9) and the newest one users run (1.58.1), the
latter with Nodes 2.0 (Vue node rendering) off and on; one server per frontend release, one browser
per variant.

For every example: it opens from the pack's entry in the template browser or as the template browser
loads it, no missing-node report appears, every node is a registered type without errors, our nodes
carry their widgets with the file's values, the frontend's own ``graphToPrompt`` makes exactly the
prompt ``support.workflow_convert`` makes (also with our nodes bypassed or muted and through a legacy
Reroute node), and exporting it again gives the file back. Queueing the SD1.5 PAG example from the
Run button shows the saved image on its Save Image node. The released copies in
``tests/workflow_compat/`` load without missing nodes and the frontend still makes the recorded prompt.

Screenshots of each loaded workflow go to ``tests/artifacts/frontend/<frontend>/``.

Needs Chromium and the Python package playwright (``python3 scripts/host.py setup`` installs both);
``AG_SKIP_BROWSER_TESTS=1`` skips this module on machines without them.
"""
import copy
import json
import os
import re

import pytest

from support.browser import (DIALOG, ERROR_OVERLAY, MISSING_NODES_DIALOG, ComfyPage, browser_missing_reason,
                             chromium_context)
from support.examples import (OUR_NODE_PREFIX, TEST_SIZE, TEST_STEPS, UI_QUEUED_EXAMPLE, compat_sets,
                              example_names, load_example)
from support.frontends import VUE_NODES_SETTING, FrontendServers, frontends_under_test
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


@pytest.fixture(scope="module", params=frontends_under_test(), ids=str)
def frontend(request):
    return request.param


@pytest.fixture(scope="module")
def servers(tmp_path_factory, browser_available):
    with FrontendServers(tmp_path_factory.mktemp("frontend_servers")) as running:
        yield running


@pytest.fixture(scope="module")
def server(servers, frontend):
    return servers.get(frontend)


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


@pytest.fixture(scope="module")
def comfy(server, frontend, object_info, tmp_path_factory):
    with chromium_context(tmp_path_factory.mktemp("chromium_profile")) as context:
        page = ComfyPage.open(context, server.url)
        page.frontend, page.object_info = frontend, object_info
        yield page


def artifact(comfy: ComfyPage, name: str):
    return ARTIFACTS / str(comfy.frontend) / name


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


def prompt_of(comfy: ComfyPage, workflow: dict) -> dict:
    """The prompt the frontend sends (``graphToPrompt``'s output), in the terms the converter writes it.
    1.58 also copies each node's registry id and version from its properties into ``_meta`` (``cnr_id``,
    ``ver``) and titles an untitled core node with its own translated name ("Detect Edges (Canny)" for
    Canny); the server reads neither, so on a newer frontend those are set to the converter's."""
    prompt = comfy.graph_to_prompt()["output"]
    if comfy.frontend.version is None:
        return prompt
    untitled = {str(node["id"]) for node in workflow["nodes"] if not node.get("title")}
    for node_id, entry in prompt.items():
        meta = entry.get("_meta", {})
        meta.pop("cnr_id", None)
        meta.pop("ver", None)
        if node_id in untitled and "title" in meta:
            meta["title"] = comfy.object_info[entry["class_type"]].get("display_name") or entry["class_type"]
    return prompt


def assert_exports_the_same_workflow(comfy: ComfyPage, workflow: dict, object_info: dict, name: str) -> None:
    """Exporting gives the file back (it was made with the pinned frontend); a newer frontend writes its
    own version and each node's values by name too (``widgets_values_named``), so there the export must
    mean the same graph and name each of our values as the file orders them."""
    exported = comfy.export_workflow()
    if comfy.frontend.version is None:
        assert without_view(exported) == without_view(workflow), f"{name} changes when exported again"
        return
    assert exported["extra"]["frontendVersion"] == comfy.frontend.version
    assert ui_to_api(exported, object_info) == ui_to_api(workflow, object_info), f"{name} means another graph when exported"
    by_id = {str(node["id"]): node for node in exported["nodes"]}
    for node in workflow["nodes"]:
        if node["type"].startswith(OUR_NODE_PREFIX):
            names = [w.name for w in widget_layout(object_info[node["type"]])]
            assert by_id[str(node["id"])]["widgets_values_named"] == dict(zip(names, node["widgets_values"])), name


def assert_loaded_cleanly(comfy: ComfyPage, workflow: dict, object_info: dict, name: str) -> None:
    assert comfy.reports() == [], f"{name}: the frontend reported a problem on load"
    # node ids are numbers in the file and in 1.32's graph, strings in 1.58's
    states = {str(state["id"]): state for state in comfy.node_states()}
    assert sorted(states) == sorted(str(node["id"]) for node in workflow["nodes"])
    for node in workflow["nodes"]:
        state = states[str(node["id"])]
        assert state["registered"] and not state["has_errors"], (name, state)
        if not node["type"].startswith(OUR_NODE_PREFIX):
            continue
        layout = widget_layout(object_info[node["type"]])
        assert [w["name"] for w in state["widgets"]] == [w.name for w in layout], (name, state["widgets"])
        # 1.58 hides a widget whose input is linked (the SAG Mask Preview's shared seed and steps)
        assert not any(w["hidden"] and not w["linked"] for w in state["widgets"]), state["widgets"]
        assert [w["value"] for w in state["widgets"]] == node["widgets_values"], (name, node["type"])
        assert state["size"][0] > 200 and state["size"][1] > 30 * len(layout), state


def test_the_page_runs_the_chosen_frontend_and_node_rendering(comfy, frontend):
    assert comfy.frontend_version() == frontend.served_version
    assert comfy.page.evaluate("(id) => window.app.extensionManager.setting.get(id)", VUE_NODES_SETTING) is frontend.vue_nodes
    comfy.close_dialogs()
    workflow = load_example(UI_QUEUED_EXAMPLE)
    comfy.load_workflow(workflow, f"{UI_QUEUED_EXAMPLE}.json")
    # Nodes 2.0 draws each node as an element of the page; the classic renderer draws them on the canvas
    rendered = comfy.page.evaluate("() => document.querySelectorAll('[data-node-id]').length")
    assert rendered == (len(workflow["nodes"]) if frontend.vue_nodes else 0)


EMPTY_WORKFLOW = {"last_node_id": 0, "last_link_id": 0, "nodes": [], "links": [], "groups": [], "config": {},
                  "extra": {}, "version": 0.4}


def test_the_template_browser_lists_the_pack_with_previews_and_opens_an_example(comfy, object_info):
    comfy.close_dialogs()
    # over a loaded graph, 1.32.9's template browser redraws so slowly in software rendering that clicks time out
    comfy.load_workflow(EMPTY_WORKFLOW, "empty.json")
    comfy.command("Comfy.BrowseTemplates")
    dialog = comfy.page.locator(DIALOG)
    pack_entries = dialog.get_by_text("attention_guidance", exact=True)
    # the browser fills its list once it has fetched every pack's templates
    pack_entries.first.wait_for(timeout=60_000)
    pack_entries.first.click()
    # The browser renders a card's preview only once the card is scrolled into view (two rows fit), and may
    # drop cards scrolled out of view again: every preview seen loaded is collected while scrolling.
    comfy.page.wait_for_function(
        "(names) => { const loaded = i => i && i.complete && i.naturalWidth > 0;"
        " const seen = window.__agTemplatePreviews = window.__agTemplatePreviews || new Set();"
        " const cards = [...document.querySelectorAll('[role=dialog] [data-testid^=\"template-workflow-\"]')];"
        " const waiting = cards.filter(c => c.querySelector('[data-testid^=\"template-workflow-\"]') === null"
        "                                  && !loaded(c.querySelector('img')));"
        " if (waiting.length) waiting[0].scrollIntoView({block: 'center'});"
        " for (const i of document.querySelectorAll('[role=dialog] img')) if (loaded(i)) seen.add(i.alt);"
        " return names.every(n => seen.has(n)); }",
        arg=NAMES, timeout=60_000)
    shown = comfy.page.evaluate("() => [...window.__agTemplatePreviews]")
    assert sorted(shown) == NAMES
    comfy.screenshot(artifact(comfy, "template_browser.png"))
    dialog.locator(f'[data-testid="template-workflow-{UI_QUEUED_EXAMPLE}"]').click()
    comfy.page.wait_for_function("() => document.querySelectorAll('[role=dialog]').length === 0", timeout=30_000)
    comfy.settle(600)
    assert_loaded_cleanly(comfy, load_example(UI_QUEUED_EXAMPLE), object_info, UI_QUEUED_EXAMPLE)


@pytest.mark.parametrize("name", NAMES)
def test_example_loads_renders_and_converts_as_the_frontend_converts_it(name, loaded, object_info):
    workflow = load_example(name)
    comfy = loaded(workflow, f"{name}.json")
    comfy.screenshot(artifact(comfy, f"{name}.png"))
    assert_loaded_cleanly(comfy, workflow, object_info, name)
    assert prompt_of(comfy, workflow) == ui_to_api(workflow, object_info)
    assert_exports_the_same_workflow(comfy, workflow, object_info, name)


@pytest.mark.parametrize("mode", [MODE_BYPASS, MODE_NEVER], ids=["bypassed", "muted"])
@pytest.mark.parametrize("name", ["sd15_sag_pag_chained", "sd15_sag_mask_preview"])
def test_converter_agrees_with_the_frontend_when_our_nodes_are_switched_off(name, mode, loaded, object_info):
    workflow = load_example(name)
    for node in workflow["nodes"]:
        if node["type"].startswith(OUR_NODE_PREFIX):
            node["mode"] = mode
    comfy = loaded(workflow, f"{name}_mode{mode}.json")
    assert comfy.reports() == []
    expected = ui_to_api(workflow, object_info)
    assert not any(e["class_type"].startswith(OUR_NODE_PREFIX) for e in expected.values())
    assert prompt_of(comfy, workflow) == expected


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
    assert comfy.reports() == []
    assert prompt_of(comfy, workflow) == expected


def test_a_workflow_with_an_unknown_node_shows_the_missing_node_report(loaded):
    """The check the examples pass is able to fail: a renamed node id brings up the missing-node dialog
    (1.32) or error overlay (1.58)."""
    workflow = load_example(UI_QUEUED_EXAMPLE)
    for node in workflow["nodes"]:
        if node["type"].startswith(OUR_NODE_PREFIX):
            node["type"] = "AG_RenamedGuidanceNode"
    comfy = loaded(workflow, "renamed.json")
    comfy.page.wait_for_selector(f"{MISSING_NODES_DIALOG}, {ERROR_OVERLAY}", timeout=20_000)
    reports = comfy.reports()
    assert any("AG_RenamedGuidanceNode" in report for report in reports), reports
    comfy.screenshot(artifact(comfy, "negative_control_missing_node.png"))
    comfy.close_dialogs()


@pytest.mark.parametrize("folder", compat_sets(), ids=lambda folder: folder.name)
def test_released_workflows_still_load_and_mean_the_same_in_the_frontend(folder, loaded, object_info):
    recorded = json.loads((folder / "api_prompts.json").read_text(encoding="utf-8"))
    for path in sorted(folder.glob("*.json")):
        if path.name == "api_prompts.json":
            continue
        workflow = json.loads(path.read_text(encoding="utf-8"))
        comfy = loaded(workflow, path.name)
        assert comfy.reports() == [], path.name
        output = prompt_of(comfy, workflow)
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
    assert comfy.reports() == []
    comfy.screenshot(artifact(comfy, f"{UI_QUEUED_EXAMPLE}_queued.png"))
    history = server.get_json("/history")
    finished = [entry for entry in history.values()
                if any(v["class_type"] == "AG_PerturbedAttentionGuidance" for v in entry["prompt"][2].values())]
    assert finished and all(entry["status"]["status_str"] == "success" for entry in finished)


def test_the_node_docs_panel_shows_each_of_our_nodes_page(comfy, object_info):
    # the frontend falls back to the node's description when it finds no page: the page's own sections
    # and the first line of its text are what tell them apart
    ours = sorted(name for name in object_info if name.startswith(OUR_NODE_PREFIX))
    assert ours == sorted(path.stem for path in (REPO / "web" / "docs").glob("*.md"))
    comfy.close_dialogs()
    comfy.load_workflow(EMPTY_WORKFLOW, "docs.json")
    for name in ours:
        comfy.select_node(comfy.add_node(name))
        text = comfy.toggle_node_docs()
        assert comfy.toggle_node_docs() == ""
        page = (REPO / "web" / "docs" / f"{name}.md").read_text(encoding="utf-8")
        first_sentence = re.sub(r"[*`]", "", page.split("\n\n")[1].split(".")[0].replace("\n", " "))
        assert text.startswith(object_info[name]["display_name"]), (name, text[:200])
        assert first_sentence in text.replace("\n", " "), (name, text[:400])
        assert "Good to know" in text and "Inputs" in text, name
