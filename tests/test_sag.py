"""SAG in the real host: the node's patch on tiny models of the real architectures, run through the
host's own sampler path, against diffusers' StableDiffusionSAGPipeline (its own attention store,
mask, blur, re-noise and combination code) on a twin UNet with identical weights, against the
host's built-in SAG node, and against masks computed here from the layer's own q/k projections."""
import contextlib
import gc
import math
import weakref

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag as diffusers_sag
import nodes as host_nodes
import pytest
import torch
import torch.nn.functional as F
from comfy_extras.nodes_model_advanced import ModelSamplingSD3
from comfy_extras.nodes_pag import PerturbedAttentionGuidance as HostPAG
from comfy_extras.nodes_sag import SelfAttentionGuidance as HostSAG
from diffusers import StableDiffusionSAGPipeline

import attention_guidance.patching.sag as sag_node
from attention_guidance.guidance_core.layer_spec import LayerSpecError
from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.patching.sag import renoise, with_sag_mask_probe
from attention_guidance.nodes.sag_preview import SAGMaskPreview
from attention_guidance.patching.families import recognise
from attention_guidance.sag_core import blur_under_mask
from support.sag_reference import renoise_flow, renoise_ve
from support.diffusers_twin import ddim_scheduler, make_twin
from support.models import (build_model, count_model_calls, denoise_once, make_conditioning, sample,
                            short_of_memory, tiny_controlnet)

FAMILIES = ["sd15", "sd2v", "sdxl"]


def sag(model, scale=0.75, blur_sigma=1.0, threshold=1.0, kernel_size=9, layer="m0.0", start_percent=0.0,
        end_percent=1.0):
    return SelfAttentionGuidance.execute(
        model, scale, blur_sigma, threshold, kernel_size, layer, start_percent, end_percent
    ).result[0]


def pag(model, scale=2.0, layers="mid"):
    return PerturbedAttentionGuidance.execute(model, scale, layers, 0.0, 0.0, 1.0, 0.0).result[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def noisy_latent(model, t, shape=(1, 4, 8, 8), seed=1):
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[t].reshape(1)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    return sampling.noise_scaling(sigma, noise, x0), sigma


def sag_mask_at(model, positive, negative, x, sigma, cfg):
    """The ``[B, 1, H, W]`` mask the SAG patch of ``model`` builds at (x, sigma), from one evaluation."""
    kept = []
    denoise_once(with_sag_mask_probe(model, kept.append), positive, negative, x, sigma, cfg)
    assert len(kept) == 1
    return kept[0]


def attn1_of(model, layer):
    """The host's attn1 module and its SpatialTransformer for a one-site layer spec."""
    (site,) = recognise(model, "test").layout.select(layer)
    diffusion_model = model.get_model_object("diffusion_model")
    blocks = {"input": diffusion_model.input_blocks, "output": diffusion_model.output_blocks}
    block = diffusion_model.middle_block if site.module.block == "middle" else blocks[site.module.block][site.module.block_id]
    (transformer,) = [m for m in block if isinstance(m, comfy.ldm.modules.attention.SpatialTransformer)]
    return transformer.transformer_blocks[site.transformer_index].attn1, transformer


@contextlib.contextmanager
def recorded_query_key(model, layer):
    """Every forward's q and k of the layer's attn1 (from its own to_q / to_k) and token grid."""
    attn1, transformer = attn1_of(model, layer)
    seen = []
    grids = []
    handles = [
        transformer.register_forward_pre_hook(lambda module, args: grids.append(tuple(args[0].shape[-2:]))),
        attn1.to_q.register_forward_hook(lambda module, args, out: seen.append({"q": out.detach()})),
        attn1.to_k.register_forward_hook(lambda module, args, out: seen[-1].update(k=out.detach())),
    ]
    try:
        yield seen, grids, attn1.heads
    finally:
        for handle in handles:
            handle.remove()


def key_mass_from(q, k, heads):
    """Per-key attention mass written out: softmax over keys, mean over heads, sum over queries."""
    b, length, inner = q.shape
    qh = q.reshape(b, length, heads, -1).transpose(1, 2).double()
    kh = k.reshape(b, k.shape[1], heads, -1).transpose(1, 2).double()
    probs = (qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1])).softmax(-1)
    return probs.mean(1).sum(1)


# --- diffusers' SAG pipeline as the reference --------------------------------------------------

class _FirstStepDone(Exception):
    pass


