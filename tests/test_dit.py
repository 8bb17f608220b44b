"""PAG and SAG on DiT models in the real host: tiny SD3 (MMDiT), SD3.5-style (qk-norm, image-only
attn2), Flux, Flux.2, Chroma, Qwen-Image, Z-Image / Lumina 2 (NextDiT) and HiDream models built from the
host's own classes, run through the host's sampler path; PAG on SD3 against diffusers'
StableDiffusion3PAGPipeline on a twin transformer with identical weights; the block names against the
host's and diffusers' full-size module trees; each family's default layers; refusals for other families."""
import contextlib

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.supported_models
import pytest
import torch
from comfy_extras.nodes_chroma_radiance import EmptyChromaRadianceLatentImage
from comfy_extras.nodes_flux import EmptyFlux2LatentImage
from comfy_extras.nodes_sd3 import EmptySD3LatentImage
from diffusers import (
    ChromaTransformer2DModel, FluxTransformer2DModel, HiDreamImageTransformer2DModel, Lumina2Transformer2DModel,
    QwenImageTransformer2DModel, SD3Transformer2DModel, ZImageTransformer2DModel,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_guidance.patching.pag as dit_handlers
from attention_guidance.guidance_core.layer_spec import LayerSpecError
from attention_guidance.patching.families import recognise
from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.patching.sag import with_sag_mask_probe
from attention_guidance.nodes.sag_preview import SAGMaskPreview
from attention_guidance.patching.families import UnsupportedModelError
from attention_guidance.sag_core import blur_under_mask
from support.dit_models import (
    SD3Twin, count_forwards, empty_dit_latent, make_dit_conditioning, noisy_dit_latent, sd3_cfg_reference, sd3_pag_reference,
)
from support.dit_models import tiny_dit as tiny
from support.models import denoise_once, sample, short_of_memory

FAMILIES = ["sd3", "sd35", "flux", "flux2", "chroma", "chroma_radiance", "qwen_image", "lumina2", "z_image", "hidream"]
# a block whose joint attention both nodes use, per family (sd35: one with the image-only attn2 too)
BLOCK = {"sd3": "joint.1", "sd35": "joint.0", "flux": "single.2", "flux2": "double.1", "chroma": "double.1",
         "chroma_radiance": "single.2", "qwen_image": "double.1", "lumina2": "layers.1", "z_image": "single.2",
         "hidream": "single.1"}
# text tokens the blocks see: the conditioning's 7, padded to 512 by the host for Flux.2 (model_base.Flux2),
# to a multiple of 32 by Z-Image; HiDream's T5 7, then Llama's last layer's 7 and the block's Llama layer's 7
TEXT_TOKENS = {"sd3": 7, "sd35": 7, "flux": 7, "flux2": 512, "chroma": 7, "chroma_radiance": 7, "qwen_image": 7,
               "lumina2": 7, "z_image": 32, "hidream": 21}


def pag(model, scale=3.0, layers="joint.1", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0):
    return PerturbedAttentionGuidance.execute(
        model, scale, layers, adaptive_scale, start_percent, end_percent, rescale
    ).result[0]


def sag(model, scale=0.75, layer="joint.1", blur_sigma=1.0, threshold=1.0, kernel_size=9):
    return SelfAttentionGuidance.execute(model, scale, blur_sigma, threshold, kernel_size, layer, 0.0, 1.0).result[0]


NODES = {"pag": lambda model, block: pag(model, layers=block), "sag": lambda model, block: sag(model, layer=block)}


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()




@pytest.fixture(scope="module")
def sd3_twin():
    return SD3Twin(tiny("sd3"))


def sag_mask_at(model, positive, negative, x, sigma, cfg):
    kept = []
    denoise_once(with_sag_mask_probe(model, kept.append), positive, negative, x, sigma, cfg)
    assert len(kept) == 1
    return kept[0]


@contextlib.contextmanager
def foreign_override(model):
    """Another pack's attention override on a clone of ``model``: plain attention, recording every call
    as ``(block_type, block_index, cond_or_uncond, q, k)`` (the block is None on the MMDiT, which sets no index)."""
    calls = []

    def record(func, *args, **kwargs):
        options = kwargs.get("transformer_options", {})
        calls.append((options.get("block_type"), options.get("block_index"), list(options.get("cond_or_uncond", [])),
                      args[0], args[1]))
        return func(*args, **kwargs)

    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = record
    yield clone, calls


@contextlib.contextmanager
def perturbed_calls(monkeypatch):
    """Every call of PAG's perturbed joint attention, text first or (HiDream, HunyuanVideo) text last:
    (rows, text tokens)."""
    seen = []

    def spy_on(name):
        real = getattr(dit_handlers, name)

        def spy(q, k, v, text_tokens, mask=None, **kwargs):
            seen.append((q.shape[0], text_tokens))
            return real(q, k, v, text_tokens, mask, **kwargs)

        monkeypatch.setattr(dit_handlers, name, spy)

    spy_on("joint_identity_attention")
    spy_on("joint_identity_attention_text_last")
    yield seen


# --- block names against the full-size architectures ----------------------------------------------------

SD3_MEDIUM = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 24, "input_size": None, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}
SD35_MEDIUM = {**SD3_MEDIUM, "num_patches": 147456, "pos_embed_max_size": 384, "qk_norm": "rms",
               "x_block_self_attn_layers": list(range(13))}
