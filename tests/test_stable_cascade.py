"""PAG, SEG and SAG on Stable Cascade (stage C, the prior, and stage B) in the real host: narrow models of the host's
own StageC / StageB with the real levels, block counts and block repeats (support.dit_models); the block names
against the host's and diffusers' full-size module trees; the defaults; which attention calls are reached; PAG
against an identity attention of the test's own; SEG at infinite and finite blur against queries the test blurs
itself; SAG's mask against one computed here on the grid the test measures at the block.

The test finds the chosen block's attention calls with forward hooks on the host's module (not through the pack's
object patches): while the block runs, its one attention call is the block's.
"""
import contextlib

import comfy.model_base
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch
import torch.nn.functional as F
from comfy.ldm.cascade.common import AttnBlock
from diffusers import StableCascadeUNet

from attention_guidance.guidance_core.layer_spec import LayerSpecError
from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.seg import SmoothedEnergyGuidance
from attention_guidance.pag_core import image_query_identity_attention
from attention_guidance.patching.families import recognise
from attention_guidance.patching.sag import with_sag_mask_probe
from support.dit_models import count_forwards, empty_dit_latent, make_dit_conditioning, noisy_dit_latent
from support.dit_models import tiny_dit as tiny
from support.family_checks import assert_batch_rows_guided_independently, pag, rel_err, sag, seg, with_override
from support.models import denoise_once, sample
from support.seg_reference import direct_query_blur


pytestmark = pytest.mark.without_autograd  # as ComfyUI runs a prompt (tests/conftest.py)


STAGES = ["stable_cascade_c", "stable_cascade_b"]
# latent sizes: stage B halves its latent four times (2x2 patches, then three stride-2 levels)
HW = {"stable_cascade_c": (8, 12), "stable_cascade_b": (32, 48)}
# a block per stage, spelled as the host or by level; stage B's up.2 runs 3 times a forward (block_repeat)
BLOCK = {"stable_cascade_c": "down_blocks.1.71", "stable_cascade_b": "up.2.5"}
LEVEL_OF = {"stable_cascade_c": 1, "stable_cascade_b": 2}


def level_grid(family, latent_hw, level):
    """The feature map of ``level`` as the architecture makes it: stage C's levels at the latent's size, stage B's
    2x2 patches halved (floor, stride-2 convolutions) once per level."""
    if family == "stable_cascade_c":
        return tuple(latent_hw)
    h, w = latent_hw[0] // 2, latent_hw[1] // 2
    for _ in range(level):
        h, w = h // 2, w // 2
    return h, w


def latent(family, hw=None, batch=1, sigma=0.6, seed=1):
    return noisy_dit_latent(tiny(family), sigma, shape=(batch, 16, *(hw or HW[family])), seed=seed)


def host_block(family, spec):
    (block,) = recognise(tiny(family), "test").layout.select(spec)
    return block


@contextlib.contextmanager
def watching(model, host_name):
    """``state["inside"]`` is True while the host module ``host_name`` runs; ``state["grids"]`` the (h, w) of the
    input of each of its runs."""
    module = model.model.diffusion_model.get_submodule(host_name)
    state = {"inside": False, "grids": []}

    def enter(_module, args, kwargs):
        state["inside"] = True
        state["grids"].append(tuple(args[0].shape[-2:]))

    def leave(_module, args, kwargs, out):
        state["inside"] = False

    handles = [module.register_forward_pre_hook(enter, with_kwargs=True),
               module.register_forward_hook(leave, with_kwargs=True)]
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def heads_of(t, heads):
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def inside_block(state, replace):
    """An override running ``replace(func, q, k, v, heads, **kwargs)`` for the watched block's attention (``q``
    ``[B, N, C]`` of the image, ``k`` and ``v`` ``[B, N + M, C]``: the image, then the conditioning), ``func``
    elsewhere."""

    def override(func, q, k, v, heads, *args, **kwargs):
        if not state["inside"]:
            return func(q, k, v, heads, *args, **kwargs)
        return replace(func, q, k, v, heads, *args, **kwargs)

    return override


def identity_with_text(func, q, k, v, heads, *args, **kwargs):
    """Each image query attends to its own token and to the conditioning tokens, never to another image token."""
    n, keys = q.shape[1], k.shape[1]
    mask = torch.zeros(n, keys)
    mask[:, :n] = float("-inf")
    mask[range(n), range(n)] = 0.0
    out = F.scaled_dot_product_attention(heads_of(q, heads), heads_of(k, heads), heads_of(v, heads), attn_mask=mask)
    return out.transpose(1, 2).reshape(q.shape)


