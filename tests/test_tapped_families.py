"""PAG, SEG and SAG on PixArt (Alpha / Sigma), HunyuanDiT and Wan 2.2 S2V in the real host.

The host runs PixArt's and HunyuanDiT's self-attention without transformer_options: the nodes read its queries,
keys and values at its submodules and hand its output projection the guided attention (tapped attention). It
runs Wan S2V's blocks without them: the nodes hand the chosen blocks the forward's own. Checked on narrow models
with the real block counts (support.dit_models): the block names against the host's and diffusers' full-size
module trees; the defaults; at the attention itself, through plain torch hooks of the tests' own on the chosen
self-attention (its submodules' outputs, its output projection's input and output): PAG's perturbed rows are the
values, SEG's at infinite blur the attention of the mean query, SAG's mask the key mass of the captured queries
and keys; the other rows and the other blocks as the unpatched model's; end to end against Eq. 14 with the
tests' own perturbation; batch rows, the uncond placement, chaining, sampling, clean unpatching, PixArt's KV
compression refused, Wan S2V's reference image kept out of SEG's blur and SAG's map.
"""
import contextlib

import comfy.model_base
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.flux.math import apply_rope1
from comfy.ldm.hydit.attn_layers import apply_rotary_emb
from diffusers import HunyuanDiT2DModel, PixArtTransformer2DModel, WanTransformer3DModel

from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.seg import SmoothedEnergyGuidance
from attention_guidance.patching.families import recognise
from attention_guidance.patching.options import GUIDANCE_OPTIONS, LATENT_HW, chunk_ids
from attention_guidance.patching.sag import with_sag_mask_probe
from support.dit_models import DIT_CONFIGS, build_dit, count_forwards, empty_dit_latent, make_dit_conditioning
from support.dit_models import tiny_dit as tiny
from support.family_checks import (
    assert_batch_rows_guided_independently, chosen, expected_sag_mask, latent, pag, recording, rel_err, sag, seg,
)
from support.models import denoise_once, initialise_weights, sample


pytestmark = pytest.mark.without_autograd  # as ComfyUI runs a prompt (tests/conftest.py)


FAMILIES = ["pixart", "hunyuan_dit", "wan22_s2v"]
TAPPED = ("pixart", "hunyuan_dit")
# non-square latents; PixArt's position embedding needs round(((H + W) // 2) / 64) >= 1
HW = {"pixart": (32, 40), "hunyuan_dit": (8, 12), "wan22_s2v": (8, 12)}
FRAMES = {"pixart": 1, "hunyuan_dit": 1, "wan22_s2v": 3}
# the block of the attention-level checks, spelled as the host, diffusers or the short name (the defaults)
BLOCK = {"pixart": "transformer_blocks.14", "hunyuan_dit": "blocks.14", "wan22_s2v": "block.10"}
# a block whose guidance moves the prediction: in the random narrow HunyuanDiT the middle blocks barely change
# the output (its residual stream is large), its last block does
EFFECT_BLOCK = {"pixart": "block.14", "hunyuan_dit": "block.39", "wan22_s2v": "block.10"}
# the chosen self-attention inside a block and its output projection
SELF_ATTENTION = {"pixart": "attn", "hunyuan_dit": "attn1", "wan22_s2v": "self_attn"}
PROJECTION = {"pixart": "proj", "hunyuan_dit": "out_proj", "wan22_s2v": "o"}
# the submodules whose outputs give the queries, keys and values: (values, query norm, key norm)
SUBMODULES = {"pixart": ("qkv", "q_norm", "k_norm"), "hunyuan_dit": ("Wqkv", "q_norm", "k_norm"),
              "wan22_s2v": ("v", "norm_q", "norm_k")}
UNCOND = "uncond branch"  # the placement that perturbs the sampler's own negative
PAG_COPY = 2  # the cond id of PAG's / SEG's perturbed copy of the positive


def block_index(family, spec):
    return chosen(family, spec).index