FLUX_DEV = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
    "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
# Chroma1-HD (comfy.model_detection's Chroma constants, Flux's block layout)
CHROMA = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
    "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120,
    "n_layers": 5,
}
QWEN_IMAGE = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56),
}
Z_IMAGE = {  # comfy.model_detection's Z-Image constants (dim 3840, pad tokens), 30 layers
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560, "n_layers": 30,
    "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}
LUMINA2 = {  # comfy.model_detection's original Lumina 2 (dim 2304, Gemma 2 2B text)
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 2304, "cap_feat_dim": 2304, "n_layers": 26,
    "qk_norm": True, "n_heads": 24, "n_kv_heads": 8, "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512],
    "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
}
HIDREAM_LLAMA_LAYERS = list(range(32)) + [31] * 16
HIDREAM = {  # comfy.model_detection's HiDream constants
    "image_model": "hidream", "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32], "caption_channels": [4096, 4096],
    "max_resolution": [128, 128], "in_channels": 16, "llama_layers": HIDREAM_LLAMA_LAYERS, "num_attention_heads": 20,
    "num_routed_experts": 4, "num_activated_experts": 2, "num_layers": 16, "num_single_layers": 32, "out_channels": 16,
    "patch_size": 2, "text_emb_dim": 2048,
}
FULL_SIZE = {
    "sd3_medium": (comfy.supported_models.SD3, comfy.model_base.SD3, SD3_MEDIUM,
                   lambda: SD3Transformer2DModel(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                                 pos_embed_max_size=192)),
    "sd35_medium": (comfy.supported_models.SD3, comfy.model_base.SD3, SD35_MEDIUM,
                    lambda: SD3Transformer2DModel(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                                  pos_embed_max_size=384, qk_norm="rms_norm",
                                                  dual_attention_layers=tuple(range(13)))),
    "flux_dev": (comfy.supported_models.Flux, comfy.model_base.Flux, FLUX_DEV,
                 lambda: FluxTransformer2DModel(guidance_embeds=True)),
    "chroma": (comfy.supported_models.Chroma, comfy.model_base.Chroma, CHROMA, lambda: ChromaTransformer2DModel()),
    "qwen_image": (comfy.supported_models.QwenImage, comfy.model_base.QwenImage, QWEN_IMAGE,
                   lambda: QwenImageTransformer2DModel()),
    "z_image": (comfy.supported_models.ZImage, comfy.model_base.Lumina2, Z_IMAGE, lambda: ZImageTransformer2DModel()),
    "lumina2": (comfy.supported_models.Lumina2, comfy.model_base.Lumina2, LUMINA2,
                lambda: Lumina2Transformer2DModel(cap_feat_dim=2304)),
    "hidream": (comfy.supported_models.HiDream, comfy.model_base.HiDream, HIDREAM,
                lambda: HiDreamImageTransformer2DModel(
                    patch_size=2, in_channels=16, out_channels=16, caption_channels=[4096, 4096],
                    axes_dims_rope=(64, 32, 32), llama_layers=HIDREAM_LLAMA_LAYERS)),
}


def full_size(which):
    """The host model on the meta device (no weights) in a ModelPatcher."""
    config_class, model_class, unet_config, _ = FULL_SIZE[which]
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model_class(config_class(dict(unet_config)), device="meta"),
                                            load_device=cpu, offload_device=cpu)


DIT_LAYOUTS = {which: recognise(full_size(which), "test").layout for which in FULL_SIZE}


@pytest.mark.parametrize("which", FULL_SIZE)
@pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")  # inside diffusers' Chroma
def test_every_block_name_is_a_module_of_the_host_and_of_diffusers(which):
    patcher = full_size(which)
    layout = recognise(patcher, "test").layout
    host_modules = dict(patcher.model.diffusion_model.named_modules())
    with torch.device("meta"):
        diffusers_modules = dict(FULL_SIZE[which][3]().named_modules())
    expected = {"sd3_medium": {"joint": 24}, "sd35_medium": {"joint": 24}, "flux_dev": {"double": 19, "single": 38},
                "chroma": {"double": 19, "single": 38}, "qwen_image": {"double": 60}, "z_image": {"single": 30},
                "lumina2": {"single": 26}, "hidream": {"double": 16, "single": 32}}
    assert layout.depths == expected[which]
    for block in layout.sites:
        assert block.host_name in host_modules, block
        assert block.diffusers_name in diffusers_modules, block
        assert layout.select(block.index_name) == [block]
        assert layout.select(block.diffusers_name) == [block]
        assert layout.select(block.host_name) == [block]


