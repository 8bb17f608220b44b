"""HunyuanImage 2.1's refiner in the real host: the host's HunyuanVideo class with 3-D patches of one, on its own
latent format (two latent frames packed into one model frame of twice the channels). The nodes' token grid is the
model input's ``(frames, h, w)``: the guided attention's image tokens are exactly that grid, SEG at infinite blur
is the mean query of each frame, SAG's mask covers each frame, on a narrow model of the real 20 double- and 40
single-stream blocks."""
import comfy.model_base
import comfy.model_patcher
import comfy.supported_models
import pytest
import torch

from attention_guidance.patching.families import recognise
from attention_guidance.patching.sag import with_sag_mask_probe
from support.dit_models import DIT_CONFIGS, make_dit_conditioning
from support.family_checks import pag, rel_err, recording, sag, seg, with_override
from support.models import denoise_once, initialise_weights

TEXT_TOKENS = 7  # make_dit_conditioning's Qwen2.5-VL tokens (no glyph tokens)
BLOCK = "double.5"


pytestmark = pytest.mark.without_autograd  # as ComfyUI runs a prompt (tests/conftest.py)


@pytest.fixture(scope="module")
@torch.no_grad()
def refiner():
    # the refiner's checkpoint as comfy.model_detection reads it: 3-D patches of one, three RoPE axes, the noise
    # and the image each 128 channels (two 64-channel latent frames packed), 128 out
    config = {**DIT_CONFIGS["hunyuan_image21"], "patch_size": [1, 1, 1], "axes_dim": [8, 12, 12], "in_channels": 256,
              "out_channels": 128}
    model_config = comfy.supported_models.HunyuanImage21Refiner(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.HunyuanImage21Refiner(model_config, device=torch.device("cpu"))
    initialise_weights(model.diffusion_model, 0)
    # the chosen block's image attention sharpened (query and key norms 4x): at random weights it is so near uniform
    # that SEG's blur moves the prediction by 1e-5 of it only, near float32's rounding of the two routes compared
    attention = model.diffusion_model.double_blocks[5].img_attn.norm
    attention.query_norm.scale.mul_(4.0)
    attention.key_norm.scale.mul_(4.0)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def model_input(frames=2, hw=(8, 10), seed=1):
    """A noisy latent as the refiner's model takes it (after its latent format's ``process_in``)."""
    return torch.randn(1, 128, frames, *hw, generator=torch.Generator().manual_seed(seed)), 0.6


def calls_at_block(calls, block_index):
    # one forward: the text refiner's two calls, then one call per double block
    return calls[2 + block_index]


def test_the_refiner_is_hunyuan_image_21_with_its_blocks(refiner):
    recognised = recognise(refiner, "test")
    assert recognised.family.name == "HunyuanImage 2.1"
    assert recognised.layout.depths == {"double": 20, "single": 40}


@pytest.mark.parametrize("frames, hw", [(2, (8, 10)), (1, (7, 9))])
def test_the_guided_attention_holds_the_grid_of_the_model_input(refiner, frames, hw):
    x, sigma = model_input(frames, hw)
    positive, negative = make_dit_conditioning("hunyuan_image21", seed=3)
    calls = []
    denoise_once(pag(recording(refiner, calls), BLOCK), positive, negative, x, sigma, 4.0)
    _, args, _ = calls_at_block(calls, 5)
    assert args[0].shape[2] == frames * hw[0] * hw[1] + TEXT_TOKENS  # [B, heads, L, D]: image, then text


def test_seg_at_infinite_blur_is_the_mean_query_of_each_frame(refiner):
    x, sigma = model_input()
    positive, negative = make_dit_conditioning("hunyuan_image21", seed=9)
    frames, tokens = 2, 2 * 8 * 10
    seen = []

    def mean_queries(func, q, k, v, heads, *args, **kwargs):
        seen.append(None)
        if len(seen) != 2 + 5 + 1:  # the chosen block's call
            return func(q, k, v, heads, *args, **kwargs)
        q = q.clone()
        per_frame = q[:, :, :tokens].reshape(q.shape[0], q.shape[1], frames, -1, q.shape[3])
        q[:, :, :tokens] = per_frame.mean(3, keepdim=True).expand_as(per_frame).reshape(q.shape[0], q.shape[1], -1,
                                                                                         q.shape[3])
        return func(q, k, v, heads, *args, **kwargs)

    plain = denoise_once(refiner, positive, negative, x, sigma, 4.0)
    cond = denoise_once(refiner, positive, negative, x, sigma, 1.0)
    perturbed = denoise_once(with_override(refiner, mean_queries), positive, negative, x, sigma, 1.0)
    ours = denoise_once(seg(refiner, BLOCK, blur_sigma=10000.0), positive, negative, x, sigma, 4.0)
    assert rel_err(cond, perturbed) > 1e-4
    assert rel_err(ours - plain, 3.0 * (cond - perturbed)) < 1e-2


def test_sag_masks_each_frame_of_the_model_input(refiner):
    x, sigma = model_input(2, (7, 9))
    positive, negative = make_dit_conditioning("hunyuan_image21", seed=6)
    kept = []
    denoise_once(with_sag_mask_probe(sag(refiner, BLOCK), kept.append), positive, negative, x, sigma, 4.0)
    assert kept[0].shape == (2, 1, 7, 9)
    assert 0 < kept[0].mean() < 1