# --- block names, recognition and defaults on the full-size architectures ----------------------------------

FULL_SIZE = {  # comfy.model_detection of each checkpoint (0.3.75), diffusers' StableCascadeUNet of it, depths
    "stage_c": ({"stable_cascade_stage": "c", "c_cond": 2048}, comfy.supported_models.Stable_Cascade_C,
                lambda: StableCascadeUNet(clip_text_in_channels=1280, clip_image_in_channels=768),
                {"down.0": 8, "down.1": 24, "up.1": 24, "up.0": 8}, "Stable Cascade stage C (3.6B)"),
    "stage_c_lite": ({"stable_cascade_stage": "c", "c_cond": 1536, "c_hidden": [1536, 1536], "nhead": [24, 24],
                      "blocks": [[4, 12], [12, 4]]}, comfy.supported_models.Stable_Cascade_C,
                     lambda: StableCascadeUNet(conditioning_dim=1536, block_out_channels=(1536, 1536),
                                               num_attention_heads=(24, 24), down_num_layers_per_block=(4, 12),
                                               up_num_layers_per_block=(12, 4), clip_text_in_channels=1280,
                                               clip_image_in_channels=768),
                     {"down.0": 4, "down.1": 12, "up.1": 12, "up.0": 4}, "Stable Cascade stage C lite (1B)"),
    "stage_b": ({"stable_cascade_stage": "b", "c_hidden": [320, 640, 1280, 1280], "nhead": [-1, -1, 20, 20],
                 "blocks": [[2, 6, 28, 6], [6, 28, 6, 2]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]]},
                comfy.supported_models.Stable_Cascade_B,
                lambda: StableCascadeUNet(
                    in_channels=4, out_channels=4, patch_size=2, conditioning_dim=1280,
                    block_out_channels=(320, 640, 1280, 1280), num_attention_heads=(0, 0, 20, 20),
                    down_num_layers_per_block=(2, 6, 28, 6), up_num_layers_per_block=(6, 28, 6, 2),
                    down_blocks_repeat_mappers=(1, 1, 1, 1), up_blocks_repeat_mappers=(3, 3, 2, 2),
                    block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock"),) * 2
                    + (("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
                    effnet_in_channels=16, pixel_mapper_in_channels=3, dropout=(0, 0, 0.1, 0.1),
                    timestep_conditioning_type=("sca",)),
                {"down.2": 28, "down.3": 6, "up.3": 6, "up.2": 28}, "Stable Cascade stage B (1.5B)"),
    "stage_b_lite": ({"stable_cascade_stage": "b", "c_hidden": [320, 576, 1152, 1152], "nhead": [-1, 9, 18, 18],
                      "blocks": [[2, 4, 14, 4], [4, 14, 4, 2]], "block_repeat": [[1, 1, 1, 1], [2, 2, 2, 2]]},
                     comfy.supported_models.Stable_Cascade_B, None,
                     {"down.2": 14, "down.3": 4, "up.3": 4, "up.2": 14}, "Stable Cascade stage B lite (700M)"),
}


def full_size(which):
    unet_config, config_class = FULL_SIZE[which][:2]
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(config_class(dict(unet_config)).get_model({}, device="meta"),
                                            load_device=cpu, offload_device=cpu)


@pytest.mark.parametrize("which", FULL_SIZE)
def test_every_block_name_is_a_module_of_the_host_and_of_diffusers(which):
    patcher = full_size(which)
    recognised = recognise(patcher, "test")
    layout = recognised.layout
    assert recognised.family.name == "Stable Cascade"
    assert layout.depths == FULL_SIZE[which][3]
    host_modules = dict(patcher.model.diffusion_model.named_modules())
    attention_blocks = {name for name, module in host_modules.items() if isinstance(module, AttnBlock)}
    assert {block.host_name for block in layout.sites} == attention_blocks  # every attention block, once
    assert all(host_modules[name].self_attn for name in attention_blocks)
    diffusers_modules = None
    if FULL_SIZE[which][2] is not None:
        with torch.device("meta"):
            diffusers_modules = dict(FULL_SIZE[which][2]().named_modules())
    for block in layout.sites:
        assert f"{block.host_name}.attention.attn" in host_modules, block  # the block's OptimizedAttention
        if diffusers_modules is not None:
            assert block.diffusers_name in diffusers_modules, block
            assert type(diffusers_modules[block.diffusers_name.rpartition(".")[0]]).__name__ == "SDCascadeAttnBlock"
        for spelling in (block.index_name, block.diffusers_name, block.host_name):
            assert layout.select(spelling) == [block]
    # the docs' layout of the same checkpoint, from its configuration, names the same modules
    (known,) = [known for known in recognised.family.known_models if known.name == FULL_SIZE[which][4]]
    names = [(block.index_name, block.host_name) for block in layout.sites]
    assert [(block.index_name, block.host_name) for block in known.layout().sites] == names


@pytest.mark.parametrize("which", FULL_SIZE)
def test_full_size_defaults_are_the_blocks_where_the_u_turns(which):
    layout = recognise(full_size(which), "test").layout
    deepest = max(int(kind.rpartition(".")[2]) for kind in layout.depths)
    down, up = layout.select(f"down.{deepest}"), layout.select(f"up.{deepest}")
    assert layout.select(layout.resolve("auto", "pag")) == down[-4:] + up[:4]
    assert layout.select(layout.resolve("auto", "seg")) == down[-4:] + up[:4]
    assert layout.select(layout.resolve("auto", "sag")) == down[-1:]
    for method in ("pag", "sag"):
        source = layout.default_source(method)
        assert "none published for Stable Cascade" in source and "SDXL" in source


def test_levels_paths_and_host_paths_name_the_same_blocks():
    layout = recognise(full_size("stage_c"), "test").layout
    assert layout.select("down") == layout.select("down.0") + layout.select("down.1")
    assert [b.host_name for b in layout.select("up.1.0-2")] == ["up_blocks.0.2", "up_blocks.0.5", "up_blocks.0.8"]
    assert layout.select("up_blocks.0") == layout.select("up.1")  # the host lists the deepest level first
    assert layout.select("down_blocks.1.71") == layout.select("down.1.23")
    for unknown in ("down.2", "up.1.24", "down_blocks.1.70", "double.3"):
        with pytest.raises(LayerSpecError, match="does not exist in this Stable_Cascade_C model") as error:
            layout.select(unknown)
        assert "down.1.0-23 = down_blocks.1.{2, 5, ..., 71}" in str(error.value)


def test_an_unknown_layer_fails_clearly_in_the_node():
    with pytest.raises(LayerSpecError, match=r"PAG layers: Layer 'up\.3\.0' does not exist") as error:
        pag(tiny("stable_cascade_c"), "up.3.0")
    assert "up.1.0-23" in str(error.value) and "up.0.0-7" in str(error.value)


def test_the_image_query_identity_is_the_masked_attention_over_the_image_and_text_keys():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=generator)
    k, v = (torch.randn(2, 3, 9, 8, generator=generator) for _ in range(2))
    padding = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    padding[1, ..., 7:] = False  # the second row's last two text tokens are padding
    mask = torch.zeros(2, 1, 5, 9).masked_fill(~padding, float("-inf"))
    mask[..., :5] = float("-inf")
    mask[..., range(5), range(5)] = 0.0
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(image_query_identity_attention(q, k, v, padding, query_chunk=2), expected, atol=1e-5)
    assert torch.equal(image_query_identity_attention(q, k[:, :, :5], v[:, :, :5]), v[:, :, :5])  # no text: I


