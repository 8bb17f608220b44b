"""PAG, SEG and SAG on the families of issue #25 in the real host: HunyuanVideo 1.5 and HunyuanImage 2.1 (the
host's HunyuanVideo class, registry entries of their own) and Cosmos Predict2 (MiniTrainDIT, reached through
object patches on its blocks), on narrow models with their real block counts (support.dit_models); the block
names against the host's and diffusers' full-size module trees; the defaults; which attention calls are
reached; PAG against an identity attention of the test's own; SAG's mask against one computed here."""
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch
import torch.nn.functional as F
from diffusers import CosmosTransformer3DModel, HunyuanImageTransformer2DModel, HunyuanVideo15Transformer3DModel

from attention_guidance.patching.families import UnsupportedModelError, recognise
from attention_guidance.patching.families.hunyuan_video import (
    HUNYUAN_IMAGE21, HUNYUAN_VIDEO, HUNYUAN_VIDEO15, variant,
)
from attention_guidance.patching.sag import with_sag_mask_probe
from support.dit_models import count_forwards, make_dit_conditioning
from support.dit_models import tiny_dit as tiny
from support.family_checks import (
    assert_batch_rows_guided_independently, assert_every_method_guides_a_sampled_latent, chosen, expected_sag_mask,
    latent, pag, recording, rel_err, sag, seg, with_override,
)
from support.models import denoise_once


pytestmark = pytest.mark.without_autograd  # as ComfyUI runs a prompt (tests/conftest.py)

FAMILIES = ["hunyuan_video15", "hunyuan_image21", "cosmos_predict2", "cosmos_predict2_i2v"]
HUNYUAN = ("hunyuan_video15", "hunyuan_image21")
COSMOS = ("cosmos_predict2", "cosmos_predict2_i2v")
# a block both nodes use per family, spelled as the host, diffusers or the short name
BLOCK = {"hunyuan_video15": "double.40", "hunyuan_image21": "single_transformer_blocks.30",
         "cosmos_predict2": "blocks.20", "cosmos_predict2_i2v": "block.3"}
# the text after the image in the Hunyuan blocks: 7 text tokens, HunyuanVideo 1.5's 3 ByT5 glyph tokens before them
TEXT_TOKENS = {"hunyuan_video15": 10, "hunyuan_image21": 7}
HEADS = 2
COSMOS_BLOCKS = 28


# --- block names, recognition and defaults on the full-size architectures ----------------------------------