@pytest.mark.parametrize("which, spec, expected", [
    ("sd3_medium", "joint.13", ["joint.13"]),
    ("sd3_medium", "transformer_blocks.13", ["joint.13"]),
    ("sd3_medium", "blocks.1", ["joint.1"]),  # diffusers' SD3 PAG default; its regex would add blocks 10-19
    ("sd3_medium", "joint_blocks.7, joint.2-3", ["joint.2", "joint.3", "joint.7"]),
    ("flux_dev", "double.7", ["double.7"]),
    ("flux_dev", "single.20", ["single.20"]),
    ("flux_dev", "transformer_blocks.7", ["double.7"]),
    ("flux_dev", "single_transformer_blocks.20", ["single.20"]),
    ("flux_dev", "single_blocks.20,double_blocks.0", ["double.0", "single.20"]),
    ("flux_dev", "blocks.3", ["double.3", "single.3"]),
    ("flux_dev", "single.36-37", ["single.36", "single.37"]),
    ("qwen_image", "double.30", ["double.30"]),
    ("qwen_image", "transformer_blocks.30", ["double.30"]),  # the host's and diffusers' name
    ("qwen_image", "blocks.3, double.58-59", ["double.3", "double.58", "double.59"]),
    ("z_image", "layers.16", ["single.16"]),  # the host's and diffusers' module
    ("z_image", "layers.3.attention, single.29", ["single.3", "single.29"]),
    ("lumina2", "layers.25.attn", ["single.25"]),
    ("hidream", "double_stream_blocks.8", ["double.8"]),
    ("hidream", "single_stream_blocks.31.block.attn1, double.0-1", ["double.0", "double.1", "single.31"]),
    ("hidream", "blocks.15", ["double.15", "single.15"]),
])
def test_block_specs(which, spec, expected):
    assert [b.index_name for b in DIT_LAYOUTS[which].select(spec)] == expected


def test_qwen_image_blocks_are_listed_under_the_hosts_module_name():
    # Qwen-Image's double blocks are the host's transformer_blocks, not Flux's double_blocks
    assert DIT_LAYOUTS["qwen_image"].describe() == "  double.0-59 = transformer_blocks.0-59 (host transformer_blocks.0-59)"
    with pytest.raises(LayerSpecError, match="double_blocks.7"):
        DIT_LAYOUTS["qwen_image"].select("double_blocks.7")


spec_alphabet = st.sampled_from(list("0123456789.-, _") + ["joint", "double", "single", "blocks", "transformer_",
                                                            "attn", "mid", "m0"])


@pytest.mark.parametrize("which", ["sd3_medium", "flux_dev"])
@settings(max_examples=300, deadline=None)
@given(spec=st.lists(spec_alphabet, max_size=10).map("".join) | st.text(max_size=16))
def test_any_text_selects_blocks_in_forward_order_or_lists_them(which, spec):
    layout = DIT_LAYOUTS[which]
    try:
        picked = layout.select(spec)
    except LayerSpecError as error:
        assert layout.describe() in str(error)  # every refusal lists the model's blocks
        return
    assert picked
    order = [layout.sites.index(b) for b in picked]
    assert order == sorted(set(order))


@pytest.mark.parametrize("which, spec, listed", [
    ("sd3_medium", "mid", "joint.0-23 = transformer_blocks.0-23 (host joint_blocks.0-23)"),
    ("sd3_medium", "single.3", "joint.0-23"),
    ("sd3_medium", "joint.24", "joint.0-23"),
    ("sd35_medium", "m0.0", "blocks 0-12 also have SD3.5's image-only self-attention (attn2)"),
    ("flux_dev", "double.19", "single.0-37 = single_transformer_blocks.0-37 (host single_blocks.0-37)"),
    ("flux_dev", "joint.1", "double.0-18 = transformer_blocks.0-18"),
    ("flux_dev", "", "double.0-18"),
])
def test_a_wrong_block_lists_the_models_blocks(which, spec, listed):
    with pytest.raises(LayerSpecError) as error:
        DIT_LAYOUTS[which].select(spec)
    assert listed in str(error.value)


def test_node_errors_name_the_input_and_the_blocks():
    model = tiny("flux")
    with pytest.raises(LayerSpecError) as error:
        pag(model, layers="mid_block")
    assert "PAG layers" in str(error.value) and "'mid_block'" in str(error.value) and "single.0-3" in str(error.value)
    with pytest.raises(LayerSpecError) as error:
        sag(model, layer="m0.1")
    assert "SAG layer" in str(error.value) and "double.0-2" in str(error.value)
    with pytest.raises(LayerSpecError) as error:
        sag(tiny("sd3"), layer="joint")
    assert "selects 4" in str(error.value) and "joint.0, joint.1, joint.2, joint.3" in str(error.value)


@pytest.mark.parametrize("node", ["Perturbed-Attention Guidance", "Self-Attention Guidance"])
def test_a_family_that_cannot_be_patched_is_refused_by_name(node):
    # Hunyuan3D 2 (a shape model the pack never guides; AuraFlow, then HunyuanDiT were the example until the pack
    # learned them)
    hunyuan3d = comfy.supported_models.Hunyuan3Dv2({"image_model": "hunyuan3d2"}).get_model({}, device="meta")
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(hunyuan3d, load_device=cpu, offload_device=cpu)
    with pytest.raises(UnsupportedModelError) as error:
        recognise(patcher, node)
    message = str(error.value)
    assert node in message and "Hunyuan3Dv2" in message and "nothing" in message
    assert all(family in message for family in ("SD1.x", "SDXL", "SD3", "Flux", "Chroma", "Qwen-Image", "Z-Image",
                                                "Lumina 2", "HiDream"))
    with pytest.raises(UnsupportedModelError):
        (pag if node.startswith("Perturbed") else sag)(patcher)


# --- PAG on SD3 equals diffusers' StableDiffusion3PAGPipeline ---------------------------------------------

