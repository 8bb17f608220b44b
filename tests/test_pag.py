"""PAG in the real host: the node's patch on tiny models of the real architectures, sampled through
the host's own samplers, compared with diffusers' PAG code and with the host's built-in PAG node."""
import math

import pytest
import comfy.samplers
import nodes as host_nodes
import torch
from comfy_extras.nodes_pag import PerturbedAttentionGuidance as HostPAG

from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.patching.families import UnsupportedModelError
from support.diffusers_twin import make_twin, pag_reference
from support.models import (
    build_model, count_model_calls, denoise_once, dual_cfg_guider, make_conditioning, sample, short_of_memory,
    tiny_controlnet,
)

FAMILIES = ["sd15", "sd2v", "sdxl"]


def pag(model, scale=3.0, layers="mid", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0):
    return PerturbedAttentionGuidance.execute(
        model, scale, layers, adaptive_scale, start_percent, end_percent, rescale
    ).result[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return build_model(family, seed=0)


@pytest.fixture(scope="module")
def twin(model):
    return make_twin(model)


def noisy_latent(model, t, shape=(1, 4, 8, 8), seed=1):
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[t].reshape(1)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return sampling.noise_scaling(sigma, noise, x0), sigma


LAYER_SPECS = {
    "sd15": ["mid", "down_blocks.1", "up_blocks.0.attentions.1", "d0,m0,u3"],
    "sd2v": ["mid", "down_blocks.1", "up_blocks.0.attentions.1", "d0,m0,u3"],
    "sdxl": ["mid", "down_blocks.1.attentions.0", "m0.1", "d2.0-1,u0.1"],
}


@pytest.mark.parametrize("cfg", [5.0, 1.0])
@pytest.mark.parametrize("t", [999, 750, 400, 50])
def test_one_step_matches_diffusers_pag(family, model, twin, cfg, t):
    x, sigma = noisy_latent(model, t)
    positive, negative = make_conditioning(family, batch=1, seed=3)
    for spec in LAYER_SPECS[family]:
        ours = denoise_once(pag(model, scale=3.0, layers=spec), positive, negative, x, sigma, cfg)
        reference = pag_reference(twin, x, sigma, positive, negative, cfg=cfg, pag_scale=3.0, pag_layers=spec)
        unguided = denoise_once(model, positive, negative, x, sigma, cfg)
        assert rel_err(ours, reference) < 1e-3, spec
        # the PAG term itself is not negligible, so the comparison above means something
        assert rel_err(unguided, reference) > 1e-2, spec


def test_adaptive_scale_matches_diffusers(family, model, twin):
    positive, negative = make_conditioning(family, batch=1, seed=4)
    for t in (950, 900):
        x, sigma = noisy_latent(model, t)
        ours = denoise_once(pag(model, scale=3.0, adaptive_scale=0.02), positive, negative, x, sigma, 4.0)
        reference = pag_reference(twin, x, sigma, positive, negative, cfg=4.0, pag_scale=3.0, pag_layers="mid",
                                  adaptive_scale=0.02)
        assert rel_err(ours, reference) < 1e-3


def test_one_forward_of_three_chunks_with_cfg_and_two_without(model, family):
    positive, negative = make_conditioning(family, batch=1)
    x, sigma = noisy_latent(model, 500)
    patched = pag(model)
    with count_model_calls(patched) as calls:
        denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1, 2]]
    with count_model_calls(patched) as calls:
        denoise_once(patched, positive, negative, x, sigma, 1.0)
    # CFG 1: no uncond pass at all, the perturbed copy rides with the positive
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 2]]


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_where_the_batch_does_not_fit_the_perturbed_copy_runs_alone_with_the_same_result(model, family, cfg, monkeypatch):
    positive, negative = make_conditioning(family, batch=2, seed=3)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 8, 8))
    patched = pag(model)
    whole = denoise_once(patched, positive, negative, x, sigma, cfg)
    short_of_memory(monkeypatch)
    with count_model_calls(patched) as calls:
        split = denoise_once(patched, positive, negative, x, sigma, cfg)
    # the host's own split: one forward per cond entry, the perturbed copy (id 2) among them
    assert sorted(c.cond_or_uncond for c in calls) == ([[0], [1], [2]] if cfg > 1.0 else [[0], [2]])
    assert rel_err(split, whole) < 1e-5