@torch.no_grad()
def diffusers_sag_step(twin, x, sigma, positive, negative, cfg, sag_scale, monkeypatch):
    """One step of diffusers' ``StableDiffusionSAGPipeline.__call__`` at the twin's integer t.

    The pipeline runs unchanged around the twin UNet; its scheduler starts the loop at t and the
    first ``scheduler.step`` ends it. Returns the guided model output as x0 (diffusers' combination,
    in the model's own output space), the same branches combined in noise space as the paper does
    (for v models the two differ), the pipeline's own upsampled mask and the mask fraction.
    """
    t = twin.timestep(sigma)
    x_vp = twin.to_vp(x, sigma)
    scheduler = ddim_scheduler(twin.prediction_type)
    guided = []
    unet_calls = []

    def set_timesteps(num_inference_steps, device=None, **kwargs):
        type(scheduler).set_timesteps(scheduler, num_inference_steps, device=device, **kwargs)
        scheduler.timesteps = torch.tensor([t, max(t - 1, 0)])

    def step(model_output, *args, **kwargs):
        guided.append(model_output.clone())
        raise _FirstStepDone

    monkeypatch.setattr(scheduler, "set_timesteps", set_timesteps)
    monkeypatch.setattr(scheduler, "step", step)

    masks = []

    class RecordingFunctional:
        """The pipeline module's ``F``, keeping what ``sag_masking`` interpolates: its mask."""

        def __getattr__(self, name):
            return getattr(F, name)

        @staticmethod
        def interpolate(*args, **kwargs):
            out = F.interpolate(*args, **kwargs)
            masks.append(out[:, :1].clone())
            return out

    monkeypatch.setattr(diffusers_sag, "F", RecordingFunctional())
    pipe = StableDiffusionSAGPipeline(vae=None, text_encoder=None, tokenizer=None, unet=twin.unet, scheduler=scheduler,
                                      safety_checker=None, feature_extractor=None, image_encoder=None,
                                      requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    hook = twin.unet.register_forward_hook(
        lambda module, args, out: unet_calls.append((args[0].clone(), out.sample.clone())))
    try:
        pipe(prompt_embeds=twin.cond(positive, x).encoder_hidden_states,
             negative_prompt_embeds=twin.cond(negative, x).encoder_hidden_states,
             latents=x_vp, height=8 * x.shape[-2], width=8 * x.shape[-1], num_inference_steps=2,
             guidance_scale=cfg, sag_scale=sag_scale, output_type="latent")
    except _FirstStepDone:
        pass
    finally:
        hook.remove()
    assert len(guided) == 1 and len(masks) == 1 and len(unet_calls) == 2

    a = twin.alpha_bar(t)

    def to_eps(output, sample):
        if twin.prediction_type == "epsilon":
            return output
        return torch.sqrt(1 - a) * sample + torch.sqrt(a) * output

    (main_in, main_out), (degraded_in, degraded_out) = unet_calls
    eps_degraded = to_eps(degraded_out, degraded_in)
    if cfg > 1.0:
        eps_u, eps_c = to_eps(main_out, main_in).chunk(2)
        eps = eps_u + cfg * (eps_c - eps_u) + sag_scale * (eps_u - eps_degraded)
    else:
        eps_c = to_eps(main_out, main_in)
        eps = eps_c + sag_scale * (eps_c - eps_degraded)
    paper_x0 = (x_vp - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    return {
        "diffusers_x0": twin.to_x0(x_vp, t, guided[0]),
        "paper_x0": paper_x0,
        "mask": masks[0],
    }


@pytest.fixture(scope="module", params=["sd15", "sd2v"])
def sd_family(request):
    return request.param


@pytest.fixture(scope="module")
def sd_model(sd_family):
    return build_model(sd_family, seed=0)


@pytest.fixture(scope="module")
def sd_twin(sd_model):
    twin = make_twin(sd_model)
    # A checkpoint's config.json gives attention_head_dim as a list (or an int); the SAG pipeline reads
    # its head count from it with `isinstance(h, list)`, which a tuple does not pass.
    heads = twin.unet.config.attention_head_dim
    if isinstance(heads, tuple):
        twin.unet.register_to_config(attention_head_dim=list(heads))
    return twin


@pytest.mark.parametrize("cfg", [5.0, 1.0])
@pytest.mark.parametrize("shape, t", [((1, 4, 8, 8), 750), ((2, 4, 8, 12), 400), ((2, 4, 9, 7), 750),
                                      ((1, 4, 14, 6), 400)])
def test_one_step_matches_diffusers_sag(sd_family, sd_model, sd_twin, cfg, shape, t, monkeypatch):
    x, sigma = noisy_latent(sd_model, t, shape=shape, seed=t + shape[-1])
    positive, negative = make_conditioning(sd_family, batch=shape[0], seed=3)
    reference = diffusers_sag_step(sd_twin, x, sigma, positive, negative, cfg, 0.75, monkeypatch)

    mask = sag_mask_at(sag(sd_model), positive, negative, x, sigma, cfg)
    fraction = reference["mask"].mean().item()
    assert 0.2 < fraction < 0.8, "the twin's attention map must give a non-trivial mask for this comparison"
    assert torch.equal(mask, reference["mask"])

    ours = denoise_once(sag(sd_model), positive, negative, x, sigma, cfg)
    unguided = denoise_once(sd_model, positive, negative, x, sigma, cfg)
    assert rel_err(ours, reference["paper_x0"]) < 1e-3
    assert rel_err(unguided, reference["paper_x0"]) > 1e-2  # the SAG term is not negligible
    if sd_family == "sd15":
        # epsilon: diffusers' own combination is the paper's, so it is matched directly
        assert rel_err(ours, reference["diffusers_x0"]) < 1e-3
    else:
        # v-prediction: diffusers adds the SAG term to v; this pack follows the paper (noise space)
        assert rel_err(ours, reference["diffusers_x0"]) > 1e-3


# --- other references: the host's own SAG node, masks from the layer's own projections ------------

@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return build_model(family, seed=0)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 16, 16)])
def test_equals_the_host_sag_node_on_its_settings(model, family, shape):
    # The host's node: middle.0.0, threshold 1.0, kernel 9, uncond map under CFG, x0-space formula
    # (the paper's for eps; for v the same x0-space formula, which is what this pack also uses).
    x, sigma = noisy_latent(model, 600, shape=shape)
    positive, negative = make_conditioning(family, batch=shape[0], seed=4)
    host = denoise_once(HostSAG.execute(model, 0.5, 2.0).result[0], positive, negative, x, sigma, 5.0)
    ours = denoise_once(sag(model, scale=0.5, blur_sigma=2.0), positive, negative, x, sigma, 5.0)
    plain = denoise_once(model, positive, negative, x, sigma, 5.0)
    assert rel_err(ours, host) < 1e-4
    assert rel_err(plain, host) > 1e-3


