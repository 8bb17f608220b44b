"""The guidance nodes under the newest host's torch.compile settings: compiled equals eager.

ComfyUI 0.38's TorchCompileModel clones the model with ``disable_dynamic=True`` and compiles with
``options={"guard_filter_fn": skip_torch_compile_dict}``, a filter that drops every dynamo guard whose name
contains ``transformer_options``; many other compile nodes copy it. 0.3.75 has the same
``set_torch_compile_wrapper`` (comfy_api/torch_helpers) but not the filter, so ``skip_torch_compile_dict`` below
is the newest host's own (comfy_api/torch_helpers/torch_compile.py, 0.38.1) where the host lacks it.

Every node samples with a step window that leaves unguided steps, compiled after the node and before it, with
CFG 4, then CFG 1, then CFG 6 and other seeds, and must give what the same node gives uncompiled, on a UNet
(SD1.5), an image DiT (Flux) and a video DiT (Wan 2.1); also with the host's wrapper compiling only the
transformer blocks (``keys=``), with one compiled model shared by an unguided and a guided branch, with PAG's and
SEG's uncond placement, and on PixArt, whose attention is reached through object patches instead of the override. The
backend is "eager" (dynamo's capture without code generation, the same guards as inductor; see
test_torch_compile.py). UNet runs use the host's scaled-dot-product attention, as on a GPU, except the one
that keeps the CPU's own attention (which asks psutil for free memory, so dynamo compiles every transformer
block as a frame of its own, and blocks of equal shapes share one).
"""
from __future__ import annotations

import asyncio
import inspect
import logging

import comfy.ldm.modules.attention
import pytest
import torch
import torch._dynamo
from comfy_api.torch_helpers import set_torch_compile_wrapper
from torch._dynamo.utils import counters

from attention_guidance.nodes import AttentionGuidanceExtension
from support.dit_models import build_dit, empty_dit_latent, make_dit_conditioning
from support.models import build_model, make_conditioning, sample

try:
    from comfy_api.torch_helpers.torch_compile import skip_torch_compile_dict
except ImportError:  # 0.3.75: the newest host's filter, verbatim (comfy_api/torch_helpers/torch_compile.py, 0.38.1)
    def skip_torch_compile_dict(guard_entries):
        return [("transformer_options" not in entry.name) for entry in guard_entries]

LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
NODES = {node.define_schema().node_id: node for node in asyncio.run(AttentionGuidanceExtension().get_node_list())}
# (cfg, seed) of consecutive runs of one compiled model: CFG on, CFG 1 (no uncond: another batch layout), CFG on
RUNS = ((4.0, 2), (1.0, 3), (6.0, 4))


def compile_like_newest_host(model, keys=None):
    """What 0.38's TorchCompileModel does, with the "eager" backend (and ``keys``: only those modules)."""
    clone = model.clone(disable_dynamic=True) if "disable_dynamic" in inspect.signature(model.clone).parameters \
        else model.clone()
    extra = {"keys": keys} if keys else {}
    set_torch_compile_wrapper(model=clone, backend="eager", options={"guard_filter_fn": skip_torch_compile_dict},
                              **extra)
    return clone


def pag(model, layers):
    return NODES["AG_PerturbedAttentionGuidance"].execute(model, scale=3.0, layers=layers, adaptive_scale=0.0,
                                                          start_percent=0.2, end_percent=0.8, rescale=0.0).result[0]


def sag(model, layers):
    return NODES["AG_SelfAttentionGuidance"].execute(model, scale=0.75, blur_sigma=1.0, threshold=1.0, kernel_size=9,
                                                     layer=layers, start_percent=0.0, end_percent=0.6).result[0]


def seg(model, layers):
    return NODES["AG_SmoothedEnergyGuidance"].execute(model, scale=3.0, blur_sigma=10000.0, layers=layers,
                                                      start_percent=0.2, end_percent=1.0).result[0]


def pag_uncond(model, layers):
    return NODES["AG_PerturbedAttentionGuidance"].execute(model, scale=3.0, layers=layers, adaptive_scale=0.0,
                                                          start_percent=0.2, end_percent=0.8, rescale=0.0,
                                                          placement="uncond branch").result[0]


def seg_uncond(model, layers):
    return NODES["AG_SmoothedEnergyGuidance"].execute(model, scale=3.0, blur_sigma=10000.0, layers=layers,
                                                      start_percent=0.2, end_percent=1.0,
                                                      placement="uncond branch").result[0]


GUIDANCE = {"pag": pag, "sag": sag, "seg": seg, "pag_uncond": pag_uncond, "seg_uncond": seg_uncond}
# PixArt's position embedding needs a latent of about 34 x 34 or more
LATENT_HW = {"pixart": (32, 40)}


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    # high enough that a graph per step would show as new graphs instead of a silent fallback to eager
    with torch._dynamo.config.patch(**{LIMIT: 256}):
        yield
    torch._dynamo.reset()


@pytest.fixture
def gpu_like_attention(monkeypatch):
    """The host's scaled-dot-product attention for the UNet, which it picks on a GPU (no psutil graph breaks)."""
    monkeypatch.setattr(comfy.ldm.modules.attention, "optimized_attention", comfy.ldm.modules.attention.attention_pytorch)


def unet_case():
    model = build_model("sd15", seed=0)
    return model, *make_conditioning("sd15", batch=1, seed=1), torch.zeros(1, 4, 8, 8), "mid", "m0.0"


def dit_case(family: str):
    model = build_dit(family, seed=0)
    layers = "block.1" if family.startswith("wan") else "auto"
    latent = empty_dit_latent(model, (1, 16, *LATENT_HW.get(family, (8, 8))))
    return model, *make_dit_conditioning(family, batch=1, seed=1), latent, layers, layers


