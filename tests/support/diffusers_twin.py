"""diffusers twins of the tiny host models: same architecture, identical weights, and diffusers'
own PAG code as the numerical reference.

Coordinates (reference-and-papers.md §3.4). The host's EPS/V models work in VE coordinates,
``x_VE = x0 + sigma * eps``; diffusers' DDPM/DDIM models in VP coordinates,
``x_VP = sqrt(abar) * x0 + sqrt(1 - abar) * eps`` with ``sigma = sqrt((1 - abar) / abar)``. So
``x_VP = x_VE / sqrt(1 + sigma^2)`` and x0 is the same in both. A twin only accepts sigmas of the
host's own table, ``sigma = model_sampling.sigmas[t]``, where the host feeds the UNet exactly the
integer timestep ``t`` and diffusers can be run at the same ``t`` without interpolation.
``abar`` comes from diffusers' ``DDIMScheduler`` with the SD training schedule; x0 from the model
output per §1.5: epsilon ``(x - sqrt(1-a) o) / sqrt(a)``, v ``sqrt(a) x - sqrt(1-a) o``.

Conditioning: a host CONDITIONING ``[[cross_attn, {"pooled_output": ..., sizes...}]]`` becomes
``encoder_hidden_states`` and, for SDXL, ``added_cond_kwargs = {"text_embeds": pooled, "time_ids":
[height, width, crop_h, crop_w, target_height, target_width]}`` (diffusers' ``original_size +
crops_coords_top_left + target_size``), with the host's defaults for missing sizes (latent size
times 8, no crop, target = original; `comfy.samplers.encode_model_conds`, `comfy.model_base.SDXL`).
"""
from __future__ import annotations

import dataclasses
import re

import comfy.utils
import torch
from diffusers import DDIMScheduler, StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline, UNet2DConditionModel

from .models import family_of

PREDICTION_TYPES = {"sd15": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon"}
SDXL_TIME_EMBED_DIM = 256  # comfy.model_base.SDXL embeds each size with Timestep(256)


def ddim_scheduler(prediction_type: str) -> DDIMScheduler:
    """The scheduler of the SD checkpoints and of diffusers' PAG/SAG tests.

    ``steps_offset=1`` is what the SD pipelines rewrite an older config to (with a deprecation
    warning); it shifts DDIM's inference timesteps by one and leaves ``alphas_cumprod`` alone.
    """
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def _per_level(values: list[int], counts: list[int], what: str) -> list[int]:
    """One value per UNet level from a per-block list; diffusers cannot vary it inside a level."""
    out, start = [], 0
    for count in counts:
        chunk = values[start:start + count]
        start += count
        if len(set(chunk)) != 1:
            raise ValueError(f"{what} varies inside a level ({chunk}); diffusers' UNet cannot express that.")
        out.append(chunk[0])
    return out


def diffusers_config(unet_config: dict) -> dict:
    """The `UNet2DConditionModel` config equivalent to a host unet_config (SD1.x/2.x/SDXL layout)."""
    num_res_blocks = list(unet_config["num_res_blocks"])
    if len(set(num_res_blocks)) != 1:
        raise ValueError(f"num_res_blocks {num_res_blocks} differs between levels; diffusers needs one value.")
    layers = num_res_blocks[0]
    levels = len(unet_config["channel_mult"])
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    depth = _per_level(list(unet_config["transformer_depth"]), num_res_blocks, "transformer_depth")
    # transformer_depth_output runs from the last output block (shallowest level) to the first
    depth_out = _per_level(list(unet_config["transformer_depth_output"]), [layers + 1] * levels,
                           "transformer_depth_output")
    if depth_out != depth:
        raise ValueError(f"output depths per level {depth_out} differ from the input depths {depth}.")
    if unet_config["transformer_depth_middle"] != depth[-1]:
        # diffusers builds its mid block with transformer_layers_per_block[-1]
        raise ValueError("diffusers' mid block depth is the last level's depth; the host config differs.")
    if unet_config.get("num_head_channels", -1) != -1:
        heads = [c // unet_config["num_head_channels"] for c in channels]
    else:
        heads = [unet_config["num_heads"]] * levels
    config = dict(
        sample_size=unet_config.get("image_size", 32),
        in_channels=unet_config["in_channels"],
        out_channels=unet_config["out_channels"],
        down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
        up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in depth[::-1]),
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        transformer_layers_per_block=tuple(max(d, 1) for d in depth),
        # diffusers' (mis)named field: the number of heads per level, as in the SD/SDXL configs
        attention_head_dim=tuple(heads),
        cross_attention_dim=unet_config["context_dim"],
        use_linear_projection=bool(unet_config.get("use_linear_in_transformer", False)),
        norm_num_groups=32,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    if unet_config.get("adm_in_channels"):
        config.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=unet_config["adm_in_channels"])
    return config


@dataclasses.dataclass
class TwinCond:
    """One branch's conditioning in diffusers' terms."""

    encoder_hidden_states: torch.Tensor
    added_cond_kwargs: dict | None = None


def _to_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:]).clone()
    raise ValueError(f"conditioning batch {tensor.shape[0]} does not fit a latent batch of {batch}.")


