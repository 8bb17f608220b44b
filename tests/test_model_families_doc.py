"""docs/model-families.md and the family sections of the node docs are generated from the registry: the
committed files must be what the registry generates now, and what they list must hold on the layouts."""
from __future__ import annotations

import importlib.util

import pytest

from attention_guidance.guidance_core.layer_spec import Method
from attention_guidance.patching.families import FAMILIES
from conftest import REPO


def generator():
    spec = importlib.util.spec_from_file_location("model_families_doc", REPO / "scripts" / "model_families_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_docs_are_what_the_registry_generates():
    stale = [str(path.relative_to(REPO)) for path, text in generator().outputs().items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"out of date: {stale}; run .cache/venv/bin/python scripts/model_families_doc.py"


def test_a_changed_default_makes_the_docs_stale(monkeypatch):
    """The comparison above sees a registry change: a family's default renamed is a difference."""
    from attention_guidance.patching.families import wan

    monkeypatch.setitem(wan.DEFAULTS, Method.PAG, wan.DEFAULTS[Method.PAG].__class__(spec="block.11", source="x"))
    outputs = generator().outputs()
    assert any(path.read_text() != text for path, text in outputs.items())


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_every_documented_default_names_blocks_of_its_model(family):
    assert family.known_models and family.models and family.host_types and family.layer_examples
    for known in family.known_models:
        layout = known.layout()
        for method in Method:
            if layout.sites:  # the UNet entry documents its defaults without a concrete model
                assert layout.select(layout.default_layers(method)), (known.name, method)
            assert layout.default_source(method), (known.name, method)
