"""PAG and SAG on the video DiTs in the real host: tiny Wan 2.1 T2V / I2V, Wan 2.2 TI2V 5B, HunyuanVideo and
LTX-Video models built from the host's own classes, on [B, C, T, H, W] latents of several frames, through the
host's sampler path; block names against the host's and diffusers' full-size module trees.

PAG's perturbed prediction is checked against one computed here with an attention override of the test's own
that replaces the chosen self-attention by the identity (each video token keeps its value; HunyuanVideo: an
explicit mask over its joint image + text sequence), SAG's mask against one computed here from the block's
own queries and keys."""
import comfy.clip_vision
import comfy.model_base
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.supported_models
import pytest
import torch
import torch.nn.functional as F
from comfy_extras.nodes_context_windows import WanContextWindowsManualNode
from diffusers import HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel, WanTransformer3DModel

from attention_guidance.patching.options import chunk_ids
from attention_guidance.patching.families import recognise
from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from attention_guidance.patching.sag import with_sag_mask_probe
from attention_guidance.nodes.sag_preview import SAGMaskPreview
from support.dit_models import count_forwards, make_dit_conditioning, noisy_dit_latent
from support.dit_models import tiny_dit as tiny
from support.models import denoise_once, short_of_memory

VIDEO = ["wan21", "wan21_i2v", "wan22_ti2v", "hunyuan_video", "ltxv"]
# the block both nodes use, per family, in each family's diffusers spelling where it has one
BLOCK = {"wan21": "blocks.1", "wan21_i2v": "block.1", "wan22_ti2v": "block.2", "hunyuan_video": "double.1",
         "ltxv": "transformer_blocks.1"}
# attention calls of one forward per block, in order: the self-attention first, then the cross-attentions
# (Wan I2V: the CLIP image embeddings, then the text)
CALLS_PER_BLOCK = {"wan21": 2, "wan21_i2v": 3, "wan22_ti2v": 2, "ltxv": 2}
HEADS = 2
TEXT_TOKENS = 7



def pag(model, layers, scale=3.0):
    return PerturbedAttentionGuidance.execute(model, scale, layers, 0.0, 0.0, 1.0, 0.0).result[0]


def sag(model, layer, scale=0.75):
    return SelfAttentionGuidance.execute(model, scale, 1.0, 1.0, 9, layer, 0.0, 1.0).result[0]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def with_override(model, override):
    clone = model.clone()
    clone.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return clone


def recording(model, calls):
    """A clone of ``model`` with an attention override that records every call (its transformer_options as they
    were at the call: the host sets block_type / block_index in place as the forward goes on; args, kwargs)."""

    def record(func, *args, **kwargs):
        calls.append((dict(kwargs.get("transformer_options") or {}), args, kwargs))
        return func(*args, **kwargs)

    return with_override(model, record)


def block_index(spec):
    return int(spec.rsplit(".", 1)[1])


