"""UI-format workflows (what the ComfyUI frontend saves and lists as templates) to API format (what
``POST /prompt`` takes), the way comfyui-frontend-package 1.32.9 does it in ``graphToPrompt``.

    prompt = ui_to_api(json.load(open("example_workflows/x.json")), server.object_info())

The node definitions come from the server's ``/object_info``; from them the widget layout of a node is
rebuilt as the frontend builds it: one widget per INT / FLOAT / STRING / BOOLEAN / COMBO input, in
``input_order`` (required, then optional), except ``forceInput`` ones; an extra "control after generate"
value after an input with ``control_after_generate`` (and after any INT named ``seed`` / ``noise_seed``);
an extra "upload" value after the required inputs of a node with an ``image_upload`` combo. Those extra
values are saved in ``widgets_values`` but not sent to the server.

Then, as ``graphToPrompt``: ``widgets_values`` are positional (a missing trailing value keeps the
input's default, as the frontend keeps a widget's default); a linked input (a socket, or a widget
converted to an input) takes its link, followed through legacy ``Reroute`` nodes and through bypassed
nodes (the first input of the requested type); a ``PrimitiveNode`` gives its value; muted (mode 2) and
bypassed (mode 4) nodes and the frontend-only nodes (Note, MarkdownNote, PrimitiveNode, Reroute) are
left out, and links to nodes that are left out are dropped. Native reroutes (``extra.reroutes``) need
nothing: their links already join origin and target.

Anything the frontend would not load the same way is an error that names the node and the input:
an unknown node type, an input the node does not have, more widget values than the node has widgets,
a widget value outside the input's range or options (``check_values``), subgraphs, dynamic-prompt
syntax in a text (the frontend would rewrite it at random).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
MODE_NEVER = 2
MODE_BYPASS = 4
LEGACY_SEED_NAMES = {"seed", "noise_seed"}
# comfyui-frontend-package's dynamic prompts: {a|b} choices and // or /* */ comments.
DYNAMIC_PROMPT_SYNTAX = re.compile(r"[{}]|//|/\*")


class WorkflowError(ValueError):
    """A workflow the frontend would not turn into the prompt its file describes."""


@dataclass(frozen=True)
class Widget:
    name: str
    input_type: object  # "INT", ..., "COMBO" or a list of options
    options: dict
    sent: bool  # False for values the frontend saves but does not send (control_after_generate, upload)

    @property
    def combo_options(self) -> list | None:
        if isinstance(self.input_type, list):
            return self.input_type
        if self.input_type == "COMBO":
            return self.options.get("options", [])
        return None

    def default(self):
        if "default" in self.options:
            return self.options["default"]
        combo = self.combo_options
        if combo is not None:
            return combo[0] if combo else None
        return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(self.input_type)


def _spec(node_info: dict, section: str, name: str) -> tuple[object, dict]:
    spec = node_info["input"][section][name]
    return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})


def input_names(node_info: dict) -> list[str]:
    order = node_info.get("input_order") or {s: list(node_info["input"].get(s, {})) for s in ("required", "optional")}
    return [name for section in ("required", "optional") for name in order.get(section, [])]


def widget_layout(node_info: dict) -> list[Widget]:
    """The node's widgets in the order their values appear in ``widgets_values``."""
    order = node_info.get("input_order") or {s: list(node_info["input"].get(s, {})) for s in ("required", "optional")}
    widgets: list[Widget] = []
    upload = False
    for section in ("required", "optional"):
        for name in order.get(section, []):
            input_type, options = _spec(node_info, section, name)
            if options.get("forceInput"):
                continue
            if not (isinstance(input_type, list) or input_type in WIDGET_TYPES):
                continue
            widgets.append(Widget(name, input_type, options, True))
            if options.get("control_after_generate") or (input_type == "INT" and name in LEGACY_SEED_NAMES):
                widgets.append(Widget("control_after_generate", "COMBO", {}, False))
            upload = upload or bool(options.get("image_upload"))
        if section == "required" and upload:
            widgets.append(Widget("upload", "IMAGEUPLOAD", {}, False))
    return widgets


def _links(workflow: dict) -> dict:
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link["type"])
        else:
            links[link[0]] = tuple(link[1:6])
    return links


