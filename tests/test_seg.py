"""SEG in the real host: the node's patch on tiny models of the real architectures, through the host's own
sampler path; against the reference pipeline's computation on a diffusers twin with identical weights
(square latents), against a direct computation from the layer's own queries where the reference cannot
go (non-square and odd grids, joint text-image attention), and chained with PAG and SAG."""
import math

import comfy.patcher_extension
import pytest
import torch

from attention_guidance.guidance_core.layer_spec import LayerSpecError
from attention_guidance.patching.options import chunk_ids
from attention_guidance.patching.unet_attention import host_attention
from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.nodes.seg import SmoothedEnergyGuidance
from support.diffusers_twin import make_twin
from support.dit_models import build_dit, empty_dit_latent, make_dit_conditioning, noisy_dit_latent
from support.models import build_model, count_model_calls, denoise_once, make_conditioning, short_of_memory
from support.seg_reference import direct_query_blur, seg_reference

FAMILIES = ["sd15", "sd2v", "sdxl"]
DIT_FAMILIES = ["sd3", "sd35", "flux", "flux2", "chroma", "chroma_radiance", "qwen_image"]
DIT_BLOCK = {"sd3": "joint.1", "sd35": "joint.0", "flux": "single.2", "flux2": "double.1", "chroma": "double.1",
             "chroma_radiance": "single.2", "qwen_image": "double.1"}


def seg(model, scale=3.0, blur_sigma=10000.0, layers="mid", start_percent=0.0, end_percent=1.0):
    return SmoothedEnergyGuidance.execute(model, scale, blur_sigma, layers, start_percent, end_percent).result[0]


def pag(model, scale=3.0, layers="mid"):
    return PerturbedAttentionGuidance.execute(model, scale, layers, 0.0, 0.0, 1.0, 0.0).result[0]


def sag(model, scale=0.75, layer="m0.0"):
    return SelfAttentionGuidance.execute(model, scale, 1.0, 1.0, 9, layer, 0.0, 1.0).result[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


_MODELS: dict = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = build_dit(family, seed=0) if family in DIT_FAMILIES else build_model(family, seed=0)
    return _MODELS[family]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def twin(family):
    return make_twin(tiny(family))


def noisy_latent(model, t, shape=(1, 4, 16, 16), seed=1):
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[t].reshape(1)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return sampling.noise_scaling(sigma, noise, x0), sigma


# --- the reference pipeline on square latents ------------------------------------------------------------

# 16x16 latents: the mid block's grid is 8x8 on the SD1.x / SD2.x models, 4x4 on the SDXL one; sigma 3
# (19 taps) is clamped to the grid on all of them, sigma 1 (7 taps) on the SDXL one
@pytest.mark.parametrize("cfg", [5.0, 1.0])
@pytest.mark.parametrize("blur_sigma", [1.0, 3.0, 9999999.0])
def test_one_step_is_the_reference_pipelines(family, twin, cfg, blur_sigma):
    model = tiny(family)
    positive, negative = make_conditioning(family, batch=1, seed=3)
    patched = seg(model, scale=3.0, blur_sigma=blur_sigma)
    for t in (900, 400):
        x, sigma = noisy_latent(model, t, seed=t)
        ours = denoise_once(patched, positive, negative, x, sigma, cfg)
        reference = seg_reference(twin, x, sigma, positive, negative, cfg=cfg, seg_scale=3.0, blur_sigma=blur_sigma)
        unguided = denoise_once(model, positive, negative, x, sigma, cfg)
        assert rel_err(ours, reference) < 1e-3, t
        # the SEG term itself is not negligible, so the comparison above means something
        assert rel_err(unguided, reference) > 1e-2, t


def test_finite_and_infinite_blur_are_different_perturbations(family, twin):
    # what diffusers' hook gets wrong: a finite sigma must not be the mean query
    model = tiny(family)
    positive, negative = make_conditioning(family, batch=1, seed=4)
    x, sigma = noisy_latent(model, 600)
    finite = denoise_once(seg(model, blur_sigma=1.0), positive, negative, x, sigma, 4.0)
    infinite = denoise_once(seg(model, blur_sigma=10000.0), positive, negative, x, sigma, 4.0)
    assert rel_err(finite, infinite) > 1e-2


# --- where the reference cannot go: the layer's own queries, blurred directly ----------------------------

def recording_attn1(calls):
    """Another pack's attn1 replacement: the host's attention, recording (chunk ids, q, grid) of every call."""

    def record(q, k, v, extra_options, **kwargs):
        calls.append((chunk_ids(extra_options), q.clone(), tuple(extra_options["activations_shape"][-2:])))
        return host_attention(q, k, v, extra_options, **kwargs)

    return record


@pytest.mark.parametrize("latent_hw", [(16, 24), (18, 13), (9, 11)])
@pytest.mark.parametrize("blur_sigma", [1.5, 100.0, 10000.0])
def test_unet_queries_are_blurred_on_the_layers_own_grid(latent_hw, blur_sigma):
    model = tiny("sd15")
    calls = []
    recorded = model.clone()
    recorded.set_model_attn1_replace(recording_attn1(calls), "middle", 0, 0)
    positive, negative = make_conditioning("sd15", batch=2, seed=5)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, *latent_hw))
    denoise_once(seg(recorded, blur_sigma=blur_sigma, layers="mid"), positive, negative, x, sigma, 4.0)
    # the chosen layer runs the positive and negative rows as before, then the copy's rows with their queries
    (rest_ids, rest_q, grid), (copy_ids, copy_q, copy_grid) = calls
    assert sorted(rest_ids) == [0, 1] and copy_ids == [2] and copy_grid == grid
    assert grid == tuple(math.ceil(side / 2) for side in latent_hw)
    start = 2 * rest_ids.index(0)
    positive_q = rest_q[start:start + 2]  # the copy's own queries before the blur are the positive's
    assert torch.allclose(copy_q.double(), direct_query_blur(positive_q, grid, blur_sigma, 1), atol=1e-5)
    assert not torch.allclose(copy_q, positive_q, atol=1e-3)


