"""sag_core against diffusers' own SAG code (pipeline_stable_diffusion_sag.py) and ComfyUI's sampling maths."""
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    CrossAttnStoreProcessor,
    StableDiffusionSAGPipeline,
)
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
    gaussian_blur_2d as diffusers_gaussian_blur_2d,
)
from diffusers.schedulers.scheduling_ddim import DDIMScheduler

from attention_guidance.guidance_core.token_grid import token_grid
from attention_guidance.sag_core import (
    MASS_TOLERANCE,
    blur_under_mask,
    effective_kernel_size,
    gaussian_blur_2d,
    gaussian_kernel_1d,
    key_attention_mass,
    sag_guided,
    sag_mask,
    upsample_mask,
    validate_sag_inputs,
)
from support.sag_reference import attention_with_key_mass, renoise_flow, renoise_ve, sag_degraded_x0


def generator(seed):
    return torch.Generator().manual_seed(seed)


def sd_scheduler(prediction_type="epsilon"):
    # The scheduler config of diffusers' SAG fast test (SD1.x betas).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )


def sag_pipeline_stand_in(heads, scheduler):
    """The attributes StableDiffusionSAGPipeline.sag_masking / pred_x0 / pred_epsilon read from self."""
    return SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(attention_head_dim=heads)), scheduler=scheduler)


def diffusers_self_attention(batch, tokens, heads, dim_head, seed, spread=3.0):
    """A diffusers Attention layer with CrossAttnStoreProcessor run on random tokens.

    Returns (q, k, v, output, attention_probs[B*heads, L, L], layer). ``spread`` scales the hidden states
    so the softmax is far from flat and no key mass sits at the threshold by accident.
    """
    torch.manual_seed(seed)
    layer = Attention(query_dim=heads * dim_head, heads=heads, dim_head=dim_head)
    store = CrossAttnStoreProcessor()
    layer.set_processor(store)
    hidden = spread * torch.randn(batch, tokens, heads * dim_head, generator=generator(seed))
    with torch.no_grad():
        output = layer(hidden)
        q, k, v = layer.to_q(hidden), layer.to_k(hidden), layer.to_v(hidden)
    return q, k, v, output, store.attention_probs, layer


# --- blur -------------------------------------------------------------------------------------------


BLUR_CASES = [
    (height, width, kernel_size, sigma)
    for height, width in [(5, 5), (8, 12), (9, 31), (64, 7)]
    for kernel_size, sigma in [(1, 1.0), (3, 0.5), (9, 1.0), (9, 2.0), (13, 9.0)]
    # diffusers' reflect padding needs kernel_size // 2 < side; smaller latents: test_blur_clamps_kernel...
    if kernel_size // 2 < min(height, width)
]


@pytest.mark.parametrize("channels", [1, 3, 4, 16])
@pytest.mark.parametrize("height,width,kernel_size,sigma", BLUR_CASES)
def test_blur_matches_diffusers(channels, height, width, kernel_size, sigma):
    x = torch.randn(2, channels, height, width, generator=generator(channels * 1000 + height * 10 + width))
    expected = diffusers_gaussian_blur_2d(x, kernel_size, sigma)
    actual = gaussian_blur_2d(x, kernel_size, sigma)
    assert actual.shape == x.shape and actual.dtype == x.dtype
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-6)


def test_kernel_taps_are_the_diffusers_kernel():
    # diffusers' blur of a centred impulse is its 2-D kernel, the outer product of the 1-D taps.
    for kernel_size, sigma in [(9, 1.0), (5, 0.7), (31, 9.0)]:
        impulse = torch.zeros(1, 1, 2 * kernel_size + 1, 2 * kernel_size + 1)
        impulse[..., kernel_size, kernel_size] = 1.0
        kernel_2d = diffusers_gaussian_blur_2d(impulse, kernel_size, sigma)[0, 0]
        half = kernel_size // 2
        kernel_2d = kernel_2d[kernel_size - half : kernel_size + half + 1, kernel_size - half : kernel_size + half + 1]
        taps = gaussian_kernel_1d(kernel_size, sigma, dtype=torch.float64)
        assert taps.dtype == torch.float64 and taps.shape == (kernel_size,)
        torch.testing.assert_close(taps.sum(), torch.tensor(1.0, dtype=torch.float64))
        torch.testing.assert_close(taps, taps.flip(0), rtol=0, atol=0)
        torch.testing.assert_close(torch.outer(taps, taps).float(), kernel_2d, rtol=0, atol=1e-7)