LAYERS = {
    "sd15": ["m0.0", "d0", "d1", "u0", "u3"],
    "sd2v": ["m0.0", "d0", "u1", "u3"],
    "sdxl": ["m0.0", "m0.2", "d0.1", "d1.0", "u0.2", "u3.1"],
}


@pytest.mark.parametrize("latent_hw, layers, batch", [
    ((8, 8), None, 2),
    ((13, 10), None, 2),
    ((11, 5), None, 2),
    ((77, 49), ["m0.0"], 1),  # middle grid 39x25: 975 tokens, which also factor as 25x39, 15x65, 13x75
    ((65, 65), ["m0.0"], 1),  # 520x520
])
def test_mask_is_the_key_mass_on_the_layers_real_grid(model, family, latent_hw, layers, batch):
    check_mask_against_the_layers_projections(model, family, latent_hw, layers or LAYERS[family], batch)


def test_mask_at_1216x832_on_sdxl():
    # SDXL has no attention at full latent resolution, so a 152x104 latent stays affordable on a CPU
    model = build_model("sdxl", seed=0)
    check_mask_against_the_layers_projections(model, "sdxl", (152, 104), ["m0.0", "d0.0"], 1)


def check_mask_against_the_layers_projections(model, family, latent_hw, layers, batch):
    positive, negative = make_conditioning(family, batch=batch, seed=5)
    x, sigma = noisy_latent(model, 500, shape=(batch, 4) + latent_hw, seed=sum(latent_hw))
    for layer in layers:
        with recorded_query_key(model, layer) as (seen, grids, heads):
            # CFG 1: the host evaluates the positive only, and SAG maps the positive: every row is a reference row
            mask = sag_mask_at(sag(model, layer=layer), positive, negative, x, sigma, 1.0)
        assert len(seen) == 1 and len(grids) == 1
        (grid,) = grids
        mass = key_mass_from(seen[0]["q"], seen[0]["k"], heads)
        expected = F.interpolate((mass > 1.0).float().reshape(batch, 1, *grid), size=latent_hw, mode="nearest")
        assert mask.shape == (batch, 1) + latent_hw, layer
        # float64 here, float32 in the node: keys within rounding of the threshold may differ
        near = F.interpolate(((mass - 1.0).abs() < 1e-5).float().reshape(batch, 1, *grid), size=latent_hw)
        assert torch.equal(mask[near == 0], expected[near == 0]), layer
        assert 0.0 < expected.mean() < 1.0, layer