def test_a_guider_that_guides_with_another_list_stops_getting_the_copy_batched():
    # DualCFGGuider evaluates [negative, middle, positive], then runs CFG of middle against negative:
    # the copy of the main call's first list (the negative) is not what PAG guides with, so PAG runs
    # the middle's perturbed pass on its own (tests/test_reliability.py: the result), and from the
    # next step on batches no copy; a new run tries again
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=41)
    middle, _ = make_conditioning("sd15", batch=1, seed=42)
    patched = pag(model, scale=2.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    for run in range(2):
        with count_model_calls(patched) as calls:
            guider = dual_cfg_guider(patched, positive, middle, negative)
            guider.sample(torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"),
                          sigmas, disable_pbar=True, seed=1)
        assert [len(call.cond_or_uncond) for call in calls] == [4, 1, 3, 1, 3, 1]


def test_scale_zero_and_outside_the_window_do_no_extra_work(model, family):
    positive, negative = make_conditioning(family, batch=1)
    x, sigma = noisy_latent(model, 200)  # late in sampling: outside a 0.0-0.5 window
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    off = pag(model, scale=0.0)
    assert "sampler_post_cfg_function" not in off.model_options
    assert torch.equal(denoise_once(off, positive, negative, x, sigma, 4.0), plain)
    early = pag(model, end_percent=0.5)
    with count_model_calls(early) as calls:
        out = denoise_once(early, positive, negative, x, sigma, 4.0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1]]
    assert torch.equal(out, plain)
    x_hi, sigma_hi = noisy_latent(model, 950)
    with count_model_calls(early) as calls:
        denoise_once(early, positive, negative, x_hi, sigma_hi, 4.0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1, 2]]


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (1, 4, 8, 12), (2, 4, 12, 8)])
def test_batch_and_non_square_latents_match_diffusers(model, twin, family, shape):
    x, sigma = noisy_latent(model, 600, shape=shape)
    positive, negative = make_conditioning(family, batch=shape[0], seed=5)
    ours = denoise_once(pag(model), positive, negative, x, sigma, 5.0)
    reference = pag_reference(twin, x, sigma, positive, negative, cfg=5.0, pag_scale=3.0, pag_layers="mid")
    assert rel_err(ours, reference) < 1e-3


def test_batch_rows_are_guided_independently(model, family):
    x, sigma = noisy_latent(model, 600, shape=(2, 4, 8, 8))
    positive, negative = make_conditioning(family, batch=2, seed=6)
    patched = pag(model, layers="mid,u0")
    both = denoise_once(patched, positive, negative, x, sigma, 5.0)
    for i in range(2):
        row = [[c[0][i : i + 1], {k: (v[i : i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                                   for k, v in c[1].items()}] for c in positive]
        neg = [[c[0][i : i + 1], {k: (v[i : i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                                   for k, v in c[1].items()}] for c in negative]
        single = denoise_once(patched, row, neg, x[i : i + 1], sigma, 5.0)
        assert rel_err(single, both[i : i + 1]) < 1e-4


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "uni_pc", "ddim"])
def test_every_sampler_family_equals_the_host_pag_node_on_mid(sampler):
    # The host's own PAG node perturbs the whole middle block in a separate pass with the same
    # formula; ours batches the pass. Any sampler must give the same latent.
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=7)
    latent = torch.zeros(1, 4, 8, 8)
    ours = sample(pag(model, scale=2.0), positive, negative, latent, sampler_name=sampler, steps=4, cfg=4.0, seed=11)
    host = sample(HostPAG.execute(model, 2.0).result[0], positive, negative, latent, sampler_name=sampler, steps=4,
                  cfg=4.0, seed=11)
    plain = sample(model, positive, negative, latent, sampler_name=sampler, steps=4, cfg=4.0, seed=11)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, host) < 1e-4
    assert rel_err(plain, host) > 1e-3


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_controlnet_runs_for_the_perturbed_copy_too(cfg):
    # The copy carries the positive's ControlNet, so the batched forward runs the ControlNet on every
    # chunk, and the result is the host's PAG node's (which runs the ControlNet in its separate pass).
    model = build_model("sd15", seed=0)
    control, control_model = tiny_controlnet(model, seed=1)
    positive, negative = make_conditioning("sd15", batch=2, seed=15)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    positive, negative = host_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, 1.0,
                                                                               0.0, 1.0)
    x, sigma = noisy_latent(model, 600, shape=(2, 4, 8, 8))
    control_rows = []
    handle = control_model.register_forward_hook(
        lambda module, args, kwargs, out: control_rows.append(kwargs["x"].shape[0]), with_kwargs=True)
    try:
        ours = denoise_once(pag(model, scale=2.0), positive, negative, x, sigma, cfg)
        assert control_rows == ([6] if cfg > 1.0 else [4])
        host = denoise_once(HostPAG.execute(model, 2.0).result[0], positive, negative, x, sigma, cfg)
    finally:
        handle.remove()
    assert rel_err(ours, host) < 1e-4
    without_control = denoise_once(pag(model, scale=2.0), *make_conditioning("sd15", batch=2, seed=15), x, sigma, cfg)
    assert rel_err(ours, without_control) > 1e-3


def test_two_pag_nodes_both_act_in_one_forward(model, family):
    positive, negative = make_conditioning(family, batch=1, seed=8)
    x, sigma = noisy_latent(model, 700)
    base = denoise_once(model, positive, negative, x, sigma, 4.0)
    first = pag(model, scale=2.0, layers="mid")
    second_alone = pag(model, scale=1.5, layers="u0")
    chained = pag(first, scale=1.5, layers="u0")
    with count_model_calls(chained) as calls:
        both = denoise_once(chained, positive, negative, x, sigma, 4.0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1, 2, 3]]
    one = denoise_once(first, positive, negative, x, sigma, 4.0)
    two = denoise_once(second_alone, positive, negative, x, sigma, 4.0)
    assert rel_err(both, base + (one - base) + (two - base)) < 1e-4