def _types_match(a, b) -> bool:
    """LiteGraph.isValidConnection: equal, a wildcard, or overlapping comma-separated type lists."""
    a, b = str(a or "*"), str(b or "*")
    if a in ("*", "") or b in ("*", ""):
        return True
    return bool({t.strip().upper() for t in a.split(",")} & {t.strip().upper() for t in b.split(",")})


def _describe(node: dict) -> str:
    title = f" '{node['title']}'" if node.get("title") else ""
    return f"node {node['id']} ({node.get('type')}{title})"


class _Converter:
    def __init__(self, workflow: dict, object_info: dict):
        if (workflow.get("definitions") or {}).get("subgraphs"):
            raise WorkflowError("workflow has subgraphs; this converter does not flatten them")
        self.object_info = object_info
        self.nodes = {node["id"]: node for node in workflow["nodes"]}
        self.links = _links(workflow)

    def node_info(self, node: dict) -> dict:
        info = self.object_info.get(node["type"])
        if info is None:
            raise WorkflowError(
                f"{_describe(node)}: the server has no node type '{node['type']}' (a missing custom node, "
                "or a renamed node id)")
        return info

    def resolve_link(self, link_id, wanted_type, seen=()):
        """('link', origin id, slot), ('value', v) or None (dangling, or nothing of the type upstream)."""
        if link_id is None:
            return None
        if link_id in seen:
            raise WorkflowError(f"link {link_id} is part of a cycle through reroutes or bypassed nodes")
        seen = (*seen, link_id)
        link = self.links.get(link_id)
        if link is None:
            raise WorkflowError(f"link {link_id} is used by a node but missing from the workflow's links")
        origin_id, origin_slot = link[0], link[1]
        origin = self.nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"link {link_id} starts at node {origin_id}, which is not in the workflow")
        if origin["type"] == "Reroute":
            inputs = origin.get("inputs") or []
            return self.resolve_link(inputs[0].get("link") if inputs else None, wanted_type, seen)
        if origin["type"] == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"{_describe(origin)} has no value")
            return ("value", values[0])
        if origin.get("mode") == MODE_BYPASS:
            inputs = origin.get("inputs") or []
            outputs = origin.get("outputs") or []
            slot = self.bypass_input_slot(inputs, outputs, origin_slot, wanted_type)
            if slot is None or slot < 0 or slot >= len(inputs):
                return None
            return self.resolve_link(inputs[slot].get("link"), wanted_type, seen)
        return ("link", str(origin_id), int(origin_slot))

    @staticmethod
    def bypass_input_slot(inputs, outputs, slot, wanted_type):
        """ExecutableNodeDTO's bypass rule: the same slot if its types fit, else the first input of the type."""
        if str(wanted_type) in ("*", ""):
            return slot if len(inputs) > slot else 0
        output_type = outputs[slot]["type"] if slot < len(outputs) else "*"
        same = inputs[slot] if slot < len(inputs) else None
        if same and _types_match(same["type"], output_type) and _types_match(same["type"], wanted_type):
            return slot
        for index, candidate in enumerate(inputs):
            if candidate["type"] == wanted_type:
                return index
        for index, candidate in enumerate(inputs):
            if _types_match(candidate["type"], output_type) and _types_match(candidate["type"], wanted_type):
                return index
        return None

    def convert_node(self, node: dict) -> dict:
        info = self.node_info(node)
        layout = widget_layout(info)
        values = node.get("widgets_values")
        if values is None:
            values = []
        if isinstance(values, dict):
            raise WorkflowError(f"{_describe(node)}: widgets_values is an object; this converter reads lists only")
        if len(values) > len(layout):
            names = ", ".join(w.name for w in layout) or "none"
            raise WorkflowError(
                f"{_describe(node)}: {len(values)} widget values {values!r} but the node has {len(layout)} "
                f"widgets ({names}): the workflow names an input this node does not have")
        inputs: dict = {}
        for index, widget in enumerate(layout):
            if not widget.sent:
                continue
            value = values[index] if index < len(values) else widget.default()
            if isinstance(value, str) and widget.options.get("dynamicPrompts") and DYNAMIC_PROMPT_SYNTAX.search(value):
                raise WorkflowError(
                    f"{_describe(node)}: input '{widget.name}' uses dynamic-prompt syntax ({{a|b}} or comments), "
                    "which the frontend rewrites when queueing; write the text plainly")
            inputs[widget.name] = {"__value__": value} if isinstance(value, list) else value

        known = set(input_names(info))
        for slot in node.get("inputs") or []:
            name = slot.get("name")
            if name not in known:
                raise WorkflowError(
                    f"{_describe(node)}: input '{name}' does not exist on {node['type']} (it has: {', '.join(sorted(known))})")
            widget_name = (slot.get("widget") or {}).get("name")
            if widget_name is not None and widget_name != name:
                raise WorkflowError(f"{_describe(node)}: input '{name}' is bound to widget '{widget_name}'")
            resolved = self.resolve_link(slot.get("link"), slot.get("type"))
            if resolved is None:
                continue
            kind, *rest = resolved
            if kind == "value":
                value = rest[0]
                inputs[name] = {"__value__": value} if isinstance(value, list) else value
            else:
                inputs[name] = list(rest)
        return {"inputs": inputs, "class_type": node["type"],
                "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}

    def convert(self) -> dict:
        prompt = {}
        for node in self.nodes.values():
            if node["type"] in FRONTEND_ONLY_TYPES or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
                continue
            prompt[str(node["id"])] = self.convert_node(node)
        for entry in prompt.values():
            for name, value in list(entry["inputs"].items()):
                if isinstance(value, list) and len(value) == 2 and value[0] not in prompt:
                    del entry["inputs"][name]
        return prompt


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend queues for this UI-format workflow."""
    return _Converter(copy.deepcopy(workflow), object_info).convert()


def check_values(prompt: dict, object_info: dict) -> None:
    """Raise WorkflowError for a widget value the input's definition does not allow (min / max / options /
    type), as the server's validation would; names the node and the input."""
    for node_id, entry in prompt.items():
        info = object_info[entry["class_type"]]
        for widget in widget_layout(info):
            if not widget.sent or widget.name not in entry["inputs"]:
                continue
            value = entry["inputs"][widget.name]
            if isinstance(value, list):  # a link
                continue
            where = f"node {node_id} ({entry['class_type']}) input '{widget.name}'"
            combo = widget.combo_options
            if combo is not None:
                if value not in combo:
                    raise WorkflowError(f"{where}: {value!r} is not one of its options")
                continue
            if widget.input_type in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise WorkflowError(f"{where}: {value!r} is not a number")
                if widget.input_type == "INT" and value != int(value):
                    raise WorkflowError(f"{where}: {value!r} is not an integer")
                if "min" in widget.options and value < widget.options["min"]:
                    raise WorkflowError(f"{where}: {value!r} is below its minimum {widget.options['min']}")
                if "max" in widget.options and value > widget.options["max"]:
                    raise WorkflowError(f"{where}: {value!r} is above its maximum {widget.options['max']}")
            elif widget.input_type == "STRING" and not isinstance(value, str):
                raise WorkflowError(f"{where}: {value!r} is not text")
            elif widget.input_type == "BOOLEAN" and not isinstance(value, bool):
                raise WorkflowError(f"{where}: {value!r} is not a boolean")