HUNYUAN_VIDEO15_FULL = {  # comfy.model_detection of the HunyuanVideo 1.5 checkpoints (hidden 2048, 16 heads)
    "image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32, "vec_in_dim": None, "context_in_dim": 3584,
    "hidden_size": 2048, "mlp_ratio": 4.0, "num_heads": 16, "depth": 54, "depth_single_blocks": 0,
    "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 1, 1], "qkv_bias": True, "guidance_embed": False,
    "byt5": True, "meanflow": False, "use_cond_type_embedding": True, "vision_in_dim": 1152,
}
HUNYUAN_IMAGE21_FULL = {  # comfy.model_detection of HunyuanImage 2.1 (hidden 3584, 28 heads, 2-D patches)
    "image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "vec_in_dim": None, "context_in_dim": 3584,
    "hidden_size": 3584, "mlp_ratio": 4.0, "num_heads": 28, "depth": 20, "depth_single_blocks": 40,
    "axes_dim": [64, 64], "theta": 256, "patch_size": [1, 1], "qkv_bias": True, "guidance_embed": False,
    "byt5": True, "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
}
COSMOS_PREDICT2_FULL = {  # comfy.model_detection of Cosmos Predict2 2B Text2Image
    "image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
    "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 2048, "num_blocks": 28,
    "num_heads": 16, "concat_padding_mask": True, "crossattn_emb_channels": 1024, "pos_emb_cls": "rope3d",
    "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True,
    "adaln_lora_dim": 256, "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
    "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False,
}
COSMOS_PREDICT2_14B_FULL = {**COSMOS_PREDICT2_FULL, "model_channels": 5120, "num_blocks": 36, "num_heads": 40}
FULL_SIZE = {
    "hunyuan_video15": (comfy.supported_models.HunyuanVideo15, comfy.model_base.HunyuanVideo15, HUNYUAN_VIDEO15_FULL,
                        lambda: HunyuanVideo15Transformer3DModel(), {"double": 54},
                        ("double.6", "double.6"), HUNYUAN_VIDEO15),
    "hunyuan_image21": (comfy.supported_models.HunyuanImage21, comfy.model_base.HunyuanImage21, HUNYUAN_IMAGE21_FULL,
                        lambda: HunyuanImageTransformer2DModel(), {"double": 20, "single": 40},
                        ("double.7-9", "double.8"), HUNYUAN_IMAGE21),
    "cosmos_predict2_2b": (comfy.supported_models.CosmosT2IPredict2, comfy.model_base.CosmosPredict2,
                           COSMOS_PREDICT2_FULL,
                           lambda: CosmosTransformer3DModel(num_layers=28, num_attention_heads=16),
                           {"block": 28}, ("block.7", "block.7"), "Cosmos Predict2"),
    "cosmos_predict2_14b": (comfy.supported_models.CosmosT2IPredict2, comfy.model_base.CosmosPredict2,
                            COSMOS_PREDICT2_14B_FULL,
                            lambda: CosmosTransformer3DModel(num_layers=36, num_attention_heads=40),
                            {"block": 36}, ("block.9", "block.9"), "Cosmos Predict2"),
}


def full_size(which):
    config_class, model_class, unet_config = FULL_SIZE[which][:3]
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model_class(config_class(dict(unet_config)), device="meta"),
                                            load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("which", FULL_SIZE)
def test_every_block_name_is_a_module_of_the_host_and_of_diffusers(which):
    patcher = full_size(which)
    recognised = recognise(patcher, "test")
    layout = recognised.layout
    assert recognised.family.name == FULL_SIZE[which][6]
    assert layout.depths == FULL_SIZE[which][4]
    host_modules = dict(patcher.model.diffusion_model.named_modules())
    with torch.device("meta"):
        diffusers_modules = dict(FULL_SIZE[which][3]().named_modules())
    for block in layout.sites:
        assert block.host_name in host_modules, block
        assert block.diffusers_name in diffusers_modules, block
        for spelling in (block.index_name, block.diffusers_name, block.host_name):
            assert layout.select(spelling) == [block]
    if which.startswith("cosmos"):
        # the guided attention is diffusers' attn1, the self-attention; attn2 is the cross-attention to the text
        assert all(block.diffusers_name.endswith(".attn1") for block in layout.sites)
        assert all(f"{block.host_name}.self_attn" in host_modules for block in layout.sites)


@pytest.mark.parametrize("which", FULL_SIZE)
def test_full_size_defaults_name_blocks_with_a_source(which):
    layout = recognise(full_size(which), "test").layout
    assert (layout.default_layers("pag"), layout.default_layers("sag")) == FULL_SIZE[which][5]
    assert layout.default_layers("seg") == layout.default_layers("pag")
    for method in ("pag", "sag"):
        assert layout.select(layout.resolve("auto", method))
    source = layout.default_source("pag")
    assert "none published" in source
    assert {"hunyuan_video15": "--stg-block-idx 2", "hunyuan_image21": "SkipLayerGuidanceDiT"}.get(
        which, "WanVideoSLG") in source
    assert "none published for SAG" in layout.default_source("sag")


