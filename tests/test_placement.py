"""PAG's and SEG's ``placement``: the uncond placement in the real host.

With ``placement='uncond branch'`` the chosen layers perturb the negative's rows of the sampler's own
cond/uncond forward, and CFG combines: ``D = D̂(u) + w · (D(c) − D̂(u))``. Checked against direct
computations (a host attn1 replacement that perturbs the negative's rows on UNets, diffusers' SD3 PAG
processor on a twin MMDiT, the default placement's own perturbed prediction on Flux), with forward counts
equal to CFG's, SAG chained, several samplers, batch 2, the step window, and the CFG 1 warning.
"""
from __future__ import annotations

import logging

import comfy.ldm.modules.attention
import comfy.samplers
import pytest
import torch
from diffusers.models.attention_processor import PAGJointAttnProcessor2_0

from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.nodes.seg import SmoothedEnergyGuidance
from attention_guidance.pag_core import rescale_guided
from attention_guidance.patching.pag import PAGSettings
from support.dit_models import (
    SD3Twin, count_forwards, make_dit_conditioning, noisy_dit_latent, sd3_layer_patterns, tiny_dit,
)
from support.models import (
    build_model, count_model_calls, denoise_once, dual_cfg_guider, make_conditioning, sample, short_of_memory,
)
from support.seg_reference import direct_query_blur

UNCOND = "uncond branch"
OWN = "own branch"
NEGATIVE = 1


def pag(model, scale=3.0, layers="mid", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0,
        placement=UNCOND):
    return PerturbedAttentionGuidance.execute(model, scale, layers, adaptive_scale, start_percent, end_percent,
                                              rescale, placement).result[0]


def seg(model, scale=3.0, blur_sigma=10000.0, layers="mid", start_percent=0.0, end_percent=1.0, placement=UNCOND):
    return SmoothedEnergyGuidance.execute(model, scale, blur_sigma, layers, start_percent, end_percent,
                                          placement).result[0]


def sag(model, scale=0.75, layer="m0.0"):
    return SelfAttentionGuidance.execute(model, scale, 1.0, 1.0, 9, layer, 0.0, 1.0).result[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


_UNETS: dict = {}


def unet(family):
    if family not in _UNETS:
        _UNETS[family] = build_model(family, seed=0)
    return _UNETS[family]


def noisy_latent(model, t, shape=(1, 4, 8, 8), seed=1):
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[t].reshape(1)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return sampling.noise_scaling(sigma, noise, x0), sigma


def branches(model, positive, negative, x, sigma, cfg):
    """(cond x0, uncond x0) of one CFG evaluation of ``model``, as the host hands them to post-CFG functions."""
    kept = {}
    recorder = model.clone()

    def record(args):
        kept.update(cond=args["cond_denoised"].float(), uncond=args["uncond_denoised"].float())
        return args["denoised"]

    recorder.set_model_sampler_post_cfg_function(record)
    denoise_once(recorder, positive, negative, x, sigma, cfg)
    return kept["cond"], kept["uncond"]


# --- direct computations: the negative's rows perturbed by a plain host attn1 replacement ----------------

def on_negative_rows(perturb):
    """A host attn1 replacement: ``perturb(q, k, v, extra_options)`` for the rows of the chunks numbered 1 (the
    negative of the sampler's [positive, negative] call), the host's attention for every other row."""

    def replacement(q, k, v, extra_options):
        out = comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])
        chunks = extra_options["cond_or_uncond"]
        rows = q.shape[0] // len(chunks)
        for i, chunk in enumerate(chunks):
            if chunk == NEGATIVE:
                part = slice(i * rows, (i + 1) * rows)
                out[part] = perturb(q[part], k[part], v[part], extra_options)
        return out

    return replacement


def identity(q, k, v, extra_options):
    return v


