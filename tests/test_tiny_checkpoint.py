"""The tiny random checkpoint the demos and end-to-end tests use is a real SD1.5 single-file checkpoint
for ComfyUI: SD1.5 key layout, detected as SD15 with the intended shrunken UNet, and it samples and
decodes to finite values."""
import comfy.model_detection
import comfy.model_management
import comfy.utils

from support.server import tiny_checkpoint, tiny_checkpoint_module


def test_key_layout_and_detected_unet_config():
    state_dict = comfy.utils.load_torch_file(str(tiny_checkpoint()))
    prefixes = {key.split(".")[0] for key in state_dict}
    assert prefixes == {"model", "cond_stage_model", "first_stage_model"}
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.11.") for k in state_dict)
    # the 8x SD VAE, not the 4x upscaler one (comfy.sd.VAE tells them apart by these keys)
    assert "first_stage_model.encoder.down.2.downsample.conv.weight" in state_dict
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in state_dict
    assert tuple(state_dict["first_stage_model.post_quant_conv.weight"].shape) == (4, 4, 1, 1)

    unet_config = comfy.model_detection.detect_unet_config(state_dict, "model.diffusion_model.")
    expected = tiny_checkpoint_module().TINY_SD15_UNET_CONFIG
    assert {k: unet_config.get(k) for k in expected} == expected
    model_config = comfy.model_detection.model_config_from_unet(state_dict, "model.diffusion_model.")
    assert type(model_config).__name__ == "SD15"


def test_loads_as_sd15_and_decodes_a_finite_64px_sample():
    try:
        checked = tiny_checkpoint_module().verify_tiny_sd15_checkpoint(tiny_checkpoint())
    finally:
        comfy.model_management.unload_all_models()
    assert checked["model"] == "SD15"
    assert checked["image_std"] > 0.0
