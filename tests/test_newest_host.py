"""Behaviours of the newest ComfyUI (0.38.x, read from its sources; see docs/host-compat.md) reproduced on the
host the tests run (0.3.75), each against the pack's nodes in the real host."""
import contextlib
import logging
import threading
import time

import comfy.ldm.flux.layers as flux_layers
import comfy.ldm.flux.math as flux_math
import comfy.ldm.modules.attention as attention_module
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import nodes as host_nodes
import pytest
import torch

import attention_guidance.patching.pag as pag_patch
import attention_guidance.patching.sag as sag_patch
from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.patching.sag import with_sag_mask_probe
from attention_guidance.nodes.sag_preview import SAGMaskPreview
from support.dit_models import empty_dit_latent, make_dit_conditioning, noisy_dit_latent
from support.dit_models import tiny_dit as tiny
from support.models import build_model, denoise_once, make_conditioning, sample



def pag(model, layers, scale=3.0):
    return PerturbedAttentionGuidance.execute(model, scale, layers, 0.0, 0.0, 1.0, 0.0).result[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def sag(model, layer, scale=0.75, threshold=1.0):
    return SelfAttentionGuidance.execute(model, scale, 1.0, threshold, 9, layer, 0.0, 1.0).result[0]


def sag_mask_at(model, positive, negative, x, sigma, cfg):
    kept = []
    denoise_once(with_sag_mask_probe(model, kept.append), positive, negative, x, sigma, cfg)
    assert len(kept) == 1
    return kept[0]


# --- empty latents carry their pixel ratio ---------------------------------------------------------------

# pixels per latent pixel of the families' own latents (0.38.x: the latent formats' spacial_downscale_ratio)
FORMAT_RATIO = {"flux2": 16, "chroma_radiance": 1}
HOST_FIX_EMPTY_LATENT_CHANNELS = comfy.sample.fix_empty_latent_channels


def newest_fix_empty_latent_channels(family):
    """0.38.x's fix_empty_latent_channels (comfy/sample.py), signature and behaviour: an empty latent made for
    another ratio of image to latent pixels (EmptyLatentImage's 8) is resized to the model's own ratio, here
    FORMAT_RATIO's, since 0.3.75's latent formats carry none."""
    ratio = FORMAT_RATIO.get(family, 8)

    def fix_empty_latent_channels(model, latent_image, downscale_ratio_spacial=None, downscale_ratio_temporal=None):
        latent = HOST_FIX_EMPTY_LATENT_CHANNELS(model, latent_image)
        if downscale_ratio_spacial is not None and torch.count_nonzero(latent) == 0 and downscale_ratio_spacial != ratio:
            factor = downscale_ratio_spacial / ratio
            latent = comfy.utils.common_upscale(latent, round(latent.shape[-1] * factor),
                                                round(latent.shape[-2] * factor), "nearest-exact", crop="disabled")
        return latent

    return fix_empty_latent_channels


@pytest.mark.parametrize("family", ["flux2", "chroma_radiance"])
def test_preview_passes_the_latents_pixel_ratio_where_the_host_takes_it(family, monkeypatch):
    # 0.38.x's EmptyLatentImage returns {"samples", "downscale_ratio_spacial": 8} and KSampler hands that
    # ratio to fix_empty_latent_channels, which resizes a generic empty latent to the model's own ratio
    # (Flux.2 16, Chroma Radiance 1). The preview must sample the same latent, so its mask is at image size.
    newest = newest_fix_empty_latent_channels(family)
    monkeypatch.setattr(comfy.sample, "fix_empty_latent_channels", newest)
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=18)
    latent = dict(host_nodes.EmptyLatentImage().generate(160, 128, 1)[0], downscale_ratio_spacial=8)
    patched = sag(model, layer="single.1")
    mask, image = SAGMaskPreview.execute(patched, positive, negative, latent, 5, 10, 3, 4.0, "simple").result
    assert mask.shape == (1, 128, 160) and image.shape == (1, 128, 160, 3)
    sampled = newest(model, latent["samples"], 8)
    sampling = model.get_model_object("model_sampling")
    sigma = comfy.samplers.calculate_sigmas(sampling, "simple", 10)[3].reshape(1)
    noise = comfy.sample.prepare_noise(sampled, 5)
    expected = sag_mask_at(patched, positive, negative, sampling.noise_scaling(sigma, noise, sampled), sigma, 4.0)
    assert 0.0 < mask.mean() < 1.0
    assert torch.equal(mask, torch.nn.functional.interpolate(expected, size=(128, 160))[:, 0])