def test_the_hunyuan_models_are_told_apart_by_config_name_and_by_structure():
    for family, expected in (("hunyuan_video", HUNYUAN_VIDEO), ("hunyuan_video15", HUNYUAN_VIDEO15),
                             ("hunyuan_image21", HUNYUAN_IMAGE21)):
        model = tiny(family)
        diffusion_model = model.get_model_object("diffusion_model")
        assert recognise(model, "test").family.name == expected
        # a host whose config class has another name: the structure decides
        assert variant(diffusion_model, "SomeNewerName") == expected
    # by config name alone: a HunyuanImage 2.1 refiner has 3-D patches like HunyuanVideo
    assert variant(tiny("hunyuan_video").get_model_object("diffusion_model"), "HunyuanImage21Refiner") == HUNYUAN_IMAGE21
    with pytest.raises(ValueError, match="single"):  # HunyuanVideo 1.5 has no single-stream block
        recognise(tiny("hunyuan_video15"), "test").layout.select("single.0")


@pytest.mark.parametrize("config_name, unet_config, model_name", [
    ("PixArtSigma", {"image_model": "pixart_sigma"}, "PixArt"),
    ("PixArtAlpha", {"image_model": "pixart_alpha"}, "PixArt"),
    ("HunyuanDiT", {"image_model": "hydit"}, "HunyuanDiT"),
    ("HunyuanDiT1", {"image_model": "hydit1"}, "HunyuanDiT")])
def test_the_families_once_left_out_are_recognised_and_listed(config_name, unet_config, model_name):
    # PixArt and HunyuanDiT, refused until the pack read their attention at its submodules, are recognised now
    # (their guidance: tests/test_tapped_families.py); a model the pack never guides lists them with the new ones
    cpu = torch.device("cpu")
    config = getattr(comfy.supported_models, config_name)(dict(unet_config))
    patcher = comfy.model_patcher.ModelPatcher(config.get_model({}, device="meta"), load_device=cpu, offload_device=cpu)
    assert recognise(patcher, "Perturbed-Attention Guidance").family.name == model_name
    hunyuan3d = comfy.supported_models.Hunyuan3Dv2({"image_model": "hunyuan3d2"}).get_model({}, device="meta")
    with pytest.raises(UnsupportedModelError) as error:
        recognise(comfy.model_patcher.ModelPatcher(hunyuan3d, load_device=cpu, offload_device=cpu),
                  "Perturbed-Attention Guidance")
    message = str(error.value)
    assert "Hunyuan3Dv2" in message and "nothing" in message
    assert all(name in message for name in ("PixArt Alpha, PixArt Sigma", "HunyuanDiT", "HunyuanVideo 1.5",
                                            "HunyuanImage 2.1", "Cosmos Predict2", "Anima"))


# --- PAG: the identity attention of the image tokens of the chosen block ------------------------------------