def test_blur_any_leading_shape_and_half_precision():
    x = torch.randn(2, 3, 5, 10, 12, generator=generator(1))
    expected = diffusers_gaussian_blur_2d(x.reshape(2, 15, 10, 12), 9, 1.5).reshape(x.shape)
    torch.testing.assert_close(gaussian_blur_2d(x, 9, 1.5), expected, rtol=0, atol=2e-6)
    for dtype in (torch.float16, torch.bfloat16):
        blurred = gaussian_blur_2d(x.to(dtype), 9, 1.5)
        assert blurred.dtype == dtype
        reference = diffusers_gaussian_blur_2d(x.to(dtype).float().reshape(2, 15, 10, 12), 9, 1.5).reshape(x.shape)
        torch.testing.assert_close(blurred, reference.to(dtype))


def test_blur_clamps_kernel_for_small_latents():
    x = torch.randn(2, 4, 3, 20, generator=generator(2))
    with pytest.raises(RuntimeError):
        diffusers_gaussian_blur_2d(x, 9, 1.0)  # padding 4 >= side 3
    assert effective_kernel_size(9, 3, 20) == 5
    torch.testing.assert_close(gaussian_blur_2d(x, 9, 1.0), diffusers_gaussian_blur_2d(x, 5, 1.0), rtol=0, atol=2e-6)
    tiny = torch.randn(1, 4, 2, 2, generator=generator(3))
    assert effective_kernel_size(9, 2, 2) == 3
    expected = diffusers_gaussian_blur_2d(tiny, 3, 1.0)
    torch.testing.assert_close(gaussian_blur_2d(tiny, 9, 1.0), expected, rtol=0, atol=2e-6)
    line = torch.randn(1, 4, 1, 9, generator=generator(4))
    assert effective_kernel_size(9, 1, 9) == 1
    assert torch.equal(gaussian_blur_2d(line, 9, 1.0), line)


def test_blur_identities():
    x = torch.randn(1, 4, 8, 8, generator=generator(5))
    assert torch.equal(gaussian_blur_2d(x, 9, 0.0), x)
    assert torch.equal(gaussian_blur_2d(x, 1, 5.0), x)
    assert not torch.allclose(gaussian_blur_2d(x, 9, 1.0), x)
    constant = torch.full((1, 2, 6, 7), 0.25)
    torch.testing.assert_close(gaussian_blur_2d(constant, 9, 3.0), constant)


@pytest.mark.parametrize(
    "kernel_size,sigma,match",
    [
        (8, 1.0, "kernel_size must be odd.*use 7 or 9"),
        (0, 1.0, "kernel_size must be an odd integer >= 1"),
        (-3, 1.0, "kernel_size must be an odd integer >= 1"),
        (9.0, 1.0, "kernel_size must be an odd integer"),
        (True, 1.0, "kernel_size must be an odd integer"),
        (9, -0.5, "sigma must be a finite number >= 0"),
        (9, float("nan"), "sigma must be a finite number >= 0"),
        (9, float("inf"), "sigma must be a finite number >= 0"),
    ],
)
def test_blur_rejects_bad_kernel_and_sigma(kernel_size, sigma, match):
    with pytest.raises(ValueError, match=match):
        gaussian_blur_2d(torch.zeros(1, 1, 16, 16), kernel_size, sigma)


# --- attention and key mass ---------------------------------------------------------------------