def test_the_twin_is_the_host_model(sd3_twin):
    model = tiny("sd3")
    positive, negative = make_dit_conditioning("sd3", batch=2, seed=2)
    for s in (0.9, 0.3):
        x, sigma = noisy_dit_latent(model, s, shape=(2, 16, 8, 12))
        for cfg in (1.0, 4.0):
            reference = sd3_cfg_reference(sd3_twin, x, sigma, positive, negative, cfg)
            assert rel_err(denoise_once(model, positive, negative, x, sigma, cfg), reference) < 1e-5


SD3_SPECS = [("joint.1", [1]), ("transformer_blocks.0,joint.2", [0, 2]), ("blocks.3", [3])]


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("s", [0.9, 0.5, 0.1])
def test_pag_one_step_matches_diffusers_sd3_pag(sd3_twin, cfg, s):
    model = tiny("sd3")
    x, sigma = noisy_dit_latent(model, s)
    positive, negative = make_dit_conditioning("sd3", batch=1, seed=3)
    unguided = denoise_once(model, positive, negative, x, sigma, cfg)
    for spec, blocks in SD3_SPECS:
        ours = denoise_once(pag(model, layers=spec), positive, negative, x, sigma, cfg)
        reference = sd3_pag_reference(sd3_twin, x, sigma, positive, negative, cfg, 3.0, blocks)
        assert rel_err(ours, reference) < 1e-3, spec
        assert rel_err(unguided, reference) > 1e-2, spec  # the PAG term is not negligible


@pytest.mark.parametrize("shape", [(2, 16, 8, 12), (1, 16, 12, 6)])
def test_pag_batch_and_non_square_match_diffusers(sd3_twin, shape):
    model = tiny("sd3")
    x, sigma = noisy_dit_latent(model, 0.7, shape=shape)
    positive, negative = make_dit_conditioning("sd3", batch=shape[0], seed=4)
    ours = denoise_once(pag(model, layers="joint.1-2"), positive, negative, x, sigma, 5.0)
    reference = sd3_pag_reference(sd3_twin, x, sigma, positive, negative, 5.0, 3.0, [1, 2])
    assert rel_err(ours, reference) < 1e-3


def test_pag_adaptive_scale_matches_diffusers(sd3_twin):
    model = tiny("sd3")
    positive, negative = make_dit_conditioning("sd3", batch=1, seed=5)
    for s in (0.95, 0.8):  # diffusers' t = 1000 sigma: scale 3 - 0.01 (1000 - t) = 2.5 and 1.0
        x, sigma = noisy_dit_latent(model, s)
        ours = denoise_once(pag(model, layers="joint.1", adaptive_scale=0.01), positive, negative, x, sigma, 4.0)
        reference = sd3_pag_reference(sd3_twin, x, sigma, positive, negative, 4.0, 3.0, [1], adaptive_scale=0.01)
        assert rel_err(ours, reference) < 1e-3


# --- the patch reaches the chosen blocks only ----------------------------------------------------------

@pytest.mark.parametrize("cfg, chunks", [(4.0, [0, 1, 2]), (1.0, [0, 2])])
def test_pag_reaches_the_chosen_blocks_only(monkeypatch, cfg, chunks):
    # Another pack's override under ours sees every attention call; in a chosen block it must get every
    # row except the perturbed copy (cond id 2), elsewhere all rows, the copy's shown as the positive (0)
    # it copies; ours computes the perturbed rows once per chosen self-attention.
    cases = [
        ("sd3", "joint.1,joint.3", [None, "p", None, "p"]),
        ("sd35", "joint.0", ["p", "p", None, None, None, None]),  # blocks 0-1 run joint attention, then attn2
        ("flux", "double.1,single.2", [("double", 0), ("double", 1, "p"), ("double", 2),
                                        ("single", 0), ("single", 1), ("single", 2, "p"), ("single", 3)]),
        ("flux2", "single.0", [("double", 0), ("double", 1), ("double", 2),
                               ("single", 0, "p"), ("single", 1), ("single", 2), ("single", 3)]),
        ("chroma", "double.0,single.3", [("double", 0, "p"), ("double", 1), ("double", 2),
                                         ("single", 0), ("single", 1), ("single", 2), ("single", 3, "p")]),
        ("chroma_radiance", "single.1", [("double", 0), ("double", 1), ("double", 2),
                                         ("single", 0), ("single", 1, "p"), ("single", 2), ("single", 3)]),
        ("qwen_image", "double.1", [("double", 0), ("double", 1, "p"), ("double", 2)]),
        # NextDiT: the context refiner, the noise refiner, then the 3 main layers (0.3.75 marks none of them)
        ("lumina2", "single.1", [None, None, None, "p", None]),
        ("z_image", "layers.0, layers.2", [None, None, "p", None, "p"]),
        # HiDream: 2 double-stream, then 3 single-stream blocks
        ("hidream", "double.0,single.2", ["p", None, None, None, "p"]),
    ]
    for family, spec, expected in cases:
        positive, negative = make_dit_conditioning(family, batch=1, seed=6)
        x, sigma = noisy_dit_latent(tiny(family), 0.6)
        with foreign_override(tiny(family)) as (foreign, calls), perturbed_calls(monkeypatch) as perturbed:
            patched = pag(foreign, layers=spec)
            with count_forwards(patched) as forwards:
                out = denoise_once(patched, positive, negative, x, sigma, cfg)
        assert [sorted(f.cond_or_uncond) for f in forwards] == [chunks]
        assert torch.isfinite(out).all()
        assert len(calls) == len(expected)
        for call, want in zip(calls, expected):
            block_type, block_index, seen, _, _ = call
            if isinstance(want, tuple):
                assert (block_type, block_index) == want[:2]
            is_chosen = want == "p" or (isinstance(want, tuple) and want[-1] == "p")
            shown = sorted(0 if c == 2 else c for c in chunks)
            assert sorted(seen) == ([c for c in chunks if c != 2] if is_chosen else shown), (family, call[:3])
        chosen = sum(1 for want in expected if want == "p" or (isinstance(want, tuple) and want[-1] == "p"))
        text = TEXT_TOKENS[family]
        want_perturbed = [(1, text)] * chosen if family != "sd35" else [(1, text), (1, 0)]  # attn2: image only
        assert perturbed == want_perturbed, family


