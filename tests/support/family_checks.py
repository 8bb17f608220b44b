"""Shared helpers of the family tests: the nodes with test defaults, overrides that record attention calls,
noisy latents and chosen blocks of the session's tiny DiTs."""
import torch

from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.nodes.seg import SmoothedEnergyGuidance
from attention_guidance.patching.families import recognise
from support.dit_models import make_dit_conditioning, noisy_dit_latent
from support.dit_models import tiny_dit as tiny
from support.models import denoise_once


def pag(model, layers, scale=3.0):
    return PerturbedAttentionGuidance.execute(model, scale, layers, 0.0, 0.0, 1.0, 0.0).result[0]


def seg(model, layers, scale=3.0, blur_sigma=10.0):
    return SmoothedEnergyGuidance.execute(model, scale, blur_sigma, layers, 0.0, 1.0).result[0]


def sag(model, layer, scale=0.75):
    return SelfAttentionGuidance.execute(model, scale, 1.0, 1.0, 9, layer, 0.0, 1.0).result[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def with_override(model, override):
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return clone


def recording(model, calls):
    """A clone whose attention override records each call (its options as they were then, args, kwargs)."""

    def record(func, *args, **kwargs):
        calls.append((dict(kwargs.get("transformer_options") or {}), args, kwargs))
        return func(*args, **kwargs)

    return with_override(model, record)


def latent(family, hw=(8, 10), batch=1, sigma=0.6, seed=1):
    return noisy_dit_latent(tiny(family), sigma, shape=(batch, 16, *hw), seed=seed)


def chosen(family, spec):
    (block,) = recognise(tiny(family), "test").layout.select(spec)
    return block


def assert_batch_rows_guided_independently(family, node, block, hw=(8, 10)):
    """``node`` (pag or sag) at ``block`` on a batch of two ``hw`` latents gives each row what it gives that row
    alone."""
    model = tiny(family)
    x, sigma = latent(family, hw=hw, batch=2)
    positive, negative = make_dit_conditioning(family, batch=2, seed=10)
    patched = node(model, block)
    both = denoise_once(patched, positive, negative, x, sigma, 4.0)
    for i in range(2):
        row = [[[c[0][i:i + 1], {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                                 for k, v in c[1].items()}] for c in conditioning] for conditioning in (positive, negative)]
        single = denoise_once(patched, row[0], row[1], x[i:i + 1], sigma, 4.0)
        assert rel_err(single, both[i:i + 1]) < 1e-4
