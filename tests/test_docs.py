"""The user docs agree with the code: the README's node tables with the nodes' schemas, the README's
length, and every relative link in README.md, CONTRIBUTING.md and docs/*.md.

The node classes come only through the pack's extension (what ComfyUI itself loads), never from a
module path, so the test does not depend on where the node modules live.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from attention_guidance.nodes import AttentionGuidanceExtension

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_LINES = 250
LINKED_DOCS = [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]

# Files that other work adds; a link to one of these may point nowhere until it lands.
EXPECTED_LATER: set[str] = set()

NODE_HEADING = re.compile(r"^#{2,4} .*`(AG_\w+)`\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def schemas() -> dict:
    nodes = asyncio.run(AttentionGuidanceExtension().get_node_list())
    return {schema.node_id: schema for schema in (cls.define_schema() for cls in nodes)}


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def readme_node_tables(text: str) -> dict[str, list[list[str]]]:
    """``{node id: [[input, default, range, meaning], ...]}``: the first table under each heading that
    names a node id in backticks."""
    tables: dict[str, list[list[str]]] = {}
    node = None
    rows: list[list[str]] = []
    in_table = False
    for line in text.splitlines() + [""]:
        heading = NODE_HEADING.match(line)
        if heading:
            node, rows, in_table = heading.group(1), [], False
            continue
        if node is None:
            continue
        if line.startswith("|"):
            in_table = True
            row = cells(line)
            if row[0] == "input" or set(row[0]) <= {"-", ":"}:
                continue
            rows.append(row)
        elif in_table or line.startswith("#"):
            assert node not in tables, f"README: two node sections for {node}"
            tables[node] = rows
            node, rows, in_table = None, [], False
    return tables


def number(text: str) -> int | float:
    """A table's number: an int when written without a point (exact, e.g. a 64-bit seed's max), else a float."""
    text = text.replace("−", "-").replace("`", "").strip()
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def same(value, expected) -> bool:
    """Equal, and an int schema value written as an int (a float literal would hide 2**64 - 1 vs 2**64)."""
    if isinstance(expected, int) and not isinstance(expected, bool):
        return value == expected if isinstance(value, int) else float(value).is_integer() and int(value) == expected
    return float(value) == float(expected)


def table_mismatches(node: str, rows: list[list[str]], schema) -> list[str]:
    problems = []
    inputs = schema.inputs or []
    names = [row[0].strip("`") for row in rows]
    wanted = [inp.id for inp in inputs]
    if names != wanted:
        problems.append(f"{node}: README inputs {names}, schema inputs (in order) {wanted}")
    by_name = {row[0].strip("`"): row for row in rows}
    for inp in inputs:
        row = by_name.get(inp.id)
        if row is None:
            continue
        if len(row) < 3:
            problems.append(f"{node}.{inp.id}: README row needs input | default | range | meaning")
            continue
        default_cell, range_cell = row[1].strip("`").strip(), row[2].strip()
        default = getattr(inp, "default", None)
        if default is None:
            if default_cell:
                problems.append(f"{node}.{inp.id}: README default {default_cell!r}, schema has none")
        elif isinstance(default, str):
            if default_cell != default:
                problems.append(f"{node}.{inp.id}: README default {default_cell!r}, schema {default!r}")
        else:
            try:
                ok = same(number(default_cell), default)
            except ValueError:
                ok = False
            if not ok:
                problems.append(f"{node}.{inp.id}: README default {default_cell!r}, schema {default!r}")
        low, high = getattr(inp, "min", None), getattr(inp, "max", None)
        if low is None and high is None:
            if range_cell:
                problems.append(f"{node}.{inp.id}: README range {range_cell!r}, schema has none")
            continue
        parts = [part for part in re.split(r"\s+–\s+", range_cell) if part]
        try:
            shown = [number(part) for part in parts]
        except ValueError:
            shown = []
        if len(shown) != 2 or not (same(shown[0], low) and same(shown[1], high)):
            problems.append(f"{node}.{inp.id}: README range {range_cell!r}, schema {low} – {high}")
    return problems


def test_readme_lists_exactly_the_packs_nodes():
    tables = readme_node_tables(README.read_text(encoding="utf-8"))
    assert sorted(tables) == sorted(schemas()), "README node sections (### … — `AG_…`) differ from the extension's nodes"


def test_readme_node_tables_match_the_schemas():
    tables = readme_node_tables(README.read_text(encoding="utf-8"))
    problems = []
    for node, schema in schemas().items():
        if node in tables:
            problems += table_mismatches(node, tables[node], schema)
    assert not problems, "README node tables disagree with the schemas:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it at most {README_MAX_LINES} (move detail to docs/)"


def github_anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            found.add(github_anchor(line.lstrip("#")))
    return found


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return LINK.findall(text)


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_files(doc: Path):
    problems = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        relative = resolved.relative_to(REPO).as_posix() if resolved.is_relative_to(REPO) else str(resolved)
        if not resolved.exists():
            if relative not in EXPECTED_LATER:
                problems.append(f"{target}: no file {relative}")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{target}: no heading #{anchor} in {relative}")
    assert not problems, f"{doc.relative_to(REPO)}: broken links:\n" + "\n".join(problems)