def identity_at_block(family, spec):
    """An attention override of the test's own: the chosen block's self-attention becomes the identity for
    every row (each video token keeps its value; HunyuanVideo: image tokens attend to themselves and the text,
    text tokens to everything), every other call runs as it was."""
    index = block_index(spec)
    seen = {"calls": 0}

    def identity(func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        if family == "hunyuan_video":
            if options.get("block_type") != "double" or options.get("block_index") != index or q.shape[2] == TEXT_TOKENS:
                return func(q, k, v, heads, *args, **kwargs)
            # [B, heads, L, D], cat(image, text)
            length = q.shape[2]
            image = length - TEXT_TOKENS
            mask = torch.zeros(length, length)
            mask[:image, :image] = float("-inf")
            mask[range(image), range(image)] = 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return out.transpose(1, 2).reshape(q.shape[0], length, -1)
        per_forward = CALLS_PER_BLOCK[family] * 3
        position = seen["calls"] % per_forward
        seen["calls"] += 1
        if position == CALLS_PER_BLOCK[family] * index:
            return v  # [B, L, heads * D]: each token's own value
        return func(q, k, v, heads, *args, **kwargs)

    return identity


# --- block names against the full-size architectures ---------------------------------------------------

WAN21_T2V_1_3B = {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 16, "dim": 1536, "ffn_dim": 8960,
                  "freq_dim": 256, "text_dim": 4096, "out_dim": 16, "num_heads": 12, "num_layers": 30}
WAN22_TI2V_5B = {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 48, "dim": 3072, "ffn_dim": 14336,
                 "freq_dim": 256, "text_dim": 4096, "out_dim": 48, "num_heads": 24, "num_layers": 30}
HUNYUAN_VIDEO = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
                 "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 20,
                 "depth_single_blocks": 40, "axes_dim": [16, 56, 56], "theta": 256, "patch_size": [1, 2, 2],
                 "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
                 "use_cond_type_embedding": False, "vision_in_dim": None}
LTXV_2B = {"image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 2048, "attention_head_dim": 64,
           "num_attention_heads": 32, "caption_channels": 4096, "num_layers": 28}
FULL_SIZE = {
    "wan21_t2v_1.3b": (comfy.supported_models.WAN21_T2V, comfy.model_base.WAN21, WAN21_T2V_1_3B,
                       lambda: WanTransformer3DModel(num_layers=30, num_attention_heads=12, ffn_dim=8960),
                       {"block": 30}),
    "wan22_ti2v_5b": (comfy.supported_models.WAN22_T2V, comfy.model_base.WAN22, WAN22_TI2V_5B,
                      lambda: WanTransformer3DModel(num_layers=30, num_attention_heads=24, ffn_dim=14336,
                                                    in_channels=48, out_channels=48),
                      {"block": 30}),
    "hunyuan_video": (comfy.supported_models.HunyuanVideo, comfy.model_base.HunyuanVideo, HUNYUAN_VIDEO,
                      HunyuanVideoTransformer3DModel, {"double": 20, "single": 40}),
    "ltxv_2b": (comfy.supported_models.LTXV, comfy.model_base.LTXV, LTXV_2B, LTXVideoTransformer3DModel,
                {"block": 28}),
}


def full_size(which):
    config_class, model_class, unet_config = FULL_SIZE[which][:3]
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model_class(config_class(dict(unet_config)), device="meta"),
                                            load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("which", FULL_SIZE)
def test_every_block_name_is_a_module_of_the_host_and_of_diffusers(which):
    patcher = full_size(which)
    layout = recognise(patcher, "test").layout
    assert layout.depths == FULL_SIZE[which][4]
    host_modules = dict(patcher.model.diffusion_model.named_modules())
    with torch.device("meta"):
        diffusers_modules = dict(FULL_SIZE[which][3]().named_modules())
    for block in layout.sites:
        assert block.host_name in host_modules, block
        assert block.diffusers_name in diffusers_modules, block
        if block.kind == "block":
            # the self-attention diffusers guides is attn1; attn2 is the cross-attention to the text
            assert block.diffusers_name.endswith(".attn1")
        for spelling in (block.index_name, block.diffusers_name, block.host_name):
            assert layout.select(spelling) == [block]
    for node in ("pag", "sag"):  # the family's defaults name one block of the model, with a source
        assert len(layout.select(layout.default_layers(node))) == 1
        assert layout.default_source(node)


