"""The quality benchmark (tests/benchmarks/quality.py) end to end at small N: its committed model and
judge are the recorded files, every row runs through the pack's nodes and the KSampler node's function,
and its JSON has every row and every field. It checks the shape of the output and that the model and
the nodes do something, not the benchmark's results (those are in docs/quality.md)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
import quality  # noqa: E402
import quality_model as qm  # noqa: E402

# The committed assets; retraining (scripts/train_quality_model.py) changes these and docs/quality.md.
EXPECTED_SHA256 = {
    "digits_unet.safetensors": "2f7fa515ca967ff9686d795939eb63fbc9c6ee0473cd33b3fe2fa0f76d1926ae",
    "digits_judge.safetensors": "45178f6d60590ba6a3ca303ef9c8b1d10276d6b394cf30f0ad21e6cabe400bb4",
}
FIELDS = {"row", "method", "cfg", "scale", "layers", "baseline", "metrics", "vs_cfg_frontier"}


def test_assets_are_the_recorded_files():
    assert qm.recorded_hashes() == EXPECTED_SHA256
    for name, digest in EXPECTED_SHA256.items():
        path = qm.ASSETS / name
        assert path.stat().st_size <= 10 * 2**20, f"{name} is over 10 MiB"
        assert qm.sha256(path) == digest, f"{name} is not the committed file"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "records.json"
    quality.main(["--n", "20", "--steps", "4", "--bootstrap", "20", "--threads", "1", "--json", str(out)])
    return json.loads(out.read_text(encoding="utf-8"))


def test_json_has_every_row_and_field(small_run):
    assert [r["row"] for r in small_run] == quality.ROW_KEYS
    methods = {r["method"] for r in small_run}
    assert {"cfg", "pag", "seg", "sag", "sag+pag"} <= methods
    assert sorted(r["cfg"] for r in small_run if r["method"] == "cfg") == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert any(r["layers"] and "inf" in r["row"] for r in small_run if r["method"] == "seg"), "SEG's infinite-sigma row"
    assert {r["cfg"] for r in small_run if r["method"] == "sag"} == {1.0, 2.0}
    keys = set(quality.ROW_KEYS)
    for record in small_run:
        assert FIELDS <= set(record), record["row"]
        assert set(record["metrics"]) == set(quality.METRICS), record["row"]
        for name, metric in record["metrics"].items():
            assert set(metric) == {"value", "delta", "ci"}, (record["row"], name)
            low, high = metric["ci"]
            assert all(math.isfinite(v) for v in (metric["value"], metric["delta"], low, high)), (record["row"], name)
            assert low <= high, (record["row"], name)
        for name in ("accuracy", "precision", "recall", "saturation"):
            assert 0.0 <= record["metrics"][name]["value"] <= 1.0, (record["row"], name)
        if record["baseline"] is None:
            assert record["vs_cfg_frontier"] == "baseline"
            assert all(m["delta"] == 0.0 for m in record["metrics"].values())
        else:
            assert record["baseline"] in keys, record["row"]
            base = next(r for r in small_run if r["row"] == record["baseline"])
            for name, metric in record["metrics"].items():
                assert metric["delta"] == pytest.approx(metric["value"] - base["metrics"][name]["value"], abs=1e-9)
        expected = {"baseline"} if record["method"] == "cfg" else {"above", "on", "below"}
        assert record["vs_cfg_frontier"] in expected, record["row"]


def test_the_model_draws_the_requested_digits(small_run):
    """The trained model at CFG 1 makes digits the judge recognises (chance is 0.1)."""
    cfg1 = next(r for r in small_run if r["row"] == "cfg1")
    assert cfg1["metrics"]["accuracy"]["value"] >= 0.6, cfg1["metrics"]


def _samples(row_key, noise_seed=0, n=4):
    model, tokens = qm.load_unet()
    row = next(r for r in quality.ROWS if r.key == row_key)
    return quality.sample_row(model, tokens, row, n, 3, noise_seed, quality.node_classes(), chunk=n)


def test_the_nodes_change_the_samples_and_noise_seed_changes_the_noise():
    base = _samples("cfg1")
    assert torch.equal(base, _samples("cfg1")), "the same seed gives different samples"
    assert not torch.allclose(base, _samples("cfg1", noise_seed=1)), "--noise-seed does not change the noise"
    for key in ("pag_u0-1_s2", "seg_u2-3_sinf", "sag_cfg1"):
        assert not torch.allclose(base, _samples(key), atol=1e-4), f"{key}: the node did not change the samples"


def test_markdown_table_has_a_line_per_row(small_run):
    lines = quality.markdown_table(small_run).splitlines()
    assert len(lines) == 2 + len(quality.ROW_KEYS)
    for key, line in zip(quality.ROW_KEYS, lines[2:]):
        assert line.startswith(f"| `{key}` |") and line.count("|") == 3 + len(quality.METRICS) + 2
