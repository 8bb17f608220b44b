"""The host's TorchCompileModel with our nodes: a patched model compiles once per shape and guidance
variant, and never again per step or per guided/unguided switch.

torch.compile (dynamo) guards every compiled graph on what the traced code read: shapes, and Python
values such as the ints and strings our attention handlers read from transformer_options. A value that
changed per step (a sigma, a step count) would compile a new graph at every step until dynamo's
recompile limit, and then silently run that code uncompiled. The backend here is "eager" (dynamo's
capture without code generation), which captures the same graphs as inductor at a fraction of the
time; the graphs are counted with dynamo's own counter. On the CPU the host's attention asks psutil for
free memory, which dynamo cannot trace, so the model compiles as many small graphs (a GPU compiles far
fewer); what counts is that their number does not grow.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from comfy_extras.nodes_torch_compile import TorchCompileModel
from torch._dynamo.utils import counters

from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from support.models import build_model, make_conditioning, sample

LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


def guided(model):
    """SAG over the first 60 % of the schedule and PAG over 20-80 %: runs have guided and unguided steps."""
    model = SelfAttentionGuidance.execute(model, scale=0.75, blur_sigma=1.0, threshold=1.0, kernel_size=9,
                                          layer="m0.0", start_percent=0.0, end_percent=0.6).result[0]
    return PerturbedAttentionGuidance.execute(model, scale=3.0, layers="mid", adaptive_scale=0.0, start_percent=0.2,
                                              end_percent=0.8, rescale=0.0).result[0]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    # high enough that a graph per step would show as new graphs instead of a silent fallback to eager
    with torch._dynamo.config.patch(**{LIMIT: 256}):
        yield
    torch._dynamo.reset()


def test_compiles_once_per_variant_not_per_step(fresh_dynamo):
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=1)
    latent = torch.zeros(1, 4, 8, 8)
    compile_after = TorchCompileModel.execute(guided(model), backend="eager").result[0]
    compile_before = guided(TorchCompileModel.execute(model, backend="eager").result[0])
    for patched in (compile_after, compile_before):
        # every variant once: CFG alone, with PAG's copy, with SAG's record and degraded pass, both
        sample(patched, positive, negative, latent, steps=5, cfg=4.0, seed=2)
    compiled = graphs()
    assert compiled > 0  # it did compile
    for patched in (compile_after, compile_before):
        # other sigmas at every step (another scheduler), another CFG and seed, guided and unguided steps:
        # nothing new to compile. (Another step count would recompile even the bare model once: the host
        # hands the model its schedule, transformer_options["sample_sigmas"], whose length dynamo guards.)
        sample(patched, positive, negative, latent, scheduler="karras", steps=5, cfg=6.0, seed=3)
        sample(patched, positive, negative, latent, scheduler="exponential", steps=5, cfg=4.0, seed=4)
    assert graphs() == compiled