# --- PAG: the identity attention of the image queries of the chosen block -----------------------------------

@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("family", STAGES)
def test_pag_is_the_identity_attention_of_the_image_queries_of_the_chosen_block(family, cfg):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=3)
    x, sigma = latent(family)
    spec = BLOCK[family]
    plain = denoise_once(model, positive, negative, x, sigma, cfg)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    with watching(model, host_block(family, spec).host_name) as state:
        perturbed = denoise_once(with_override(model, inside_block(state, identity_with_text)), positive, negative, x,
                                 sigma, 1.0)
    assert len(state["grids"]) == (3 if family == "stable_cascade_b" else 1)  # stage B's up.2 runs 3 times
    expected = plain + 3.0 * (cond - perturbed)  # paper Eq. 14 with the test's own identity attention
    ours = denoise_once(pag(model, spec), positive, negative, x, sigma, cfg)
    assert rel_err(ours, expected) < 1e-4
    assert rel_err(ours, plain) > 1e-2


@pytest.mark.parametrize("family", STAGES)
def test_pag_reaches_only_the_attention_of_the_chosen_blocks(family):
    # the override under PAG sees every attention call of the batched forward with all three chunks, except the
    # chosen blocks', whose perturbed chunk is PAG's own; each call's queries are its block's input pixels
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=4)
    x, sigma = latent(family)
    specs = {"stable_cascade_c": "down.0.0, up.1.23", "stable_cascade_b": "down.3.5, up.3.0"}[family]
    chosen = [block.host_name for block in recognise(model, "test").layout.select(specs)]
    calls = []
    with contextlib.ExitStack() as stack:
        watched = {name: stack.enter_context(watching(model, name)) for name in chosen}

        def record(func, q, k, v, heads, *args, **kwargs):
            calls.append((q.shape[0], q.shape[1], k.shape[1], any(s["inside"] for s in watched.values())))
            return func(q, k, v, heads, *args, **kwargs)

        patched = pag(with_override(model, record), specs)
        with count_forwards(patched) as forwards:
            out = denoise_once(patched, positive, negative, x, sigma, 4.0)
    assert torch.isfinite(out).all()
    assert [sorted(f.cond_or_uncond) for f in forwards] == [[0, 1, 2]]
    assert len(calls) == {"stable_cascade_c": 64, "stable_cascade_b": 28 + 6 + 6 * 3 + 28 * 3}[family]
    assert [rows for rows, *_ in calls] == [2 if inside else 3 for *_, inside in calls]
    assert sum(inside for *_, inside in calls) == sum(len(state["grids"]) for state in watched.values())
    text = {"stable_cascade_c": 7 + 4 + 4, "stable_cascade_b": 4}[family]  # CLIP text, pooled and image tokens
    assert {keys - queries for _, queries, keys, _ in calls} == {text}
    for state in watched.values():
        for grid in state["grids"]:
            assert grid[0] * grid[1] in {queries for _, queries, _, inside in calls if inside}