# --- batch, chunking, several conds, areas, ControlNet ----------------------------------------------

@pytest.fixture
def split_batches(monkeypatch):
    short_of_memory(monkeypatch)


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_chunked_forwards_give_the_same_result(model, family, cfg, monkeypatch):
    x, sigma = noisy_latent(model, 600, shape=(2, 4, 8, 12))
    positive, negative = make_conditioning(family, batch=2, seed=7)
    extra_positive, extra_negative = make_conditioning(family, batch=2, seed=8)
    positive, negative = positive + extra_positive, negative + extra_negative  # two entries each
    patched = sag(model)
    with count_model_calls(patched) as calls:
        whole = denoise_once(patched, positive, negative, x, sigma, cfg)
    mask = sag_mask_at(patched, positive, negative, x, sigma, cfg)
    # the degraded pass evaluates one cond list (the reference branch's), so its chunks are labelled 0
    assert [sorted(c.cond_or_uncond) for c in calls] == ([[0, 0, 1, 1], [0, 0]] if cfg > 1.0 else [[0, 0], [0, 0]])

    short_of_memory(monkeypatch)
    with count_model_calls(patched) as calls:
        split = denoise_once(patched, positive, negative, x, sigma, cfg)
    assert all(len(c.cond_or_uncond) == 1 for c in calls)
    assert len(calls) == (6 if cfg > 1.0 else 4)
    assert torch.equal(sag_mask_at(patched, positive, negative, x, sigma, cfg), mask)
    assert rel_err(split, whole) < 1e-5


def test_several_entries_average_their_maps_from_every_forward(split_batches):
    # CFG 1 maps the positive; its two entries run in separate forwards. The map is the mean of both
    # entries' key mass (they have equal weight), not the last forward's.
    model = build_model("sd15", seed=0)
    first, _ = make_conditioning("sd15", batch=1, seed=9)
    second, negative = make_conditioning("sd15", batch=1, seed=10)
    x, sigma = noisy_latent(model, 500, shape=(1, 4, 12, 10))
    patched = sag(model)
    with recorded_query_key(model, "m0.0") as (seen, grids, heads):
        mask = sag_mask_at(patched, first + second, negative, x, sigma, 1.0)
    assert len(seen) == 2 and grids == [(6, 5), (6, 5)]
    masses = [key_mass_from(s["q"], s["k"], heads) for s in seen]
    expected = F.interpolate(((masses[0] + masses[1]) / 2 > 1.0).float().reshape(1, 1, 6, 5), size=(12, 10))
    assert torch.equal(mask, expected)
    for alone in masses:  # either entry alone would give another mask
        assert not torch.equal(F.interpolate((alone > 1.0).float().reshape(1, 1, 6, 5), size=(12, 10)), expected)


def test_area_entries_are_mapped_onto_their_area(split_batches):
    # Positive: a full entry and one on the left half (ConditioningSetArea). On the right half only the
    # full entry contributes; inside the area (away from its feathered edge) both do, with weight 1.
    model = build_model("sd15", seed=0)
    full, negative = make_conditioning("sd15", batch=1, seed=11)
    other, _ = make_conditioning("sd15", batch=1, seed=12)
    (left,) = host_nodes.ConditioningSetArea().append(other, 64, 128, 0, 0, 1.0)
    x, sigma = noisy_latent(model, 500, shape=(1, 4, 16, 16))
    with recorded_query_key(model, "m0.0") as (seen, grids, heads):
        mask = sag_mask_at(sag(model), full + left, negative, x, sigma, 1.0)
    by_grid = {grid: key_mass_from(s["q"], s["k"], heads) for s, grid in zip(seen, grids)}
    assert set(by_grid) == {(8, 8), (8, 4)}
    full_map = F.interpolate(by_grid[(8, 8)].reshape(1, 1, 8, 8), size=(16, 16))
    area_map = F.interpolate(by_grid[(8, 4)].reshape(1, 1, 8, 4), size=(16, 8))
    assert torch.equal(mask[..., 8:], (full_map[..., 8:] > 1.0).float())
    interior = ((full_map[..., :6] + area_map[..., :6]) / 2 > 1.0).float()
    assert torch.equal(mask[..., :6], interior)