@pytest.mark.parametrize("family", FAMILIES)
def test_sag_records_without_changing_any_attention(family):
    # SAG computes no attention itself: the foreign override under it gets the same calls with the same
    # rows as without SAG, and the sampler's forward gives the same prediction (the probe stops SAG
    # before it guides).
    positive, negative = make_dit_conditioning(family, batch=1, seed=7)
    x, sigma = noisy_dit_latent(tiny(family), 0.6)
    with foreign_override(tiny(family)) as (foreign, calls):
        plain = denoise_once(foreign, positive, negative, x, sigma, 4.0)
        plain_calls = [(c[0], c[1], sorted(c[2])) for c in calls]
        calls.clear()
        kept = []
        probe = with_sag_mask_probe(sag(foreign, layer=BLOCK[family]), kept.append)
        assert torch.equal(denoise_once(probe, positive, negative, x, sigma, 4.0), plain)
    assert [(c[0], c[1], sorted(c[2])) for c in calls] == plain_calls
    assert kept[0] is not None and kept[0].shape == (1, 1, *x.shape[-2:])


# --- guidance changes the output, stays finite, keeps rows aligned --------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_changes_the_sample_and_stays_finite(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=2, seed=8)
    latent = empty_dit_latent(model, (2, 16, 8, 10))
    block = BLOCK[family]
    plain = sample(model, positive, negative, latent, steps=4, cfg=3.5, seed=3)
    for patched in (pag(model, layers=block), sag(model, layer=block), pag(sag(model, layer=block), layers=block)):
        out = sample(patched, positive, negative, latent, steps=4, cfg=3.5, seed=3)
        assert torch.isfinite(out).all()
        assert rel_err(out, plain) > 1e-3


def _row(conditioning, i):
    return [[c[0][i:i + 1], {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                             for k, v in c[1].items()}] for c in conditioning]


@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_are_guided_independently(family, node):
    model = tiny(family)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(2, 16, 8, 8))
    positive, negative = make_dit_conditioning(family, batch=2, seed=9)
    patched = NODES[node](model, BLOCK[family])
    both = denoise_once(patched, positive, negative, x, sigma, 4.0)
    for i in range(2):
        single = denoise_once(patched, _row(positive, i), _row(negative, i), x[i:i + 1], sigma, 4.0)
        assert rel_err(single, both[i:i + 1]) < 1e-4


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("family", ["sd3", "flux", "chroma", "chroma_radiance", "qwen_image", "z_image", "hidream"])
def test_chunked_forwards_give_the_same_result(family, node, cfg, monkeypatch):
    model = tiny(family)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(2, 16, 8, 12))
    positive, negative = make_dit_conditioning(family, batch=2, seed=10)
    extra_positive, extra_negative = make_dit_conditioning(family, batch=2, seed=11)
    positive, negative = positive + extra_positive, negative + extra_negative  # two entries each
    patched = NODES[node](model, BLOCK[family])
    with count_forwards(patched) as forwards:
        whole = denoise_once(patched, positive, negative, x, sigma, cfg)
    assert len(forwards) == (1 if node == "pag" else 2)
    mask = sag_mask_at(patched, positive, negative, x, sigma, cfg) if node == "sag" else None
    short_of_memory(monkeypatch)
    with count_forwards(patched) as forwards:
        split = denoise_once(patched, positive, negative, x, sigma, cfg)
    assert all(len(f.cond_or_uncond) == 1 for f in forwards) and len(forwards) > 2
    assert rel_err(split, whole) < 1e-5
    if node == "sag":
        assert torch.equal(sag_mask_at(patched, positive, negative, x, sigma, cfg), mask)


# --- SAG: the mask of the image tokens, flow re-noising ------------------------------------------------