@pytest.mark.parametrize("batch,tokens,heads,dim_head", [(2, 24, 4, 8), (1, 63, 8, 5), (3, 17, 1, 16)])
def test_key_mass_and_output_match_diffusers(batch, tokens, heads, dim_head):
    q, k, v, output, probs, layer = diffusers_self_attention(batch, tokens, heads, dim_head, seed=tokens)
    out, key_mass = attention_with_key_mass(q, k, v, heads)
    expected_mass = probs.reshape(batch, heads, tokens, tokens).mean(1).sum(1)
    assert key_mass.shape == (batch, tokens) and key_mass.dtype == torch.float32
    torch.testing.assert_close(key_mass, expected_mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(key_attention_mass(q, k, heads), key_mass, rtol=0, atol=0)
    assert out.shape == q.shape and out.dtype == q.dtype
    with torch.no_grad():
        torch.testing.assert_close(layer.to_out[0](out), output, rtol=1e-5, atol=1e-6)


def test_output_matches_host_attention():
    import comfy.ldm.modules.attention as host_attention

    q, k, v, *_ = diffusers_self_attention(2, 40, 8, 8, seed=11)
    out, _ = attention_with_key_mass(q, k, v, 8)
    torch.testing.assert_close(out, host_attention.attention_basic(q, k, v, 8), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, host_attention.attention_pytorch(q, k, v, 8), rtol=1e-5, atol=1e-6)


def test_key_mass_chunking_does_not_change_results():
    q, k, v, *_ = diffusers_self_attention(2, 50, 4, 8, seed=7)
    whole_out, whole_mass = attention_with_key_mass(q, k, v, 4, query_chunk=50)
    for chunk in (1, 7, 49, 1000, None):
        out, mass = attention_with_key_mass(q, k, v, 4, query_chunk=chunk)
        # fp32 reassociation only: the matmul kernels block a 1-row and a 50-row problem differently
        torch.testing.assert_close(out, whole_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mass, whole_mass, rtol=0, atol=1e-5)
        torch.testing.assert_close(key_attention_mass(q, k, 4, query_chunk=chunk), whole_mass, rtol=0, atol=1e-5)


def test_key_mass_sums_to_query_count():
    torch.manual_seed(0)
    q, k = 2 * torch.randn(3, 30, 32), 2 * torch.randn(3, 45, 32)  # cross-shaped: 30 queries, 45 keys
    mass = key_attention_mass(q, k, 4, query_chunk=8)
    assert mass.shape == (3, 45)
    torch.testing.assert_close(mass.sum(1), torch.full((3,), 30.0), rtol=1e-6, atol=0)
    assert mass.min() >= 0


def test_uniform_attention_gives_empty_mask():
    for height, width in [(8, 8), (7, 13), (32, 48)]:
        tokens = height * width
        q = torch.zeros(2, tokens, 64)
        k = torch.randn(2, tokens, 64, generator=generator(tokens))
        mass = key_attention_mass(q, k, 8, query_chunk=97)
        torch.testing.assert_close(mass, torch.ones(2, tokens), rtol=0, atol=1e-5)
        # the plain ">" marks whatever rounding put above 1.0; the tolerance leaves a flat map unmarked
        assert sag_mask(mass, (height, width), tolerance=MASS_TOLERANCE).sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32_key_mass(dtype):
    q, k, v, *_ = diffusers_self_attention(2, 36, 4, 8, seed=3, spread=1.0)
    out_low, mass_low = attention_with_key_mass(q.to(dtype), k.to(dtype), v.to(dtype), 4, query_chunk=5)
    assert mass_low.dtype == torch.float32 and out_low.dtype == dtype
    # Internally float32: the same as float32 inputs holding the rounded values ...
    out_up, mass_up = attention_with_key_mass(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), 4)
    torch.testing.assert_close(mass_low, mass_up, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_low, out_up.to(dtype), rtol=0, atol=0)
    # ... and close to the float32 computation on float32 inputs.
    _, mass_fp32 = attention_with_key_mass(q, k, v, 4)
    torch.testing.assert_close(mass_low, mass_fp32, rtol=0, atol=1e-3)


def test_attention_rejects_bad_heads():
    q = torch.zeros(1, 4, 12)
    with pytest.raises(ValueError, match="not divisible by heads=5"):
        key_attention_mass(q, q, 5)
    with pytest.raises(ValueError, match="heads must be a positive integer"):
        key_attention_mass(q, q, 0)
    with pytest.raises(ValueError, match="query_chunk must be a positive integer"):
        key_attention_mass(q, q, 2, query_chunk=0)