# --- SEG: the image queries blurred on the block's own grid --------------------------------------------------

@pytest.mark.parametrize("blur_sigma", [10000.0, 1.0])
@pytest.mark.parametrize("family", STAGES)
def test_seg_blurs_the_image_queries_on_the_grid_of_the_chosen_block(family, blur_sigma):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=9)
    hw = {"stable_cascade_c": (10, 14), "stable_cascade_b": (64, 96)}[family]
    x, sigma = latent(family, hw=hw)
    spec = {"stable_cascade_c": "down.0.0", "stable_cascade_b": "down.2.0"}[family]  # queries still differ most
    grid = level_grid(family, hw, int(spec.split(".")[1]))

    def blurred(func, q, k, v, heads, *args, **kwargs):
        assert state["grids"][-1] == grid
        return func(direct_query_blur(q, grid, blur_sigma, 1).to(q.dtype), k, v, heads, *args, **kwargs)

    plain = denoise_once(model, positive, negative, x, sigma, 4.0)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    with watching(model, host_block(family, spec).host_name) as state:
        perturbed = denoise_once(with_override(model, inside_block(state, blurred)), positive, negative, x, sigma, 1.0)
    ours = denoise_once(seg(model, spec, blur_sigma=blur_sigma), positive, negative, x, sigma, 4.0)
    assert rel_err(cond, perturbed) > 1e-5
    assert rel_err(ours - plain, 3.0 * (cond - perturbed)) < 5e-2


# --- SAG: the key mass of the image queries over the image keys, on the block's grid -------------------------