def blurred_queries(blur_sigma):
    def perturb(q, k, v, extra_options):
        grid = tuple(extra_options["activations_shape"][-2:])
        blurred = direct_query_blur(q, grid, blur_sigma, 1).to(q.dtype)
        return comfy.ldm.modules.attention.optimized_attention(blurred, k, v, extra_options["n_heads"])

    return perturb


def direct(model, perturb):
    """``model`` whose middle block's self-attention perturbs the negative's rows (the layers 'mid')."""
    clone = model.clone()
    clone.set_model_attn1_replace(on_negative_rows(perturb), "middle", 0)
    return clone


NODES = {"pag": (pag, identity), "seg": (seg, blurred_queries(10000.0))}


# --- the equation ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("node", ["pag", "seg"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_result_is_cfg_with_the_perturbed_negative(family, node):
    model = unet(family)
    apply, perturb = NODES[node]
    positive, negative = make_conditioning(family, batch=2, seed=3)
    reference_model = direct(model, perturb)
    for t, cfg in ((800, 5.0), (300, 2.5)):
        x, sigma = noisy_latent(model, t, shape=(2, 4, 8, 12))
        ours = denoise_once(apply(model), positive, negative, x, sigma, cfg)
        cond, _ = branches(model, positive, negative, x, sigma, cfg)
        _, perturbed_uncond = branches(reference_model, positive, negative, x, sigma, cfg)
        expected = perturbed_uncond + cfg * (cond - perturbed_uncond)
        assert rel_err(ours, expected) < 1e-4
        # the perturbation itself moves the result, so the comparison means something
        assert rel_err(denoise_once(model, positive, negative, x, sigma, cfg), expected) > 1e-2


def test_seg_finite_blur_on_the_negative(family="sd15"):
    model = unet(family)
    positive, negative = make_conditioning(family, batch=1, seed=4)
    x, sigma = noisy_latent(model, 600, shape=(1, 4, 10, 6))
    ours = denoise_once(seg(model, blur_sigma=1.5), positive, negative, x, sigma, 4.0)
    expected = denoise_once(direct(model, blurred_queries(1.5)), positive, negative, x, sigma, 4.0)
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(denoise_once(model, positive, negative, x, sigma, 4.0), expected) > 1e-3


def test_the_scale_only_switches_and_rescale_applies_to_the_result():
    model = unet("sd15")
    positive, negative = make_conditioning("sd15", batch=2, seed=5)
    x, sigma = noisy_latent(model, 700, shape=(2, 4, 8, 8))
    at_three = denoise_once(pag(model, scale=3.0), positive, negative, x, sigma, 4.0)
    assert torch.equal(denoise_once(pag(model, scale=0.5), positive, negative, x, sigma, 4.0), at_three)
    off = pag(model, scale=0.0)
    assert torch.equal(denoise_once(off, positive, negative, x, sigma, 4.0),
                       denoise_once(model, positive, negative, x, sigma, 4.0))
    cond, _ = branches(model, positive, negative, x, sigma, 4.0)
    rescaled = denoise_once(pag(model, rescale=0.7), positive, negative, x, sigma, 4.0)
    assert rel_err(rescaled, rescale_guided(at_three, cond, 0.7)) < 1e-5
    assert rel_err(rescaled, at_three) > 1e-3
    # adaptive_scale: the negative is perturbed while s_t > 0 (t 699 here: s_t = 3 - 0.01 * 301 < 0)
    assert torch.equal(denoise_once(pag(model, adaptive_scale=0.01), positive, negative, x, sigma, 4.0),
                       denoise_once(model, positive, negative, x, sigma, 4.0))