# --- mask and masked blur -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grid_hw,latent_hw",
    [((4, 6), (8, 12)), ((5, 3), (10, 6)), ((5, 3), (9, 7)), ((1, 7), (8, 56)), ((13, 9), (26, 18))],
)
def test_masked_blur_matches_diffusers_sag_masking(grid_hw, latent_hw):
    batch, heads, dim_head, channels = 2, 4, 8, 4
    tokens = grid_hw[0] * grid_hw[1]
    q, k, _, _, probs, _ = diffusers_self_attention(batch, tokens, heads, dim_head, seed=tokens + latent_hw[1])
    x0 = torch.randn(batch, channels, *latent_hw, generator=generator(tokens))
    eps = torch.randn(batch, channels, *latent_hw, generator=generator(tokens + 1))
    scheduler = sd_scheduler()
    t = torch.tensor(601)
    pipeline = sag_pipeline_stand_in(heads, scheduler)

    key_mass = key_attention_mass(q, k, heads)
    assert (key_mass - 1.0).abs().min() > 1e-5, "fixture: no key mass within rounding of the threshold"
    mask = sag_mask(key_mass, grid_hw, threshold=1.0, tolerance=0.0)
    assert 0 < mask.sum() < mask.numel(), "fixture: the mask must be neither empty nor full"
    x0_hat = blur_under_mask(x0, upsample_mask(mask, latent_hw), kernel_size=9, sigma=1.0)
    torch.testing.assert_close(
        sag_degraded_x0(x0, key_mass, grid_hw, threshold=1.0, kernel_size=9, sigma=1.0, tolerance=0.0), x0_hat,
        rtol=0, atol=0,
    )

    expected = StableDiffusionSAGPipeline.sag_masking(pipeline, x0, probs, grid_hw, t, eps)
    torch.testing.assert_close(scheduler.add_noise(x0_hat, eps, t[None]), expected, rtol=0, atol=1e-5)
    # With zero noise add_noise is sqrt(abar) * x0_hat: compare the degraded x0 itself.
    noiseless = StableDiffusionSAGPipeline.sag_masking(pipeline, x0, probs, grid_hw, t, torch.zeros_like(eps))
    torch.testing.assert_close(x0_hat, noiseless / scheduler.alphas_cumprod[t].sqrt(), rtol=0, atol=1e-5)


def test_tokens_are_row_major_like_the_host_transformer():
    # ComfyUI SpatialTransformer: x.movedim(1, 3).flatten(1, 2), token index = row * w + col.
    activations = torch.randn(2, 3, 5, 7, generator=generator(8))
    tokens = activations.movedim(1, 3).flatten(1, 2)
    grid = token_grid(list(activations.shape), tokens.shape[1])
    assert grid == (5, 7)
    mask = sag_mask(tokens[..., 0] + 1.0, grid, threshold=1.0, tolerance=0.0)
    assert torch.equal(mask, (activations[:, :1] > 0).float())


def test_mask_threshold_and_tolerance():
    key_mass = torch.tensor([[0.5, 1.0, 1.00005, 1.5, 3.0, 0.0]])
    # the paper's plain ">" by default; a tolerance leaves keys just above the threshold unmarked
    assert sag_mask(key_mass, (2, 3)).flatten().tolist() == [0, 0, 1, 1, 1, 0]
    assert sag_mask(key_mass, (2, 3), tolerance=MASS_TOLERANCE).flatten().tolist() == [0, 0, 0, 1, 1, 0]
    assert sag_mask(key_mass, (3, 2), threshold=2.0).flatten().tolist() == [0, 0, 0, 0, 1, 0]
    assert MASS_TOLERANCE == pytest.approx(1e-4)


def test_mask_zero_and_one_blend():
    x0 = torch.randn(2, 4, 8, 8, generator=generator(9))
    assert torch.equal(blur_under_mask(x0, torch.zeros(2, 1, 8, 8)), x0)
    torch.testing.assert_close(blur_under_mask(x0, torch.ones(1, 1, 8, 8), 9, 1.0), gaussian_blur_2d(x0, 9, 1.0))


def test_mask_shape_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"key_mass must have shape \[batch, 24\] for the 4x6 token grid"):
        sag_mask(torch.zeros(2, 25), (4, 6))
    with pytest.raises(ValueError, match="upsample_mask"):
        blur_under_mask(torch.zeros(2, 4, 8, 12), torch.zeros(2, 1, 4, 6))
    with pytest.raises(ValueError, match="same cond/uncond chunk"):
        sag_degraded_x0(torch.zeros(2, 4, 8, 12), torch.zeros(4, 24), (4, 6))
    with pytest.raises(ValueError, match="activations_shape"):
        token_grid([2, 64, 320], 64)
    with pytest.raises(ValueError, match="gives an 4x6 grid"):
        token_grid([2, 320, 4, 6], 25)


# --- guidance in x0 space, re-noising -----------------------------------------------------------------