def assert_compiled_equals_eager(model, positive, negative, latent, layers_of, keys=None, steps=5):
    """Each node of ``layers_of``, compiled after it and before it, over RUNS; then nothing compiles again in
    further runs."""
    compiled_models = {}
    for name, layers in layers_of.items():
        node = GUIDANCE[name]
        eager = {cfg: sample(node(model, layers), positive, negative, latent, steps=steps, cfg=cfg, seed=seed)
                 for cfg, seed in RUNS}
        unguided = sample(model, positive, negative, latent, steps=steps, cfg=RUNS[0][0], seed=RUNS[0][1])
        # well above the tolerance below, so that guidance skipped when compiled cannot pass
        assert (eager[RUNS[0][0]] - unguided).abs().max() > 1e-3, f"{name} changes nothing here"
        for order, compiled in (("after", compile_like_newest_host(node(model, layers), keys)),
                                ("before", node(compile_like_newest_host(model, keys), layers))):
            for cfg, seed in RUNS:
                out = sample(compiled, positive, negative, latent, steps=steps, cfg=cfg, seed=seed)
                torch.testing.assert_close(out, eager[cfg], rtol=1e-5, atol=1e-4,
                                           msg=lambda m: f"{name} compiled {order} it, cfg {cfg}: {m}")
            compiled_models[(name, order)] = compiled
    assert graphs() > 0
    compiled_count = graphs()
    # other sigmas at every step, another seed: nothing new to compile, guided or unguided steps alike
    for compiled in compiled_models.values():
        sample(compiled, positive, negative, latent, scheduler="karras", steps=steps, cfg=5.0, seed=7)
    assert graphs() == compiled_count


def test_unet_compiled_equals_eager(fresh_dynamo, gpu_like_attention):
    model, positive, negative, latent, layers, layer = unet_case()
    assert_compiled_equals_eager(model, positive, negative, latent, {"pag": layers, "sag": layer, "seg": layers})


# PixArt: its attention reached through object patches on its submodules (tapped_attention), not the override
@pytest.mark.parametrize("family", ["flux", "wan21", "pixart"])
def test_dit_compiled_equals_eager(fresh_dynamo, family):
    model, positive, negative, latent, layers, layer = dit_case(family)
    assert_compiled_equals_eager(model, positive, negative, latent, {"pag": layers, "sag": layer, "seg": layers},
                                 steps=4)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_uncond_placement_compiled_equals_eager(fresh_dynamo, gpu_like_attention, family):
    """PAG's and SEG's uncond placement (the sampler's negative perturbed, CFG 1 turning it off)."""
    model, positive, negative, latent, layers, _ = unet_case() if family == "sd15" else dit_case(family)
    assert_compiled_equals_eager(model, positive, negative, latent, {"pag_uncond": layers, "seg_uncond": layers},
                                 steps=4)


def test_per_block_compile_equals_eager(fresh_dynamo):
    """The host's wrapper with ``keys=`` every transformer block, as popular compile nodes call it."""
    model, positive, negative, latent, layers, layer = dit_case("flux")
    diffusion_model = model.get_model_object("diffusion_model")
    keys = [f"diffusion_model.{stack}.{i}" for stack in ("double_blocks", "single_blocks")
            for i in range(len(getattr(diffusion_model, stack)))]
    # SEG reaches the blocks as PAG does
    assert_compiled_equals_eager(model, positive, negative, latent, {"pag": layers, "sag": layer}, keys=keys, steps=4)


def test_unet_blocks_compiled_apart_share_traced_code(fresh_dynamo):
    """With the CPU's attention every transformer block compiles as a frame of its own, and blocks of equal
    shapes (the middle block and the first output blocks here) run the code traced at whichever came first,
    with the attn1 replacement it looked up there: PAG still perturbs its own layer only."""
    model, positive, negative, latent, layers, layer = unet_case()
    eager = sample(pag(model, layers), positive, negative, latent, steps=4, cfg=4.0, seed=2)
    out = sample(compile_like_newest_host(pag(model, layers)), positive, negative, latent, steps=4, cfg=4.0, seed=2)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("guided_first", [False, True], ids=["unguided_first", "guided_first"])
def test_compiled_model_shared_by_guided_and_unguided_branch(fresh_dynamo, gpu_like_attention, guided_first, caplog):
    """The unguided model compiled, then a node applied to a clone of it (and, later, another node with other
    layers): each branch gives what it gives uncompiled, in either order, with no warning. Dynamo keeps its
    compiled code per code object, so with the guards on transformer_options dropped every branch would run the
    code traced for the first (the guidance skipped, or handlers looked up that the other has not)."""
    model, positive, negative, latent, layers, layer = unet_case()
    compiled = compile_like_newest_host(model)
    branches = {"unguided": (model, compiled), "pag": (pag(model, layers), pag(compiled, layers)),
                "sag": (sag(model, layer), sag(compiled, layer)), "pag_u0": (pag(model, "u0"), pag(compiled, "u0"))}
    order = ["pag", "unguided", "sag", "pag_u0", "pag", "unguided"] if guided_first \
        else ["unguided", "pag", "sag", "unguided", "pag_u0", "pag"]
    expected = {name: sample(eager, positive, negative, latent, steps=5, cfg=4.0, seed=2)
                for name, (eager, _) in branches.items()}
    assert (expected["pag"] - expected["unguided"]).abs().max() > 1e-2
    assert (expected["pag_u0"] - expected["pag"]).abs().max() > 1e-2
    with caplog.at_level(logging.WARNING):
        for name in order:
            out = sample(branches[name][1], positive, negative, latent, steps=5, cfg=4.0, seed=2)
            torch.testing.assert_close(out, expected[name], rtol=1e-5, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "Guidance" in r.getMessage()]