def test_area_conds_with_cfg_run_chunked_or_not(monkeypatch):
    # The host gives the uncond an area copy of each positive area entry; the built-in node reshapes
    # that copy's smaller map as if it were the latent's.
    model = build_model("sd15", seed=0)
    full, negative = make_conditioning("sd15", batch=2, seed=13)
    other, _ = make_conditioning("sd15", batch=2, seed=14)
    (right,) = host_nodes.ConditioningSetArea().append(other, 64, 96, 64, 16, 0.8)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 16, 16))
    patched = sag(model)
    plain = denoise_once(model, full + right, negative, x, sigma, 5.0)
    whole = denoise_once(patched, full + right, negative, x, sigma, 5.0)
    short_of_memory(monkeypatch)
    split = denoise_once(patched, full + right, negative, x, sigma, 5.0)
    assert torch.isfinite(whole).all()
    assert rel_err(split, whole) < 1e-5
    assert rel_err(whole, plain) > 1e-3


def test_controlnet_conditions_the_degraded_pass_too(monkeypatch):
    model = build_model("sd15", seed=0)
    control, control_model = tiny_controlnet(model, seed=1)
    positive, negative = make_conditioning("sd15", batch=2, seed=15)
    x, sigma = noisy_latent(model, 600, shape=(2, 4, 8, 8))
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    positive, negative = host_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control, hint, 1.0,
                                                                               0.0, 1.0)
    patched = sag(model)
    control_calls = []
    handle = control_model.register_forward_hook(
        lambda module, args, kwargs, out: control_calls.append(kwargs["x"].shape[0]), with_kwargs=True)
    try:
        ours = denoise_once(patched, positive, negative, x, sigma, 5.0)
        # main forward (cond + uncond rows) and the degraded pass (uncond rows) both run the ControlNet
        assert control_calls == [4, 2]
        short_of_memory(monkeypatch)
        split = denoise_once(patched, positive, negative, x, sigma, 5.0)
    finally:
        handle.remove()
    assert rel_err(split, ours) < 1e-5
    # The SAG term is the ControlNet model's: blur its uncond x0 under the mask, re-noise, evaluate.
    monkeypatch.undo()
    mask = sag_mask_at(patched, positive, negative, x, sigma, 5.0)
    cfg_x0 = denoise_once(model, positive, negative, x, sigma, 5.0)
    uncond_x0 = denoise_once(model, negative, negative, x, sigma, 1.0)
    degraded = blur_under_mask(uncond_x0, mask, 9, 1.0)
    degraded_x0 = denoise_once(model, negative, negative, x + degraded - uncond_x0, sigma, 1.0)
    assert rel_err(ours, cfg_x0 + 0.75 * (degraded - degraded_x0)) < 1e-4
    without_control = denoise_once(patched, *make_conditioning("sd15", batch=2, seed=15), x, sigma, 5.0)
    assert rel_err(ours, without_control) > 1e-3


def test_batch_rows_are_guided_independently(model, family):
    x, sigma = noisy_latent(model, 600, shape=(2, 4, 10, 8))
    positive, negative = make_conditioning(family, batch=2, seed=16)
    patched = sag(model)
    both = denoise_once(patched, positive, negative, x, sigma, 5.0)
    for i in range(2):
        def row(conditioning):
            return [[c[0][i:i + 1], {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                                     for k, v in c[1].items()}] for c in conditioning]
        single = denoise_once(patched, row(positive), row(negative), x[i:i + 1], sigma, 5.0)
        assert rel_err(single, both[i:i + 1]) < 1e-4


def test_a_reference_without_active_entries_is_skipped_with_a_warning(caplog):
    # The negative applies only to the first 10% of sampling: later the host predicts no uncond at all
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=33)
    (early_negative,) = host_nodes.ConditioningSetTimestepRange().set_range(negative, 0.0, 0.1)
    x, sigma = noisy_latent(model, 300)
    with caplog.at_level("WARNING"):
        ours = denoise_once(sag(model), positive, early_negative, x, sigma, 4.0)
    assert torch.equal(ours, denoise_once(model, positive, early_negative, x, sigma, 4.0))
    assert "SAG skips this step" in caplog.text