def recording_override(calls):
    """Another pack's attention override: the host's attention, recording (chunk ids, q as [B, heads, L, D])."""

    def record(func, *args, **kwargs):
        values = dict(zip(("q", "k", "v", "heads"), args), **kwargs)
        q = values["q"]
        if not values.get("skip_reshape"):
            q = q.reshape(q.shape[0], q.shape[1], values["heads"], -1).transpose(1, 2)
        calls.append((chunk_ids(values.get("transformer_options") or {}), q.clone()))
        return func(*args, **kwargs)

    return record


@pytest.mark.parametrize("blur_sigma", [2.0, 10000.0])
@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_dit_image_queries_are_blurred_and_text_queries_kept(family, blur_sigma):
    model = tiny(family)
    calls = []
    recorded = model.clone()
    recorded.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recording_override(calls)
    positive, negative = make_dit_conditioning(family, batch=1, seed=6)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 12))
    denoise_once(seg(recorded, blur_sigma=blur_sigma, layers=DIT_BLOCK[family]), positive, negative, x, sigma, 4.0)
    copies = [i for i, (ids, _) in enumerate(calls) if ids == [2]]
    # one attention in the block; SD3.5's joint.0 also has the image-only attn2, whose queries come from the
    # same input as the joint attention's
    assert len(copies) == (2 if family == "sd35" else 1)
    patch = model.get_model_object("diffusion_model").patch_size
    grid = tuple(math.ceil(side / patch) for side in x.shape[-2:])
    for copy in copies:
        (rest_ids, rest_q), (_, copy_q) = calls[copy - 1], calls[copy]
        assert sorted(rest_ids) == [0, 1]
        text = copy_q.shape[2] - grid[0] * grid[1]
        positive_q = rest_q[rest_ids.index(0):rest_ids.index(0) + 1]
        assert text > 0 or (family == "sd35" and copy == copies[1])
        assert torch.allclose(copy_q[:, :, :text], positive_q[:, :, :text], atol=1e-5)
        image = positive_q[:, :, text:]
        blurred = direct_query_blur(image.transpose(1, 2).flatten(2), grid, blur_sigma, 1)
        expected = blurred.reshape(image.shape[0], image.shape[2], image.shape[1], -1).transpose(1, 2)
        assert torch.allclose(copy_q[:, :, text:].double(), expected, atol=1e-5)
        assert not torch.allclose(copy_q[:, :, text:], image, atol=1e-3)