@pytest.mark.parametrize("which, spec, expected", [
    ("wan21_t2v_1.3b", "blocks.9", ["block.9"]),  # diffusers' WanTransformer3DModel and the host's name
    ("wan21_t2v_1.3b", "block.8-9", ["block.8", "block.9"]),
    ("wan21_t2v_1.3b", "blocks.1", ["block.1"]),  # never blocks.10-19
    ("wan21_t2v_1.3b", "blocks.9.attn1", ["block.9"]),
    ("hunyuan_video", "transformer_blocks.2", ["double.2"]),
    ("hunyuan_video", "single_transformer_blocks.10", ["single.10"]),
    ("hunyuan_video", "double_blocks.2, single_blocks.0", ["double.2", "single.0"]),
    ("ltxv_2b", "transformer_blocks.19", ["block.19"]),
    ("ltxv_2b", "block.19", ["block.19"]),
])
def test_block_specs(which, spec, expected):
    assert [b.index_name for b in recognise(full_size(which), "test").layout.select(spec)] == expected


def test_a_wrong_block_lists_the_video_models_blocks():
    layout = recognise(full_size("wan21_t2v_1.3b"), "test").layout
    with pytest.raises(ValueError) as error:
        layout.select("mid")
    assert "block.0-29 = blocks.0-29 (host blocks.0-29)" in str(error.value)
    ltxv = recognise(full_size("ltxv_2b"), "test").layout
    with pytest.raises(ValueError) as error:
        ltxv.select("block.28")
    assert "block.0-27 = transformer_blocks.0-27 (host transformer_blocks.0-27)" in str(error.value)


# --- PAG: the identity over the video tokens of the chosen block ------------------------------------------

@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("family", VIDEO)
def test_pag_is_the_identity_attention_of_every_video_token_of_the_chosen_block(family, cfg):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=3)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 10))
    spec = BLOCK[family]
    plain = denoise_once(model, positive, negative, x, sigma, cfg)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    perturbed = denoise_once(with_override(model, identity_at_block(family, spec)), positive, negative, x, sigma, 1.0)
    expected = plain + 3.0 * (cond - perturbed)  # paper Eq. 14 with the test's own identity attention
    ours = denoise_once(pag(model, spec), positive, negative, x, sigma, cfg)
    assert rel_err(ours, expected) < 1e-4
    assert x.shape[2] == 3
    for frame in range(x.shape[2]):  # every frame is guided
        assert rel_err(ours[:, :, frame], plain[:, :, frame]) > 1e-2


@pytest.mark.parametrize("family", ["wan21", "wan21_i2v", "ltxv"])
def test_pag_reaches_only_the_self_attention_of_the_chosen_block(family):
    # the override under PAG sees every call of the batched forward with all three chunks, except the chosen
    # block's self-attention, where the perturbed chunk is PAG's own; the cross-attentions keep every row
    positive, negative = make_dit_conditioning(family, batch=1, seed=4)
    x, sigma = noisy_dit_latent(tiny(family), 0.6)
    calls = []
    patched = pag(recording(tiny(family), calls), "block.2")
    with count_forwards(patched) as forwards:
        denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert [sorted(f.cond_or_uncond) for f in forwards] == [[0, 1, 2]]
    rows = [args[0].shape[0] for _, args, _ in calls]
    chosen = CALLS_PER_BLOCK[family] * 2
    assert rows == [3] * chosen + [2] + [3] * (CALLS_PER_BLOCK[family] - 1)
    tokens = 3 * 8 * 8 if family == "ltxv" else 3 * 4 * 4  # frames x h x w: LTX-Video's patch is 1, Wan's 2x2
    assert calls[chosen][1][0].shape[1] == calls[chosen][1][1].shape[1] == tokens


def test_pag_tells_the_self_attention_from_a_cross_attention_of_the_same_length():
    # 48 text tokens on a 3 x 4 x 4 token video: the cross-attention's queries and keys are as long as the
    # self-attention's; it is still left alone (the self-attention is the block's first call)
    family = "wan21"
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=13, tokens=48)
    x, sigma = noisy_dit_latent(model, 0.6)
    calls = []
    patched = pag(recording(model, calls), "block.1")
    denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert all(args[0].shape[1] == args[1].shape[1] == 48 for _, args, _ in calls)
    assert [args[0].shape[0] for _, args, _ in calls] == [3, 3, 2, 3, 3, 3]
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    perturbed = denoise_once(with_override(model, identity_at_block(family, "block.1")), positive, negative, x, sigma, 1.0)
    assert rel_err(denoise_once(pag(model, "block.1"), positive, negative, x, sigma, 4.0),
                   plain + 3.0 * (cond - perturbed)) < 1e-4