def test_preview_passes_no_hint_a_host_does_not_take():
    # on 0.3.75 fix_empty_latent_channels takes (model, latent) only: a LATENT dict with the new keys (from a
    # newer node, or a saved latent) still previews, at what 0.3.75's KSampler samples
    model = tiny("flux")
    positive, negative = make_dit_conditioning("flux", batch=1, seed=18)
    latent = dict(host_nodes.EmptyLatentImage().generate(64, 48, 1)[0], downscale_ratio_spacial=8, downscale_ratio_temporal=1)
    mask, _ = SAGMaskPreview.execute(sag(model, layer="single.1"), positive, negative, latent, 5, 10, 3, 4.0,
                                     "simple").result
    assert mask.shape == (1, 48, 64)


# --- the attention override's newer keyword arguments -----------------------------------------------------

OVERRIDE = "optimized_attention_override"


def flux_call_site(scale=None, kv_groups=1, newest=True):
    """comfy.ldm.flux.math.attention as a model of a newer host calls attention: with a ``scale`` of its own and
    k / v with ``kv_groups`` times fewer heads, handed over as keywords (``scale``, ``enable_gqa``,
    ``low_precision_attention``); with ``newest=False`` the same attention the 0.3.75 way (q multiplied by
    ``scale * sqrt(D)``, k / v repeated to every head)."""

    def attention(q, k, v, pe, mask=None, transformer_options={}):
        q, k = flux_math.apply_rope(q, k, pe)
        heads, dim = q.shape[1], q.shape[-1]
        k, v = k[:, ::kv_groups], v[:, ::kv_groups]
        if newest:
            keywords = {"low_precision_attention": False}
            if scale is not None:
                keywords["scale"] = scale
            if kv_groups > 1:
                keywords["enable_gqa"] = True
            return attention_module.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask,
                                                        transformer_options=transformer_options, **keywords)
        if scale is not None:
            q = q * (scale * dim ** 0.5)
        k, v = k.repeat_interleave(kv_groups, dim=1), v.repeat_interleave(kv_groups, dim=1)
        return attention_module.optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask,
                                                    transformer_options=transformer_options)

    return attention


def under_newest_host_attention(model, keywords_seen):
    """A clone of ``model`` whose attention honours ``scale`` and ``enable_gqa`` as 0.38.x's attention functions
    do (an override under the node's: 0.3.75's attention functions ignore both); it records the keywords of
    every call it gets."""

    def host_attention(func, q, k, v, heads, *args, **kwargs):
        keywords_seen.append(sorted(set(kwargs) - {"mask", "skip_reshape", "transformer_options", "_inside_attn_wrapper"}))
        scale = kwargs.pop("scale", None)
        if kwargs.pop("enable_gqa", False):
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        kwargs.pop("low_precision_attention", None)
        if scale is not None:
            q = q * (scale * q.shape[-1] ** 0.5)
        return func(q, k, v, heads, *args, **kwargs)

    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})[OVERRIDE] = host_attention
    return clone