def _expected_sag_mask(q, k, heads, text, grid, latent_hw, skip_reshape, image_first=False):
    """The SAG mask from the joint attention probabilities of one block: image queries over image keys
    (their joint probabilities renormalised), mean over heads, summed over queries, above 1.0."""
    if not skip_reshape:
        q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
    start = 0 if image_first else text
    image = slice(start, start + grid[0] * grid[1])
    probs = (q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    probs = probs[:, :, image, image]
    probs = probs / probs.sum(-1, keepdim=True)
    mass = probs.mean(1).sum(1)
    mask = (mass > 1.0).double().reshape(-1, 1, *grid)
    return torch.nn.functional.interpolate(mask, size=latent_hw, mode="nearest").float()


SAG_MASK_BLOCKS = [("sd3", "joint.2", 2), ("sd35", "joint.0", 0), ("flux", "double.1", 1), ("flux", "single.3", 6),
                   ("flux2", "single.1", 4), ("chroma", "double.2", 2), ("chroma", "single.0", 3),
                   ("chroma_radiance", "single.1", 4), ("qwen_image", "double.2", 2),
                   # NextDiT's main layers after its context and noise refiner; HiDream's 2 double blocks first
                   ("lumina2", "single.2", 4), ("z_image", "layers.1", 3), ("hidream", "double.1", 1),
                   ("hidream", "single.2", 4)]
# heads of the attention calls; the NextDiT and Flux-style models hand q, k, v over as [B, heads, L, D]
SAG_HEADS = {"sd3": 4, "sd35": 4, "z_image": 4}
SPLIT_HEADS = ("flux", "flux2", "chroma", "chroma_radiance", "qwen_image", "lumina2", "z_image")


# latent sizes (Chroma Radiance takes 8 pixels a latent pixel), and 36x50 pixels, which Chroma Radiance
# pads to 48x64 (3x4 patches)
@pytest.mark.parametrize("family, block, call_index, latent_hw",
                         [(*case, hw) for case in SAG_MASK_BLOCKS for hw in [(8, 8), (9, 11)]]
                         + [("chroma_radiance", "single.1", 4, "36x50 pixels")])
def test_sag_mask_is_the_image_key_mass_of_the_chosen_block(family, block, call_index, latent_hw):
    model = tiny(family)
    pixels = (36, 50) if isinstance(latent_hw, str) else None
    x, sigma = noisy_dit_latent(model, 0.5, shape=(1, 16, 8, 8) if pixels else (1, 16, *latent_hw), pixels=pixels)
    hw = tuple(x.shape[-2:])
    positive, negative = make_dit_conditioning(family, batch=1, seed=12)
    with foreign_override(model) as (foreign, calls):
        mask = sag_mask_at(sag(foreign, layer=block), positive, negative, x, sigma, 4.0)
    call = calls[call_index]  # the probe runs the sampler's one forward, [cond, uncond]
    _, _, chunks, q, k = call
    rows = slice(chunks.index(1), chunks.index(1) + 1)  # the uncond row: SAG's reference under CFG
    patch = {"flux2": 1, "chroma_radiance": 16}.get(family, 2)
    grid = ((hw[0] + patch - 1) // patch, (hw[1] + patch - 1) // patch)
    heads = SAG_HEADS.get(family, 2)
    expected = _expected_sag_mask(q[rows], k[rows], heads, TEXT_TOKENS[family], grid, hw,
                                  skip_reshape=family in SPLIT_HEADS, image_first=family == "hidream")
    assert mask.shape == (1, 1, *hw)
    assert 0 < mask.mean() < 1
    assert torch.equal(mask, expected)


def test_sag_renoises_through_the_flow_parameterisation():
    model = tiny("sd3")
    positive, negative = make_dit_conditioning("sd3", batch=1, seed=13)
    x, sigma = noisy_dit_latent(model, 0.6)
    patched = sag(model, layer="joint.1")
    inputs = []

    def keep_input(executor, base_model, conds, x_in, timestep, model_options):
        inputs.append(x_in)
        return executor(base_model, conds, x_in, timestep, model_options)

    watched = patched.clone()
    watched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test", keep_input)
    out = denoise_once(watched, positive, negative, x, sigma, 4.0)
    assert len(inputs) == 2  # the sampler's forward, then SAG's degraded pass
    mask = sag_mask_at(patched, positive, negative, x, sigma, 4.0)
    uncond_x0 = denoise_once(model, negative, negative, x, sigma, 1.0)
    degraded = blur_under_mask(uncond_x0, mask, 9, 1.0)
    s = sigma.item()
    noise = (x - (1 - s) * uncond_x0) / s  # flow matching: x = (1 - s) x0 + s eps
    torch.testing.assert_close(inputs[1], (1 - s) * degraded + s * noise, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


# --- chaining, reference latents, no-ops ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_pag_and_sag_on_the_same_block_both_act(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=14)
    x, sigma = noisy_dit_latent(model, 0.7)
    block = BLOCK[family]
    base = denoise_once(model, positive, negative, x, sigma, 4.0)
    pag_only = denoise_once(pag(model, layers=block), positive, negative, x, sigma, 4.0)
    sag_only = denoise_once(sag(model, layer=block), positive, negative, x, sigma, 4.0)
    expected = base + (pag_only - base) + (sag_only - base)
    for chained in (sag(pag(model, layers=block), layer=block), pag(sag(model, layer=block), layers=block)):
        assert rel_err(denoise_once(chained, positive, negative, x, sigma, 4.0), expected) < 1e-4
    two_pags = pag(pag(model, scale=2.0, layers=block), scale=1.5, layers="joint.3" if family == "sd3" else "double.0")
    other = denoise_once(pag(model, scale=1.5, layers="joint.3" if family == "sd3" else "double.0"),
                         positive, negative, x, sigma, 4.0)
    first = denoise_once(pag(model, scale=2.0, layers=block), positive, negative, x, sigma, 4.0)
    assert rel_err(denoise_once(two_pags, positive, negative, x, sigma, 4.0),
                   base + (first - base) + (other - base)) < 1e-4


@pytest.mark.parametrize("family, pag_blocks, sag_block", [("flux", "double.1,single.0", "single.1"),
                                                       ("qwen_image", "double.0,double.2", "double.1")])
def test_reference_latents_of_flux_kontext_and_qwen_image_edit(family, pag_blocks, sag_block):
    # Reference latents add image tokens after the generated image's: PAG perturbs them with it, SAG's
    # grid is the generated image's own.
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=15)
    reference_shape = empty_dit_latent(model, (1, 16, 6, 6)).shape
    reference = torch.randn(reference_shape, generator=torch.Generator().manual_seed(16))
    with_reference = [[positive[0][0], {**positive[0][1], "reference_latents": [reference]}]]
    x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 10))
    plain = denoise_once(model, with_reference, negative, x, sigma, 3.0)
    assert rel_err(plain, denoise_once(model, positive, negative, x, sigma, 3.0)) > 1e-3  # the reference is used
    for patched in (pag(model, layers=pag_blocks), sag(model, layer=sag_block)):
        out = denoise_once(patched, with_reference, negative, x, sigma, 3.0)
        assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3
    mask = sag_mask_at(sag(model, layer=sag_block), positive, with_reference, x, sigma, 3.0)
    assert mask.shape == (1, 1, 8, 10)