def meaning_changes(recorded: dict, converted: dict, object_info: dict, node_prefix: str) -> list[str]:
    """What changed, for the nodes whose class starts with ``node_prefix``, between ``recorded`` (the API
    prompt the frontend made of a workflow when it was released) and ``converted`` (the same workflow
    converted with today's node definitions): a node gone or of another class, an input gone, another
    value or link, or a new input whose value is not its default. Empty when the meaning is kept."""
    changes = []
    for node_id, before in sorted(recorded.items()):
        if not before["class_type"].startswith(node_prefix):
            continue
        after = converted.get(node_id)
        if after is None or after["class_type"] != before["class_type"]:
            changes.append(f"node {node_id} ({before['class_type']}) is now {after and after['class_type']}")
            continue
        for name, value in before["inputs"].items():
            if name not in after["inputs"]:
                changes.append(f"node {node_id} ({before['class_type']}): input '{name}' ({value!r}) is gone")
            elif after["inputs"][name] != value:
                changes.append(f"node {node_id} ({before['class_type']}): input '{name}' was {value!r}, "
                               f"now reads {after['inputs'][name]!r}")
        defaults = {w.name: w.default() for w in widget_layout(object_info[before["class_type"]]) if w.sent}
        for name in sorted(set(after["inputs"]) - set(before["inputs"])):
            if name not in defaults or after["inputs"][name] != defaults[name]:
                changes.append(f"node {node_id} ({before['class_type']}): new input '{name}' reads "
                               f"{after['inputs'][name]!r}, not its default {defaults.get(name)!r}")
    return changes
