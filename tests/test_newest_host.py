"""Behaviours of the newest ComfyUI (0.38.x, read from its sources; see docs/host-compat.md) reproduced on the
host the tests run (0.3.75), each against the pack's nodes in the real host."""
import comfy.sample
import comfy.samplers
import comfy.utils
import nodes as host_nodes
import pytest
import torch

from attention_guidance.nodes.sag import SelfAttentionGuidance, with_sag_mask_probe
from attention_guidance.nodes.sag_preview import SAGMaskPreview
from support.dit_models import build_dit, make_dit_conditioning
from support.models import denoise_once

_MODELS: dict = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = build_dit(family, seed=0)
    return _MODELS[family]


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