def ve_sigma(scheduler, t):
    abar = scheduler.alphas_cumprod[t]
    return abar, ((1 - abar) / abar).sqrt()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_renoise_ve_matches_diffusers_add_noise(prediction_type):
    scheduler = sd_scheduler(prediction_type)
    pipeline = sag_pipeline_stand_in(8, scheduler)
    for t in (1, 250, 601, 999):
        abar, _ = ve_sigma(scheduler, t)
        x_vp = torch.randn(2, 4, 8, 12, generator=generator(t))
        model_output = torch.randn(2, 4, 8, 12, generator=generator(t + 1))
        x0_ref = StableDiffusionSAGPipeline.pred_x0(pipeline, x_vp, model_output, t)
        eps_ref = StableDiffusionSAGPipeline.pred_epsilon(pipeline, x_vp, model_output, t)
        degraded_x0 = gaussian_blur_2d(x0_ref, 9, 1.0)
        expected_vp = scheduler.add_noise(degraded_x0, eps_ref, torch.tensor([t]))
        actual_ve = renoise_ve(degraded_x0, x_vp / abar.sqrt(), x0_ref)
        scale = expected_vp.abs().max() / abar.sqrt()
        torch.testing.assert_close(actual_ve * abar.sqrt(), expected_vp, rtol=0, atol=2e-6 * max(1.0, float(scale)))


def test_renoise_recreates_x_when_nothing_is_degraded():
    x = torch.randn(2, 4, 8, 8, generator=generator(12))
    x0_ref = torch.randn(2, 4, 8, 8, generator=generator(13))
    assert torch.equal(renoise_ve(x0_ref, x, x0_ref), x)
    assert torch.equal(renoise_flow(x0_ref, x, x0_ref, 0.7), x)
    assert torch.equal(renoise_flow(x0_ref, x, x0_ref, torch.tensor([0.2, 0.9])), x)


def test_renoise_matches_host_noise_scaling():
    import comfy.model_sampling as host_sampling

    x = torch.randn(2, 4, 8, 8, generator=generator(14))
    x0_ref = torch.randn(2, 4, 8, 8, generator=generator(15))
    degraded_x0 = gaussian_blur_2d(x0_ref, 9, 2.0)
    sigma = torch.tensor([0.3, 0.85])
    per_sample = sigma.view(2, 1, 1, 1)

    eps_flow = (x - (1 - per_sample) * x0_ref) / per_sample
    expected = host_sampling.CONST().noise_scaling(sigma, eps_flow, degraded_x0)
    torch.testing.assert_close(renoise_flow(degraded_x0, x, x0_ref, sigma), expected, rtol=0, atol=1e-6)
    expected_scalar = host_sampling.CONST().noise_scaling(sigma[:1], (x - 0.7 * x0_ref) / 0.3, degraded_x0)
    torch.testing.assert_close(renoise_flow(degraded_x0, x, x0_ref, 0.3), expected_scalar, rtol=0, atol=1e-6)

    eps_ve = (x - x0_ref) / per_sample
    expected_ve = host_sampling.EPS().noise_scaling(sigma, eps_ve.clone(), degraded_x0)
    torch.testing.assert_close(renoise_ve(degraded_x0, x, x0_ref), expected_ve, rtol=0, atol=1e-6)
    # The VE re-noise on a flow model is off by sigma * (degraded_x0 - x0_ref), as the docstring says.
    torch.testing.assert_close(
        renoise_ve(degraded_x0, x, x0_ref) - expected, per_sample * (degraded_x0 - x0_ref), rtol=0, atol=1e-5
    )


def test_sag_guided_equals_diffusers_noise_space_guidance_for_eps_models():
    """One diffusers SAG step (CFG on) with a random stand-in for the degraded model output, in x0 space."""
    scheduler = sd_scheduler("epsilon")
    heads, grid_hw, latent_hw = 4, (4, 6), (8, 12)
    pipeline = sag_pipeline_stand_in(heads, scheduler)
    q, k, _, _, probs, _ = diffusers_self_attention(2, 24, heads, 8, seed=21)
    t, cfg, sag_scale = torch.tensor(601), 5.0, 0.75
    abar, _ = ve_sigma(scheduler, t)
    x_vp = torch.randn(2, 4, *latent_hw, generator=generator(22))
    eps_u, eps_c, eps_deg = (torch.randn(2, 4, *latent_hw, generator=generator(s)) for s in (23, 24, 25))

    # diffusers: StableDiffusionSAGPipeline.__call__, CFG branch.
    eps_cfg = eps_u + cfg * (eps_c - eps_u)
    x0_u = StableDiffusionSAGPipeline.pred_x0(pipeline, x_vp, eps_u, t)
    eps_hat = StableDiffusionSAGPipeline.pred_epsilon(pipeline, x_vp, eps_u, t)
    x_deg_vp = StableDiffusionSAGPipeline.sag_masking(pipeline, x0_u, probs, grid_hw, t, eps_hat)
    guided_eps = eps_cfg + sag_scale * (eps_u - eps_deg)
    expected_x0 = StableDiffusionSAGPipeline.pred_x0(pipeline, x_vp, guided_eps, t)

    # The pack, in ComfyUI's VE coordinates.
    x_ve = x_vp / abar.sqrt()
    cfg_x0 = StableDiffusionSAGPipeline.pred_x0(pipeline, x_vp, eps_cfg, t)
    key_mass = key_attention_mass(q, k, heads)
    degraded_x0 = sag_degraded_x0(x0_u, key_mass, grid_hw, tolerance=0.0)
    x_deg_ve = renoise_ve(degraded_x0, x_ve, x0_u)
    torch.testing.assert_close(x_deg_ve * abar.sqrt(), x_deg_vp, rtol=0, atol=1e-5)
    degraded_denoised = StableDiffusionSAGPipeline.pred_x0(pipeline, x_deg_vp, eps_deg, t)
    actual_x0 = sag_guided(cfg_x0, degraded_x0, degraded_denoised, sag_scale)
    torch.testing.assert_close(actual_x0, expected_x0, rtol=0, atol=2e-5)


