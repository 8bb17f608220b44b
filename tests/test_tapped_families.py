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
from attention_guidance.patching.sag import with_sag_mask_probe
from support.dit_models import DIT_CONFIGS, count_forwards, empty_dit_latent, make_dit_conditioning
from support.dit_models import tiny_dit as tiny
from support.family_checks import (
    assert_batch_rows_guided_independently, chosen, latent, pag, recording, rel_err, sag, seg,
)
from support.models import denoise_once, sample


@pytest.fixture(autouse=True)
def _without_autograd():
    """As ComfyUI runs a prompt (under inference mode): no autograd graph. These stacks are long (up to 40
    blocks); with autograd on, what the host and the tests keep between tests adds up to gigabytes in the one
    process of the whole suite."""
    with torch.no_grad():
        yield


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


def conditioning(family, batch=1, seed=3, reference=None):
    positive, negative = make_dit_conditioning(family, batch=batch, seed=seed)
    if reference is None:
        return positive, negative
    return tuple([[c[0][0], {**c[0][1], "reference_latents": [reference]}]] for c in (positive, negative))


def reference_latent(hw, seed=2):
    """A Wan S2V reference image's latent: one frame."""
    return torch.randn(1, 16, 1, *hw, generator=torch.Generator().manual_seed(seed))


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


@pytest.mark.parametrize("family", FAMILIES)
def test_pag_rows_of_the_chosen_attention_are_the_values(family):
    positive, negative = conditioning(family)
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