def test_pag_on_hunyuan_video_keeps_the_text_rows_and_the_refiner():
    positive, negative = make_dit_conditioning("hunyuan_video", batch=1, seed=5)
    x, sigma = noisy_dit_latent(tiny("hunyuan_video"), 0.6)
    calls = []
    patched = pag(recording(tiny("hunyuan_video"), calls), "double.1,single.2")
    denoise_once(patched, positive, negative, x, sigma, 4.0)
    marks = [(o.get("block_type"), o.get("block_index"), args[0].shape[0]) for o, args, _ in calls]
    # the token refiner's two calls (no block yet), 2 double and 3 single blocks; PAG computes the perturbed
    # chunk of double.1 and single.2 itself
    assert marks == [(None, None, 3), (None, None, 3), ("double", 0, 3), ("double", 1, 2), ("single", 0, 3),
                     ("single", 1, 3), ("single", 2, 2)]


# --- SAG: the map over the space-time tokens, mask and blur per frame -------------------------------------

def _expected_mask(q, k, heads, image, grid, latent_hw, skip_reshape):
    if not skip_reshape:
        q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
    probs = (q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[:, :, image, image]
    probs = probs / probs.sum(-1, keepdim=True)
    mass = probs.mean(1).sum(1)  # [B, frames * h * w]
    frames = (mass > 1.0).double().reshape(-1, 1, *grid[1:])  # one mask per frame
    return F.interpolate(frames, size=latent_hw, mode="nearest").float()


@pytest.mark.parametrize("latent_hw", [(8, 10), (6, 9)])
@pytest.mark.parametrize("family", VIDEO)
def test_sag_mask_is_the_key_mass_of_the_video_tokens_per_frame(family, latent_hw):
    if family == "hunyuan_video" and latent_hw[1] % 2:
        latent_hw = (latent_hw[0], latent_hw[1] + 1)  # the host's HunyuanVideo takes only even sizes (0.3.75)
    model = tiny(family)
    x, sigma = noisy_dit_latent(model, 0.5, shape=(1, 16, *latent_hw))
    positive, negative = make_dit_conditioning(family, batch=1, seed=6)
    spec = BLOCK[family]
    calls = []
    kept = []
    denoise_once(with_sag_mask_probe(sag(recording(model, calls), spec), kept.append), positive, negative, x, sigma, 4.0)
    grid = (x.shape[2], -(-latent_hw[0] // 2), -(-latent_hw[1] // 2)) if family != "ltxv" else (x.shape[2], *latent_hw)
    tokens = grid[0] * grid[1] * grid[2]
    if family == "hunyuan_video":
        options, args, _ = next(c for c in calls if c[0].get("block_type") == "double" and c[0].get("block_index") == 1)
        image, skip_reshape = slice(0, tokens), True  # cat(image, text)
    else:
        options, args, _ = calls[CALLS_PER_BLOCK[family] * block_index(spec)]
        image, skip_reshape = slice(0, tokens), False
        assert args[0].shape[1] == args[1].shape[1] == tokens
    uncond = options["cond_or_uncond"].index(1)  # SAG's reference under CFG
    q, k = args[0][uncond:uncond + 1], args[1][uncond:uncond + 1]
    expected = _expected_mask(q, k, HEADS, image, grid, latent_hw, skip_reshape)
    assert kept[0].shape == (x.shape[2], 1, *latent_hw)  # one mask per frame
    assert 0 < kept[0].mean() < 1
    assert torch.equal(kept[0], expected)


@pytest.mark.parametrize("family", ["wan21", "hunyuan_video"])
def test_sag_blurs_each_frame_under_its_own_mask(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=7)
    x, sigma = noisy_dit_latent(model, 0.6)
    patched = sag(model, BLOCK[family])
    inputs = []

    def keep_input(executor, base_model, conds, x_in, timestep, model_options):
        inputs.append(x_in)
        return executor(base_model, conds, x_in, timestep, model_options)

    watched = patched.clone()
    watched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test", keep_input)
    denoise_once(watched, positive, negative, x, sigma, 4.0)
    kept = []
    denoise_once(with_sag_mask_probe(patched, kept.append), positive, negative, x, sigma, 4.0)
    uncond_x0 = denoise_once(model, negative, negative, x, sigma, 1.0)
    s = sigma.item()
    noise = (x - (1 - s) * uncond_x0) / s
    from attention_guidance.sag_core import blur_under_mask
    for frame in range(x.shape[2]):
        degraded = blur_under_mask(uncond_x0[:, :, frame], kept[0][frame:frame + 1], 9, 1.0)
        torch.testing.assert_close(inputs[1][:, :, frame], (1 - s) * degraded + s * noise[:, :, frame],
                                   rtol=1e-5, atol=1e-5)


# --- rows, chunks, the unpatched model ------------------------------------------------------------------

def _row(conditioning, i):
    return [[c[0][i:i + 1], {k: (v[i:i + 1] if torch.is_tensor(v) and v.shape[:1] == (2,) else v)
                             for k, v in c[1].items()}] for c in conditioning]


NODES = {"pag": lambda model, block: pag(model, block), "sag": lambda model, block: sag(model, block)}


@pytest.mark.parametrize("node", NODES)
@pytest.mark.parametrize("family", VIDEO)
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
@pytest.mark.parametrize("family", VIDEO)
def test_chunked_forwards_give_the_same_result(family, node, cfg, monkeypatch):
    # the host's memory check splits the batch (here: into one entry per forward); the result is the same
    model = tiny(family)
    x, sigma = noisy_dit_latent(model, 0.6, shape=(2, 16, 8, 8))
    positive, negative = make_dit_conditioning(family, batch=2, seed=10)
    extra_positive, extra_negative = make_dit_conditioning(family, batch=2, seed=11)
    positive, negative = positive + extra_positive, negative + extra_negative
    patched = NODES[node](model, BLOCK[family])
    with count_forwards(patched) as forwards:
        whole = denoise_once(patched, positive, negative, x, sigma, cfg)
    assert len(forwards) == (1 if node == "pag" else 2)
    short_of_memory(monkeypatch)
    with count_forwards(patched) as forwards:
        split = denoise_once(patched, positive, negative, x, sigma, cfg)
    assert all(len(f.cond_or_uncond) == 1 for f in forwards) and len(forwards) > 2
    assert rel_err(split, whole) < 1e-5


@pytest.mark.parametrize("family", VIDEO)
def test_the_unpatched_model_is_untouched(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=12)
    x, sigma = noisy_dit_latent(model, 0.6)
    before = denoise_once(model, positive, negative, x, sigma, 4.0)
    options = repr(model.model_options)
    for patched in (pag(model, BLOCK[family]), sag(model, BLOCK[family])):
        assert rel_err(denoise_once(patched, positive, negative, x, sigma, 4.0), before) > 1e-3
    assert repr(model.model_options) == options
    assert torch.equal(denoise_once(model, positive, negative, x, sigma, 4.0), before)


# --- the host's context windows (long videos) -------------------------------------------------------------

def _windowed_wan():
    # 13 video frames = 4 latent frames a window, 2 of them overlapping (the node counts video frames)
    return WanContextWindowsManualNode.execute(tiny("wan21"), 13, 5, "standard_static", 1, False, "pyramid").result[0]


def _long_video(seed=14):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 7, 8, 8, generator=generator), torch.tensor([0.6])


def test_pag_under_context_windows_runs_its_own_pass_through_the_windows():
    # the windows evaluate the sampler's lists window by window and blend only those lists, so PAG's copy
    # cannot ride along: PAG runs the perturbed positive as its own pass, which the windows split the same
    # way, and its result is CFG + s (cond - perturbed) of the windowed predictions
    windowed = _windowed_wan()
    positive, negative = make_dit_conditioning("wan21", batch=1, seed=15)
    x, sigma = _long_video()
    plain = denoise_once(windowed, positive, negative, x, sigma, 4.0)
    cond = denoise_once(windowed, positive, negative, x, sigma, 1.0)
    perturbed = denoise_once(with_override(windowed, identity_at_block("wan21", "block.1")), positive, negative, x,
                             sigma, 1.0)
    patched = pag(windowed, "block.1")
    with count_forwards(patched) as forwards:
        ours = denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert rel_err(ours, plain + 3.0 * (cond - perturbed)) < 1e-4
    assert {f.batch_size for f in forwards} == {1, 2} and len(forwards) == 2 * 3  # 3 windows, no copy batched
    assert all(sorted(f.cond_or_uncond) in ([0, 1], [0]) for f in forwards)


def test_sag_under_context_windows_says_so_and_leaves_the_step_unguided(caplog):
    # a window's map covers only its frames; SAG does not stitch windows, so it warns and does not guide
    windowed = _windowed_wan()
    positive, negative = make_dit_conditioning("wan21", batch=1, seed=16)
    x, sigma = _long_video(seed=17)
    plain = denoise_once(windowed, positive, negative, x, sigma, 4.0)
    with caplog.at_level("WARNING"):
        out = denoise_once(sag(windowed, "block.1"), positive, negative, x, sigma, 4.0)
    assert torch.equal(out, plain)
    assert "context windows" in caplog.text


# --- image-to-video conditioning -----------------------------------------------------------------------------

def _wan_i2v_conditioning(seed=18):
    """What the host's WanImageToVideo node adds to both conditionings: the start image's latent and mask as
    concat channels, and a CLIP vision output for the image embeddings."""
    positive, negative = make_dit_conditioning("wan21_i2v", batch=1, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    image_latent = torch.randn(1, 16, 3, 8, 10, generator=generator)
    mask = torch.ones(1, 1, 3, 8, 10)
    mask[:, :, 0] = 0.0  # the first frame is given
    vision = comfy.clip_vision.Output()
    vision["penultimate_hidden_states"] = torch.randn(1, 257, 1280, generator=generator)
    extras = {"concat_latent_image": image_latent, "concat_mask": mask, "clip_vision_output": vision}
    return ([[c[0], {**c[1], **extras}] for c in positive], [[c[0], {**c[1], **extras}] for c in negative])


def test_image_to_video_conditioning_reaches_the_perturbed_copy_unchanged():
    model = tiny("wan21_i2v")
    positive, negative = _wan_i2v_conditioning()
    x, sigma = noisy_dit_latent(model, 0.6, shape=(1, 16, 8, 10))
    text_only, _ = make_dit_conditioning("wan21_i2v", batch=1, seed=18)
    assert rel_err(denoise_once(model, positive, negative, x, sigma, 4.0),
                   denoise_once(model, text_only, negative, x, sigma, 4.0)) > 1e-2  # the image is used
    seen = []

    def keep_inputs(executor, x_in, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        seen.append((chunk_ids(transformer_options), c_concat, kwargs["clip_fea"]))
        return executor(x_in, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    calls = []
    patched = pag(recording(model, calls), "block.1")
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test", keep_inputs)
    ours = denoise_once(patched, positive, negative, x, sigma, 4.0)
    (chunks, concat, clip_fea), = seen
    copy, source = chunks.index(2), chunks.index(0)
    assert concat.shape[1] == 20  # 4 mask + 16 image channels
    assert torch.equal(concat[copy], concat[source]) and torch.equal(clip_fea[copy], clip_fea[source])
    # per block: the self-attention over the 3 x 4 x 5 video tokens, the cross-attention to the 257 image
    # embeddings, to the 7 text tokens; only the chosen self-attention loses the perturbed rows
    assert [args[1].shape[1] for _, args, _ in calls] == [60, 257, 7] * 3
    assert [args[0].shape[0] for _, args, _ in calls] == [3, 3, 3, 2, 3, 3, 3, 3, 3]
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    perturbed = denoise_once(with_override(model, identity_at_block("wan21_i2v", "block.1")), positive, negative, x,
                             sigma, 1.0)
    assert rel_err(ours, plain + 3.0 * (cond - perturbed)) < 1e-4
    sag_out = denoise_once(sag(model, "block.1"), positive, negative, x, sigma, 4.0)
    assert torch.isfinite(sag_out).all() and rel_err(sag_out, plain) > 1e-3


@pytest.mark.parametrize("family", ["wan21", "wan22_ti2v", "ltxv"])
def test_preview_node_shows_one_mask_per_frame_at_image_size(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=19)
    latent = torch.zeros(noisy_dit_latent(model, 0.5, shape=(1, 16, 8, 10))[0].shape)
    patched = sag(model, BLOCK[family])
    mask, image = SAGMaskPreview.execute(patched, positive, negative, {"samples": latent}, 5, 10, 3, 4.0,
                                         "simple").result
    ratio = {"wan21": 8, "wan22_ti2v": 16, "ltxv": 32}[family]  # the VAEs' spatial downscale
    assert mask.shape == (3, 8 * ratio, 10 * ratio) and image.shape == (3, 8 * ratio, 10 * ratio, 3)
    sampling = model.get_model_object("model_sampling")
    sigma = comfy.samplers.calculate_sigmas(sampling, "simple", 10)[3].reshape(1)
    noise = comfy.sample.prepare_noise(latent, 5)
    kept = []
    denoise_once(with_sag_mask_probe(patched, kept.append), positive, negative,
                 sampling.noise_scaling(sigma, noise, latent), sigma, 4.0)
    assert torch.equal(mask, F.interpolate(kept[0], scale_factor=ratio)[:, 0])
    assert all(0.0 < mask[frame].mean() < 1.0 for frame in range(3))


def test_sag_says_it_cannot_map_a_wan_sequence_with_reference_tokens_and_pag_guides_it():
    # Wan's reference latent (the Fun models' ref_conv) puts one frame of reference tokens before the video's
    from support.dit_models import DIT_CONFIGS
    from support.models import initialise_weights

    config = comfy.supported_models.WAN21_T2V({**DIT_CONFIGS["wan21"], "in_dim_ref_conv": 16})
    config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.WAN21(config, device=torch.device("cpu"))
    initialise_weights(base.diffusion_model, 0)
    base.tiny_family = "wan21"
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    positive, negative = make_dit_conditioning("wan21", batch=1, seed=20)
    x, sigma = noisy_dit_latent(model, 0.6)
    reference = torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(21))
    positive = [[c[0], {**c[1], "reference_latents": [reference]}] for c in positive]
    negative = [[c[0], {**c[1], "reference_latents": [reference]}] for c in negative]
    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    guided = denoise_once(pag(model, "block.1"), positive, negative, x, sigma, 4.0)
    assert torch.isfinite(guided).all() and rel_err(guided, plain) > 1e-3
    with pytest.raises(RuntimeError) as error:
        denoise_once(sag(model, "block.1"), positive, negative, x, sigma, 4.0)
    message = str(error.value)
    assert "block.1 attends over 64 tokens, not the 3x4x4 tokens of the latent" in message and "Use PAG" in message