def test_v_prediction_identity_in_module_docstring():
    """diffusers' v-space SAG is cfg_x0 + s*(abar*degraded_x0 + (1-abar)*x0_ref - degraded_denoised)."""
    scheduler = sd_scheduler("v_prediction")
    pipeline = sag_pipeline_stand_in(8, scheduler)
    t, s = 400, 0.75
    abar = scheduler.alphas_cumprod[t]
    x_vp = torch.randn(1, 4, 8, 8, generator=generator(31))
    v_ref, v_cfg, v_deg = (torch.randn(1, 4, 8, 8, generator=generator(n)) for n in (32, 33, 34))
    x0_ref = StableDiffusionSAGPipeline.pred_x0(pipeline, x_vp, v_ref, t)
    degraded_x0 = gaussian_blur_2d(x0_ref, 9, 1.0)
    eps_ref = StableDiffusionSAGPipeline.pred_epsilon(pipeline, x_vp, v_ref, t)
    x_deg_vp = scheduler.add_noise(degraded_x0, eps_ref, torch.tensor([t]))
    degraded_denoised = StableDiffusionSAGPipeline.pred_x0(pipeline, x_deg_vp, v_deg, t)
    cfg_x0 = StableDiffusionSAGPipeline.pred_x0(pipeline, x_vp, v_cfg, t)
    expected = StableDiffusionSAGPipeline.pred_x0(pipeline, x_vp, v_cfg + s * (v_ref - v_deg), t)
    diffusers_form = cfg_x0 + s * (abar * degraded_x0 + (1 - abar) * x0_ref - degraded_denoised)
    torch.testing.assert_close(diffusers_form, expected, rtol=0, atol=1e-5)
    paper_form = sag_guided(cfg_x0, degraded_x0, degraded_denoised, s)
    torch.testing.assert_close(paper_form - expected, -s * (1 - abar) * (x0_ref - degraded_x0), rtol=0, atol=1e-5)


# --- node input validation ----------------------------------------------------------------------------


def test_validate_sag_inputs_accepts_defaults():
    validate_sag_inputs(scale=0.5, blur_sigma=2.0, threshold=1.0, kernel_size=9)
    validate_sag_inputs(scale=-2.0, blur_sigma=0.0, threshold=0.0, kernel_size=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(scale=float("nan")), "scale must be a finite number"),
        (dict(scale="0.5"), "scale must be a finite number"),
        (dict(blur_sigma=-1.0), "blur_sigma must be a finite number >= 0.*use 0 for no blur"),
        (dict(blur_sigma=float("inf")), "blur_sigma must be a finite number >= 0"),
        (dict(threshold=-0.1), "threshold must be >= 0.*use 1.0"),
        (dict(threshold=float("nan")), "threshold must be a finite number"),
        (dict(kernel_size=10), "kernel_size must be odd.*use 9 or 11"),
        (dict(kernel_size=0), "kernel_size must be an odd integer >= 1"),
    ],
)
def test_validate_sag_inputs_names_input_and_fix(kwargs, match):
    settings = dict(scale=0.5, blur_sigma=2.0, threshold=1.0, kernel_size=9) | kwargs
    with pytest.raises(ValueError, match=match):
        validate_sag_inputs(**settings)