# the host's empty-latent node of each family, for an image of (width, height)
EMPTY_LATENT_NODES = {"flux": EmptySD3LatentImage, "flux2": EmptyFlux2LatentImage, "qwen_image": EmptySD3LatentImage,
                      "chroma_radiance": EmptyChromaRadianceLatentImage, "z_image": EmptySD3LatentImage}


@pytest.mark.parametrize("family", list(EMPTY_LATENT_NODES))
def test_preview_node_shows_the_mask_at_the_size_of_the_image(family):
    # the empty latent the host's node makes for a 160x128 image (Qwen-Image's without the time axis
    # the sampler adds); the preview's mask is 160x128 and equals SAG's own at that step
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=18)
    latent = EMPTY_LATENT_NODES[family].execute(width=160, height=128, batch_size=1).result[0]
    patched = sag(model, layer=BLOCK[family])
    mask, image = SAGMaskPreview.execute(patched, positive, negative, latent, 5, 10, 3, 4.0, "simple").result
    assert mask.shape == (1, 128, 160) and image.shape == (1, 128, 160, 3)
    assert 0.0 < mask.mean() < 1.0
    empty = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    sampling = model.get_model_object("model_sampling")
    sigma = comfy.samplers.calculate_sigmas(sampling, "simple", 10)[3].reshape(1)
    noise = comfy.sample.prepare_noise(empty, 5)
    expected = sag_mask_at(patched, positive, negative, sampling.noise_scaling(sigma, noise, empty), sigma, 4.0)
    assert torch.equal(mask, torch.nn.functional.interpolate(expected, size=(128, 160))[:, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_zero_and_outside_the_window_change_nothing(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=17)
    x, sigma = noisy_dit_latent(model, 0.2)  # late: outside a 0.0-0.5 window
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    block = BLOCK[family]
    assert torch.equal(denoise_once(pag(model, scale=0.0, layers=block), positive, negative, x, sigma, 4.0), plain)
    assert torch.equal(denoise_once(sag(model, scale=0.0, layer=block), positive, negative, x, sigma, 4.0), plain)
    early = pag(model, layers=block, end_percent=0.5)
    with count_forwards(early) as forwards:
        assert torch.equal(denoise_once(early, positive, negative, x, sigma, 4.0), plain)
    assert [sorted(f.cond_or_uncond) for f in forwards] == [[0, 1]]


# --- default layers: 'auto' resolves per family --------------------------------------------------------

# (PAG, SAG) defaults of the full-size models: published settings where they exist, moved to the model's
# depth elsewhere (layer_spec.scaled_block_range)
FULL_SIZE_DEFAULTS = {
    "sd3_medium": ("joint.13", "joint.13"),  # diffusers' SD3 PAG example
    "sd35_medium": ("joint.7-9", "joint.8"),  # Stability's SD3.5 Medium skip-layer guidance
    "flux_dev": ("double.7-9", "double.8"),  # ComfyUI's SkipLayerGuidanceDiT defaults
    "chroma": ("double.7-9", "double.8"),
    "qwen_image": ("double.25-27", "double.26"),
    "z_image": ("single.16", "single.16"),
    "lumina2": ("single.14", "single.14"),
    "hidream": ("double.6-8", "double.7"),
}


@pytest.mark.parametrize("which", FULL_SIZE)
def test_full_size_defaults_name_existing_blocks_with_a_source(which):
    layout = DIT_LAYOUTS[which]
    assert (layout.default_layers("pag"), layout.default_layers("sag")) == FULL_SIZE_DEFAULTS[which]
    assert layout.default_layers("seg") == layout.default_layers("pag")  # SEG perturbs where PAG does
    for kind in ("pag", "sag"):
        assert layout.select(layout.resolve("auto", kind))
        assert layout.resolve("AUTO ", kind) == layout.default_layers(kind)
        assert layout.default_source(kind)
    published = {"sd3_medium": "blocks.13", "sd35_medium": "7, 8, 9", "flux_dev": "SkipLayerGuidanceDiT"}
    if which in published:
        assert published[which] in layout.default_source("pag") and "none published" not in layout.default_source("pag")
    else:
        assert "none published" in layout.default_source("pag")
    assert "none published for SAG" in layout.default_source("sag")


def test_unet_defaults_are_the_ones_saved_workflows_carry():
    from support.real_architectures import meta_model

    for architecture in ("sd15", "sdxl"):
        layout = recognise(meta_model(architecture), "test").layout
        assert layout.resolve("auto", "pag") == "mid" and layout.resolve("auto", "sag") == "m0.0"
        assert layout.resolve("mid", "pag") == "mid" and layout.resolve("u0", "pag") == "u0"
        assert "diffusers" in layout.default_source("pag") and "diffusers" in layout.default_source("sag")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_old_unet_defaults_mean_auto_on_a_dit(family):
    # a workflow saved before 'auto' carries 'mid' / 'm0.0', which named nothing on a DiT (an error then)
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=20)
    x, sigma = noisy_dit_latent(model, 0.6)
    assert torch.equal(denoise_once(pag(model, layers="mid"), positive, negative, x, sigma, 4.0),
                       denoise_once(pag(model, layers="auto"), positive, negative, x, sigma, 4.0))
    assert torch.equal(denoise_once(sag(model, layer="m0.0"), positive, negative, x, sigma, 4.0),
                       denoise_once(sag(model, layer="auto"), positive, negative, x, sigma, 4.0))


@pytest.mark.parametrize("family", ["sd15", "sdxl"] + FAMILIES)
def test_every_input_at_its_default_guides_every_family(family):
    # the nodes' schema defaults, as a new node in the frontend has them, on every family; the first guided
    # step of a run logs the layers in use once
    from support.models import build_model, make_conditioning

    defaults = {node: {i.id: i.default for i in cls.define_schema().inputs if i.id != "model"}
                for node, cls in (("pag", PerturbedAttentionGuidance), ("sag", SelfAttentionGuidance))}
    assert defaults["pag"]["layers"] == "auto" and defaults["sag"]["layer"] == "auto"
    if family in ("sd15", "sdxl"):
        model = build_model(family, seed=0)
        positive, negative = make_conditioning(family, batch=1, seed=21)
        sigma = model.get_model_object("model_sampling").sigmas[600].reshape(1)
        x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1)) * (sigma ** 2 + 1).sqrt()
    else:
        model = tiny(family)
        positive, negative = make_dit_conditioning(family, batch=1, seed=21)
        x, sigma = noisy_dit_latent(model, 0.6)
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    for node, cls in (("pag", PerturbedAttentionGuidance), ("sag", SelfAttentionGuidance)):
        patched = cls.execute(model, **defaults[node]).result[0]
        out = denoise_once(patched, positive, negative, x, sigma, 4.0)
        assert torch.isfinite(out).all() and rel_err(out, plain) > 1e-3, node
    assert torch.equal(denoise_once(model, positive, negative, x, sigma, 4.0), plain)  # the model itself untouched


