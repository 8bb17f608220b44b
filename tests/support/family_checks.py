"""Shared helpers of the family tests: the nodes with test defaults, overrides that record attention calls,
noisy latents and chosen blocks of the session's tiny DiTs."""
import torch
import torch.nn.functional as F

from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.nodes.seg import SmoothedEnergyGuidance
from attention_guidance.patching.families import recognise
from support.dit_models import make_dit_conditioning, noisy_dit_latent
from support.dit_models import tiny_dit as tiny
from support.dit_models import empty_dit_latent
from support.models import denoise_once, sample


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


def expected_sag_mask(q, k, image, grid, latent_hw):
    """SAG's mask computed here from a call's ``q``, ``k`` (``[B, heads, L, D]``): the mass each of the ``image``
    tokens receives from the image's queries (their attention renormalised over the image's keys), thresholded at
    its mean of 1.0, one mask per frame of ``grid``, nearest-upsampled to ``latent_hw``."""
    probs = (q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[:, :, image, image]
    probs = probs / probs.sum(-1, keepdim=True)
    mass = probs.mean(1).sum(1)  # [B, image tokens]
    frames = (mass > 1.0).double().reshape(-1, 1, *grid[-2:])  # one mask per frame
    return F.interpolate(frames, size=latent_hw, mode="nearest").float()


def assert_every_method_guides_a_sampled_latent(family, block, hw=(6, 10)):
    """PAG, SEG and SAG at ``auto``, SAG + PAG and SEG at ``block``, each sampled on a non-square batch of two:
    finite, changed, and the model given to the nodes left as it was."""
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=2, seed=8)
    start = empty_dit_latent(model, (2, 16, *hw))
    plain = sample(model, positive, negative, start, steps=3, cfg=3.5, seed=3)
    for name, patched in (("pag", pag(model, "auto")), ("seg", seg(model, "auto")), ("sag", sag(model, "auto")),
                          ("sag+pag", pag(sag(model, block), block)), ("seg", seg(model, block))):
        out = sample(patched, positive, negative, start, steps=3, cfg=3.5, seed=3)
        assert out.shape == plain.shape
        assert torch.isfinite(out).all()
        # SEG's blurred queries move a random-weight model's near-uniform attention far less than PAG's identity
        # does (its size is checked against the equation in the family tests); PAG and SAG move the sample by
        # more than 0.1 %
        assert rel_err(out, plain) > (1e-6 if name == "seg" else 1e-3), name
    assert torch.equal(sample(model, positive, negative, start, steps=3, cfg=3.5, seed=3), plain)  # model untouched