@pytest.mark.parametrize("cfg", [5.0, 2.0])
def test_sd3_pag_equals_diffusers_pag_processor_on_the_negative(cfg):
    model = tiny_dit("sd3")
    twin = SD3Twin(model)
    positive, negative = make_dit_conditioning("sd3", batch=1, seed=7)
    x, sigma = noisy_dit_latent(model, 0.7, shape=(1, 16, 8, 10))
    ours = denoise_once(pag(model, layers="joint.1"), positive, negative, x, sigma, cfg)
    # diffusers' PAG processor without CFG takes [c, c_perturbed]: the negative twice, the second perturbed
    transformer = twin.transformer
    original = transformer.attn_processors
    processors = dict(original)
    for name in processors:
        if any(__import__("re").search(p, name.rsplit(".processor", 1)[0]) for p in sd3_layer_patterns([1])):
            processors[name] = PAGJointAttnProcessor2_0()
    hidden, pooled = twin.cond(negative)
    t = twin.timestep(sigma)
    transformer.set_attn_processor(processors)
    try:
        with torch.no_grad():
            both = transformer(hidden_states=torch.cat([x, x]), timestep=t.expand(2),
                               encoder_hidden_states=torch.cat([hidden, hidden]),
                               pooled_projections=torch.cat([pooled, pooled]), return_dict=False)[0]
    finally:
        transformer.set_attn_processor(original)
    perturbed_uncond = both[1:]
    velocity = perturbed_uncond + cfg * (twin.velocity(x, sigma, positive) - perturbed_uncond)
    expected = twin.to_x0(x, sigma, velocity)
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(denoise_once(model, positive, negative, x, sigma, cfg), expected) > 1e-2


@pytest.mark.parametrize("node", ["pag", "seg"])
def test_flux_uncond_is_the_same_perturbation_as_the_own_branch_copy(node):
    # the default placement perturbs a copy of the positive; given the negative as positive at CFG 1 and
    # scale 1 it returns u + (u - û), so û = 2u - D: the same perturbed prediction, taken from the copy
    model = tiny_dit("flux")
    apply = {"pag": pag, "seg": seg}[node]
    positive, negative = make_dit_conditioning("flux", batch=2, seed=8)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(2, 16, 8, 8))
    layers = "double.1,single.2"
    ours = denoise_once(apply(model, layers=layers), positive, negative, x, sigma, 3.5)
    copy_model = apply(model, scale=1.0, layers=layers, placement=OWN)
    uncond = denoise_once(model, negative, negative, x, sigma, 1.0)
    perturbed_uncond = 2 * uncond - denoise_once(copy_model, negative, negative, x, sigma, 1.0)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    expected = perturbed_uncond + 3.5 * (cond - perturbed_uncond)
    plain = denoise_once(model, positive, negative, x, sigma, 3.5)
    assert rel_err(ours, expected) < 1e-4
    # SEG moves this random tiny Flux's result by only about 2e-4 of its range: compare the perturbation's
    # own effect too, to 1 % of itself
    assert rel_err(plain, expected) > 1e-4
    assert rel_err(ours - plain, expected - plain) < 1e-2


# --- cost: CFG's forward, nothing batched ----------------------------------------------------------------

@pytest.mark.parametrize("node", ["pag", "seg"])
def test_unet_step_is_cfgs_forward(node):
    model = unet("sd15")
    apply = NODES[node][0]
    positive, negative = make_conditioning("sd15", batch=2, seed=9)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 8, 8))
    patched = apply(model)
    for guided in (model, patched):
        with count_model_calls(guided) as calls:
            denoise_once(guided, positive, negative, x, sigma, 4.0)
        assert [(c.batch_size, sorted(c.cond_or_uncond)) for c in calls] == [(4, [0, 1])]


def test_where_the_batch_does_not_fit_the_host_splits_it_as_for_cfg(monkeypatch):
    model = unet("sd15")
    positive, negative = make_conditioning("sd15", batch=2, seed=10)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 8, 8))
    patched = pag(model)
    whole = denoise_once(patched, positive, negative, x, sigma, 4.0)
    short_of_memory(monkeypatch)
    with count_model_calls(patched) as calls:
        split = denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert sorted(c.cond_or_uncond for c in calls) == [[0], [1]]
    assert rel_err(split, whole) < 1e-5