def expected_mask(q, k, heads, grid, latent_hw):
    n = q.shape[1]
    probs = (heads_of(q, heads).double() @ heads_of(k, heads).double().transpose(-1, -2)
             * (q.shape[-1] // heads) ** -0.5).softmax(-1)[..., :n]  # the image queries over the image keys
    probs = probs / probs.sum(-1, keepdim=True)
    mass = probs.mean(1).sum(1)  # [B, image tokens]
    return F.interpolate((mass > 1.0).double().reshape(-1, 1, *grid), size=latent_hw, mode="nearest").float()


SAG_CASES = [("stable_cascade_c", "down.1.23", (8, 12)), ("stable_cascade_c", "up.0.3", (7, 9)),
             ("stable_cascade_b", "down.3.5", (32, 48)), ("stable_cascade_b", "down.2.27", (36, 44)),
             ("stable_cascade_b", "up.2.5", (48, 32))]


@pytest.mark.parametrize("family, spec, latent_hw", SAG_CASES)
def test_sag_mask_is_the_key_mass_of_the_image_on_the_grid_of_the_chosen_block(family, spec, latent_hw):
    model = tiny(family)
    x, sigma = latent(family, hw=latent_hw, sigma=0.5)
    positive, negative = make_dit_conditioning(family, batch=1, seed=6)
    calls, kept = [], []
    with watching(model, host_block(family, spec).host_name) as state:
        def record(func, q, k, v, heads, *args, **kwargs):
            if state["inside"]:
                calls.append((dict(kwargs["transformer_options"]), q, k, heads))
            return func(q, k, v, heads, *args, **kwargs)

        denoise_once(with_sag_mask_probe(sag(with_override(model, record), spec), kept.append), positive, negative,
                     x, sigma, 4.0)
    grid = state["grids"][-1]
    assert grid == level_grid(family, latent_hw, int(spec.split(".")[1]))
    options, q, k, heads = calls[-1]  # stage B's up-path blocks run several times: the map is the last run's
    assert q.shape[1] == grid[0] * grid[1]
    uncond = options["cond_or_uncond"].index(1)  # SAG's reference under CFG
    expected = expected_mask(q[uncond:uncond + 1], k[uncond:uncond + 1], heads, grid, latent_hw)
    assert kept[0].shape == (1, 1, *latent_hw)
    assert 0 < kept[0].mean() < 1
    assert torch.equal(kept[0], expected)


# --- batches, sampling, the uncond placement -----------------------------------------------------------------

@pytest.mark.parametrize("node", ["pag", "sag"])
@pytest.mark.parametrize("family", STAGES)
def test_batch_rows_are_guided_independently(family, node):
    assert_batch_rows_guided_independently(family, (pag if node == "pag" else sag), BLOCK[family], hw=HW[family])


@pytest.mark.parametrize("family", STAGES)
def test_every_method_guides_a_sampled_non_square_latent_and_stays_finite(family):
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=2, seed=8)
    start = empty_dit_latent(model, (2, 16, *{"stable_cascade_c": (6, 10), "stable_cascade_b": (32, 56)}[family]))
    plain = sample(model, positive, negative, start, steps=3, cfg=3.5, seed=3)
    for name, patched in (("pag", pag(model, "auto")), ("seg", seg(model, "auto")), ("sag", sag(model, "auto")),
                          ("sag+pag", pag(sag(model, BLOCK[family]), BLOCK[family]))):
        out = sample(patched, positive, negative, start, steps=3, cfg=3.5, seed=3)
        assert out.shape == plain.shape
        assert torch.isfinite(out).all()
        # the random stage B's noise prediction at its first, large sigmas makes samples of ~100, which the
        # guidance moves by a few 1e-4 of their range (its single steps by 1e-2, as the tests above check)
        assert rel_err(out, plain) > (1e-6 if name == "seg" else 1e-3 if family == "stable_cascade_c" else 1e-4), name
    assert torch.equal(sample(model, positive, negative, start, steps=3, cfg=3.5, seed=3), plain)  # model untouched


def placed(node, model, layers, placement, scale=3.0):
    if node == "pag":
        return PerturbedAttentionGuidance.execute(model, scale, layers, 0.0, 0.0, 1.0, 0.0, placement).result[0]
    return SmoothedEnergyGuidance.execute(model, scale, 10000.0, layers, 0.0, 1.0, placement).result[0]


@pytest.mark.parametrize("node", ["pag", "seg"])
@pytest.mark.parametrize("family", STAGES)
def test_the_uncond_placement_is_cfgs_forward_with_the_perturbed_negative(family, node):
    # the own-branch copy, given the negative as positive at CFG 1 and scale 1, returns u + (u - û): û = 2u - D
    model = tiny(family)
    positive, negative = make_dit_conditioning(family, batch=1, seed=11)
    x, sigma = latent(family)
    layers = BLOCK[family]
    patched = placed(node, model, layers, "uncond branch")
    with count_forwards(patched) as forwards:
        ours = denoise_once(patched, positive, negative, x, sigma, 3.5)
    assert [(f.batch_size, sorted(f.cond_or_uncond)) for f in forwards] == [(2, [0, 1])]
    uncond = denoise_once(model, negative, negative, x, sigma, 1.0)
    perturbed_uncond = 2 * uncond - denoise_once(placed(node, model, layers, "own branch", scale=1.0), negative,
                                                 negative, x, sigma, 1.0)
    cond = denoise_once(model, positive, negative, x, sigma, 1.0)
    expected = perturbed_uncond + 3.5 * (cond - perturbed_uncond)
    plain = denoise_once(model, positive, negative, x, sigma, 3.5)
    assert rel_err(plain, expected) > 1e-5
    assert rel_err(ours - plain, expected - plain) < 1e-2