# --- cost: no forced uncond, recording only where needed, window, scale 0 ----------------------------

def test_cfg_one_keeps_the_hosts_single_pass(model, family):
    positive, negative = make_conditioning(family, batch=1, seed=17)
    x, sigma = noisy_latent(model, 500)
    patched = sag(model)
    with count_model_calls(patched) as calls:
        denoise_once(patched, positive, negative, x, sigma, 1.0)
    assert [c.cond_or_uncond for c in calls] == [[0], [0]]  # positive, then the degraded positive
    with count_model_calls(patched) as calls:
        denoise_once(patched, positive, negative, x, sigma, 4.0)
    # cond + uncond, then the degraded uncond (a one-list pass, so labelled 0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1], [0]]


def test_records_only_the_reference_rows_and_releases_them(monkeypatch):
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=2, seed=18)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 8, 8))
    rows, kept = [], []
    real = sag_node.key_attention_mass

    def spy(q, k, heads, query_chunk=None):
        rows.append(q.shape[0])
        mass = real(q, k, heads, query_chunk)
        kept.append(weakref.ref(mass))
        return mass

    monkeypatch.setattr(sag_node, "key_attention_mass", spy)
    patched = sag(model)
    denoise_once(patched, positive, negative, x, sigma, 5.0)
    assert rows == [2]  # the uncond rows of the main forward, not its 4 rows nor the degraded pass
    gc.collect()
    assert all(ref() is None for ref in kept)  # nothing is held after the step
    rows.clear()
    denoise_once(patched, positive, negative, x, sigma, 1.0)
    assert rows == [2]


def test_scale_zero_and_outside_the_window_do_no_extra_work(model, family):
    positive, negative = make_conditioning(family, batch=1, seed=19)
    x, sigma = noisy_latent(model, 200)  # late: outside a 0.0-0.5 window
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    off = sag(model, scale=0.0)
    assert "sampler_post_cfg_function" not in off.model_options
    assert torch.equal(denoise_once(off, positive, negative, x, sigma, 4.0), plain)
    early = sag(model, end_percent=0.5)
    with count_model_calls(early) as calls:
        out = denoise_once(early, positive, negative, x, sigma, 4.0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1]]
    assert torch.equal(out, plain)
    x_hi, sigma_hi = noisy_latent(model, 950)
    with count_model_calls(early) as calls:
        denoise_once(early, positive, negative, x_hi, sigma_hi, 4.0)
    assert [sorted(c.cond_or_uncond) for c in calls] == [[0, 1], [0]]


def test_the_models_own_pass_is_untouched(model, family):
    # Recording observes the layer: the guided model's cond/uncond prediction is bit-identical.
    positive, negative = make_conditioning(family, batch=2, seed=20)
    x, sigma = noisy_latent(model, 500, shape=(2, 4, 8, 8))
    probe = with_sag_mask_probe(sag(model), lambda mask: None)
    assert torch.equal(denoise_once(probe, positive, negative, x, sigma, 5.0),
                       denoise_once(model, positive, negative, x, sigma, 5.0))


# --- chaining -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("sag_first", [True, False])
def test_chains_with_pag_on_the_same_layer_both_effects_kept(model, family, cfg, sag_first):
    positive, negative = make_conditioning(family, batch=2, seed=21)
    x, sigma = noisy_latent(model, 700, shape=(2, 4, 8, 8))
    base = denoise_once(model, positive, negative, x, sigma, cfg)
    sag_alone = denoise_once(sag(model), positive, negative, x, sigma, cfg)
    pag_alone = denoise_once(pag(model, layers="m0.0"), positive, negative, x, sigma, cfg)
    chained = pag(sag(model), layers="m0.0") if sag_first else sag(pag(model, layers="m0.0"))
    with count_model_calls(chained) as calls:
        both = denoise_once(chained, positive, negative, x, sigma, cfg)
    # one forward with PAG's perturbed copy (2), then SAG's degraded pass
    assert [sorted(c.cond_or_uncond) for c in calls] == ([[0, 1, 2], [0]] if cfg > 1.0 else [[0, 2], [0]])
    assert rel_err(both, base + (sag_alone - base) + (pag_alone - base)) < 1e-4
    assert rel_err(sag_alone, base) > 1e-3 and rel_err(pag_alone, base) > 1e-3