@pytest.mark.parametrize("scale, kv_groups", [(0.9, 1), (None, 2), (0.2, 2)])
@pytest.mark.parametrize("family", ["flux", "chroma"])
def test_the_override_honours_scale_and_grouped_kv_heads_and_passes_other_keywords_on(family, scale, kv_groups,
                                                                                      monkeypatch):
    # Newer hosts call the attention override with `scale`, `enable_gqa` (fewer k/v heads) and
    # `low_precision_attention`. PAG's perturbed rows and SAG's key mass must be those of that attention
    # (the same as the 0.3.75 call that gives it by scaling q and repeating k / v), and every keyword must
    # reach the override under ours.
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=21)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 10))
    block = "double.1,single.2"
    results = {}
    for newest in (True, False):
        seen: list = []
        monkeypatch.setattr(flux_layers, "attention", flux_call_site(scale, kv_groups, newest))
        base = under_newest_host_attention(model, seen)
        results[newest] = (denoise_once(pag(base, block), positive, negative, x, sigma, 4.0),
                           sag_mask_at(sag(base, "single.2"), positive, negative, x, sigma, 4.0))
        if newest:
            wanted = sorted({"low_precision_attention"} | ({"scale"} if scale else set())
                            | ({"enable_gqa"} if kv_groups > 1 else set()))
            assert seen and all(keywords == wanted for keywords in seen)
    assert rel_err(results[True][0], results[False][0]) < 1e-5
    assert torch.equal(results[True][1], results[False][1])
    monkeypatch.setattr(flux_layers, "attention", flux_call_site(None, 1, False))
    plain_scale = denoise_once(pag(model, block), positive, negative, x, sigma, 4.0)
    assert rel_err(results[False][0], plain_scale) > 1e-3  # the test can tell the attentions apart


# --- an attention override or attn1 replacement applied after the node's ----------------------------------

DIT_BLOCK = {"sd3": "joint.1", "sd35": "joint.0", "flux": "single.2", "flux2": "double.1", "chroma": "double.1",
             "chroma_radiance": "single.2", "qwen_image": "double.1"}
NODES = {"pag": ("Perturbed-Attention Guidance", lambda model, layer: pag(model, layer)),
         "sag": ("Self-Attention Guidance", lambda model, layer: sag(model, layer))}
DISPLACED = "without calling it, which would switch the guidance off"


def attention_backend_set_after(model):
    """0.38.x ModelPatcher.set_model_optimized_attention (its Model Attention Backend node), applied after the
    node: an override that runs the given attention function and never the previous override."""
    clone = model.clone()

    def optimized_attention_override(_, *args, **kwargs):
        return attention_module.attention_pytorch(*args, **kwargs)

    clone.model_options.setdefault("transformer_options", {})[OVERRIDE] = optimized_attention_override
    return clone


def override_reinstalled_every_step(model, calls_previous=False):
    """0.38.x BlockSparseAttention's way: at every step an override is put above whatever override is there
    (here from a CALC_COND_BATCH wrapper; BlockSparseAttention uses ON_PREPARE_STATE, whose callbacks 0.3.75
    does not hand the step's model_options), computing the calls it takes itself; with ``calls_previous`` it
    hands every call to the override it found."""

    def reinstall(executor, base_model, conds, x_in, timestep, model_options):
        options = model_options.get("transformer_options", {})
        found = options.get(OVERRIDE)

        def sparse_attention(func, *args, **kwargs):
            if calls_previous and found is not None:
                return found(func, *args, **kwargs)
            return func(*args, **kwargs)

        model_options = {**model_options, "transformer_options": {**options, OVERRIDE: sparse_attention}}
        return executor(base_model, conds, x_in, timestep, model_options)

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "block_sparse", reinstall)
    return clone


def attn1_replaced_after(model, key):
    """Another pack's attn1 replacement of the middle block applied after the node, under ``key``: plain
    attention, never the replacement before it."""

    def plain_attention(q, k, v, extra_options):
        return attention_module.optimized_attention(q, k, v, extra_options["n_heads"])

    clone = model.clone()
    clone.set_model_attn1_replace(plain_attention, *key)
    return clone


@contextlib.contextmanager
def handler_calls(node):
    """How often the node's own computation ran in a DiT block: PAG's perturbed attention, SAG's key mass."""
    name = "joint_identity_attention" if node == "pag" else "key_attention_mass"
    dit_handlers = pag_patch if node == "pag" else sag_patch
    real = getattr(dit_handlers, name)
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    setattr(dit_handlers, name, counted)
    try:
        yield calls
    finally:
        setattr(dit_handlers, name, real)


