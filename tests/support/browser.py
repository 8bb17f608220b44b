"""The ComfyUI frontend in headless Chromium, driven with Playwright, for tests and for building the
example workflows.

    with chromium_context(tmp_dir) as context:
        page = ComfyPage.open(context, server.url)
        page.load_workflow(workflow, "sd15_sag.json")
        prompt = page.graph_to_prompt()

The browser is the system's Chromium (Debian's ``chromium`` package, ``$AG_CHROMIUM`` to use another);
Playwright never downloads one. It runs headless, without sandbox (root in CI), GPU, network services
or a display, with a fresh profile in the given folder.

The frontend is the one the server serves (``comfyui-frontend-package`` from the host's
requirements). ``server_settings()`` are written into the server's user folder before it starts, so
the first-run template browser does not open over the canvas.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]
VIEWPORT = {"width": 1600, "height": 1000}
APP_READY_TIMEOUT_MS = 180_000
MISSING_NODES_DIALOG = '.p-dialog[aria-labelledby="global-missing-nodes"]'
# PrimeVue's dialogs (frontend 1.32) and Reka UI's (1.58: the template browser)
DIALOG = '.p-dialog, [role="dialog"]'
# 1.58 reports a missing node in a toast-like overlay above the canvas instead of a dialog
ERROR_OVERLAY = '[data-testid="error-overlay"]'
ERROR_OVERLAY_DISMISS = '[data-testid="error-overlay-dismiss"]'
# 1.32: the button inside the queue split button; 1.58: the Run button itself
QUEUE_BUTTON = '[data-testid="queue-button"] button, button[data-testid="queue-button"]'
INFO_BUTTON = '[data-testid="info-button"]'
NODE_DOCS = ".node-help-content"
# 1.58 opens the node docs in the Info tab of the properties panel, which the info button does not close
PROPERTIES_PANEL = '[data-testid="properties-panel"]'
PROPERTIES_PANEL_TOGGLE = 'button[aria-label="Toggle properties panel"]'


def find_chromium() -> str | None:
    chosen = os.environ.get("AG_CHROMIUM")
    if chosen:
        return chosen if Path(chosen).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the Python package 'playwright' is not installed (python3 scripts/host.py setup installs it)"
    if find_chromium() is None:
        return ("no Chromium found (looked for $AG_CHROMIUM, " + ", ".join(CHROMIUM_NAMES) +
                "); python3 scripts/host.py setup installs Debian's chromium package")
    return None


def server_settings() -> dict:
    """ComfyUI user settings for a test server: no first-run template browser, warnings on."""
    return {
        "Comfy.TutorialCompleted": True,
        "Comfy.Workflow.ShowMissingNodesWarning": True,
        "Comfy.Workflow.ShowMissingModelsWarning": True,
    }


def write_server_settings(user_dir: Path) -> Path:
    path = Path(user_dir) / "default" / "comfy.settings.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(server_settings(), indent=2), encoding="utf-8")
    return path


@contextlib.contextmanager
def chromium_context(profile_dir: Path, viewport: dict = VIEWPORT):
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise RuntimeError(browser_missing_reason())
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir), executable_path=executable, headless=True, args=CHROMIUM_ARGS, viewport=viewport,
        )
        # The "Nodes 2.0" banner above the canvas, dismissed as a user dismisses it (TryVueNodeBanner).
        context.add_init_script("window.localStorage.setItem('vueNodesBannerDismissed', 'true')")
        try:
            yield context
        finally:
            context.close()


class ComfyPage:
    """One tab with the ComfyUI frontend; ``console`` collects the page's console messages."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.console: list[str] = []
        page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))

    @classmethod
    def open(cls, context, url: str) -> "ComfyPage":
        comfy = cls(context.new_page(), url)
        comfy.page.goto(url)
        comfy.page.wait_for_function(
            "() => window.app && window.app.graph && window.app.vueAppReady && window.app.extensionManager",
            timeout=APP_READY_TIMEOUT_MS)
        comfy.settle()
        return comfy

    def settle(self, ms: int = 300) -> None:
        """Let the frontend finish the work a change scheduled (dialogs, canvas redraw)."""
        self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        self.page.wait_for_timeout(ms)

    def command(self, command_id: str) -> None:
        self.page.evaluate("async (id) => { await window.app.extensionManager.command.execute(id) }", command_id)
        self.settle()

    def frontend_version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")

    def load_workflow(self, workflow: dict, name: str) -> None:
        """Load as the template browser does (``app.loadGraphData`` with the file's name)."""
        self.page.evaluate(
            "async ([graph, name]) => { await window.app.loadGraphData(graph, true, true, name, {openSource: 'template'}) }",
            [workflow, name])
        self.settle(600)

    def open_dialogs(self) -> list[dict]:
        return self.page.evaluate(
            "(selector) => [...document.querySelectorAll(selector)].map(d => ({id: d.getAttribute('aria-labelledby'),"
            " text: d.innerText.slice(0, 500)}))", DIALOG)

    def error_overlays(self) -> list[str]:
        """The texts of the error overlays above the canvas (1.58's missing-node report)."""
        return self.page.evaluate("(selector) => [...document.querySelectorAll(selector)].map(o => o.innerText)",
                                  ERROR_OVERLAY)

    def reports(self) -> list[str]:
        """Everything the frontend put up about the workflow: open dialogs and error overlays."""
        return [f"dialog {d['id']}: {d['text']}" for d in self.open_dialogs()] + \
            [f"overlay: {text}" for text in self.error_overlays()]

    def close_dialogs(self) -> None:
        for _ in range(3):
            if not self.open_dialogs():
                break
            self.page.keyboard.press("Escape")
            self.settle()
        for button in self.page.locator(ERROR_OVERLAY_DISMISS).all():
            button.click()
        if self.error_overlays():
            self.settle()

    def graph_to_prompt(self) -> dict:
        """``app.graphToPrompt()``: {"workflow": ..., "output": ...}, as JSON (what is sent and saved)."""
        return json.loads(self.page.evaluate("async () => JSON.stringify(await window.app.graphToPrompt())"))

    def export_workflow(self) -> dict:
        """What Workflow > Export writes: graphToPrompt's workflow plus the view (``extra.ds``)."""
        return json.loads(self.page.evaluate("""async () => {
            const p = await window.app.graphToPrompt();
            const [x, y] = window.app.canvas.ds.offset;
            p.workflow.extra ??= {};
            p.workflow.extra.ds = {scale: window.app.canvas.ds.scale, offset: [x, y]};
            return JSON.stringify(p.workflow);
        }"""))

    def node_states(self) -> list[dict]:
        """Every node on the canvas as the frontend built it: registered type, error flag, widgets."""
        return json.loads(self.page.evaluate("""() => JSON.stringify(window.app.graph.nodes.map(n => ({
            id: n.id, type: n.type, title: n.title, mode: n.mode,
            registered: !!window.LiteGraph.registered_node_types[n.type],
            has_errors: !!n.has_errors,
            size: [n.size[0], n.size[1]], pos: [n.pos[0], n.pos[1]],
            widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
                                                  hidden: !!(w.hidden || (w.options && w.options.hidden)),
                                                  linked: (n.inputs || []).some(i => i.widget && i.widget.name === w.name
                                                                                     && i.link != null)})),
        })))"""))

    def set_widget(self, node_id: int, name: str, value) -> None:
        """Set a widget as a user edit does (value, then the widget's callback)."""
        self.page.evaluate("""([id, name, value]) => {
            const node = window.app.graph.getNodeById(id);
            const widget = node.widgets.find(w => w.name === name);
            if (!widget) throw new Error(`node ${id} has no widget ${name}`);
            widget.value = value;
            widget.callback?.(value, window.app.canvas, node);
            window.app.graph.setDirtyCanvas(true, true);
        }""", [node_id, name, value])

    def fit_view(self) -> None:
        self.command("Comfy.Canvas.FitView")
        self.settle(400)

    def set_focus_mode(self, on: bool) -> None:
        """Focus mode hides every panel and menu, leaving only the canvas."""
        current = self.page.evaluate("() => window.app.extensionManager.focusMode")
        if bool(current) != on:
            self.command("Workspace.ToggleFocusMode")

    def screenshot(self, path: Path, **kwargs) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), **kwargs)
        return path

    def click_queue(self) -> None:
        self.page.locator(QUEUE_BUTTON).first.click()

    def node_image_sizes(self, node_id: int) -> list[list[int]]:
        """Natural sizes of the images the frontend shows on a node (e.g. SaveImage after a run)."""
        return self.page.evaluate("""(id) => {
            const node = window.app.graph.getNodeById(id);
            return (node.imgs || []).filter(i => i.complete && i.naturalWidth > 0).map(i => [i.naturalWidth, i.naturalHeight]);
        }""", node_id)

    def add_node(self, node_type: str) -> int:
        """A new ``node_type`` node in the middle of the view; its id."""
        return self.page.evaluate("""(type) => {
            const node = window.LiteGraph.createNode(type);
            node.pos = window.app.canvas.ds.convertOffsetToCanvas([600, 400]);
            window.app.graph.add(node);
            return node.id;
        }""", node_type)

    def select_node(self, node_id: int) -> None:
        self.page.evaluate("""(id) => {
            window.app.canvas.deselectAll();
            window.app.canvas.selectNode(window.app.graph.getNodeById(id));
            window.app.canvas.setDirty(true, true);
        }""", node_id)
        self.settle(600)

    def toggle_node_docs(self, timeout_ms: int = 30_000) -> str:
        """The selection toolbox's info button, as a user presses it: opens the selected node's page in the
        node docs panel and returns the panel's text once it has loaded, or closes the panel ("")."""
        was_open = self.page.locator(NODE_DOCS).count() > 0
        in_panel = self.page.locator(PROPERTIES_PANEL).count() > 0
        self.page.locator(PROPERTIES_PANEL_TOGGLE if was_open and in_panel else INFO_BUTTON).first.click()
        if was_open:
            self.page.wait_for_function("(selector) => !document.querySelector(selector)", arg=NODE_DOCS,
                                        timeout=timeout_ms)
            self.settle()
            return ""
        self.page.wait_for_function(
            "(selector) => (document.querySelector(selector)?.innerText || '').trim().length > 0", arg=NODE_DOCS,
            timeout=timeout_ms)
        self.settle(300)
        return self.page.locator(NODE_DOCS).first.inner_text()