class DiffusersTwin:
    """A diffusers UNet with the host model's architecture and weights, and the coordinate maps."""

    def __init__(self, patcher):
        self.family = family_of(patcher)
        base_model = patcher.model
        self.unet_config = dict(base_model.model_config.unet_config)
        self.model_sampling = base_model.model_sampling
        self.prediction_type = PREDICTION_TYPES[self.family]
        self.scheduler = ddim_scheduler(self.prediction_type)
        self.config = diffusers_config(self.unet_config)
        self.unet = UNet2DConditionModel(**self.config).eval()
        self._load_weights(base_model.diffusion_model.state_dict())
        self._pag_pipeline = None

    def _load_weights(self, host_state: dict) -> None:
        key_map = comfy.utils.unet_to_diffusers(self.unet_config)  # diffusers key -> host key
        target = self.unet.state_dict()
        state = {}
        for diffusers_key in target:
            host_key = key_map.get(diffusers_key)
            if host_key is None or host_key not in host_state:
                raise KeyError(f"no host weight for diffusers parameter {diffusers_key}")
            state[diffusers_key] = host_state[host_key]
        unused = set(host_state) - {key_map[k] for k in state}
        if unused:
            raise KeyError(f"host weights without a diffusers twin: {sorted(unused)[:5]}")
        self.unet.load_state_dict(state, strict=True)

    # coordinates -------------------------------------------------------------------------------
    def timestep(self, sigma) -> int:
        """The integer t with ``model_sampling.sigmas[t] == sigma`` (the host's own table)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0]
        t = int(self.model_sampling.timestep(sigma.reshape(1)).item())
        on_table = self.model_sampling.sigmas[t]
        if not torch.isclose(sigma, on_table, rtol=1e-6, atol=0.0):
            raise ValueError(f"sigma {sigma.item()} is not on the model's table (nearest: sigmas[{t}] = "
                             f"{on_table.item()}); use model_sampling.sigmas[t] for an integer t.")
        return t

    def alpha_bar(self, t: int) -> torch.Tensor:
        return self.scheduler.alphas_cumprod[t].to(torch.float32)

    @staticmethod
    def to_vp(x_ve: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0]
        return x_ve / torch.sqrt(1.0 + sigma**2)

    def to_x0(self, x_vp: torch.Tensor, t: int, model_output: torch.Tensor) -> torch.Tensor:
        a = self.alpha_bar(t)
        if self.prediction_type == "epsilon":
            return (x_vp - torch.sqrt(1 - a) * model_output) / torch.sqrt(a)
        return torch.sqrt(a) * x_vp - torch.sqrt(1 - a) * model_output

    # conditioning ------------------------------------------------------------------------------
    def cond(self, conditioning, x: torch.Tensor) -> TwinCond:
        """A host CONDITIONING (one entry, no areas/masks) as diffusers inputs for latent `x`."""
        if isinstance(conditioning, TwinCond):
            return conditioning
        if torch.is_tensor(conditioning):
            return TwinCond(_to_batch(conditioning, x.shape[0]))
        if len(conditioning) != 1:
            raise ValueError("the twin takes a CONDITIONING with exactly one entry")
        cross_attn, extras = conditioning[0]
        batch = x.shape[0]
        hidden = _to_batch(cross_attn.to(torch.float32), batch)
        if not self.config.get("addition_embed_type"):
            return TwinCond(hidden)
        width = extras.get("width", x.shape[-1] * 8)
        height = extras.get("height", x.shape[-2] * 8)
        sizes = [height, width, extras.get("crop_h", 0), extras.get("crop_w", 0),
                 extras.get("target_height", height), extras.get("target_width", width)]
        time_ids = torch.tensor([sizes], dtype=torch.float32).expand(batch, 6).clone()
        pooled = _to_batch(extras["pooled_output"].to(torch.float32), batch)
        return TwinCond(hidden, {"text_embeds": pooled, "time_ids": time_ids})

    # evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def model_output(self, x_ve: torch.Tensor, sigma, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        """The raw diffusers UNet output (eps or v) at the host's (x_VE, sigma)."""
        t = self.timestep(sigma)
        x_vp = self.to_vp(x_ve, sigma)
        return self.unet(x_vp, t, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]

    def x0(self, x_ve: torch.Tensor, sigma, encoder_hidden_states, added_cond_kwargs=None) -> torch.Tensor:
        """Denoised x0 of one diffusers UNet evaluation at the host's (x_VE, sigma)."""
        output = self.model_output(x_ve, sigma, encoder_hidden_states, added_cond_kwargs)
        return self.to_x0(self.to_vp(x_ve, sigma), self.timestep(sigma), output)

    def cfg_x0(self, x_ve: torch.Tensor, sigma, positive, negative, cfg: float) -> torch.Tensor:
        """diffusers-style CFG (``u + cfg * (c - u)`` on the model output; cond only for cfg <= 1) as x0."""
        cond = self.cond(positive, x_ve)
        output = self.model_output(x_ve, sigma, cond.encoder_hidden_states, cond.added_cond_kwargs)
        if cfg > 1.0:
            uncond = self.cond(negative, x_ve)
            output_u = self.model_output(x_ve, sigma, uncond.encoder_hidden_states, uncond.added_cond_kwargs)
            output = output_u + cfg * (output - output_u)
        return self.to_x0(self.to_vp(x_ve, sigma), self.timestep(sigma), output)

    # diffusers' PAG pipeline around this UNet --------------------------------------------------
    def pag_pipeline(self):
        """diffusers' PAG pipeline (SD or SDXL) around `unet`, without VAE / text encoders / tokenizers."""
        if self._pag_pipeline is None:
            if self.family == "sdxl":
                self._pag_pipeline = StableDiffusionXLPAGPipeline(
                    vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                    unet=self.unet, scheduler=ddim_scheduler(self.prediction_type), add_watermarker=False)
            else:
                self._pag_pipeline = StableDiffusionPAGPipeline(
                    vae=None, text_encoder=None, tokenizer=None, unet=self.unet,
                    scheduler=ddim_scheduler(self.prediction_type), safety_checker=None, feature_extractor=None,
                    image_encoder=None, requires_safety_checker=False)
            self._pag_pipeline.set_progress_bar_config(disable=True)
        return self._pag_pipeline