def identity_at(family, spec):
    """An attention override of the test's own: the chosen block's self-attention with the image tokens
    attending only to themselves and the text (Hunyuan: image first, text last), the text to everything; each
    video token keeping its value (Cosmos); every other call as it was."""
    block = chosen(family, spec)
    seen = {"calls": 0}

    def identity(func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if family in COSMOS:
            position = seen["calls"] % (2 * COSMOS_BLOCKS)  # a self- and a cross-attention per block
            seen["calls"] += 1
            if position != 2 * block.index:
                return func(q, k, v, heads, *args, **kwargs)
            return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1)  # [B, heads, L, D] -> [B, L, heads * D]
        if (options.get("block_type"), options.get("block_index")) != (block.kind, block.index):
            return func(q, k, v, heads, *args, **kwargs)
        length = q.shape[2]
        image = length - TEXT_TOKENS[family]
        mask = torch.zeros(length, length)
        mask[:image, :image] = float("-inf")
        mask[range(image), range(image)] = 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(q.shape[0], length, -1)

    return identity


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_pag_is_the_identity_attention_of_the_image_tokens_of_the_chosen_block(family, cfg):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=3)
    x, sigma = latent(family, hw=(8, 12))
    spec = BLOCK[family]
    plain = denoise_once(model, positive, negative, x, sigma, cfg)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    perturbed = denoise_once(with_override(model, identity_at(family, spec)), positive, negative, x, sigma, 1.0)
    expected = plain + 3.0 * (cond - perturbed)  # paper Eq. 14 with the test's own identity attention
    ours = denoise_once(pag(model, spec), positive, negative, x, sigma, cfg)
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(ours, plain) > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_pag_reaches_only_the_self_attention_of_the_chosen_blocks(family):
    # the override under PAG sees every call of the batched forward with all three chunks, except the chosen
    # blocks' self-attention, whose perturbed chunk is PAG's own
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=4)
    x, sigma = latent(family)
    specs = {"hunyuan_video15": "double.0, double.53", "hunyuan_image21": "double.19, single.0",
             "cosmos_predict2": "block.0, block.27", "cosmos_predict2_i2v": "block.13"}[family]
    blocks = recognise(model, "test").layout.select(specs)
    calls = []
    patched = pag(recording(model, calls), specs)
    with count_forwards(patched) as forwards:
        out = denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert torch.isfinite(out).all()
    assert [sorted(f.cond_or_uncond) for f in forwards] == [[0, 1, 2]]
    rows = [args[0].shape[0] for _, args, _ in calls]
    if family in HUNYUAN:
        marks = [(o.get("block_type"), o.get("block_index")) for o, _, _ in calls]
        layout = recognise(model, "test").layout
        # the text refiner's two calls, then one call per block
        assert marks == [(None, None)] * 2 + [(b.kind, b.index) for b in layout.sites]
        expected = [2 if (kind, index) in {(b.kind, b.index) for b in blocks} else 3 for kind, index in marks]
        grid = x.shape[2] * 8 * 10 if family == "hunyuan_video15" else 8 * 10  # patches of 1
        for (options, args, _), block_rows in zip(calls, expected):
            if options.get("block_type") is not None:
                assert args[0].shape[2] == grid + TEXT_TOKENS[family]  # [B, heads, image + text, D]
    else:
        expected = [3] * (2 * COSMOS_BLOCKS)
        for block in blocks:
            expected[2 * block.index] = 2  # its self-attention; its cross-attention keeps every row
        tokens = x.shape[2] * 4 * 5  # frames x h x w in 2x2 patches
        for position, (_, args, _) in enumerate(calls):
            assert args[0].shape[2] == tokens  # [B, heads, L, D]
            assert args[1].shape[2] == (tokens if position % 2 == 0 else 7)  # the self-, then the cross-attention
    assert rows == expected


# --- SAG: the key mass of the image tokens of the chosen block ----------------------------------------------