def _displacement_runs(node, guided, displaced, positive, negative, latent, caplog):
    """Two sampling runs of ``displaced``: each equals ``guided`` and logs the displacement once, naming the node."""
    name = NODES[node][0]
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            out = sample(displaced, positive, negative, latent, steps=2, cfg=4.0, seed=1)
        warnings = [r.getMessage() for r in caplog.records if DISPLACED in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].startswith(name), warnings
        assert rel_err(out, guided) < 1e-5


@pytest.mark.parametrize("displacer", ["attention_backend", "reinstalled_every_step"])
@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("family", list(DIT_BLOCK))
def test_an_override_applied_after_the_node_leaves_it_acting_and_is_named(family, node, displacer, caplog):
    # the node keeps guiding (the result of the guidance over plain attention, which the displacer computes)
    # and says once per run what displaced it; unguided the result would be plain CFG
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=22)
    latent = empty_dit_latent(model, (1, 16, 8, 10))
    patched = NODES[node][1](model, DIT_BLOCK[family])
    guided = sample(patched, positive, negative, latent, steps=2, cfg=4.0, seed=1)
    plain = sample(model, positive, negative, latent, steps=2, cfg=4.0, seed=1)
    assert rel_err(guided, plain) > 1e-3
    displaced = (attention_backend_set_after(patched) if displacer == "attention_backend"
                 else override_reinstalled_every_step(patched))
    _displacement_runs(node, guided, displaced, positive, negative, latent, caplog)


@pytest.mark.parametrize("key", [("middle", 0, 0), ("middle", 0)])
@pytest.mark.parametrize("node", NODES)
def test_an_attn1_replacement_applied_after_the_node_leaves_it_acting_and_is_named(node, key, caplog):
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=23)
    latent = torch.zeros(1, 4, 8, 8)
    patched = NODES[node][1](model, "mid" if node == "pag" else "m0.0")
    guided = sample(patched, positive, negative, latent, steps=2, cfg=4.0, seed=1)
    assert rel_err(guided, sample(model, positive, negative, latent, steps=2, cfg=4.0, seed=1)) > 1e-3
    _displacement_runs(node, guided, attn1_replaced_after(patched, key), positive, negative, latent, caplog)


@pytest.mark.parametrize("node", NODES)
def test_an_override_that_calls_the_nodes_acts_below_it_unannounced(node, caplog):
    # 0.38.x BlockSparseAttention hands the calls it does not take to the override before it: the node's
    # handler then runs once per call (not again beneath), with the same result, and nothing is logged
    model = tiny("flux")
    positive, negative = make_dit_conditioning("flux", batch=1, seed=24)
    latent = empty_dit_latent(model, (1, 16, 8, 10))
    patched = NODES[node][1](model, "double.1")
    guided = sample(patched, positive, negative, latent, steps=2, cfg=4.0, seed=1)
    with caplog.at_level(logging.WARNING), handler_calls(node) as calls:
        out = sample(override_reinstalled_every_step(patched, calls_previous=True), positive, negative, latent,
                     steps=2, cfg=4.0, seed=1)
    assert DISPLACED not in caplog.text
    assert rel_err(out, guided) < 1e-5
    with handler_calls(node) as calls_alone:
        sample(patched, positive, negative, latent, steps=2, cfg=4.0, seed=1)
    assert calls[0] == calls_alone[0] > 0


# --- the host's own text / image split of Flux-style blocks ---------------------------------------------