@pytest.mark.parametrize("node", ["pag", "seg"])
def test_dit_step_is_cfgs_forward(node):
    model = tiny_dit("flux")
    apply = NODES[node][0]
    positive, negative = make_dit_conditioning("flux", batch=1, seed=11)
    x, sigma = noisy_dit_latent(model, 0.5, shape=(1, 16, 8, 8))
    patched = apply(model, layers="double.1")
    with count_forwards(patched) as forwards:
        denoise_once(patched, positive, negative, x, sigma, 3.0)
    assert [(f.batch_size, sorted(f.cond_or_uncond)) for f in forwards] == [(2, [0, 1])]


# --- with SAG, samplers, batch, window -------------------------------------------------------------------

@pytest.mark.parametrize("order", ["sag first", "pag first"])
def test_sag_chained_guides_from_the_perturbed_negative(order):
    # SAG maps, blurs and re-evaluates the reference branch (the negative under CFG) in a pass of its own,
    # which the placement leaves unperturbed: the result is SAG on a model whose CFG negative is perturbed
    model = unet("sd15")
    positive, negative = make_conditioning("sd15", batch=2, seed=12)
    x, sigma = noisy_latent(model, 600, shape=(2, 4, 8, 8))
    patched = pag(sag(model)) if order == "sag first" else sag(pag(model))
    with count_model_calls(patched) as calls:
        ours = denoise_once(patched, positive, negative, x, sigma, 4.0)
    # CFG's forward, SAG's degraded pass; where SAG's layer is one PAG perturbs and SAG was applied first
    # (below PAG), PAG computes the negative's rows there without SAG's recorder, so SAG records its map in a
    # pass of its own (the same map: PAG's layer sees the same queries and keys)
    expected_calls = [[0, 1], [0], [0]] if order == "sag first" else [[0, 1], [0]]
    assert [sorted(c.cond_or_uncond) for c in calls] == expected_calls
    expected = denoise_once(sag(direct(model, identity)), positive, negative, x, sigma, 4.0)
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(denoise_once(sag(model), positive, negative, x, sigma, 4.0), expected) > 1e-2


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_samplers_give_the_direct_computations_result(sampler):
    model = unet("sd15")
    positive, negative = make_conditioning("sd15", batch=2, seed=13)
    latent = torch.zeros(2, 4, 8, 8)
    ours = sample(pag(model), positive, negative, latent, sampler_name=sampler, steps=3, cfg=5.0, seed=2)
    expected = sample(direct(model, identity), positive, negative, latent, sampler_name=sampler, steps=3, cfg=5.0,
                      seed=2)
    plain = sample(model, positive, negative, latent, sampler_name=sampler, steps=3, cfg=5.0, seed=2)
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(plain, expected) > 1e-2


def test_batch_rows_are_guided_independently():
    model = unet("sd15")
    positive, negative = make_conditioning("sd15", batch=2, seed=14)
    x, sigma = noisy_latent(model, 600, shape=(2, 4, 8, 8))
    patched = seg(model, blur_sigma=2.0)
    both = denoise_once(patched, positive, negative, x, sigma, 5.0)

    def row(conditioning, i):
        return [[c[0][i:i + 1], {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                                 for k, v in c[1].items()}] for c in conditioning]

    for i in range(2):
        single = denoise_once(patched, row(positive, i), row(negative, i), x[i:i + 1], sigma, 5.0)
        assert rel_err(single, both[i:i + 1]) < 1e-4


@pytest.mark.parametrize("node", ["pag", "seg"])
def test_outside_the_window_the_negative_is_not_perturbed(node):
    model = unet("sd15")
    apply, perturb = NODES[node]
    positive, negative = make_conditioning("sd15", batch=1, seed=15)
    early = apply(model, start_percent=0.0, end_percent=0.5)
    x, sigma = noisy_latent(model, 200)  # late: outside
    with count_model_calls(early) as calls:
        out = denoise_once(early, positive, negative, x, sigma, 4.0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1]]
    assert torch.equal(out, denoise_once(model, positive, negative, x, sigma, 4.0))
    x, sigma = noisy_latent(model, 950)  # early: inside
    out = denoise_once(early, positive, negative, x, sigma, 4.0)
    assert rel_err(out, denoise_once(direct(model, perturb), positive, negative, x, sigma, 4.0)) < 1e-4