def make_twin(patcher) -> DiffusersTwin:
    """The diffusers twin of a model built by `support.models.build_model`."""
    return DiffusersTwin(patcher)


_INDEX_ENTRY = re.compile(r"^([dmu])(\d+)(?:-[dmu]?(\d+))?(?:\.(\d+)(?:-(\d+))?)?$")
_PATH_PREFIX = {"d": "down_blocks.", "m": "mid_block.", "u": "up_blocks."}


def pag_layer_patterns(twin: DiffusersTwin, pag_layers) -> list[str]:
    """`pag_applied_layers` for diffusers from a list or comma-separated string of layer entries.

    Entries in the PAG paper's index syntax (``m0``, ``d1``, ``u3``, ``m0.1``, ``d2.0-1``, ``u0-2``:
    the n-th attention module (Transformer2DModel) of the down / mid / up path in forward order,
    optionally transformer blocks k..l inside it) are translated into anchored regexes from the
    twin's own module tree. Anything else is handed to diffusers unchanged, i.e. read as a
    diffusers regex (``mid``, ``down_blocks.1``, ``up_blocks.0.attentions.1``).
    """
    entries = pag_layers if isinstance(pag_layers, (list, tuple)) else str(pag_layers).split(",")
    entries = [e.strip() for e in entries if e.strip()]
    modules = [name for name, module in twin.unet.named_modules()
               if type(module).__name__ == "Transformer2DModel"]
    patterns = []
    for entry in entries:
        match = _INDEX_ENTRY.match(entry.lower())
        if not match:
            patterns.append(entry)
            continue
        letter, first, last, k_first, k_last = match.groups()
        path = [m for m in modules if m.startswith(_PATH_PREFIX[letter])]
        indices = range(int(first), int(last if last is not None else first) + 1)
        blocks = r"\d+"
        if k_first is not None:
            ks = range(int(k_first), int(k_last if k_last is not None else k_first) + 1)
            blocks = "(" + "|".join(str(k) for k in ks) + ")"
        for n in indices:
            if n >= len(path):
                raise ValueError(f"layer entry '{entry}': the model has only {len(path)} such attention modules")
            patterns.append(rf"^{re.escape(path[n])}\.transformer_blocks\.{blocks}\.attn1$")
    return patterns