@pytest.mark.parametrize("family", ["flux", "chroma", "qwen_image"])
def test_the_hosts_img_slice_gives_the_text_length_where_a_later_node_replaced_the_first_double_block(family):
    # 0.38.x marks Flux-style blocks with transformer_options["img_slice"] = [text tokens, end]; where it does,
    # a node applied after ours that replaces the first double block (where ours measures the text) without
    # calling ours no longer stops the sampler, and both nodes guide as before
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=25)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 10))
    block = DIT_BLOCK[family]

    def first_block_marked_as_newest(args, extra):
        text = args["txt"].shape[1]
        args["transformer_options"]["img_slice"] = [text, text + args["img"].shape[1]]  # in place, as the host
        return extra["original_block"](args)

    for node in NODES:
        patched = NODES[node][1](model, block)
        replaced = patched.clone()
        replaced.set_model_patch_replace(first_block_marked_as_newest, "dit", "double_block", 0)
        if node == "pag":
            guided = denoise_once(patched, positive, negative, x, sigma, 4.0)
            assert rel_err(denoise_once(replaced, positive, negative, x, sigma, 4.0), guided) < 1e-6
        else:
            assert torch.equal(sag_mask_at(replaced, positive, negative, x, sigma, 4.0),
                               sag_mask_at(patched, positive, negative, x, sigma, 4.0))


# --- conds evaluated in worker threads -------------------------------------------------------------------

def conds_in_worker_threads(model):
    """0.38.x's multi-GPU evaluation, on one device: the cond lists of each call batched apart and evaluated at
    the same time in worker threads (under torch.no_grad, as its _handle_batch), each with the host's own
    numbering (the other lists left out)."""

    def in_threads(executor, base_model, conds, x_in, timestep, model_options):
        results, failures = [None] * len(conds), []
        lists = [i for i, c in enumerate(conds) if c is not None]
        together = threading.Barrier(len(lists))

        def evaluate(i):
            try:
                together.wait(timeout=60)
                with torch.no_grad():
                    only = [c if j == i else None for j, c in enumerate(conds)]
                    results[i] = executor(base_model, only, x_in, timestep, model_options)[i]
            except BaseException as error:  # noqa: BLE001 - raised again on the sampler's thread
                failures.append(error)

        threads = [threading.Thread(target=evaluate, args=(i,)) for i in lists]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]
        return [r if r is not None else torch.zeros_like(x_in) for r in results]

    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "worker_threads", in_threads)
    return clone


def slow_attention_under(model, family):
    """A clone of ``model`` whose attention (an override, or the UNet middle block's attn1 replacement, under
    the node's) sleeps a little in every call, so that the worker threads' attention calls interleave."""
    clone = model.clone()
    if family == "sd15":
        def slow_attn1(q, k, v, extra_options):
            time.sleep(0.002)
            return attention_module.optimized_attention(q, k, v, extra_options["n_heads"])

        clone.set_model_attn1_replace(slow_attn1, "middle", 0)
    else:
        def slow_override(func, *args, **kwargs):
            time.sleep(0.002)
            return func(*args, **kwargs)

        clone.model_options.setdefault("transformer_options", {})[OVERRIDE] = slow_override
    return clone


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_conds_evaluated_in_worker_threads_give_the_same_guidance(family, caplog):
    # each list in its own thread, concurrently: PAG's copy, SAG's recorded rows and the displacement guard
    # (an override set after the node) act as on one thread, and the guard still warns once a run
    if family == "sd15":
        model, layer = build_model("sd15", seed=0), {"pag": "mid", "sag": "m0.0"}
        positive, negative = make_conditioning("sd15", batch=2, seed=26)
        latent = torch.zeros(2, 4, 8, 8)
    else:
        model, layer = tiny("flux"), {"pag": "double.1", "sag": "single.2"}
        positive, negative = make_dit_conditioning("flux", batch=2, seed=26)
        latent = empty_dit_latent(model, (2, 16, 8, 10))
    model = slow_attention_under(model, family)
    for node in NODES:
        patched = NODES[node][1](model, layer[node])
        one_thread = sample(patched, positive, negative, latent, steps=2, cfg=4.0, seed=1)
        threaded = sample(conds_in_worker_threads(patched), positive, negative, latent, steps=2, cfg=4.0, seed=1)
        assert rel_err(threaded, one_thread) < 1e-5, node
        if family == "flux":
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                displaced = sample(conds_in_worker_threads(attention_backend_set_after(patched)), positive, negative,
                                   latent, steps=2, cfg=4.0, seed=1)
            assert rel_err(displaced, one_thread) < 1e-5, node
            assert sum(DISPLACED in r.getMessage() for r in caplog.records) == 1