@pytest.mark.parametrize("sag_first", [True, False])
def test_chains_with_the_host_pag_node(sag_first):
    # SDXL's middle block has 3 transformer blocks: SAG records in block 0 only, and the host PAG's
    # run-time ("middle", 0) patch must still reach block 0 in its own pass.
    model = build_model("sdxl", seed=0)
    positive, negative = make_conditioning("sdxl", batch=1, seed=22)
    x, sigma = noisy_latent(model, 700)
    base = denoise_once(model, positive, negative, x, sigma, 4.0)
    sag_alone = denoise_once(sag(model), positive, negative, x, sigma, 4.0)
    host_alone = denoise_once(HostPAG.execute(model, 1.0).result[0], positive, negative, x, sigma, 4.0)
    chained = HostPAG.execute(sag(model), 1.0).result[0] if sag_first else sag(HostPAG.execute(model, 1.0).result[0])
    both = denoise_once(chained, positive, negative, x, sigma, 4.0)
    assert rel_err(both, base + (sag_alone - base) + (host_alone - base)) < 1e-4


def test_two_sag_nodes_on_different_layers_both_act():
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=23)
    x, sigma = noisy_latent(model, 600, shape=(1, 4, 12, 12))
    base = denoise_once(model, positive, negative, x, sigma, 4.0)
    mid = denoise_once(sag(model, scale=0.5), positive, negative, x, sigma, 4.0)
    # the second SAG sees the first one's result as its CFG input; its own term is independent of it
    up = denoise_once(sag(model, scale=0.5, layer="u1"), positive, negative, x, sigma, 4.0)
    both = denoise_once(sag(sag(model, scale=0.5), scale=0.5, layer="u1"), positive, negative, x, sigma, 4.0)
    assert rel_err(both, base + (mid - base) + (up - base)) < 1e-4


def test_keeps_another_packs_attn1_replacement(model, family):
    positive, negative = make_conditioning(family, batch=1, seed=24)
    x, sigma = noisy_latent(model, 700)
    seen = []

    def doubled_attention(q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        seen.append(list(extra_options["cond_or_uncond"]))
        return 2.0 * attention.optimized_attention(q, k, v, extra_options["n_heads"])

    foreign = model.clone()
    foreign.set_model_attn1_replace(doubled_attention, "middle", 0, 0)
    foreign_only = denoise_once(foreign, positive, negative, x, sigma, 4.0)
    seen.clear()
    probe = with_sag_mask_probe(sag(foreign), lambda mask: None)
    assert torch.equal(denoise_once(probe, positive, negative, x, sigma, 4.0), foreign_only)
    assert sorted(sum(seen, [])) == [0, 1]  # every row, the recorded uncond rows included
    seen.clear()
    out = denoise_once(sag(foreign), positive, negative, x, sigma, 4.0)
    assert seen == [[1, 0], [0]]  # the degraded pass runs through the foreign replacement too
    assert rel_err(out, foreign_only) > 1e-3
    assert rel_err(foreign_only, denoise_once(model, positive, negative, x, sigma, 4.0)) > 1e-3


# --- re-noising through the model's own parameterisation ----------------------------------------------

def test_renoise_for_every_sampling_type():
    g = torch.Generator().manual_seed(25)
    x, x0_ref, degraded = (torch.randn(2, 4, 6, 5, generator=g) for _ in range(3))
    sigma = torch.tensor([0.7, 0.7])
    for family in FAMILIES:  # EPS and V_PREDICTION
        sampling = build_model(family).get_model_object("model_sampling")
        torch.testing.assert_close(renoise(sampling, sigma, x, x0_ref, degraded), renoise_ve(degraded, x, x0_ref))
    flow = ModelSamplingSD3().patch(build_model("sd15"), 3.0)[0].get_model_object("model_sampling")
    out = renoise(flow, sigma, x, x0_ref, degraded)
    torch.testing.assert_close(out, renoise_flow(degraded, x, x0_ref, sigma))
    # CONST: x = (1 - s) x0 + s eps; the degraded input carries the same eps
    eps = (x - (1 - 0.7) * x0_ref) / 0.7
    torch.testing.assert_close(out, (1 - 0.7) * degraded + 0.7 * eps)


def test_flow_sampling_degraded_pass_gets_the_flow_renoise():
    model = ModelSamplingSD3().patch(build_model("sd15", seed=0), 3.0)[0]
    positive, negative = make_conditioning("sd15", batch=1, seed=26)
    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[600].reshape(1)
    g = torch.Generator().manual_seed(27)
    x = sampling.noise_scaling(sigma, torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g))
    patched = sag(model)
    inputs = []

    def keep_extra_pass_input(executor, base_model, conds, x_in, timestep, model_options):
        inputs.append(x_in)
        return executor(base_model, conds, x_in, timestep, model_options)

    watched = patched.clone()
    watched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test", keep_extra_pass_input)
    out = denoise_once(watched, positive, negative, x, sigma, 4.0)
    assert len(inputs) == 2
    mask = sag_mask_at(patched, positive, negative, x, sigma, 4.0)
    uncond_x0 = denoise_once(model, negative, negative, x, sigma, 1.0)
    degraded = blur_under_mask(uncond_x0, mask, 9, 1.0)
    s = sigma.item()
    eps = (x - (1 - s) * uncond_x0) / s
    torch.testing.assert_close(inputs[1], (1 - s) * degraded + s * eps, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


# --- sampling, the preview node, inputs ---------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "euler_ancestral", "uni_pc", "ddim"])
def test_every_sampler_family_runs_guided(sampler):
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=2, seed=28)
    latent = torch.zeros(2, 4, 10, 8)
    ours = sample(sag(model), positive, negative, latent, sampler_name=sampler, steps=4, cfg=4.0, seed=11)
    plain = sample(model, positive, negative, latent, sampler_name=sampler, steps=4, cfg=4.0, seed=11)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, plain) > 1e-3


