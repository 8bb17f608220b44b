"""Tiny DiT models of the families the pack supports, built from the host's own classes, and the
diffusers twin of the SD3 one.

Families (see ``DIT_CONFIGS``):

- ``sd3``: ``comfy.supported_models.SD3`` + ``comfy.model_base.SD3`` (MMDiT, flow matching with
  shift 3). Head size 64 and ``depth`` heads as in every MMDiT (the host derives both from
  ``depth``): 4 heads, 4 joint blocks, the last one ``pre_only`` (its text stream ends there), no qk-norm.
- ``sd35``: the same with SD3.5's RMS qk-norm and SD3.5 Medium's extra image-only self-attention
  (``x_block_self_attn``) in blocks 0 and 1.
- ``flux``: ``comfy.supported_models.Flux`` + ``comfy.model_base.Flux`` (guidance-embedded,
  Flux.1-dev style), 3 double and 4 single blocks, 2 heads of 32 channels.
- ``flux2``: the same blocks in ``comfy.supported_models.Flux2`` / ``comfy.model_base.Flux2``'s layout
  (patch size 1, 128 latent channels, shared modulation; the host pads the text to 512 tokens).
- ``chroma``: ``comfy.supported_models.Chroma`` + ``comfy.model_base.Chroma``: Flux's double and single
  blocks (3 and 4, 2 heads of 32 channels) modulated by one approximator, T5 text only.
- ``chroma_radiance``: the same in pixel space (``ChromaRadiance``): 3 channels in 16x16 patches, each
  decoded by a small NeRF-style MLP; ``noisy_dit_latent`` gives it 8 pixels per latent pixel.
- ``qwen_image``: ``comfy.supported_models.QwenImage`` + ``comfy.model_base.QwenImage``: 3 dual-stream
  blocks (2 heads of 32 channels) on a Wan 2.1 latent, ``[B, 16, 1, H, W]``.
- ``lumina2``: ``comfy.supported_models.Lumina2`` + ``comfy.model_base.Lumina2`` (NextDiT): one context and
  one noise refiner, then 3 main layers over ``cat(text, image)``; 2 query heads sharing 1 key/value head
  (grouped-query attention, as Lumina 2's 24 / 8).
- ``z_image``: ``comfy.supported_models.ZImage`` on the same class with Z-Image's modulation (its 256-wide
  timestep embedding needs ``dim`` >= 256: 4 heads of 64 channels), timestep scale and its padding of the
  text and of the image tokens to a multiple of 32.
- ``hidream``: ``comfy.supported_models.HiDream`` + ``comfy.model_base.HiDream``: 2 double-stream and 3
  single-stream blocks (2 heads of 32 channels, 4 routed experts, 2 active) over ``cat(image, text)``; its
  text is T5's tokens and, per block, a Llama layer's (``conditioning_llama3``, 4 layers here).
- ``hunyuan_video15``: ``comfy.supported_models.HunyuanVideo15`` + ``comfy.model_base.HunyuanVideo15``: the host's
  HunyuanVideo class with HunyuanVideo 1.5's real 54 double-stream blocks (no single-stream block), 3-D patches of
  1, ByT5 glyph tokens (``conditioning_byt5small``) and the condition-type embedding.
- ``hunyuan_image21``: ``comfy.supported_models.HunyuanImage21`` + ``comfy.model_base.HunyuanImage21``: the same
  class with HunyuanImage 2.1's real 20 double- and 40 single-stream blocks, 2-D patches of 1.
- ``cosmos_predict2`` / ``cosmos_predict2_i2v``: ``comfy.supported_models.CosmosT2IPredict2`` / ``CosmosI2VPredict2``
  + ``comfy.model_base.CosmosPredict2`` (MiniTrainDIT) with the 2B model's real 28 blocks; Text2Image on a
  one-frame latent, Video2World on ``VIDEO_FRAMES`` frames.
- ``auraflow``: ``comfy.supported_models.AuraFlow`` + ``comfy.model_base.AuraFlow`` (the AuraFlow MMDiT) with
  AuraFlow's real 4 double-stream and 32 single-stream blocks (2 heads of 32 channels), 2x2 patches of the
  4-channel SDXL latent, 8 register tokens before the text.
- ``omnigen2``: ``comfy.supported_models.Omnigen2`` + ``comfy.model_base.Omnigen2`` with OmniGen2's real 32 main
  layers and 2 layers in each refiner (2 query heads sharing 1 key/value head, as its 21 / 7); its conditioning
  carries the text encoder's ``attention_mask`` (the host takes the text length from it).
- ``mochi``: ``comfy.supported_models.GenmoMochi`` + ``comfy.model_base.GenmoMochi`` (AsymmDiTJoint) with Mochi's
  real 48 blocks (2 heads; video stream 64 wide, text stream 32; the host fixes the video MLP at 12288 wide, so
  ``mlp_ratio_x`` is 192), 2x2 spatial patches of the 12-channel latent;
  its conditioning's ``attention_mask`` marks the last two text tokens as padding, which the host crops.
- ``cosmos1`` / ``cosmos1_i2v``: ``comfy.supported_models.CosmosT2V`` / ``CosmosI2V`` + ``comfy.model_base.CosmosVideo``
  (GeneralDIT) with the 7B model's real 28 blocks ("FA-CA-MLP", tokens as ``[T, H, W, B, C]``), on
  ``VIDEO_FRAMES`` latent frames.
- ``stable_cascade_c``: ``comfy.supported_models.Stable_Cascade_C`` + ``comfy.model_base.StableCascade_C`` (StageC)
  with the 3.6B prior's real levels and block counts (two "CTA" levels of 8 / 24 repeats down, 24 / 8 up, both at
  the latent's resolution) at 32 channels and 2 heads; its conditioning is the CLIP text tokens, the pooled text
  and the host's zero image embedding (768 wide, as the host makes it).
- ``stable_cascade_b``: ``comfy.supported_models.Stable_Cascade_B`` + ``comfy.model_base.StableCascade_B`` (StageB)
  with the 1.5B stage B's real levels, block counts and block repeats (attention in levels 2 and 3, at 1/8 and 1/16
  of the latent) at 8 / 16 / 32 / 32 channels and 2 heads; its conditioning carries the pooled text and a stage C
  latent (``stable_cascade_prior``), as StableCascade_StageB_Conditioning gives it. Its latents need 32 or more
  pixels a side (four halvings).

Weights are random but fixed by ``seed`` (``support.models.initialise_weights``; the MMDiT's
``pos_embed`` buffer gets the same treatment); fp32 on the CPU. One forward at an 8x8 latent
(16 image tokens, 7 text tokens) takes a few milliseconds.

``SD3Twin`` is diffusers' ``SD3Transformer2DModel`` with the host model's weights, moved through the
host's own key map (``comfy.utils.mmdit_to_diffusers``), and ``sd3_pag_reference`` runs one step of
diffusers' ``StableDiffusion3PAGPipeline`` around it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models
import comfy.utils
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3PAGPipeline
from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0

from attention_guidance.patching.options import chunk_ids

from .models import initialise_weights

DIT_FAMILIES = ("sd3", "sd35", "flux", "flux2", "chroma", "chroma_radiance", "qwen_image", "lumina2", "z_image",
                "hidream", "wan21", "wan21_i2v", "wan22_ti2v", "hunyuan_video", "ltxv", "hunyuan_video15",
                "hunyuan_image21", "cosmos_predict2", "cosmos_predict2_i2v", "auraflow", "omnigen2", "mochi", "cosmos1", "cosmos1_i2v",
                "wan22_animate", "pixart", "hunyuan_dit", "wan22_s2v", "stable_cascade_c", "stable_cascade_b")
# families whose latents are videos, [B, C, T, H, W]; their test latents have VIDEO_FRAMES frames
VIDEO_FAMILIES = ("wan21", "wan21_i2v", "wan22_ti2v", "hunyuan_video", "ltxv", "hunyuan_video15", "cosmos_predict2_i2v",
                  "mochi", "cosmos1", "cosmos1_i2v", "wan22_animate", "wan22_s2v")
BYT5_DIM = 1472  # ByT5-small's width, which the host's ByT5Mapper takes (HunyuanVideo 1.5's glyph tokens)
VISION_DIM = 32  # image embeddings fed to HunyuanVideo 1.5's vision_in (SigLIP's 1152 in the real one)
VIDEO_FRAMES = 3

CONTEXT_DIM = 48  # text encoder width fed to the model (T5/CLIP features in the real ones)
POOLED_DIM = 32  # pooled text vector (CLIP-L + CLIP-G for SD3, CLIP-L for Flux)

_SD3 = {
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    # The host's MMDiT has hidden = 64 * depth and depth heads; its diffusers key map
    # (comfy.utils.mmdit_to_diffusers) assumes as many blocks as depth, as in every real checkpoint.
    "depth": 4,
    "input_size": None,
    "adm_in_channels": POOLED_DIM,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 256}},
    "num_patches": 16 * 16,
    "pos_embed_max_size": 16,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}
DIT_CONFIGS = {
    "sd3": _SD3,
    "sd35": {**_SD3, "qk_norm": "rms", "x_block_self_attn_layers": [0, 1]},
    "flux": {
        "image_model": "flux",
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "vec_in_dim": POOLED_DIM,
        "context_in_dim": CONTEXT_DIM,
        "hidden_size": 64,
        "mlp_ratio": 4.0,
        "num_heads": 2,
        "depth": 3,
        "depth_single_blocks": 4,
        "axes_dim": [8, 12, 12],
        "theta": 10000,
        "qkv_bias": True,
        "guidance_embed": True,
    },
}
DIT_CONFIGS["flux2"] = {
    # Flux.2's layout (comfy.model_detection, 0.3.75): patch size 1 on a 128-channel latent, modulation
    # shared by all blocks, 4 RoPE axes; the host pads the text to 512 tokens (model_base.Flux2)
    **DIT_CONFIGS["flux"],
    "image_model": "flux2",
    "in_channels": 128,
    "out_channels": 128,
    "patch_size": 1,
    "vec_in_dim": None,
    "mlp_ratio": 3.0,
    "axes_dim": [8, 8, 8, 8],
    "theta": 2000,
    "qkv_bias": False,
    "ops_bias": False,
    "global_modulation": True,
    "mlp_silu_act": True,
    "default_ref_method": "index",
    "ref_index_scale": 10.0,
}
DIT_CONFIGS["chroma"] = {
    # Chroma (comfy.model_detection, 0.3.75): Flux's blocks without their own modulation (no pooled vector,
    # no guidance embedding); one approximator makes every block's modulation from the timestep (its
    # output is the hidden size)
    **{key: value for key, value in DIT_CONFIGS["flux"].items() if key not in ("vec_in_dim", "guidance_embed")},
    "image_model": "chroma",
    "in_channels": 64,  # 16 latent channels in 2x2 patches
    "out_channels": 64,
    "in_dim": 64,
    "out_dim": 64,
    "hidden_dim": 64,
    "n_layers": 2,
}
DIT_CONFIGS["chroma_radiance"] = {
    # pixel space: 3 channels in 16x16 patches, decoded per patch by a small NeRF-style MLP
    **DIT_CONFIGS["chroma"],
    "image_model": "chroma_radiance",
    "in_channels": 3,
    "out_channels": 3,
    "patch_size": 16,
    "nerf_hidden_size": 16,
    "nerf_mlp_ratio": 2,
    "nerf_depth": 2,
    "nerf_max_freqs": 4,
    "nerf_tile_size": 512,
    "nerf_final_head_type": "linear",
    "nerf_embedder_dtype": torch.float32,
}
DIT_CONFIGS["qwen_image"] = {
    # Qwen-Image's dual-stream blocks (3 of them, 2 heads of 32 channels) on the Wan 2.1 latent
    # (16 channels, a time axis of 1), in 2x2 patches
    "image_model": "qwen_image",
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 3,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": CONTEXT_DIM,
    "axes_dims_rope": (8, 12, 12),
}
DIT_CONFIGS["lumina2"] = {
    # Lumina 2's NextDiT (comfy.model_detection, 0.3.75) at 64 channels: grouped-query attention, qk-norm
    "image_model": "lumina2",
    "patch_size": 2,
    "in_channels": 16,
    "dim": 64,
    "n_layers": 3,
    "n_refiner_layers": 1,
    "n_heads": 2,
    "n_kv_heads": 1,
    "multiple_of": 16,
    "ffn_dim_multiplier": 4.0,
    "qk_norm": True,
    "cap_feat_dim": CONTEXT_DIM,
    "axes_dims": [8, 12, 12],
    "axes_lens": [300, 512, 512],
}
DIT_CONFIGS["z_image"] = {
    # Z-Image: the same class with its 256-wide timestep embedding and modulation, timestep scale and
    # pad tokens (comfy.model_detection, 0.3.75: dim 3840, pad_tokens_multiple 32)
    **DIT_CONFIGS["lumina2"],
    "dim": 256,
    "n_heads": 4,
    "n_kv_heads": 4,
    "ffn_dim_multiplier": 8.0 / 3.0,
    "axes_dims": [16, 24, 24],
    "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0,
    "z_image_modulation": True,
    "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}
LLAMA_LAYERS = 4  # Llama layers in the tiny HiDream's conditioning_llama3 (32 in the real one)
DIT_CONFIGS["hidream"] = {
    # HiDream (comfy.model_detection, 0.3.75) at 64 channels: each block takes one Llama layer's tokens
    "image_model": "hidream",
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 2,
    "num_single_layers": 3,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "caption_channels": [CONTEXT_DIM, CONTEXT_DIM],
    "text_emb_dim": POOLED_DIM,
    "num_routed_experts": 4,
    "num_activated_experts": 2,
    "axes_dims_rope": [8, 12, 12],
    "max_resolution": [32, 32],
    "llama_layers": [0, 1, 2, 3, 3],
}
# Video DiTs (comfy.supported_models / comfy.model_base, 0.3.75), 3 blocks of 2 heads of 32 channels each:
_WAN21 = {
    # Wan 2.1 T2V: a video-only self-attention and a cross-attention to the text in every block
    "image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2), "text_len": 512, "in_dim": 16,
    "dim": 64, "ffn_dim": 128, "freq_dim": 256, "text_dim": CONTEXT_DIM, "out_dim": 16, "num_heads": 2,
    "num_layers": 3, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
}
DIT_CONFIGS["wan21"] = _WAN21
# Wan 2.1 I2V: 16 noise + 4 mask + 16 image channels in, and a cross-attention to CLIP image embeddings
DIT_CONFIGS["wan21_i2v"] = {**_WAN21, "model_type": "i2v", "in_dim": 36}
# Wan 2.2 TI2V 5B: the Wan 2.2 VAE's 48-channel latent, a timestep per token where a start image is given
DIT_CONFIGS["wan22_ti2v"] = {**_WAN21, "in_dim": 48, "out_dim": 48}
DIT_CONFIGS["hunyuan_video"] = {
    # Flux's double and single stream blocks over cat(image, text), 3-D patches
    "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "vec_in_dim": POOLED_DIM,
    "context_in_dim": CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2,
    "depth_single_blocks": 3, "axes_dim": [8, 12, 12], "theta": 256, "patch_size": [1, 2, 2], "qkv_bias": True,
    "guidance_embed": True, "byt5": False, "meanflow": False, "use_cond_type_embedding": False, "vision_in_dim": None,
}
DIT_CONFIGS["ltxv"] = {
    # LTX-Video: self-attention attn1 over the video tokens (patch 1) and cross-attention attn2 to the text
    "image_model": "ltxv", "in_channels": 128, "cross_attention_dim": 64, "attention_head_dim": 32,
    "num_attention_heads": 2, "caption_channels": CONTEXT_DIM, "num_layers": 3,
}
DIT_CONFIGS["hunyuan_video15"] = {
    # HunyuanVideo 1.5 (comfy.model_detection, 0.3.75) at 64 channels with its real 54 double-stream blocks and no
    # single-stream block: 3-D patches of 1, 32 latent + 32 image + 1 mask channels in, ByT5 glyph tokens and image
    # embeddings (vision_in) joined to the text with the condition-type embedding
    **DIT_CONFIGS["hunyuan_video"], "in_channels": 65, "out_channels": 32, "vec_in_dim": None, "depth": 54,
    "depth_single_blocks": 0, "patch_size": [1, 1, 1], "guidance_embed": False, "byt5": True,
    "use_cond_type_embedding": True, "vision_in_dim": VISION_DIM,
}
DIT_CONFIGS["hunyuan_image21"] = {
    # HunyuanImage 2.1 (comfy.model_detection, 0.3.75) at 64 channels with its real 20 double- and 40 single-stream
    # blocks: 2-D patches of 1 on its 64-channel latent, 2 RoPE axes
    **DIT_CONFIGS["hunyuan_video"], "in_channels": 64, "out_channels": 64, "vec_in_dim": None, "depth": 20,
    "depth_single_blocks": 40, "axes_dim": [16, 16], "patch_size": [1, 1], "guidance_embed": False,
}
DIT_CONFIGS["cosmos_predict2"] = {
    # Cosmos Predict2 2B Text2Image (comfy.model_detection, 0.3.75) at 64 channels with its real 28 blocks: a
    # video-only self-attention, a cross-attention to the text and an MLP per block, 2x2 spatial patches
    "image_model": "cosmos_predict2", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
    "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64, "num_blocks": 28,
    "num_heads": 2, "concat_padding_mask": True, "crossattn_emb_channels": CONTEXT_DIM, "pos_emb_cls": "rope3d",
    "pos_emb_learnable": True, "pos_emb_interpolation": "crop", "min_fps": 1, "max_fps": 30, "use_adaln_lora": True,
    "adaln_lora_dim": 16, "extra_per_block_abs_pos_emb": False, "rope_h_extrapolation_ratio": 4.0,
    "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
    "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0, "rope_enable_fps_modulation": False,
}
# Cosmos Predict2 Video2World: one more input channel (the mask of the given frames)
DIT_CONFIGS["cosmos_predict2_i2v"] = {**DIT_CONFIGS["cosmos_predict2"], "in_channels": 17,
                                      "rope_h_extrapolation_ratio": 3.0, "rope_w_extrapolation_ratio": 3.0}
DIT_CONFIGS["auraflow"] = {
    # AuraFlow (comfy.model_detection, 0.3.75: n_double_layers 4, n_layers 36, max_seq 4096) at 64 channels
    "cond_seq_dim": CONTEXT_DIM, "in_channels": 4, "out_channels": 4, "patch_size": 2, "dim": 64, "n_layers": 36,
    "n_double_layers": 4, "n_heads": 2, "global_conddim": 64, "max_seq": 16 * 16,
}
DIT_CONFIGS["omnigen2"] = {
    # OmniGen2 (comfy.model_detection, 0.3.75: 32 layers, 2 refiner layers, 21 heads sharing 7 key/value heads)
    # at 64 channels
    "image_model": "omnigen2", "axes_dim_rope": [8, 12, 12], "axes_lens": [300, 512, 512], "ffn_dim_multiplier": None,
    "hidden_size": 64, "in_channels": 16, "multiple_of": 16, "norm_eps": 1e-05, "num_attention_heads": 2,
    "num_kv_heads": 1, "num_layers": 32, "num_refiner_layers": 2, "out_channels": None, "patch_size": 2,
    "text_feat_dim": CONTEXT_DIM, "timestep_scale": 1000.0,
}
DIT_CONFIGS["mochi"] = {
    # Mochi 1 preview (comfy.model_detection, 0.3.75: depth 48, 24 heads, widths 3072 / 1536) at 64 / 32 channels
    "image_model": "mochi_preview", "depth": 48, "patch_size": 2, "num_heads": 2, "hidden_size_x": 64,
    "hidden_size_y": 32, "mlp_ratio_x": 192.0, "mlp_ratio_y": 4.0, "learn_sigma": False, "in_channels": 12,
    "qk_norm": True, "qkv_bias": False, "out_bias": True, "attn_drop": 0.0, "patch_embed_bias": True,
    "posenc_preserve_area": True, "timestep_mlp_bias": True, "attend_to_padding": False, "timestep_scale": 1000.0,
    "use_t5": True, "t5_feat_dim": CONTEXT_DIM, "t5_token_length": 256, "rope_theta": 10000.0,
}
# Wan 2.2 Animate 14B (comfy.model_detection, 0.3.75: model_type "animate") with its real 40 blocks: Wan I2V's
# blocks, pose latents added to the patch embedding, a face adapter after every fifth block
DIT_CONFIGS["wan22_animate"] = {**_WAN21, "model_type": "animate", "in_dim": 36, "num_layers": 40}
DIT_CONFIGS["cosmos1"] = {
    # Cosmos 1 7B Text2World (comfy.model_detection, 0.3.75) at 64 channels with its real 28 blocks
    "image_model": "cosmos", "max_img_h": 240, "max_img_w": 240, "max_frames": 128, "in_channels": 16,
    "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1, "model_channels": 64, "block_config": "FA-CA-MLP",
    "concat_padding_mask": True, "pos_emb_cls": "rope3d", "pos_emb_learnable": False, "pos_emb_interpolation": "crop",
    "block_x_format": "THWBD", "affline_emb_norm": True, "use_adaln_lora": True, "adaln_lora_dim": 16,
    "num_blocks": 28, "num_heads": 2, "extra_per_block_abs_pos_emb": True, "rope_h_extrapolation_ratio": 1.0,
    "rope_w_extrapolation_ratio": 1.0, "rope_t_extrapolation_ratio": 2.0,
    "extra_per_block_abs_pos_emb_type": "learnable", "crossattn_emb_channels": CONTEXT_DIM,
}
# Cosmos 1 Video2World: one more input channel (the mask of the given frames)
DIT_CONFIGS["cosmos1_i2v"] = {**DIT_CONFIGS["cosmos1"], "in_channels": 17}
DIT_CONFIGS["pixart"] = {
    # PixArt Sigma XL-2 (comfy.model_detection, 0.3.75) at 64 channels with its real 28 blocks, no qk-norm
    "image_model": "pixart_sigma", "num_heads": 2, "patch_size": 2, "hidden_size": 64, "in_channels": 4, "depth": 28,
    "caption_channels": CONTEXT_DIM, "model_max_length": 7, "micro_condition": False,
}
DIT_CONFIGS["hunyuan_dit"] = {
    # HunyuanDiT v1.2 DiT-g/2 (comfy.model_detection) at 64 channels with its real 40 blocks and qk-norm; its CLIP
    # text (cross_attn) and mT5 text (conditioning_mt5xl) HUNYUAN_DIT_TEXT tokens each
    "image_model": "hydit", "depth": 40, "hidden_size": 64, "num_heads": 2, "text_states_dim": CONTEXT_DIM,
    "text_states_dim_t5": 32, "text_len": 7, "text_len_t5": 7,
}
# Wan 2.2 S2V 14B's real 40 blocks, its audio injector after the blocks of Wan's published list
DIT_CONFIGS["wan22_s2v"] = {**_WAN21, "model_type": "s2v", "num_layers": 40, "audio_dim": 32, "num_audio_token": 4,
                            "cond_dim": 16, "audio_inject_layers": [0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39]}
DIT_CONFIGS["stable_cascade_c"] = {
    # Stable Cascade stage C, 3.6B (comfy.model_detection, 0.3.75: c_cond 2048, the rest StageC's defaults) at 32
    # channels; the image embedding stays 768 wide, the host's zero embedding's width
    "stable_cascade_stage": "c", "c_cond": 32, "c_hidden": [32, 32], "nhead": [2, 2],
    "blocks": [[8, 24], [24, 8]], "block_repeat": [[1, 1], [1, 1]], "level_config": ["CTA", "CTA"],
    "c_clip_text": CONTEXT_DIM, "c_clip_text_pooled": POOLED_DIM, "c_clip_img": 768,
}
DIT_CONFIGS["stable_cascade_b"] = {
    # Stable Cascade stage B, 1.5B (comfy.model_detection, 0.3.75) at 8 / 16 / 32 / 32 channels
    "stable_cascade_stage": "b", "c_cond": 32, "c_hidden": [8, 16, 32, 32], "nhead": [-1, -1, 2, 2],
    "blocks": [[2, 6, 28, 6], [6, 28, 6, 2]], "block_repeat": [[1, 1, 1, 1], [3, 3, 2, 2]],
    "level_config": ["CT", "CT", "CTA", "CTA"], "c_clip": POOLED_DIM,
}
_MODEL_CLASSES = {
    "sd3": (comfy.supported_models.SD3, comfy.model_base.SD3),
    "sd35": (comfy.supported_models.SD3, comfy.model_base.SD3),
    "flux": (comfy.supported_models.Flux, comfy.model_base.Flux),
    "flux2": (comfy.supported_models.Flux2, comfy.model_base.Flux2),
    "chroma": (comfy.supported_models.Chroma, comfy.model_base.Chroma),
    "chroma_radiance": (comfy.supported_models.ChromaRadiance, comfy.model_base.ChromaRadiance),
    "qwen_image": (comfy.supported_models.QwenImage, comfy.model_base.QwenImage),
    "lumina2": (comfy.supported_models.Lumina2, comfy.model_base.Lumina2),
    "z_image": (comfy.supported_models.ZImage, comfy.model_base.Lumina2),
    "hidream": (comfy.supported_models.HiDream, comfy.model_base.HiDream),
    "wan21": (comfy.supported_models.WAN21_T2V, comfy.model_base.WAN21),
    "wan21_i2v": (comfy.supported_models.WAN21_I2V, lambda config, device: comfy.model_base.WAN21(
        config, image_to_video=True, device=device)),
    "wan22_ti2v": (comfy.supported_models.WAN22_T2V, lambda config, device: comfy.model_base.WAN22(
        config, image_to_video=True, device=device)),
    "hunyuan_video": (comfy.supported_models.HunyuanVideo, comfy.model_base.HunyuanVideo),
    "ltxv": (comfy.supported_models.LTXV, comfy.model_base.LTXV),
    "hunyuan_video15": (comfy.supported_models.HunyuanVideo15, comfy.model_base.HunyuanVideo15),
    "hunyuan_image21": (comfy.supported_models.HunyuanImage21, comfy.model_base.HunyuanImage21),
    "cosmos_predict2": (comfy.supported_models.CosmosT2IPredict2, comfy.model_base.CosmosPredict2),
    "cosmos_predict2_i2v": (comfy.supported_models.CosmosI2VPredict2, lambda config, device: comfy.model_base.CosmosPredict2(
        config, image_to_video=True, device=device)),
    "auraflow": (comfy.supported_models.AuraFlow, comfy.model_base.AuraFlow),
    "omnigen2": (comfy.supported_models.Omnigen2, comfy.model_base.Omnigen2),
    "mochi": (comfy.supported_models.GenmoMochi, comfy.model_base.GenmoMochi),
    "cosmos1": (comfy.supported_models.CosmosT2V, comfy.model_base.CosmosVideo),
    "wan22_animate": (comfy.supported_models.WAN22_Animate, comfy.model_base.WAN22_Animate),
    "cosmos1_i2v": (comfy.supported_models.CosmosI2V, lambda config, device: comfy.model_base.CosmosVideo(
        config, image_to_video=True, device=device)),
    "pixart": (comfy.supported_models.PixArtSigma, comfy.model_base.PixArt),
    "hunyuan_dit": (comfy.supported_models.HunyuanDiT, comfy.model_base.HunyuanDiT),
    "wan22_s2v": (comfy.supported_models.WAN22_S2V, comfy.model_base.WAN22_S2V),
    "stable_cascade_c": (comfy.supported_models.Stable_Cascade_C, comfy.model_base.StableCascade_C),
    "stable_cascade_b": (comfy.supported_models.Stable_Cascade_B, comfy.model_base.StableCascade_B),
}


def _check_family(family: str) -> None:
    if family not in DIT_CONFIGS:
        raise ValueError(f"Unknown DiT family '{family}'. Use one of: {', '.join(DIT_FAMILIES)}.")


def build_dit(family: str, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """A tiny random model of `family` (one of DIT_FAMILIES) in a ModelPatcher, fp32 on the CPU."""
    _check_family(family)
    config_class, model_class = _MODEL_CLASSES[family]
    model_config = config_class(dict(DIT_CONFIGS[family]))
    model_config.set_inference_dtype(torch.float32, None)
    device = torch.device("cpu")
    model = model_class(model_config, device=device)
    diffusion_model = model.diffusion_model
    initialise_weights(diffusion_model, seed)
    if getattr(diffusion_model, "pos_embed", None) is not None:
        # a buffer, filled from the checkpoint in real models and left uninitialised by the host
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            diffusion_model.pos_embed.copy_(torch.randn(diffusion_model.pos_embed.shape, generator=generator) * 0.5)
    if family == "chroma_radiance":
        # Its NeRF head adds each pixel's own embedding to the MLP the transformer's state makes; at random
        # weights the embedding drowns the transformer (CFG would move the prediction by 1e-4). Scaled down,
        # the prediction follows the transformer, as a trained model's does.
        with torch.no_grad():
            for param in diffusion_model.nerf_image_embedder.parameters():
                param.mul_(0.01)
    model.tiny_family = family
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=device
    )



_TINY_DITS: dict = {}


def tiny_dit(family: str) -> comfy.model_patcher.ModelPatcher:
    """``build_dit(family, seed=0)``, built once per test session; the nodes clone it before patching."""
    if family not in _TINY_DITS:
        _TINY_DITS[family] = build_dit(family, seed=0)
    return _TINY_DITS[family]


def make_dit_conditioning(family: str, batch: int = 1, seed: int = 0, tokens: int = 7):
    """(positive, negative) CONDITIONING as the host's text encode nodes produce it for `family`.

    ``[[cross_attn (batch, tokens, CONTEXT_DIM), {"pooled_output": (batch, POOLED_DIM)}]]``; Flux's
    also carries the FluxGuidance node's ``guidance``, HiDream's its Llama layers' tokens
    (``conditioning_llama3``, ``(batch, LLAMA_LAYERS, tokens, CONTEXT_DIM)``), LTX-Video's its text
    encoder's ``attention_mask``.
    """
    _check_family(family)
    generator = torch.Generator().manual_seed(seed)

    def encode():
        extras = {"pooled_output": torch.randn(batch, POOLED_DIM, generator=generator)}
        if family.startswith("flux"):
            extras["guidance"] = 3.5
        if family == "hidream":
            extras["conditioning_llama3"] = torch.randn(batch, LLAMA_LAYERS, tokens, CONTEXT_DIM, generator=generator)
        if family == "hunyuan_video15":  # the glyph tokens of its ByT5 encoder (the text in quotes)
            extras["conditioning_byt5small"] = torch.randn(batch, 3, BYT5_DIM, generator=generator)
        if family == "ltxv":  # the LTX-Video text encoder's padding mask: the last two tokens are padding
            extras["attention_mask"] = torch.tensor([[1] * (tokens - 2) + [0] * 2] * batch)
        if family == "omnigen2":
            # its text encoder's mask, from which the host takes the text length (num_tokens); one prompt's, as the
            # text encoder gives it: the host (0.3.75) sums the whole mask, so a batch of masks would overcount
            extras["attention_mask"] = torch.ones(1, tokens, dtype=torch.long)
        if family == "mochi":  # its text encoder's mask, one prompt's (as OmniGen2's): the last two tokens padding
            extras["attention_mask"] = torch.tensor([[1] * (tokens - 2) + [0] * 2])
        if family == "hunyuan_dit":  # its two text encoders' tokens and masks (the last CLIP token padding)
            extras["attention_mask"] = torch.tensor([[1] * (tokens - 1) + [0]] * batch)
            extras["conditioning_mt5xl"] = torch.randn(batch, tokens, 32, generator=generator)
            extras["attention_mask_mt5xl"] = torch.ones(batch, tokens, dtype=torch.long)
        if family == "stable_cascade_b":  # the stage C latent it decodes (StableCascade_StageB_Conditioning)
            extras["stable_cascade_prior"] = torch.randn(batch, 16, 4, 5, generator=generator)
        return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=generator), extras]]

    positive = encode()
    negative = encode()
    return positive, negative


# Pixel-space families take images where the others take latents: 8 pixels a latent pixel, as with the
# latent families' VAEs, so that a test's latent size gives every family about the same token grid.
PIXELS_PER_LATENT = {"chroma_radiance": 8}


def model_latent_shape(patcher, shape, pixels=None) -> tuple:
    """``shape`` (batch, channels, latent height, width) as the model takes it: its latent channels, a
    time axis where its latents have one (one frame for Qwen-Image's Wan 2.1 latent, ``[B, C, 1, H, W]``,
    ``VIDEO_FRAMES`` for the video families),
    and on a pixel-space model ``PIXELS_PER_LATENT`` times the size, or ``pixels`` (height, width)."""
    scale = PIXELS_PER_LATENT.get(getattr(patcher.model, "tiny_family", None), 1)
    size = pixels if pixels is not None and scale > 1 else tuple(side * scale for side in shape[2:])
    frames = VIDEO_FRAMES if getattr(patcher.model, "tiny_family", None) in VIDEO_FAMILIES else 1
    time_axis = (frames,) if getattr(patcher.model.latent_format, "latent_dimensions", 2) == 3 else ()
    return (shape[0], patcher.model.latent_format.latent_channels, *time_axis, *size)


def noisy_dit_latent(patcher, sigma: float, shape=(1, 16, 8, 8), seed: int = 1, pixels=None):
    """A latent at noise level ``sigma`` in the host's flow coordinates, ``(1 - sigma) x0 + sigma eps``,
    of ``model_latent_shape(patcher, shape, pixels)``."""
    sampling = patcher.get_model_object("model_sampling")
    shape = model_latent_shape(patcher, shape, pixels)
    sigma = torch.tensor([float(sigma)])
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    return sampling.noise_scaling(sigma, noise, x0), sigma


def empty_dit_latent(patcher, shape) -> torch.Tensor:
    """Zeros of ``model_latent_shape(patcher, shape)``: an empty latent for the sampler."""
    return torch.zeros(model_latent_shape(patcher, shape))


@dataclasses.dataclass(frozen=True)
class Forward:
    """One model evaluation (``apply_model``): what the diffusion model was called with."""

    batch_size: int
    cond_or_uncond: list  # as the host numbered the chunks (support.models.ModelCall)


_counter = itertools.count()


@contextlib.contextmanager
def count_forwards(patcher):
    """Record every model evaluation through `patcher` while the block is open.

    An APPLY_MODEL wrapper, because the host's MMDiT (0.3.75) does not run DIFFUSION_MODEL wrappers.
    """
    forwards: list[Forward] = []
    key = f"tests.count_forwards.{next(_counter)}"

    def record(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        forwards.append(Forward(x.shape[0], chunk_ids(transformer_options)))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, record)
    try:
        yield forwards
    finally:
        patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key)


# --- diffusers twin of the SD3 model -----------------------------------------------------------------

def sd3_diffusers_config(unet_config: dict) -> dict:
    """The `SD3Transformer2DModel` config of a host MMDiT unet_config."""
    heads = unet_config["depth"]
    return dict(
        sample_size=unet_config["pos_embed_max_size"],
        patch_size=unet_config["patch_size"],
        in_channels=unet_config["in_channels"],
        num_layers=unet_config.get("num_blocks", unet_config["depth"]),
        attention_head_dim=64,
        num_attention_heads=heads,
        joint_attention_dim=unet_config["context_embedder_config"]["params"]["in_features"],
        caption_projection_dim=64 * heads,
        pooled_projection_dim=unet_config["adm_in_channels"],
        out_channels=unet_config["out_channels"],
        pos_embed_max_size=unet_config["pos_embed_max_size"],
        dual_attention_layers=tuple(unet_config.get("x_block_self_attn_layers", [])),
        qk_norm="rms_norm" if unet_config.get("qk_norm") == "rms" else None,
    )


def _host_weight(host_state: dict, target):
    """The diffusers value of one entry of `comfy.utils.mmdit_to_diffusers` (diffusers key -> target)."""
    if isinstance(target, str):
        return host_state[target]
    name, offset = target[0], target[1]
    weight = host_state[name]
    if offset is not None:
        weight = weight.narrow(offset[0], offset[1], offset[2])
    if len(target) > 2:
        weight = target[2](weight)  # swap_scale_shift, its own inverse
    return weight


class SD3Twin:
    """diffusers' SD3 transformer with the host model's weights, and its PAG pipeline."""

    def __init__(self, patcher):
        base_model = patcher.model
        self.unet_config = dict(base_model.model_config.unet_config)
        self.model_sampling = base_model.model_sampling
        self.transformer = SD3Transformer2DModel(**sd3_diffusers_config(self.unet_config)).eval()
        host_state = base_model.diffusion_model.state_dict()
        key_map = comfy.utils.mmdit_to_diffusers({"depth": self.unet_config["depth"]})
        state = {}
        used = set()
        for key in self.transformer.state_dict():
            target = key_map.get(key)
            if target is None:
                raise KeyError(f"no host weight for diffusers parameter {key}")
            state[key] = _host_weight(host_state, target)
            used.add(target if isinstance(target, str) else target[0])
        unused = set(host_state) - used
        if unused:
            raise KeyError(f"host weights without a diffusers twin: {sorted(unused)[:5]}")
        self.transformer.load_state_dict(state, strict=True)
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=float(self.model_sampling.shift))
        self._pipeline = None

    @staticmethod
    def cond(conditioning):
        """(encoder_hidden_states, pooled_projections) of a one-entry host CONDITIONING."""
        cross_attn, extras = conditioning[0]
        return cross_attn.to(torch.float32), extras["pooled_output"].to(torch.float32)

    def timestep(self, sigma) -> torch.Tensor:
        # the host feeds the MMDiT model_sampling.timestep(sigma) = sigma * 1000, diffusers sigma * 1000
        return self.model_sampling.timestep(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[:1])

    @torch.no_grad()
    def velocity(self, x, sigma, conditioning) -> torch.Tensor:
        hidden, pooled = self.cond(conditioning)
        t = self.timestep(sigma).expand(x.shape[0])
        return self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=hidden,
                                pooled_projections=pooled, return_dict=False)[0]

    @staticmethod
    def to_x0(x, sigma, velocity):
        """Flow matching: ``x = (1 - s) x0 + s eps``, ``v = eps - x0``, so ``x0 = x - s v``."""
        return x - float(torch.as_tensor(sigma).reshape(-1)[0]) * velocity

    def pipeline(self) -> StableDiffusion3PAGPipeline:
        if self._pipeline is None:
            self._pipeline = StableDiffusion3PAGPipeline(
                transformer=self.transformer, scheduler=self.scheduler, vae=None, text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
            self._pipeline.set_progress_bar_config(disable=True)
        return self._pipeline


def sd3_layer_patterns(blocks) -> list[str]:
    """Anchored diffusers regexes for the joint attention (``attn``) of the given block indices.

    diffusers' own spelling ``blocks.1`` is a regex search, so it would also take blocks 10-19 and the
    SD3.5 ``attn2`` modules.
    """
    return [rf"^transformer_blocks\.{i}\.attn$" for i in blocks]


@torch.no_grad()
def sd3_pag_reference(twin: SD3Twin, x, sigma, positive, negative, cfg: float, pag_scale: float, blocks,
                      adaptive_scale: float = 0.0) -> torch.Tensor:
    """One step of `StableDiffusion3PAGPipeline.__call__` at the host's (x, sigma), as denoised x0.

    What the pipeline does around its transformer call, with its own methods: the batch from
    `_prepare_perturbed_attention_guidance` ([uncond, cond, cond] with CFG, [cond, cond] without),
    `_set_pag_attn_processor` with its joint PAG processors, one forward,
    `_apply_perturbed_attention_guidance`, processors restored.
    """
    pipe = twin.pipeline()
    pipe._guidance_scale = cfg
    pipe._pag_scale = pag_scale
    pipe._pag_adaptive_scale = adaptive_scale
    pipe._joint_attention_kwargs = None
    pipe.set_pag_applied_layers(sd3_layer_patterns(blocks),
                                pag_attn_processors=(PAGCFGJointAttnProcessor2_0(), PAGJointAttnProcessor2_0()))
    do_cfg = pipe.do_classifier_free_guidance
    cond_hidden, cond_pooled = twin.cond(positive)
    uncond_hidden, uncond_pooled = twin.cond(negative)
    hidden = pipe._prepare_perturbed_attention_guidance(cond_hidden, uncond_hidden, do_cfg)
    pooled = pipe._prepare_perturbed_attention_guidance(cond_pooled, uncond_pooled, do_cfg)
    latent_input = torch.cat([x] * (hidden.shape[0] // x.shape[0]))
    t = twin.timestep(sigma)
    original_processors = pipe.transformer.attn_processors
    pipe._set_pag_attn_processor(pag_applied_layers=pipe.pag_applied_layers, do_classifier_free_guidance=do_cfg)
    try:
        output = pipe.transformer(hidden_states=latent_input, timestep=t.expand(latent_input.shape[0]),
                                  encoder_hidden_states=hidden, pooled_projections=pooled, return_dict=False)[0]
    finally:
        pipe.transformer.set_attn_processor(original_processors)
    guided = pipe._apply_perturbed_attention_guidance(output, do_cfg, cfg, t[0])
    return twin.to_x0(x, sigma, guided)


def sd3_cfg_reference(twin: SD3Twin, x, sigma, positive, negative, cfg: float) -> torch.Tensor:
    """diffusers-style CFG on the velocity (cond only for cfg <= 1), as denoised x0."""
    velocity = twin.velocity(x, sigma, positive)
    if cfg > 1.0:
        uncond = twin.velocity(x, sigma, negative)
        velocity = uncond + cfg * (velocity - uncond)
    return twin.to_x0(x, sigma, velocity)