def test_the_layers_in_use_are_logged_once_per_run(caplog):
    model = tiny("z_image")
    positive, negative = make_dit_conditioning("z_image", batch=1, seed=22)
    latent = empty_dit_latent(model, (1, 16, 8, 8))
    patched = sag(pag(model, layers="auto"), layer="layers.2")
    for run in range(2):
        with caplog.at_level("INFO"):
            caplog.clear()
            sample(patched, positive, negative, latent, steps=3, cfg=3.0, seed=run)
        lines = [r.getMessage() for r in caplog.records if "on this ZImage model" in r.getMessage()]
        assert lines == [
            "Perturbed-Attention Guidance on this ZImage model: layers 'auto' = single.1 (the family's default, from "
            "none published for ZImage: diffusers' SD3 PAG block 13 of 24 (a stack of joint text-image blocks like "
            "this one), at the same relative depth).",
            "Self-Attention Guidance on this ZImage model: layer 'layers.2' = single.2.",
        ], run


def test_hidream_with_an_edit_image_beside_the_generated_one():
    # HiDream E1: the edit latent is concatenated along the width; PAG perturbs every image token, SAG refuses
    # with a message instead of mapping the wrong tokens
    model = tiny("hidream")
    positive, negative = make_dit_conditioning("hidream", batch=1, seed=23)
    edit = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(24))
    positive = [[positive[0][0], {**positive[0][1], "concat_latent_image": edit}]]
    x, sigma = noisy_dit_latent(model, 0.6)
    plain = denoise_once(model, positive, negative, x, sigma, 3.0)
    guided = denoise_once(pag(model, layers="auto"), positive, negative, x, sigma, 3.0)
    assert torch.isfinite(guided).all() and rel_err(guided, plain) > 1e-3
    with pytest.raises(RuntimeError, match="HiDream E1"):
        denoise_once(sag(model, layer="auto"), negative, positive, x, sigma, 3.0)  # the edit image on SAG's rows
