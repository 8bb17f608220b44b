"""Layer specs against the real layouts: the host's SD1.5 / SDXL UNets (built on the meta device, no
weights) and diffusers' own module names for the same architectures."""
import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention

from attention_guidance.guidance_core.layer_spec import AttentionLayout, LayerSpecError, describe_sites, scaled_block_range
from support.real_architectures import meta_model

SD15_DIFFUSERS = dict(cross_attention_dim=768)  # UNet2DConditionModel defaults are SD1.x
SDXL_DIFFUSERS = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)


def _layout(architecture: str) -> AttentionLayout:
    """The layout the node sees: the node's own discovery code on the full-size host model, built on
    the meta device (no weights)."""
    from attention_guidance.patching.families import recognise

    return recognise(meta_model(architecture), "test").layout


def _diffusers_self_attention_names(config) -> list[str]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [n for n, m in unet.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]


@pytest.fixture(scope="module")
def sd15():
    return _layout("sd15")


@pytest.fixture(scope="module")
def sdxl():
    return _layout("sdxl")


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_site_names_are_diffusers_module_names(which, request):
    layout = request.getfixturevalue(which)
    config = SD15_DIFFUSERS if which == "sd15" else SDXL_DIFFUSERS
    names = [s.diffusers_name for s in layout.sites]
    assert sorted(names) == sorted(_diffusers_self_attention_names(config))
    # ours are in forward order: down path, middle, up path
    paths = [n.split(".")[0] for n in names]
    assert paths == sorted(paths, key=["down_blocks", "mid_block", "up_blocks"].index)


def test_sd15_index_names_follow_the_paper(sd15):
    modules = sorted({s.index_name.split(".")[0] for s in sd15.sites}, key=lambda n: ("dmu".index(n[0]), int(n[1:])))
    assert modules == [f"d{i}" for i in range(6)] + ["m0"] + [f"u{i}" for i in range(9)]
    assert [s.host_key for s in sd15.select("m0")] == [("middle", 0, 0)]
    # u0 is the first up-path attention: diffusers up_blocks.1.attentions.0 = host output block 3
    assert [s.host_key for s in sd15.select("u0")] == [("output", 3, 0)]
    assert [s.host_key for s in sd15.select("d4")] == [("input", 7, 0)]


def test_sdxl_depths_and_ranges(sdxl):
    assert len(sdxl.sites) == 2 * 2 + 2 * 10 + 10 + 3 * 10 + 3 * 2
    assert [s.host_key for s in sdxl.select("mid")] == [("middle", 0, k) for k in range(10)]
    assert [s.host_key for s in sdxl.select("m0.4")] == [("middle", 0, 4)]
    assert [s.host_key for s in sdxl.select("d2.2-9")] == [("input", 7, k) for k in range(2, 10)]
    assert sdxl.select("d0-3") == sdxl.select("d0-d3") == sdxl.select("down")
    assert [s.host_key for s in sdxl.select("u0.4")] == [("output", 0, 4)]


@pytest.mark.parametrize(
    "spec", ["mid", "down", "up", "down_blocks.1", "up_blocks.1.attentions.2", "mid_block.attentions.0", "attn1"]
)
@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_diffusers_paths_select_what_diffusers_selects(spec, which, request):
    layout = request.getfixturevalue(which)
    config = SD15_DIFFUSERS if which == "sd15" else SDXL_DIFFUSERS
    # pag_utils.py: re.search(layer_id, name) over self-attention module names
    expected = {n for n in _diffusers_self_attention_names(config) if re.search(spec, n)}
    assert {s.diffusers_name for s in layout.select(spec)} == expected


def test_whole_components_only(sdxl):
    # diffusers#13594: a regex "blocks.1" also hits "blocks.10".."blocks.19"; here only index 1
    picked = sdxl.select("transformer_blocks.1")
    assert picked and {s.transformer_index for s in picked} == {1}
    with pytest.raises(LayerSpecError):
        sdxl.select("mid_block.attentions.0.transformer_blocks.10")


def test_old_diffusers_and_host_spellings(sd15):
    assert sd15.select("down.block_2") == sd15.select("down_blocks.2") == sd15.select("d4-5")
    assert sd15.select("up.block_1.attentions_0") == sd15.select("up_blocks.1.attentions.0") == sd15.select("u0")
    assert sd15.select("middle.0") == sd15.select("mid") == sd15.select(" M0 ")
    assert sd15.select("output.3.0") == sd15.select("u0")


def test_several_entries_are_merged_in_forward_order(sd15):
    picked = sd15.select("u0, m0, d1, m0")
    assert [s.index_name for s in picked] == ["d1.0", "m0.0", "u0.0"]


@pytest.mark.parametrize("spec", ["u9", "m1", "mid_block.attentions.1", "down_blocks.3", "d0.1", "u99"])
def test_unknown_layers_list_the_model_layers(sd15, spec):
    with pytest.raises(LayerSpecError) as error:
        sd15.select(spec)
    message = str(error.value)
    assert f"'{spec}'" in message and "does not exist" in message
    assert "u8 = up_blocks.3.attentions.2" in message and "m0 = mid_block.attentions.0" in message


@pytest.mark.parametrize("spec", ["", " , ", "m0;", "mid_block.*attn1", "d-1"])
def test_unreadable_or_empty_specs_say_how_to_write_one(sd15, spec):
    with pytest.raises(LayerSpecError) as error:
        sd15.select(spec)
    assert "mid" in str(error.value)


@pytest.mark.parametrize("published, depth, expected", [
    ((7, 9, 19), 19, (7, 9)),  # the published model itself: the published blocks
    ((13, 13, 24), 24, (13, 13)),
    ((7, 9, 19), 8, (2, 4)),  # Flux.2 dev's 8 double blocks: three, centred at 8/18 of the depth
    ((13, 13, 24), 38, (21, 21)),  # SD3.5 Large: 13/23 of 37 = 20.9
    ((7, 9, 19), 60, (25, 27)),  # Qwen-Image
    ((7, 9, 19), 2, (0, 1)),  # fewer blocks than published: all of them
    ((7, 9, 19), 1, (0, 0)),
])
def test_published_blocks_move_to_the_same_relative_depth(published, depth, expected):
    first, last = scaled_block_range(*published, depth)
    assert (first, last) == expected
    assert 0 <= first <= last < depth and last - first + 1 == min(published[1] - published[0] + 1, depth)


@pytest.mark.parametrize("architecture", ["sd15", "sdxl"])
def test_auto_on_a_unet_is_the_former_default_and_selects_the_same_layers(architecture):
    layout = _layout(architecture)
    assert layout.select(layout.resolve("auto", "pag")) == layout.select("mid")
    assert layout.select(layout.resolve("auto", "sag")) == layout.select("m0.0")
    assert layout.resolve("auto", "seg") == "mid"  # SEG perturbs where PAG does
    # a saved 'mid' / 'm0.0' is itself, not 'auto', on a UNet
    assert layout.resolve("mid", "pag") == "mid" and layout.resolve("m0.0", "sag") == "m0.0"
    assert describe_sites(layout.select("mid")) == ("m0.0" if architecture == "sd15" else "m0.0-9")
    assert describe_sites(layout.select("d0, m0, u3")) in ("d0.0, m0.0, u3.0", "d0.0-1, m0.0-9, u3.0-1")