def test_preview_node_shows_the_mask_of_that_step(family, model):
    positive, negative = make_conditioning(family, batch=2, seed=29)
    latent = {"samples": torch.zeros(2, 4, 13, 10)}
    patched = sag(model, threshold=1.05)
    mask, image = SAGMaskPreview.execute(patched, positive, negative, latent, 5, 10, 3, 4.0, "karras").result
    assert mask.shape == (2, 104, 80) and image.shape == (2, 104, 80, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and 0.0 < mask.mean() < 1.0
    assert torch.equal(image[..., 0], mask) and torch.equal(image[..., 2], mask)
    # the same mask as SAG's at that step: the empty latent noised to sigma 3 of the schedule
    sampling = model.get_model_object("model_sampling")
    sigma = comfy.samplers.calculate_sigmas(sampling, "karras", 10)[3].reshape(1)
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    x = sampling.noise_scaling(sigma, noise, latent["samples"])
    expected = sag_mask_at(patched, positive, negative, x, sigma, 4.0)
    assert torch.equal(mask, F.interpolate(expected, scale_factor=8, mode="nearest")[:, 0])


def test_preview_node_refuses_a_model_without_sag_and_a_step_past_the_end():
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=30)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="Self-Attention Guidance"):
        SAGMaskPreview.execute(model, positive, negative, latent, 0, 10, 0, 4.0, "normal")
    with pytest.raises(ValueError, match="step is 10 but steps is 10"):
        SAGMaskPreview.execute(sag(model), positive, negative, latent, 0, 10, 10, 4.0, "normal")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(scale=math.inf), ["scale"]),
        (dict(blur_sigma=-1.0), ["blur_sigma"]),
        (dict(threshold=-0.5), ["threshold"]),
        (dict(kernel_size=8), ["kernel_size", "odd", "7 or 9"]),
        (dict(start_percent=0.9, end_percent=0.1), ["start_percent", "end_percent"]),
        (dict(layer="u42"), ["SAG layer", "u42", "does not exist", "m0 = mid_block.attentions.0"]),
        (dict(layer="mid,u0"), ["selects 2", "m0.0, u0.0", "one layer"]),
        (dict(layer=""), ["empty"]),
    ],
)
def test_bad_inputs_name_the_input(kwargs, words):
    with pytest.raises(ValueError) as error:
        sag(build_model("sd15", seed=0), **kwargs)
    for word in words:
        assert word in str(error.value)


def test_a_whole_sdxl_middle_block_is_refused_with_its_layers():
    with pytest.raises(LayerSpecError) as error:
        sag(build_model("sdxl", seed=0), layer="mid")
    assert "selects 3" in str(error.value) and "m0.0, m0.1, m0.2" in str(error.value)