def test_a_window_over_a_sampled_run_perturbs_only_its_steps():
    model = unet("sd15")
    positive, negative = make_conditioning("sd15", batch=1, seed=16)
    latent = torch.zeros(1, 4, 8, 8)
    sampling = model.get_model_object("model_sampling")
    high, low = sampling.percent_to_sigma(0.3), sampling.percent_to_sigma(0.8)
    seen = []

    def in_window(q, k, v, extra_options):
        sigma = float(extra_options["sigmas"][0])
        seen.append(low <= sigma <= high)
        return v if seen[-1] else comfy.ldm.modules.attention.optimized_attention(q, k, v, extra_options["n_heads"])

    ours = sample(pag(model, start_percent=0.3, end_percent=0.8), positive, negative, latent, steps=6, cfg=4.0, seed=3)
    expected = sample(direct(model, in_window), positive, negative, latent, steps=6, cfg=4.0, seed=3)
    assert True in seen and False in seen  # the run had steps on both sides of the window
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(ours, sample(pag(model), positive, negative, latent, steps=6, cfg=4.0, seed=3)) > 1e-3


# --- where the placement does nothing: said once per run -------------------------------------------------

def warnings_of(caplog, words):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and all(w in r.getMessage() for w in words)]


@pytest.mark.parametrize("node, name", [("pag", "Perturbed-Attention Guidance"), ("seg", "Smoothed Energy Guidance")])
def test_at_cfg_1_it_says_once_per_run_that_it_does_nothing(node, name, caplog):
    model = unet("sd15")
    patched = NODES[node][0](model)
    positive, negative = make_conditioning("sd15", batch=1, seed=17)
    latent = torch.zeros(1, 4, 8, 8)
    plain = sample(model, positive, negative, latent, steps=3, cfg=1.0, seed=4)
    for run in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING), count_model_calls(patched) as calls:
            out = sample(patched, positive, negative, latent, steps=3, cfg=1.0, seed=4)
        assert torch.equal(out, plain)
        assert [sorted(c.cond_or_uncond) for c in calls] == [[0]] * 3
        warned = warnings_of(caplog, [name, "'uncond branch'", "does nothing", "CFG 1", "'own branch'", "raise CFG"])
        assert len(warned) == 1, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sample(patched, positive, negative, latent, steps=2, cfg=3.0, seed=4)
    assert warnings_of(caplog, [name]) == []


def test_a_guider_without_a_cfg_negative_gets_the_warning_and_an_unchanged_result(caplog):
    model = unet("sd15")
    positive, negative = make_conditioning("sd15", batch=1, seed=18)
    middle, _ = make_conditioning("sd15", batch=1, seed=19)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 2)
    results = []
    for guided in (model, pag(model)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            results.append(dual_cfg_guider(guided, positive, middle, negative).sample(
                torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.zeros(1, 4, 8, 8),
                comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=1))
    assert torch.equal(results[0], results[1])
    assert len(warnings_of(caplog, ["Perturbed-Attention Guidance", "does nothing", "[positive, negative]"])) == 1


def test_the_placement_input_is_last_optional_and_defaults_to_the_own_branch():
    for node in (PerturbedAttentionGuidance, SmoothedEnergyGuidance):
        schema = node.define_schema()
        last = schema.inputs[-1]
        assert last.id == "placement" and last.optional
        assert last.options == [OWN, UNCOND] and last.default == OWN
    with pytest.raises(ValueError) as error:
        PAGSettings(scale=3.0, layers="mid", placement="negative")
    assert "placement" in str(error.value) and "'uncond branch'" in str(error.value)