@pytest.mark.parametrize("latent_hw", [(8, 10), (6, 12)])
@pytest.mark.parametrize("family", FAMILIES)
def test_sag_mask_is_the_key_mass_of_the_image_tokens_of_the_chosen_block(family, latent_hw):
    if family in HUNYUAN and latent_hw == (6, 12):
        latent_hw = (7, 9)  # patches of 1 take odd sizes
    model = tiny(family)
    x, sigma = latent(family, hw=latent_hw, sigma=0.5)
    positive, negative = make_dit_conditioning(family, batch=1, seed=6)
    spec = BLOCK[family]
    block = chosen(family, spec)
    calls, kept = [], []
    denoise_once(with_sag_mask_probe(sag(recording(model, calls), spec), kept.append), positive, negative, x, sigma, 4.0)
    frames = x.shape[2] if x.ndim == 5 else 1
    if family in COSMOS:
        grid = (frames, latent_hw[0] // 2, latent_hw[1] // 2)
        options, args, _ = calls[2 * block.index]
    else:
        grid = (frames, *latent_hw)
        options, args, _ = next(c for c in calls
                                if (c[0].get("block_type"), c[0].get("block_index")) == (block.kind, block.index))
    tokens = grid[0] * grid[1] * grid[2]
    assert args[0].shape[2] == tokens + TEXT_TOKENS.get(family, 0)
    uncond = options["cond_or_uncond"].index(1)  # SAG's reference under CFG
    q, k = args[0][uncond:uncond + 1], args[1][uncond:uncond + 1]
    expected = expected_sag_mask(q, k, slice(0, tokens), grid, latent_hw)
    assert kept[0].shape == (frames, 1, *latent_hw)
    assert 0 < kept[0].mean() < 1
    assert torch.equal(kept[0], expected)


# --- every method guides, through the sampler, at the defaults and on chosen blocks ----------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_guides_a_sampled_non_square_latent_and_stays_finite(family):
    assert_every_method_guides_a_sampled_latent(family, BLOCK[family])


def mean_queries_at(family, spec):
    """An attention override of the test's own: in the chosen block's self-attention every image query is the
    mean of its frame's image queries (SEG's infinite blur), text queries keep theirs; every other call as it was."""
    block = chosen(family, spec)
    seen = {"calls": 0}

    def mean_queries(func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if family in COSMOS:
            position = seen["calls"] % (2 * COSMOS_BLOCKS)
            seen["calls"] += 1
            if position != 2 * block.index:
                return func(q, k, v, heads, *args, **kwargs)
            image = q.shape[2]
        elif (options.get("block_type"), options.get("block_index")) != (block.kind, block.index):
            return func(q, k, v, heads, *args, **kwargs)
        else:
            image = q.shape[2] - TEXT_TOKENS[family]
        frames = FRAMES[family]
        q = q.clone()  # [B, heads, L, D], the image's tokens first, frame by frame
        per_frame = q[:, :, :image].reshape(q.shape[0], q.shape[1], frames, image // frames, -1)
        q[:, :, :image] = per_frame.mean(3, keepdim=True).expand_as(per_frame).reshape(q.shape[0], q.shape[1], image, -1)
        return func(q, k, v, heads, *args, **kwargs)

    return mean_queries


SEG_BLOCK = {"hunyuan_video15": "double.0", "hunyuan_image21": "double.0", "cosmos_predict2": "block.0",
             "cosmos_predict2_i2v": "block.0"}
FRAMES = {"hunyuan_video15": 3, "hunyuan_image21": 1, "cosmos_predict2": 1, "cosmos_predict2_i2v": 3}


@pytest.mark.parametrize("family", FAMILIES)
def test_seg_at_infinite_blur_is_the_mean_query_of_each_frame_in_the_chosen_block(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=9)
    x, sigma = latent(family, hw=(8, 12))
    assert (x.shape[2] if x.ndim == 5 else 1) == FRAMES[family]
    # the first block, whose queries still differ most from token to token: the blur's effect on a random-weight
    # model is far above float32's rounding there
    spec = SEG_BLOCK[family]
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    perturbed = denoise_once(with_override(model, mean_queries_at(family, spec)), positive, negative, x, sigma, 1.0)
    calls = []
    ours = denoise_once(seg(recording(model, calls), spec, blur_sigma=10000.0), positive, negative, x, sigma, 4.0)
    expected_term = 3.0 * (cond - perturbed)
    assert rel_err(cond, perturbed) > 1e-5
    # SEG's term, Eq. 14 with the blurred-query prediction; the term is 1e-4 of the prediction on HunyuanVideo 1.5,
    # where float32's rounding of the two routes to it differs by about 2 % of it (1 % or less elsewhere)
    assert rel_err(ours - plain, expected_term) < 5e-2
    # the chosen self-attention is run twice: the perturbed chunk with its blurred queries, the rest as they were
    rows = [args[0].shape[0] for _, args, _ in calls]
    assert rows.count(1) == 1 and rows.count(2) == 1 and set(rows) == {1, 2, 3}


@pytest.mark.parametrize("node", ["pag", "sag"])
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_rows_are_guided_independently(family, node):
    assert_batch_rows_guided_independently(family, (pag if node == "pag" else sag), BLOCK[family])


def test_an_object_patch_on_a_cosmos_block_is_gone_from_the_unpatched_model():
    # the marks are object patches of the clone: the model given to the node keeps its blocks' own forward
    model = tiny("cosmos_predict2")
    patched = pag(model, "block.3")
    assert "diffusion_model.blocks.3.forward" in patched.object_patches
    assert "diffusion_model.blocks.3.forward" not in model.object_patches
