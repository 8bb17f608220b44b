"""The full-size architectures of the model files the example workflows name, built on the meta device
(real block counts and widths, no weights, no memory), as the host's model detection configures them
from those files (``comfy.model_detection``, 0.3.75).

    patcher = meta_model("sd3_medium")   # a ModelPatcher the nodes' layout code can read
"""
from __future__ import annotations

import torch

SD15_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
)
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
)
# SD3 Medium: 24 joint blocks of width 64 * 24, CLIP-L + CLIP-G pooled (2048), T5-width context (4096).
SD3_MEDIUM_MMDIT = dict(
    in_channels=16, out_channels=16, patch_size=2, depth=24, input_size=None, adm_in_channels=2048,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    num_patches=192 * 192, pos_embed_max_size=192, pos_embed_scaling_factor=None, x_block_self_attn_layers=[],
)
# Flux.1 dev: 19 double and 38 single blocks, width 3072, guidance embedding.
FLUX_DEV = dict(
    image_model="flux", in_channels=16, out_channels=16, patch_size=2, vec_in_dim=768, context_in_dim=4096,
    hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
    theta=10000, qkv_bias=True, guidance_embed=True,
)

# Z-Image (Turbo): NextDiT of width 3840, 30 main layers, text and image padded to multiples of 32.
Z_IMAGE = dict(
    image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30, qk_norm=True,
    n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
    ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32,
)
# Wan 2.1 T2V 1.3B: 30 blocks of width 1536, 12 heads (comfy.model_detection reads them from the weights).
WAN21_T2V_1_3B = dict(
    image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=1536, ffn_dim=8960,
    freq_dim=256, text_dim=4096, out_dim=16, num_heads=12, num_layers=30, eps=1e-6,
)

# Cosmos Predict2 2B Text2Image (Anima's architecture): 28 blocks of width 2048, 16 heads.
COSMOS_PREDICT2_2B = dict(
    image_model="cosmos_predict2", max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16,
    patch_spatial=2, patch_temporal=1, model_channels=2048, num_blocks=28, num_heads=16, concat_padding_mask=True,
    crossattn_emb_channels=1024, pos_emb_cls="rope3d", pos_emb_learnable=True, pos_emb_interpolation="crop", min_fps=1,
    max_fps=30, use_adaln_lora=True, adaln_lora_dim=256, extra_per_block_abs_pos_emb=False,
    rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0, rope_t_extrapolation_ratio=1.0,
    rope_enable_fps_modulation=False,
)

# Wan 2.2 14B T2V, each of its two experts (high noise, low noise): Wan 2.1 14B's architecture, 40 blocks of width
# 5120, 40 heads; the host detects it as WAN21_T2V (Wan 2.2's own latent is the 5B model's).
WAN22_T2V_14B = dict(
    image_model="wan2.1", model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=5120, ffn_dim=13824,
    freq_dim=256, text_dim=4096, out_dim=16, num_heads=40, num_layers=40, eps=1e-6,
)

# Mochi 1 preview: 48 joint blocks, video width 3072, text width 1536 (fixed in comfy.model_detection).
MOCHI_PREVIEW = dict(
    image_model="mochi_preview", depth=48, patch_size=2, num_heads=24, hidden_size_x=3072, hidden_size_y=1536,
    mlp_ratio_x=4.0, mlp_ratio_y=4.0, learn_sigma=False, in_channels=12, qk_norm=True, qkv_bias=False, out_bias=True,
    attn_drop=0.0, patch_embed_bias=True, posenc_preserve_area=True, timestep_mlp_bias=True, attend_to_padding=False,
    timestep_scale=1000.0, use_t5=True, t5_feat_dim=4096, t5_token_length=256, rope_theta=10000.0,
)

# PixArt Sigma XL-2 1024-MS: 28 blocks of width 1152, 16 heads, 300 T5 tokens, no micro-conditioning (the host
# tells Sigma from Alpha by the missing aspect-ratio embedder); a 128-latent position grid at interpolation 2.
PIXART_SIGMA_XL2_1024 = dict(
    image_model="pixart_sigma", num_heads=16, patch_size=2, hidden_size=1152, in_channels=4, depth=28,
    model_max_length=300, input_size=128, pe_interpolation=2, micro_condition=False,
)

ARCHITECTURES = ("sd15", "sdxl", "sd3_medium", "flux_dev", "z_image", "wan21_t2v_1.3b", "cosmos_predict2_2b",
                 "wan22_t2v_14b", "mochi_preview", "pixart_sigma_xl2_1024")


def meta_model(architecture: str):
    """A ModelPatcher around the full-size host model of ``architecture`` (one of ARCHITECTURES), on the
    meta device."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    builders = {
        "sd15": lambda: comfy.model_base.BaseModel(comfy.supported_models.SD15(dict(SD15_UNET)), device="meta"),
        "sdxl": lambda: comfy.model_base.SDXL(comfy.supported_models.SDXL(dict(SDXL_UNET)), device="meta"),
        "sd3_medium": lambda: comfy.model_base.SD3(comfy.supported_models.SD3(dict(SD3_MEDIUM_MMDIT)), device="meta"),
        "flux_dev": lambda: comfy.model_base.Flux(comfy.supported_models.Flux(dict(FLUX_DEV)), device="meta"),
        "z_image": lambda: comfy.model_base.Lumina2(comfy.supported_models.ZImage(dict(Z_IMAGE)), device="meta"),
        "wan21_t2v_1.3b": lambda: comfy.model_base.WAN21(comfy.supported_models.WAN21_T2V(dict(WAN21_T2V_1_3B)),
                                                         device="meta"),
        "cosmos_predict2_2b": lambda: comfy.model_base.CosmosPredict2(
            comfy.supported_models.CosmosT2IPredict2(dict(COSMOS_PREDICT2_2B)), device="meta"),
        "wan22_t2v_14b": lambda: comfy.model_base.WAN21(comfy.supported_models.WAN21_T2V(dict(WAN22_T2V_14B)),
                                                        device="meta"),
        "mochi_preview": lambda: comfy.model_base.GenmoMochi(comfy.supported_models.GenmoMochi(dict(MOCHI_PREVIEW)),
                                                             device="meta"),
        "pixart_sigma_xl2_1024": lambda: comfy.model_base.PixArt(
            comfy.supported_models.PixArtSigma(dict(PIXART_SIGMA_XL2_1024)), device="meta"),
    }
    if architecture not in builders:
        raise ValueError(f"unknown architecture {architecture!r}; one of {', '.join(ARCHITECTURES)}")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(builders[architecture](), load_device=cpu, offload_device=cpu)