@torch.no_grad()
def pag_guided_output(twin: DiffusersTwin, x_vp: torch.Tensor, t: int, cond: TwinCond, uncond: TwinCond,
                      cfg: float, pag_scale: float, pag_layers, adaptive_scale: float = 0.0) -> torch.Tensor:
    """One step of diffusers' PAG pipeline loop at integer timestep `t`: the guided model output.

    What `StableDiffusion(XL)PAGPipeline.__call__` does around its UNet call, with its own methods:
    attributes set as `__call__` sets them, `_set_pag_attn_processor`, the batch from
    `_prepare_perturbed_attention_guidance` ([uncond, cond, cond] with CFG, [cond, cond] without),
    one UNet forward, `_apply_perturbed_attention_guidance`, processors restored. PAG off
    (scale 0) falls back to the pipeline's plain CFG branch; CFG off is ``cfg <= 1``.
    """
    pipe = twin.pag_pipeline()
    pipe._guidance_scale = cfg
    pipe._pag_scale = pag_scale
    pipe._pag_adaptive_scale = adaptive_scale
    pipe._cross_attention_kwargs = None
    pipe.set_pag_applied_layers(pag_layer_patterns(twin, pag_layers))
    do_cfg = pipe.do_classifier_free_guidance
    do_pag = pipe.do_perturbed_attention_guidance

    def batched(c, u):
        if do_pag:
            return pipe._prepare_perturbed_attention_guidance(c, u, do_cfg)
        return torch.cat([u, c]) if do_cfg else c

    hidden = batched(cond.encoder_hidden_states, uncond.encoder_hidden_states)
    added = None
    if cond.added_cond_kwargs is not None:
        added = {k: batched(v, uncond.added_cond_kwargs[k]) for k, v in cond.added_cond_kwargs.items()}
    latent_input = torch.cat([x_vp] * (hidden.shape[0] // x_vp.shape[0]))
    latent_input = pipe.scheduler.scale_model_input(latent_input, t)

    original_processors = pipe.unet.attn_processors
    if do_pag:
        pipe._set_pag_attn_processor(pag_applied_layers=pipe.pag_applied_layers, do_classifier_free_guidance=do_cfg)
    try:
        output = pipe.unet(latent_input, t, encoder_hidden_states=hidden, added_cond_kwargs=added,
                           return_dict=False)[0]
    finally:
        pipe.unet.set_attn_processor(original_processors)

    if do_pag:
        return pipe._apply_perturbed_attention_guidance(output, do_cfg, cfg, t)
    if do_cfg:
        output_u, output_c = output.chunk(2)
        return output_u + cfg * (output_c - output_u)
    return output


def pag_reference(twin: DiffusersTwin, x: torch.Tensor, sigma, positive, negative, cfg: float, pag_scale: float,
                  pag_layers="mid", adaptive_scale: float = 0.0) -> torch.Tensor:
    """diffusers' PAG, as denoised x0 at the host's (x_VE, sigma) with host CONDITIONINGs.

    `positive` / `negative` are host CONDITIONINGs (or `TwinCond`s, or bare encoder_hidden_states
    for SD1.x/2.x); `pag_layers` see `pag_layer_patterns`; `adaptive_scale` is diffusers'
    `pag_adaptive_scale` (scale - adaptive * (1000 - t), floored at 0).
    """
    t = twin.timestep(sigma)
    x_vp = twin.to_vp(x.to(torch.float32), sigma)
    cond = twin.cond(positive, x)
    uncond = twin.cond(negative, x) if negative is not None else cond
    guided = pag_guided_output(twin, x_vp, t, cond, uncond, cfg, pag_scale, pag_layers, adaptive_scale)
    return twin.to_x0(x_vp, t, guided)