@pytest.mark.parametrize("ours_first", [True, False])
def test_chains_with_the_host_pag_node_on_the_same_layer(ours_first):
    model = build_model("sdxl", seed=0)
    positive, negative = make_conditioning("sdxl", batch=1, seed=9)
    x, sigma = noisy_latent(model, 700)
    base = denoise_once(model, positive, negative, x, sigma, 4.0)
    ours_alone = denoise_once(pag(model, scale=2.0, layers="mid"), positive, negative, x, sigma, 4.0)
    host_alone = denoise_once(HostPAG.execute(model, 1.0).result[0], positive, negative, x, sigma, 4.0)
    if ours_first:
        chained = HostPAG.execute(pag(model, scale=2.0, layers="mid"), 1.0).result[0]
    else:
        chained = pag(HostPAG.execute(model, 1.0).result[0], scale=2.0, layers="mid")
    both = denoise_once(chained, positive, negative, x, sigma, 4.0)
    assert rel_err(both, base + (ours_alone - base) + (host_alone - base)) < 1e-4


def test_keeps_another_packs_attn1_replacement(family, model):
    # A foreign replacement on the same site (here: attention with doubled output) must still run
    # for every row PAG does not perturb, before and after our node.
    positive, negative = make_conditioning(family, batch=1, seed=10)
    x, sigma = noisy_latent(model, 700)
    seen = []

    def doubled_attention(q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        seen.append(list(extra_options["cond_or_uncond"]))
        return 2.0 * attention.optimized_attention(q, k, v, extra_options["n_heads"])

    foreign = model.clone()
    foreign.set_model_attn1_replace(doubled_attention, "middle", 0)
    foreign_only = denoise_once(foreign, positive, negative, x, sigma, 4.0)
    seen.clear()
    ours_on_foreign = pag(foreign, scale=3.0, layers="mid")
    out = denoise_once(ours_on_foreign, positive, negative, x, sigma, 4.0)
    assert seen and all(2 not in chunks for chunks in seen) and any(0 in chunks for chunks in seen)
    # the perturbed prediction does not depend on the foreign patch (PAG replaces attention there):
    # recover it from PAG on the plain model, then predict PAG on the foreign model exactly
    plain_cfg = denoise_once(model, positive, negative, x, sigma, 4.0)
    plain_pag = denoise_once(pag(model, scale=3.0, layers="mid"), positive, negative, x, sigma, 4.0)
    perturbed = denoise_once(model, positive, negative, x, sigma, 1.0) - (plain_pag - plain_cfg) / 3.0
    foreign_cond = denoise_once(foreign, positive, negative, x, sigma, 1.0)
    assert rel_err(out, foreign_only + 3.0 * (foreign_cond - perturbed)) < 1e-4
    assert rel_err(foreign_only, plain_cfg) > 1e-3


def test_rescale_one_matches_the_positive_spread(model, family):
    positive, negative = make_conditioning(family, batch=2, seed=12)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 8, 8))
    out = denoise_once(pag(model, scale=6.0, rescale=1.0), positive, negative, x, sigma, 1.0)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    assert torch.allclose(out.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)), rtol=1e-4)
    half = denoise_once(pag(model, scale=6.0, rescale=0.5), positive, negative, x, sigma, 1.0)
    none = denoise_once(pag(model, scale=6.0), positive, negative, x, sigma, 1.0)
    assert rel_err(half, 0.5 * out + 0.5 * none) < 1e-4


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(scale=math.nan), ["scale", "nan"]),
        (dict(scale=-1.0), ["scale", "-1.0"]),
        (dict(adaptive_scale=2.0), ["adaptive_scale"]),
        (dict(rescale=1.5), ["rescale"]),
        (dict(start_percent=0.8, end_percent=0.2), ["start_percent", "end_percent"]),
        (dict(layers="u42"), ["u42", "does not exist", "m0 = mid_block.attentions.0"]),
    ],
)
def test_bad_inputs_name_the_input(kwargs, words):
    model = build_model("sd15", seed=0)
    with pytest.raises(ValueError) as error:
        pag(model, **kwargs)
    for word in words:
        assert word in str(error.value)


def test_an_unsupported_dit_model_is_refused_by_name():
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    # Hunyuan3D 2 (a shape model the pack never guides; AuraFlow, then HunyuanDiT were the example until the pack
    # learned them)
    hunyuan3d = comfy.supported_models.Hunyuan3Dv2({"image_model": "hunyuan3d2"}).get_model({}, device="meta")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(hunyuan3d, load_device=cpu, offload_device=cpu)
    with pytest.raises(UnsupportedModelError) as error:
        pag(patcher)
    message = str(error.value)
    assert "Hunyuan3Dv2" in message and "SD1.x" in message and "Flux" in message
    assert "PixArt" in message and "HunyuanDiT" in message  # supported now