@pytest.mark.parametrize("family, block", [("flux", "double.1"), ("qwen_image", "double.1")])
def test_reference_image_tokens_of_flux_kontext_and_qwen_image_edit_keep_their_queries(family, block):
    # reference latents add image tokens after the generated image's: only the generated grid is blurred
    model = tiny(family)
    calls = []
    recorded = model.clone()
    recorded.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = recording_override(calls)
    positive, negative = make_dit_conditioning(family, batch=1, seed=15)
    reference = torch.randn(empty_dit_latent(model, (1, 16, 6, 6)).shape, generator=torch.Generator().manual_seed(16))
    with_reference = [[positive[0][0], {**positive[0][1], "reference_latents": [reference]}]]
    x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 10))
    denoise_once(seg(recorded, blur_sigma=1.5, layers=block), with_reference, negative, x, sigma, 3.0)
    copy = next(i for i, (ids, _) in enumerate(calls) if ids == [2])
    (rest_ids, rest_q), (_, copy_q) = calls[copy - 1], calls[copy]
    positive_q = rest_q[rest_ids.index(0):rest_ids.index(0) + 1]
    text, image = 7, 4 * 5
    assert copy_q.shape[2] == text + image + 3 * 3  # the reference's 3x3 tokens after the image's 4x5
    assert torch.allclose(copy_q[:, :, text + image:], positive_q[:, :, text + image:], atol=1e-5)
    generated = positive_q[:, :, text:text + image]
    blurred = direct_query_blur(generated.transpose(1, 2).flatten(2), (4, 5), 1.5, 1)
    expected = blurred.reshape(1, image, generated.shape[1], -1).transpose(1, 2)
    assert torch.allclose(copy_q[:, :, text:text + image].double(), expected, atol=1e-5)


# --- one forward per step, chaining with PAG and SAG -----------------------------------------------------

def test_the_blurred_copy_rides_in_the_samplers_forward_also_beside_pags():
    model = tiny("sd15")
    positive, negative = make_conditioning("sd15", batch=1)
    x, sigma = noisy_latent(model, 500)
    for patched, with_cfg, cfg_1 in ((seg(model), [0, 1, 2], [0, 2]),
                                     (pag(seg(model)), [0, 1, 2, 3], [0, 2, 3]),
                                     (seg(pag(model)), [0, 1, 2, 3], [0, 2, 3])):
        with count_model_calls(patched) as calls:
            denoise_once(patched, positive, negative, x, sigma, 4.0)
        assert [sorted(c.cond_or_uncond) for c in calls] == [with_cfg]
        with count_model_calls(patched) as calls:
            denoise_once(patched, positive, negative, x, sigma, 1.0)
        assert [sorted(c.cond_or_uncond) for c in calls] == [cfg_1]


@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_where_the_batch_does_not_fit_the_blurred_copy_runs_alone_with_the_same_result(cfg, monkeypatch):
    model = tiny("sdxl")
    positive, negative = make_conditioning("sdxl", batch=2, seed=10)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 16, 12))
    patched = seg(model, blur_sigma=2.0)
    whole = denoise_once(patched, positive, negative, x, sigma, cfg)
    short_of_memory(monkeypatch)
    with count_model_calls(patched) as calls:
        split = denoise_once(patched, positive, negative, x, sigma, cfg)
    assert sorted(c.cond_or_uncond for c in calls) == ([[0], [1], [2]] if cfg > 1.0 else [[0], [2]])
    assert rel_err(split, whole) < 1e-5


