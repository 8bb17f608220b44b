"""The pack registers through ComfyUI's own custom-node loader, V3 only, without clashing with core ids."""
import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

import nodes

REPO = Path(__file__).resolve().parent.parent
REPO_INIT_NAME = "attention_guidance"


@pytest.fixture(scope="module")
def core_node_ids():
    """Node ids of the host itself (nodes.py plus comfy_extras), as init_external_custom_nodes sees them."""
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    ids = set(nodes.NODE_CLASS_MAPPINGS)
    assert {"KSampler", "PerturbedAttentionGuidance", "SelfAttentionGuidance"} <= ids
    return ids


@pytest.fixture
def pack_link(tmp_path):
    """The repository inside a custom_nodes folder, under the folder name scripts/host.py uses."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    link = custom_nodes / REPO_INIT_NAME
    link.symlink_to(REPO, target_is_directory=True)
    return link


def load_pack(path, ignore):
    return asyncio.run(nodes.load_custom_node(str(path), ignore=set(ignore), module_parent="custom_nodes"))


def test_pack_loads_through_the_host_loader_as_v3_without_id_collisions(core_node_ids, pack_link, monkeypatch):
    monkeypatch.setattr(nodes, "NODE_CLASS_MAPPINGS", dict(nodes.NODE_CLASS_MAPPINGS))
    monkeypatch.setattr(nodes, "NODE_DISPLAY_NAME_MAPPINGS", dict(nodes.NODE_DISPLAY_NAME_MAPPINGS))

    assert load_pack(pack_link, core_node_ids), "nodes.load_custom_node failed; see the log for the traceback"

    # load_custom_node imports the folder under its path (dots escaped) as module name.
    module = sys.modules[str(pack_link).replace(".", "_x_")]
    assert not hasattr(module, "NODE_CLASS_MAPPINGS"), (
        "the host uses NODE_CLASS_MAPPINGS and then ignores comfy_entrypoint; the pack ships only V3")
    extension = asyncio.run(module.comfy_entrypoint())
    node_classes = asyncio.run(extension.get_node_list())
    node_ids = [cls.GET_SCHEMA().node_id for cls in node_classes]

    assert "AG_PerturbedAttentionGuidance" in node_ids
    assert len(set(node_ids)) == len(node_ids), f"duplicate node ids in the pack: {node_ids}"
    assert not set(node_ids) & core_node_ids, f"pack node ids taken by the host: {sorted(set(node_ids) & core_node_ids)}"
    for cls in node_classes:
        node_id = cls.GET_SCHEMA().node_id
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is cls, f"{node_id} was not registered"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == cls.GET_SCHEMA().display_name
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{REPO_INIT_NAME}"
    assert set(nodes.NODE_CLASS_MAPPINGS) - core_node_ids == set(node_ids)


def test_no_bytecode_ships_with_the_pack():
    # ComfyUI's governed build (0.38.x) refuses packs that ship __pycache__ / .pyc files; what the Comfy
    # Registry packs is the repository's tracked files, and git must keep ignoring the ones Python writes
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    bytecode = [path for path in tracked.split("\0") if path.endswith((".pyc", ".pyo")) or "__pycache__" in path.split("/")]
    assert not bytecode, f"tracked bytecode: {bytecode}"
    written = ["__pycache__/nodes.cpython-311.pyc", "nodes/__pycache__/pag.cpython-311.pyc", "tests/x.pyc"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *written], cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == written