def grid_of(family, hw):
    return (FRAMES[family], hw[0] // 2, hw[1] // 2)  # 2x2 patches


# --- the tests' own view of one self-attention: plain torch hooks ------------------------------------------

def _queries_keys_values(family, call, heads):
    """[B, heads, L, D] queries and keys as the host's attention takes them, [B, L, heads * D] values, from the
    outputs of the attention's submodules (and its forward's RoPE frequencies)."""
    values, q, k = call["values"], call["q_norm"], call["k_norm"]
    if family == "pixart":  # qkv [B, L, 3C]: the values last; norms on [B, L, C]
        batch, tokens, width = q.shape
        q, k = (t.reshape(batch, tokens, heads, -1).transpose(1, 2) for t in (q, k))
        return q, k, values[..., 2 * width:]
    if family == "hunyuan_dit":  # Wqkv [B, L, 3C]; norms on [B, heads, L, D], then the 2-D RoPE of the forward
        q, k = apply_rotary_emb(q, k, call["args"][1], head_first=True)
        width = values.shape[-1] // 3
        return q, k, values[..., 2 * width:]
    # Wan: norms on [B, L, C], then the RoPE of the forward; v [B, L, C]
    batch, tokens, _ = q.shape
    freqs = call["args"][1]
    q, k = (apply_rope1(t.view(batch, tokens, heads, -1), freqs).transpose(1, 2) for t in (q, k))
    return q, k, values


def heads_of(t, heads):
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def concatenated(t):
    """[B, heads, L, D] as [B, L, heads * D]."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def attend(q, k, v):
    """The tests' own attention: [B, heads, L, D] queries and keys, [B, L, heads * D] values."""
    return concatenated(F.scaled_dot_product_attention(q, k, heads_of(v, q.shape[1])))


@contextlib.contextmanager
def hooked(model, family, index, replace=None):
    """Forward hooks of the test's own (removed on exit) on block ``index``'s self-attention of ``model``'s
    diffusion model. Yields a list with one dict per call of the attention: ``q``, ``k``, ``v`` (as above),
    ``attention`` (what the host's attention gave, the output projection's input) and ``out`` (the projection's
    output). ``replace(call)``: a ``[B, L, heads * D]`` input for the projection instead of the host's (the
    projection's output is recomputed from it), or None to leave it."""
    attention = model.model.diffusion_model.blocks[index].get_submodule(SELF_ATTENTION[family])
    calls = []
    handles = []

    def opened(module, args, kwargs):
        calls.append({"args": args})

    def keep(name):
        def hook(module, args, output):
            calls[-1][name] = output
        return hook

    def projected(module, args, output):
        call = calls[-1]
        call["q"], call["k"], call["v"] = _queries_keys_values(family, call, attention.num_heads)
        call["attention"], call["out"] = args[0], output
        new = replace(call) if replace is not None else None
        if new is None:
            return None
        call["out"] = F.linear(new.to(output.dtype), module.weight, module.bias)
        return call["out"]

    try:
        handles.append(attention.register_forward_pre_hook(opened, with_kwargs=True))
        for name, key in zip(SUBMODULES[family], ("values", "q_norm", "k_norm")):
            handles.append(attention.get_submodule(name).register_forward_hook(keep(key)))
        handles.append(attention.get_submodule(PROJECTION[family]).register_forward_hook(projected))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def projection(model, family, index):
    return model.model.diffusion_model.blocks[index].get_submodule(f"{SELF_ATTENTION[family]}.{PROJECTION[family]}")


def project(model, family, index, t):
    module = projection(model, family, index)
    return F.linear(t, module.weight, module.bias)


def mean_queries(q, grid):
    """SEG's infinite blur: each of the grid's queries (the first frames x h x w tokens, frame by frame) the mean of
    its frame's; queries after the grid (Wan S2V's reference image) keep theirs."""
    frames, height, width = grid
    count = frames * height * width
    q = q.clone()
    per_frame = q[:, :, :count].reshape(q.shape[0], q.shape[1], frames, height * width, q.shape[3])
    q[:, :, :count] = per_frame.mean(3, keepdim=True).expand_as(per_frame).reshape(q.shape[0], q.shape[1], count,
                                                                                  q.shape[3])
    return q


def identity(call):
    return call["v"]


def mean_query_attention(grid):
    return lambda call: attend(mean_queries(call["q"], grid), call["k"], call["v"])


def conditioning(family, batch=1, seed=3):
    return make_dit_conditioning(family, batch=batch, seed=seed)


def s2v_extras(kind, hw):
    """Wan S2V conditioning beyond the text: its reference image's latent, the motion frames of the clip before,
    the audio features."""
    generator = torch.Generator().manual_seed(11)
    extras = {"reference_latents": [torch.randn(1, 16, 1, *hw, generator=generator)]}
    if kind == "reference, motion and audio":
        extras["reference_motion"] = torch.randn(1, 16, 19, *hw, generator=generator)
        extras["audio_embed"] = torch.randn(1, 25, 32, 4 * FRAMES["wan22_s2v"], generator=generator)
    return extras


def s2v_conditioning(kind, hw, seed=3):
    """Wan S2V's positive and negative with ``s2v_extras(kind)`` (None: the text only)."""
    positive, negative = conditioning("wan22_s2v", seed=seed)
    if kind is None:
        return positive, negative
    return tuple([[c[0][0], {**c[0][1], **s2v_extras(kind, hw)}]] for c in (positive, negative))


S2V_EXTRAS = ["reference", "reference, motion and audio"]
# Wan S2V also with its reference image's latent (after the video's tokens, a frame of them), and the motion frames
WITH_EXTRAS = [(family, None) for family in FAMILIES] + [("wan22_s2v", kind) for kind in S2V_EXTRAS]


# --- sanity: the hooks see the host's attention -----------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_the_tests_own_attention_from_the_hooks_is_the_hosts(family):
    model = tiny(family)
    positive, negative = conditioning(family)
    x, sigma = latent(family, hw=HW[family])
    index = block_index(family, BLOCK[family])
    with hooked(model, family, index) as calls:
        denoise_once(model, positive, negative, x, sigma, 4.0)
    (call,) = calls
    assert call["q"].shape[2] == FRAMES[family] * HW[family][0] * HW[family][1] // 4
    assert rel_err(attend(call["q"], call["k"], call["v"]), call["attention"]) < 1e-5


# --- PAG: the perturbed rows' attention is the values ------------------------------------------------------

def rows_of(forward, chunk):
    """The rows of cond id ``chunk`` in one forward (its chunks of equal size in ``cond_or_uncond`` order)."""
    size = forward.batch_size // len(forward.cond_or_uncond)
    position = forward.cond_or_uncond.index(chunk)
    return slice(position * size, (position + 1) * size)


def run_hooked(model, family, index, positive, negative, x, sigma, cfg, replace=None):
    """(the forwards, the hooked calls of block ``index``'s self-attention) of one guided evaluation."""
    with count_forwards(model) as forwards, hooked(model, family, index, replace) as calls:
        out = denoise_once(model, positive, negative, x, sigma, cfg)
    assert torch.isfinite(out).all()
    return forwards, calls


def assert_pag_rows(family, patched, spec, positive, negative, x, sigma):
    """Under PAG at ``spec``, the perturbed copy's rows of the chosen self-attention hand its output projection
    the values; the positive's and the negative's rows what the unpatched model's attention gives."""
    model = tiny(family)
    index = block_index(family, spec)
    plain_forwards, (plain,) = run_hooked(model, family, index, positive, negative, x, sigma, 4.0)
    forwards, calls = run_hooked(patched, family, index, positive, negative, x, sigma, 4.0)
    # CFG's forward with PAG's copy first (SAG's degraded pass, where chained, after it)
    assert sorted(forwards[0].cond_or_uncond) == [0, 1, PAG_COPY]
    (forward, ours), (plain_forward,) = (forwards[0], calls[0]), plain_forwards
    copy = rows_of(forward, PAG_COPY)
    # the test's own identity attention of the copy's rows: each token its value, heads concatenated
    assert rel_err(ours["out"][copy], project(model, family, index, ours["v"][copy])) < 1e-6
    for chunk in (0, 1):
        row, plain_row = rows_of(forward, chunk), rows_of(plain_forward, chunk)
        assert rel_err(ours["out"][row], plain["out"][plain_row]) < 1e-5
        assert rel_err(ours["out"][row], project(model, family, index,
                                                 attend(ours["q"], ours["k"], ours["v"])[row])) < 1e-5
    # the copy is the positive's: its values and the host's attention are the positive's, perturbed it is not
    positive_row = rows_of(forward, 0)
    assert rel_err(ours["v"][copy], ours["v"][positive_row]) < 1e-6
    assert rel_err(ours["out"][copy], ours["out"][positive_row]) > 1e-2
    return ours


@pytest.mark.parametrize("family, kind", WITH_EXTRAS)
def test_pag_rows_of_the_chosen_attention_are_the_values(family, kind):
    # on Wan S2V every token of the self-attention, the reference image's and the motion frames' too
    positive, negative = s2v_conditioning(kind, HW[family]) if family == "wan22_s2v" else conditioning(family)
    x, sigma = latent(family, hw=HW[family])
    assert_pag_rows(family, pag(tiny(family), BLOCK[family]), BLOCK[family], positive, negative, x, sigma)


@pytest.mark.parametrize("order", ["sag then pag", "pag then sag"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pag_chained_with_sag_on_the_same_block_keeps_its_values(family, order):
    model = tiny(family)
    spec = BLOCK[family]
    positive, negative = conditioning(family)
    x, sigma = latent(family, hw=HW[family])
    patched = pag(sag(model, spec), spec) if order == "sag then pag" else sag(pag(model, spec), spec)
    assert_pag_rows(family, patched, spec, positive, negative, x, sigma)
    # and SAG maps what it maps alone (the negative's rows, which PAG leaves)
    chained_mask, alone_mask = [], []
    denoise_once(with_sag_mask_probe(patched, chained_mask.append), positive, negative, x, sigma, 4.0)
    denoise_once(with_sag_mask_probe(sag(model, spec), alone_mask.append), positive, negative, x, sigma, 4.0)
    assert 0 < alone_mask[0].mean() < 1
    assert torch.equal(chained_mask[0], alone_mask[0])


# --- block names, recognition and defaults on the full-size architectures ----------------------------------

PIXART_SIGMA_FULL = {  # comfy.model_detection of PixArt Sigma XL-2
    "image_model": "pixart_sigma", "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
    "depth": 28, "micro_condition": False,
}
PIXART_ALPHA_FULL = {**PIXART_SIGMA_FULL, "image_model": "pixart_alpha", "micro_condition": True}
HUNYUAN_DIT_FULL = {"image_model": "hydit", "depth": 40, "hidden_size": 1408, "mlp_ratio": 4.3637}  # DiT-g/2
HUNYUAN_DIT1_FULL = {**HUNYUAN_DIT_FULL, "image_model": "hydit1", "size_cond": True, "use_style_cond": True}
WAN_S2V_FULL = {  # comfy.model_detection of Wan 2.2 S2V 14B
    "image_model": "wan2.1", "model_type": "s2v", "dim": 5120, "out_dim": 16, "num_heads": 40, "ffn_dim": 13824,
    "num_layers": 40, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True,
    "cross_attn_norm": True, "eps": 1e-6, "in_dim": 16,
}
# the transformer config of diffusers' HunyuanDiT v1.x checkpoints (DiT-g/2)
HUNYUAN_DIT_DIFFUSERS = {"in_channels": 4, "patch_size": 2, "num_layers": 40, "hidden_size": 1408, "mlp_ratio": 4.3637,
                         "sample_size": 128}
# config class, model class, unet_config, diffusers' model, depth, family, (PAG default, SAG default), source
FULL_SIZE = {
    "pixart_sigma": (comfy.supported_models.PixArtSigma, comfy.model_base.PixArt, PIXART_SIGMA_FULL,
                     lambda: PixArtTransformer2DModel(), 28, "PixArt", ("block.14", "block.14"),
                     "PixArtSigmaPAGPipeline"),
    "pixart_alpha": (comfy.supported_models.PixArtAlpha, comfy.model_base.PixArt, PIXART_ALPHA_FULL,
                     lambda: PixArtTransformer2DModel(), 28, "PixArt", ("block.14", "block.14"),
                     "PixArtSigmaPAGPipeline"),
    "hunyuan_dit": (comfy.supported_models.HunyuanDiT, comfy.model_base.HunyuanDiT, HUNYUAN_DIT_FULL,
                    lambda: HunyuanDiT2DModel(**HUNYUAN_DIT_DIFFUSERS), 40, "HunyuanDiT", ("block.14", "block.14"),
                    "HunyuanDiTPAGPipeline"),
    "hunyuan_dit1": (comfy.supported_models.HunyuanDiT1, comfy.model_base.HunyuanDiT, HUNYUAN_DIT1_FULL,
                     lambda: HunyuanDiT2DModel(**HUNYUAN_DIT_DIFFUSERS), 40, "HunyuanDiT", ("block.14", "block.14"),
                     "HunyuanDiTPAGPipeline"),
    # diffusers has no S2V model; its blocks are Wan's, named as in diffusers' Wan transformer
    "wan22_s2v": (comfy.supported_models.WAN22_S2V, comfy.model_base.WAN22_S2V, WAN_S2V_FULL,
                  lambda: WanTransformer3DModel(num_layers=40), 40, "Wan S2V", ("block.10", "block.10"), "WanVideoSLG"),
}
# the submodules of each block's self-attention the nodes use (tapped families: recorded, then the projection)
FULL_SUBMODULES = {"pixart": ("attn", ("qkv", "q_norm", "k_norm", "proj")),
                   "hunyuan_dit": ("attn1", ("Wqkv", "q_norm", "k_norm", "out_proj")),
                   "wan22_s2v": ("self_attn", ("q", "k", "v", "o"))}


def full_size(which):
    config_class, model_class, unet_config = FULL_SIZE[which][:3]
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model_class(config_class(dict(unet_config)), device="meta"),
                                            load_device=cpu, offload_device=cpu)


def family_of(which):
    return "pixart" if which.startswith("pixart") else "hunyuan_dit" if which.startswith("hunyuan") else "wan22_s2v"


@pytest.mark.parametrize("which", FULL_SIZE)
def test_every_block_name_is_a_module_of_the_host_and_of_diffusers(which):
    patcher = full_size(which)
    recognised = recognise(patcher, "test")
    layout = recognised.layout
    depth, family_name = FULL_SIZE[which][4:6]
    assert recognised.family.name == family_name
    assert type(patcher.model.model_config).__name__ in recognised.family.host_types
    assert layout.depths == {"block": depth}
    host_modules = dict(patcher.model.diffusion_model.named_modules())
    with torch.device("meta"):
        diffusers_modules = dict(FULL_SIZE[which][3]().named_modules())
    attention, submodules = FULL_SUBMODULES[family_of(which)]
    assert recognised.family.reach.taps is None or (recognised.family.reach.taps.attention, (
        *recognised.family.reach.taps.recorded, recognised.family.reach.taps.output)) == (attention, submodules)
    for block in layout.sites:
        assert block.host_name in host_modules, block
        for name in submodules:
            assert f"{block.host_name}.{attention}.{name}" in host_modules, (block, name)
        assert block.diffusers_name in diffusers_modules, block
        assert block.diffusers_name.endswith(".attn1")  # diffusers' self-attention (attn2: the text)
        for spelling in (block.index_name, block.diffusers_name, block.host_name):
            assert layout.select(spelling) == [block]
    if family_of(which) == "pixart":  # no KV compression in the published checkpoints
        assert all(host_modules[f"{block.host_name}.attn"].sr_ratio == 1 for block in layout.sites)


@pytest.mark.parametrize("which", FULL_SIZE)
def test_full_size_defaults_name_blocks_with_a_source(which):
    layout = recognise(full_size(which), "test").layout
    pag_default, sag_default = FULL_SIZE[which][6]
    assert (layout.default_layers("pag"), layout.default_layers("sag")) == (pag_default, sag_default)
    assert layout.default_layers("seg") == layout.default_layers("pag")
    for method in ("pag", "seg", "sag"):
        assert [block.index_name for block in layout.select(layout.resolve("auto", method))] == [pag_default]
    assert FULL_SIZE[which][7] in layout.default_source("pag")
    assert ("no published SAG setting" if which == "wan22_s2v" else "none published for SAG") in \
        layout.default_source("sag")
    # the narrow test models have the full-size depths and so the same defaults
    tiny_layout = recognise(tiny(family_of(which)), "test").layout
    assert (tiny_layout.default_layers("pag"), tiny_layout.default_layers("sag")) == (pag_default, sag_default)


# --- PAG end to end: Eq. 14 with the tests' own identity attention -----------------------------------------

@contextlib.contextmanager
def perturbed(family, spec, replace):
    """The narrow model with the chosen block's self-attention replaced, in every row, by ``replace`` (the
    tests' own hooks)."""
    model = tiny(family)
    with hooked(model, family, block_index(family, spec), replace):
        yield model


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_pag_is_eq14_with_the_identity_attention_of_the_chosen_block(family, cfg):
    model = tiny(family)
    positive, negative = conditioning(family)
    x, sigma = latent(family, hw=HW[family])
    spec = EFFECT_BLOCK[family]
    plain = denoise_once(model, positive, negative, x, sigma, cfg)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    with perturbed(family, spec, identity) as identity_model:
        perturbed_cond = denoise_once(identity_model, positive, negative, x, sigma, 1.0)
    ours = denoise_once(pag(model, spec), positive, negative, x, sigma, cfg)
    assert rel_err(ours, plain + 3.0 * (cond - perturbed_cond)) < 1e-4  # paper Eq. 14
    assert rel_err(ours, plain) > 1e-2


# --- SEG at infinite blur: the attention of the mean query --------------------------------------------------

@pytest.mark.parametrize("family, kind", WITH_EXTRAS)
def test_seg_at_infinite_blur_is_the_attention_of_the_mean_query(family, kind):
    model = tiny(family)
    hw = HW[family]
    positive, negative = s2v_conditioning(kind, hw) if family == "wan22_s2v" else conditioning(family)
    x, sigma = latent(family, hw=hw)
    index = block_index(family, BLOCK[family])
    grid = grid_of(family, hw)
    count = grid[0] * grid[1] * grid[2]
    forwards, calls = run_hooked(seg(model, BLOCK[family], blur_sigma=10000.0), family, index, positive, negative, x,
                                 sigma, 4.0)
    (forward,), (ours,) = forwards, calls
    assert sorted(forward.cond_or_uncond) == [0, 1, PAG_COPY]
    if kind == "reference, motion and audio":
        assert ours["q"].shape[2] > count + grid[1] * grid[2]
    else:
        assert ours["q"].shape[2] == count + (grid[1] * grid[2] if kind == "reference" else 0)
    copy = rows_of(forward, PAG_COPY)
    expected = attend(mean_queries(ours["q"][copy], grid), ours["k"][copy], ours["v"][copy])
    assert rel_err(ours["out"][copy], project(model, family, index, expected)) < 1e-5
    # the blur's own effect, small where a random model's attention is near uniform (Wan S2V's), is the mean
    # query's
    unblurred = project(model, family, index, attend(ours["q"][copy], ours["k"][copy], ours["v"][copy]))
    assert rel_err(ours["out"][copy] - unblurred, project(model, family, index, expected) - unblurred) < 1e-2
    assert rel_err(ours["out"][copy], unblurred) > 1e-5
    for chunk in (0, 1):  # the positive's and the negative's rows: the attention as it was
        row = rows_of(forward, chunk)
        assert rel_err(ours["out"][row], project(model, family, index, ours["attention"][row])) < 1e-5


@pytest.mark.parametrize("kind", S2V_EXTRAS)
def test_seg_on_wan_s2v_blurs_the_video_queries_and_leaves_the_reference_queries(kind):
    # the override sees the chosen self-attention twice: the positive's and the negative's rows as they are, then
    # the copy's rows with its queries blurred (each frame's the mean of the frame), the reference image's and the
    # motion frames' own
    family = "wan22_s2v"
    hw = HW[family]
    positive, negative = s2v_conditioning(kind, hw)
    x, sigma = latent(family, hw=hw)
    calls = []
    denoise_once(seg(recording(tiny(family), calls), BLOCK[family], blur_sigma=10000.0), positive, negative, x, sigma,
                 4.0)
    grid = grid_of(family, hw)
    count = grid[0] * grid[1] * grid[2]
    self_attention = [(options, args) for options, args, _ in calls if args[1].shape[1] == args[0].shape[1]]
    (rest_options, rest), (copy_options, copy) = self_attention
    assert [args[0].shape[0] for _, args in self_attention] == [2, 1]
    assert chunk_ids(copy_options) == [PAG_COPY] and sorted(chunk_ids(rest_options)) == [0, 1]
    positive_row = chunk_ids(rest_options).index(0)
    q, q_copy = heads_of(rest[0][positive_row:positive_row + 1], 2), heads_of(copy[0], 2)  # [B, L, C] as the host's
    assert q.shape[2] == count + grid[1] * grid[2] if kind == "reference" else q.shape[2] > count + grid[1] * grid[2]
    assert rel_err(q_copy, mean_queries(q, grid)) < 1e-6
    assert torch.equal(q_copy[:, :, count:], q[:, :, count:])  # the reference image's and the motion's queries
    assert not torch.allclose(q_copy[:, :, :count], q[:, :, :count])
    for i in (1, 2):  # keys and values as the positive's
        assert torch.equal(copy[i], rest[i][positive_row:positive_row + 1])


# --- SAG: the key mass of the grid's tokens in the chosen block ----------------------------------------------

SAG_SIZES = [(family, hw) for family, sizes in (("pixart", [(32, 40), (40, 32), (36, 36)]),
                                                  ("hunyuan_dit", [(8, 12), (12, 8), (10, 10)]),
                                                  ("wan22_s2v", [(8, 12), (6, 10)])) for hw in sizes]


@pytest.mark.parametrize("family, latent_hw", SAG_SIZES)
def test_sag_mask_is_the_key_mass_of_the_captured_queries_and_keys(family, latent_hw):
    model = tiny(family)
    x, sigma = latent(family, hw=latent_hw, sigma=0.5)
    positive, negative = conditioning(family, seed=6)
    index = block_index(family, BLOCK[family])
    kept = []
    forwards, calls = run_hooked(with_sag_mask_probe(sag(model, BLOCK[family]), kept.append), family, index, positive,
                                 negative, x, sigma, 4.0)
    grid = grid_of(family, latent_hw)
    count = grid[0] * grid[1] * grid[2]
    assert sorted(forwards[0].cond_or_uncond) == [0, 1]
    uncond = rows_of(forwards[0], 1)  # SAG's reference under CFG
    q, k = calls[0]["q"][uncond], calls[0]["k"][uncond]
    assert q.shape[2] == count
    assert kept[0].shape == (grid[0], 1, *latent_hw)
    assert 0 < kept[0].mean() < 1
    assert torch.equal(kept[0], expected_sag_mask(q, k, slice(0, count), grid, latent_hw))


@pytest.mark.parametrize("kind", [None, *S2V_EXTRAS])
def test_sag_mask_on_wan_s2v_is_the_key_mass_of_the_video_tokens(kind):
    # from the queries and keys the host hands its attention (a recording override): the reference image's and the
    # motion frames' tokens follow the video's and are left out of the map
    family, latent_hw = "wan22_s2v", (8, 12)
    x, sigma = latent(family, hw=latent_hw, sigma=0.5)
    positive, negative = s2v_conditioning(kind, latent_hw, seed=6)
    calls, kept = [], []
    denoise_once(with_sag_mask_probe(sag(recording(tiny(family), calls), BLOCK[family]), kept.append), positive,
                 negative, x, sigma, 4.0)
    grid = grid_of(family, latent_hw)
    count = grid[0] * grid[1] * grid[2]
    options, args, _ = calls[0]  # the chosen block's self-attention, the first call the override sees
    extra = {None: 0, "reference": grid[1] * grid[2]}.get(kind)
    assert args[0].shape[1] == args[1].shape[1]
    assert args[0].shape[1] == count + extra if extra is not None else args[0].shape[1] > count + grid[1] * grid[2]
    uncond = chunk_ids(options).index(1)
    q, k = (heads_of(t[uncond:uncond + 1], 2) for t in args[:2])
    assert 0 < kept[0].mean() < 1
    assert torch.equal(kept[0], expected_sag_mask(q, k, slice(0, count), grid, latent_hw))


# --- what is not chosen stays the host's ----------------------------------------------------------------------

def pag_uncond(model, layers, scale=3.0):
    return PerturbedAttentionGuidance.execute(model, scale, layers, 0.0, 0.0, 1.0, 0.0, UNCOND).result[0]


def seg_uncond(model, layers, scale=3.0, blur_sigma=10000.0):
    return SmoothedEnergyGuidance.execute(model, scale, blur_sigma, layers, 0.0, 1.0, UNCOND).result[0]


@contextlib.contextmanager
def block_outputs(model):
    """Every block's output, forward by forward (the tests' own hooks)."""
    outputs = {}
    handles = [block.register_forward_hook(lambda module, args, out, i=i: outputs.setdefault(i, []).append(out))
               for i, block in enumerate(model.model.diffusion_model.blocks)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("placement", [UNCOND, "own branch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_blocks_not_chosen_are_the_unpatched_models(family, placement):
    model = tiny(family)
    positive, negative = conditioning(family, seed=4)
    x, sigma = latent(family, hw=HW[family])
    spec = BLOCK[family]
    index = block_index(family, spec)
    patched = pag_uncond(model, spec) if placement == UNCOND else pag(model, spec)
    with count_forwards(model) as plain_forwards, block_outputs(model) as plain:
        denoise_once(model, positive, negative, x, sigma, 4.0)
    with count_forwards(patched) as forwards, block_outputs(model) as ours:
        denoise_once(patched, positive, negative, x, sigma, 4.0)
    (forward,), (plain_forward,) = forwards, plain_forwards
    assert len(forward.cond_or_uncond) == (2 if placement == UNCOND else 3)
    for i in sorted(plain):
        (out,), (plain_out,) = ours[i], plain[i]
        positive, plain_positive = out[rows_of(forward, 0)], plain_out[rows_of(plain_forward, 0)]
        negative, plain_negative = out[rows_of(forward, 1)], plain_out[rows_of(plain_forward, 1)]
        if placement == UNCOND:  # CFG's own batch: bit for bit the host's, but where the negative is perturbed
            assert torch.equal(positive, plain_positive), i
            assert torch.equal(negative, plain_negative) == (i < index), i
        else:  # a batch of three (float32 rounds a larger batch's rows a little differently)
            assert rel_err(positive, plain_positive) < 1e-5 and rel_err(negative, plain_negative) < 1e-5, i
            assert torch.equal(out[rows_of(forward, PAG_COPY)], positive) == (i < index), i
    # the object patches are on the chosen block's self-attention (and the model's forward), and on the clone only
    added = set(patched.object_patches) - set(model.object_patches)
    block = chosen(family, spec).host_name
    assert added and all(key.startswith(f"diffusion_model.{block}.") or key == "diffusion_model.forward"
                         for key in added), added


@pytest.mark.parametrize("node", ["pag", "seg", "sag"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_scale_of_0_gives_the_unpatched_model(family, node):
    model = tiny(family)
    positive, negative = conditioning(family, seed=5)
    x, sigma = latent(family, hw=HW[family])
    patched = {"pag": pag, "seg": seg, "sag": sag}[node](model, BLOCK[family], scale=0.0)
    assert patched.object_patches == model.object_patches
    assert torch.equal(denoise_once(patched, positive, negative, x, sigma, 4.0),
                       denoise_once(model, positive, negative, x, sigma, 4.0))


def test_unpatching_gives_the_hosts_modules_back():
    # sampled with every node on two families' chosen blocks, then with the unpatched model: its output is the one
    # before, and no module keeps a forward of ours
    for family in FAMILIES:
        model = tiny(family)
        positive, negative = conditioning(family, batch=1, seed=7)
        start = empty_dit_latent(model, (1, 16, *HW[family]))
        before = sample(model, positive, negative, start, steps=2, cfg=3.5, seed=3)
        spec = EFFECT_BLOCK[family]
        patched = sag(seg(pag(model, spec), spec), spec)
        assert not torch.equal(sample(patched, positive, negative, start, steps=2, cfg=3.5, seed=3), before)
        assert torch.equal(sample(model.clone(), positive, negative, start, steps=2, cfg=3.5, seed=3), before)
        diffusion_model = model.model.diffusion_model
        for name, module in [("", diffusion_model), *diffusion_model.named_modules()]:
            forward = module.__dict__.get("forward")
            assert forward is None or getattr(forward, "__func__", None) is type(module).forward, (family, name)


# --- batches, latent sizes, placement, chaining, sampling -----------------------------------------------------

@pytest.mark.parametrize("node", ["pag", "seg", "sag"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_are_guided_independently(family, node):
    assert_batch_rows_guided_independently(family, {"pag": pag, "seg": seg, "sag": sag}[node], EFFECT_BLOCK[family],
                                           hw=HW[family])


@pytest.mark.parametrize("node", ["pag", "seg"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_uncond_placement_is_cfg_with_the_perturbed_negative_in_cfgs_forward(family, node):
    # D = D^(u) + w (D(c) - D^(u)), the perturbed negative from the tests' own perturbation, in CFG's one forward
    model = tiny(family)
    positive, negative = conditioning(family, seed=8)
    x, sigma = latent(family, hw=HW[family])
    spec = EFFECT_BLOCK[family]
    patched = (pag_uncond if node == "pag" else seg_uncond)(model, spec)
    with count_forwards(patched) as forwards:
        ours = denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert [(f.batch_size, sorted(f.cond_or_uncond)) for f in forwards] == [(2, [0, 1])]
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    replace = identity if node == "pag" else mean_query_attention(grid_of(family, HW[family]))
    with perturbed(family, spec, replace) as perturbed_model:
        perturbed_uncond = denoise_once(perturbed_model, negative, positive, x, sigma, 1.0)  # the negative as cond
    assert rel_err(ours, perturbed_uncond + 4.0 * (cond - perturbed_uncond)) < 1e-4
    assert rel_err(ours, denoise_once(model, positive, negative, x, sigma, 4.0)) > (1e-2 if node == "pag" else 1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_guides_a_sampled_non_square_latent_and_stays_finite(family):
    model = tiny(family)
    positive, negative = conditioning(family, batch=2, seed=8)
    start = empty_dit_latent(model, (2, 16, *HW[family]))
    plain = sample(model, positive, negative, start, steps=2, cfg=3.5, seed=3)
    spec = EFFECT_BLOCK[family]
    for name, patched in (("pag auto", pag(model, "auto")), ("seg auto", seg(model, "auto")),
                          ("sag auto", sag(model, "auto")), ("pag", pag(model, spec)), ("seg", seg(model, spec)),
                          ("sag", sag(model, spec)), ("sag+pag", sag(pag(model, spec), spec)),
                          ("pag+sag", pag(sag(model, spec), spec)), ("uncond pag", pag_uncond(model, spec))):
        out = sample(patched, positive, negative, start, steps=2, cfg=3.5, seed=3)
        assert out.shape == plain.shape
        assert torch.isfinite(out).all()
        # SEG's blurred queries move a random model's near-uniform attention far less than PAG's identity (its size
        # is checked at the attention above), as does PAG at the middle blocks of the random HunyuanDiT ('auto')
        small = name.startswith("seg") or (family == "hunyuan_dit" and name == "pag auto")
        assert rel_err(out, plain) > (1e-6 if small else 1e-3), name
    assert torch.equal(sample(model, positive, negative, start, steps=2, cfg=3.5, seed=3), plain)  # model untouched


# --- PixArt's KV compression --------------------------------------------------------------------------------

def pixart_with_kv_compression(layers):
    """The narrow PixArt with PixArt Sigma's KV token compression (every second key and value) in ``layers``."""
    config = comfy.supported_models.PixArtSigma(dict(DIT_CONFIGS["pixart"], kv_compress_config={
        "sampling": "uniform_every", "scale_factor": 2, "kv_compress_layer": list(layers)}))
    config.set_inference_dtype(torch.float32, None)
    cpu = torch.device("cpu")
    base = comfy.model_base.PixArt(config, device=cpu)
    initialise_weights(base.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("node", ["pag", "seg", "sag"])
def test_a_pixart_block_with_kv_compression_is_refused_by_name(node):
    model = pixart_with_kv_compression([14])
    apply = {"pag": pag, "seg": seg, "sag": sag}[node]
    for spec in ("block.14", "auto", "transformer_blocks.14"):
        with pytest.raises(ValueError) as error:
            apply(model, spec)
        message = str(error.value)
        assert "block.14" in message and "KV compression" in message and "compressed" in message, message
        assert "Choose another block" in message
    assert not model.object_patches  # nothing left on the model given to the node
    # its other blocks are guided, and the compressed block runs as the host's
    positive, negative = conditioning("pixart", seed=9)
    start = empty_dit_latent(model, (1, 16, *HW["pixart"]))
    plain = sample(model, positive, negative, start, steps=2, cfg=3.5, seed=3)
    out = sample(apply(model, "block.13"), positive, negative, start, steps=2, cfg=3.5, seed=3)
    assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-6


def test_an_attention_built_otherwise_than_the_pack_knows_is_refused_saying_so():
    """A host whose PixArt self-attention lacks a submodule the pack reads (as a future ComfyUI might build it)."""
    model = build_dit("pixart", seed=0)
    del model.model.diffusion_model.blocks[14].attn.q_norm
    with pytest.raises(ValueError) as error:
        pag(model, "block.14")
    message = str(error.value)
    assert "blocks.14.attn" in message and "q_norm" in message and "Update the pack" in message, message
    assert not model.object_patches


# --- which attention calls are reached -----------------------------------------------------------------------

REACH_BLOCKS = "block.0, block.14"


@pytest.mark.parametrize("family", TAPPED)
def test_the_tapped_attention_hands_the_previous_override_the_rows_it_does_not_perturb(family):
    # the host calls these attentions without transformer_options: an override set before the node sees only the
    # chosen blocks' self-attention, as the nodes compute it, for the positive's and the negative's rows, with the
    # forward's options and the host's own arguments (HunyuanDiT's float32 attention precision among them)
    model = tiny(family)
    positive, negative = conditioning(family, seed=4)
    x, sigma = latent(family, hw=HW[family])
    calls = []
    with count_forwards(model) as forwards:
        out = denoise_once(pag(recording(model, calls), REACH_BLOCKS), positive, negative, x, sigma, 4.0)
    assert torch.isfinite(out).all()
    tokens = HW[family][0] * HW[family][1] // 4
    blocks = recognise(model, "test").layout.select(REACH_BLOCKS)
    assert len(calls) == len(blocks) == 2
    for block, (options, args, kwargs) in zip(blocks, calls):
        assert sorted(chunk_ids(options)) == [0, 1]
        assert [tuple(t.shape) for t in args[:3]] == [(2, 2, tokens, 32)] * 3  # [B, heads, L, D]
        assert kwargs["skip_reshape"]
        assert options[GUIDANCE_OPTIONS][LATENT_HW] == HW[family]  # the forward's own options
        assert sorted(forwards[0].cond_or_uncond) == [0, 1, PAG_COPY]
        attention = model.get_model_object(f"diffusion_model.{block.host_name}.{SELF_ATTENTION[family]}")
        assert kwargs.get("attn_precision") == getattr(attention, "attn_precision", None)
    if family == "hunyuan_dit":
        assert calls[0][2]["attn_precision"] == torch.float32  # the host's for HunyuanDiT


def test_on_wan_s2v_the_override_reaches_the_chosen_blocks_only():
    # the host runs S2V's blocks without transformer_options: the override sees the two chosen blocks (handed the
    # forward's options) and nothing of the others; in each, the self-attention over the video, the reference
    # image's and the motion frames' tokens (PAG's copy computed by PAG), then the cross-attention to the text
    family, hw = "wan22_s2v", HW["wan22_s2v"]
    positive, negative = s2v_conditioning("reference, motion and audio", hw, seed=4)
    x, sigma = latent(family, hw=hw)
    calls = []
    out = denoise_once(pag(recording(tiny(family), calls), "block.0, block.39"), positive, negative, x, sigma, 4.0)
    assert torch.isfinite(out).all()
    shapes = [(args[0].shape[0], args[0].shape[1], args[1].shape[1]) for _, args, _ in calls]
    tokens = shapes[0][1]
    assert tokens > FRAMES[family] * hw[0] * hw[1] // 4 + hw[0] * hw[1] // 4  # the video's, the reference's, motion
    assert shapes == [(2, tokens, tokens), (3, tokens, 7)] * 2


@pytest.mark.parametrize("kind", S2V_EXTRAS)
def test_wan_s2v_with_its_reference_image_samples_with_every_method(kind):
    family, hw = "wan22_s2v", (8, 10)  # the motion frames are packed with 8x8 kernels
    model = tiny(family)
    positive, negative = s2v_conditioning(kind, hw, seed=12)
    start = empty_dit_latent(model, (1, 16, *hw))
    plain = sample(model, positive, negative, start, steps=2, cfg=3.5, seed=3)
    # the reference (and the motion frames) are used: without them the sample is another
    assert rel_err(sample(model, *conditioning(family, seed=12), start, steps=2, cfg=3.5, seed=3), plain) > 1e-3
    for name, patched in (("pag", pag(model, "auto")), ("seg", seg(model, "auto")), ("sag", sag(model, "auto")),
                          ("sag+pag", sag(pag(model, "block.3"), "block.3")),
                          ("uncond seg", seg_uncond(model, "auto"))):
        out = sample(patched, positive, negative, start, steps=2, cfg=3.5, seed=3)
        assert torch.isfinite(out).all()
        assert rel_err(out, plain) > (1e-6 if "seg" in name else 1e-3), name


@pytest.mark.parametrize("order", ["seg then pag", "pag then seg"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pag_chained_with_seg_on_the_same_block_keeps_its_effect(family, order):
    # SEG at a scale too small to matter, on the same block before or after PAG: PAG's guidance is PAG's alone (the
    # node above hands the rows it does not compute, in one call or several, to the one below)
    model = tiny(family)
    positive, negative = conditioning(family, seed=13)
    x, sigma = latent(family, hw=HW[family])
    spec = EFFECT_BLOCK[family]
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    alone = denoise_once(pag(model, spec), positive, negative, x, sigma, 4.0)
    tiny_seg = lambda m: seg(m, spec, scale=1e-4)  # noqa: E731
    patched = pag(tiny_seg(model), spec) if order == "seg then pag" else tiny_seg(pag(model, spec))
    with count_forwards(patched) as forwards:
        chained = denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert [len(f.cond_or_uncond) for f in forwards] == [4]  # CFG's and both copies in one forward
    assert rel_err(chained - plain, alone - plain) < 1e-2