CHAINS = {
    "seg+pag": (lambda m: pag(seg(m)), lambda m: seg(m), lambda m: pag(m)),
    "pag+seg": (lambda m: seg(pag(m)), lambda m: seg(m), lambda m: pag(m)),
    "seg+sag": (lambda m: sag(seg(m)), lambda m: seg(m), lambda m: sag(m)),
    "sag+seg": (lambda m: seg(sag(m)), lambda m: seg(m), lambda m: sag(m)),
    # on the tiny random Flux, whose attention is nearly flat, blurred queries move the result by 4e-4 per
    # unit of scale, hence the scale
    "seg+pag (blocks)": (lambda m: pag(seg(m, scale=100.0, layers="double.1"), layers="double.1-2"),
                         lambda m: seg(m, scale=100.0, layers="double.1"), lambda m: pag(m, layers="double.1-2")),
}


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("chain", CHAINS)
def test_chained_with_pag_or_sag_every_term_is_there(chain, cfg):
    family = "flux" if "blocks" in chain else "sdxl"
    model = tiny(family)
    if family == "flux":
        positive, negative = make_dit_conditioning(family, batch=1, seed=7)
        x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 10))
    else:
        positive, negative = make_conditioning(family, batch=1, seed=7)
        x, sigma = noisy_latent(model, 500, shape=(1, 4, 16, 20))
    both, first, second = (make(model) for make in CHAINS[chain])
    plain = denoise_once(model, positive, negative, x, sigma, cfg)
    first_alone = denoise_once(first, positive, negative, x, sigma, cfg)
    second_alone = denoise_once(second, positive, negative, x, sigma, cfg)
    chained = denoise_once(both, positive, negative, x, sigma, cfg)
    # cfg + s1 (c - p1) + s2 (c - p2): each node's term, as it adds it alone
    assert rel_err(chained, first_alone + second_alone - plain) < 1e-4
    assert rel_err(first_alone, plain) > 1e-2 and rel_err(second_alone, plain) > 1e-2


# --- the node's inputs ---------------------------------------------------------------------------------

def test_scale_zero_and_outside_the_window_change_nothing():
    model = tiny("sd15")
    positive, negative = make_conditioning("sd15", batch=1, seed=8)
    x, sigma = noisy_latent(model, 300)  # late in the schedule
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    for patched in (seg(model, scale=0.0), seg(model, end_percent=0.2)):
        with count_model_calls(patched) as calls:
            assert torch.equal(denoise_once(patched, positive, negative, x, sigma, 4.0), plain)
        assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1]]
    assert rel_err(denoise_once(seg(model, start_percent=0.5), positive, negative, x, sigma, 4.0), plain) > 1e-2


def test_a_host_that_gives_no_token_grid_is_told_to_update():
    # ComfyUI 0.3.64's SpatialTransformer sets no transformer_options["activations_shape"] (0.3.75 does,
    # comfy/ldm/modules/attention.py): the forward's options here keep every key but that one
    class OptionsWithoutGrid(dict):
        def __setitem__(self, key, value):
            if key != "activations_shape":
                super().__setitem__(key, value)

    def as_0_3_64(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        return executor(x, t, c_concat, c_crossattn, control, OptionsWithoutGrid(transformer_options), **kwargs)

    model = tiny("sd15")
    patched = seg(model)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_0_3_64", as_0_3_64)
    positive, negative = make_conditioning("sd15", batch=1, seed=9)
    x, sigma = noisy_latent(model, 500)
    with pytest.raises(RuntimeError, match=r"SEG layers 'mid': this ComfyUI does not tell .* Update ComfyUI"):
        denoise_once(patched, positive, negative, x, sigma, 4.0)


def test_errors_name_the_input_and_the_fix():
    model = tiny("sd15")
    with pytest.raises(LayerSpecError, match=r"^SEG layers: Layer 'u9' does not exist"):
        seg(model, layers="u9")
    with pytest.raises(ValueError, match=r"SEG blur_sigma is 0.1: .* Use more than 1/6"):
        seg(model, blur_sigma=0.1)
    with pytest.raises(ValueError, match=r"start_percent \(0.8\) is after end_percent \(0.2\)"):
        seg(model, start_percent=0.8, end_percent=0.2)
    with pytest.raises(LayerSpecError, match=r"^SEG layers: .*not as UNet layers"):
        seg(tiny("flux"), layers="mid")
