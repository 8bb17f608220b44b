"""Self-Attention Guidance (Hong et al., arXiv 2210.00939) on a ModelPatcher.

One step, as the patch runs it inside the host's sampler:

1. The sampler's cond/uncond forward (a CALC_COND_BATCH wrapper tags it) records, at the chosen
   self-attention site, the attention mass each key token receives (``sag_core.key_attention_mass``)
   for the rows of the reference branch only: the uncond entries under CFG, the cond entries when
   the host skips the uncond at CFG 1. The site's output is whatever the site computed before
   (the host's attention or another patch's), untouched. Every forward the host splits the batch
   into records its own entries, keyed by the entry's uuid, on the layer's real token grid
   (``activations_shape``). On a DiT the site is a transformer block and the map is that of its image
   tokens (``key_mass_recorder``); on a video DiT that of every space-time token, on the (frames, h, w)
   token grid, and the mask and blur act on each frame in space.
2. The post-CFG function combines the recorded maps of the reference branch in latent space the
   way the host combines that branch's predictions (entry area and mult), thresholds it, blurs the
   reference x0 under the mask, re-noises it with the reference's own noise through the model's
   ``noise_scaling``, evaluates the model on it (reference conds only) and adds
   ``scale * (degraded - degraded_denoised)``: the paper's noise-space term written in x0 space
   (``sag_core.guidance``). The records are dropped at the end of the step.
"""
from __future__ import annotations

import dataclasses
import logging
import uuid

import comfy.patcher_extension
import comfy.samplers
import torch

from ..guidance_core.layer_spec import Method
from ..guidance_core.rows import chunk_rows
from ..guidance_core.schedule import validate_percent_window
from ..guidance_core.token_grid import token_grid
from ..sag_core import blur_under_mask, key_attention_mass, sag_guided, sag_mask, upsample_mask, validate_sag_inputs
from .batched_pass import as_own_entries, is_main_cond_call
from .dit_attention import DiTAttention, install_dit_handler
from .displacement import DisplacementGuard
from .layers import choose_layers, dit_model
from .options import EXTRA_PASS, GUIDANCE_OPTIONS, SAG_PREVIEW, SAG_RECORD, chunk_ids, guidance_options, with_guidance_options
from .post_cfg_watch import PostCfgWatch
from .run_state import WRAPPER_KEY, GuidanceRun, clear_after_sampling, log_once_per_run
from .sigma_window import SigmaWindow
from .unet_attention import install_site_handler, require_own_queries

NODE = "Self-Attention Guidance"

# Attribute on our post-CFG function, so the mask preview can tell a SAG-patched model apart.
SAG_PATCH_ATTRIBUTE = "attention_guidance_sag"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAGSettings:
    """One SAG node's inputs, checked: ``scale`` s of Eq. 25, the blur (``blur_sigma``, ``kernel_size``, odd)
    in latent pixels, the mask ``threshold`` psi on the key mass (mean 1.0), the one ``layer`` whose map makes
    the mask, and the sampling window in percent."""

    scale: float
    layer: str
    blur_sigma: float = 1.0
    threshold: float = 1.0
    kernel_size: int = 9
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self):
        validate_sag_inputs(self.scale, self.blur_sigma, self.threshold, self.kernel_size)
        validate_percent_window(self.start_percent, self.end_percent)


def _model_guidance_options(model_options: dict) -> dict:
    return model_options.get("transformer_options", {}).get(GUIDANCE_OPTIONS, {})


def with_sag_mask_probe(model, keep):
    """A clone of a SAG-patched ModelPatcher whose SAG patches call ``keep(mask)`` (``[B, 1, H, W]``
    latent mask, ``[B * T, 1, H, W]`` for a video's T frames, or None when nothing was recorded) instead of guiding; the model evaluation itself
    is unchanged. A function, not a container: the host copies lists and dicts in model_options."""
    probe = model.clone()
    transformer_options = probe.model_options.setdefault("transformer_options", {})
    transformer_options[GUIDANCE_OPTIONS] = {**transformer_options.get(GUIDANCE_OPTIONS, {}), SAG_PREVIEW: keep}
    return probe


class KeyMassRecord:
    """Key attention mass of one cond entry's rows at the recorded site: ``mass`` is ``[B, h * w]`` on
    the layer's ``grid`` ``(h, w)``, or ``[B, t * h * w]`` on a video DiT's ``(t, h, w)``."""

    __slots__ = ("mass", "grid")

    def __init__(self, mass: torch.Tensor, grid: tuple[int, int]):
        self.mass = mass
        self.grid = grid


def record_handler(instance: str, transformer_index: int, records: dict, label: str):
    """``make_handler`` for ``install_site_handler``: the previous attention for every row, plus, in
    transformer block ``transformer_index``, the key mass of the rows of the chunks tagged for this
    instance. ``label`` names the node's input in errors.

    It is installed on every transformer block of the site's SpatialTransformer (so under the host's
    2-tuple key, which a run-time patch such as the host's PAG pass can replace instead of being
    shadowed by our 3-tuple key) and only records in its own block.
    """

    def make_handler(previous):
        def sag_record_attention(q, k, v, extra_options, **kwargs):
            out = previous(q, k, v, extra_options, **kwargs)
            ref_id = guidance_options(extra_options).get(SAG_RECORD, {}).get(instance)
            if ref_id is None or extra_options.get("block_index", 0) != transformer_index:
                return out
            chunks = chunk_ids(extra_options)
            positions = [i for i, c in enumerate(chunks) if c == ref_id]
            if not positions:
                return out
            require_own_queries(q, k, extra_options, label)
            grid = token_grid(extra_options.get("activations_shape"), tokens=k.shape[1])
            rows = chunk_rows(chunks, positions, q.shape[0], q.device)
            with torch.profiler.record_function("attention_guidance.sag_key_mass"):
                mass = key_attention_mass(q[rows], k[rows], extra_options["n_heads"])
            size = q.shape[0] // len(chunks)
            uuids = extra_options.get("uuids") or [None] * len(chunks)
            for n, position in enumerate(positions):
                key = uuids[position] if uuids[position] is not None else position
                records[key] = KeyMassRecord(mass[n * size:(n + 1) * size], grid)
            return out

        return sag_record_attention

    return make_handler


def reference_mass_map(records: dict, ref_conds: list, x: torch.Tensor, sigma: torch.Tensor):
    """The reference branch's key mass as a ``[B, 1, H, W]`` latent map, or None if nothing was recorded.

    Each entry's map is nearest-upsampled to the region it was evaluated on (the whole latent, or its
    area) and the maps are averaged with the entry's ``mult`` (mask x strength, feathered areas), as
    ``comfy.samplers._calc_cond_batch`` averages the entries' predictions. A single full-size entry
    gives its own map upsampled to the latent, diffusers' mask. Latent pixels no recorded entry
    covers get mass 0 (never blurred).
    """
    batch = x.shape[0]
    total = torch.zeros(batch, 1, *x.shape[2:], dtype=torch.float32, device=x.device)
    weight = torch.zeros_like(total)
    found = False
    for entry in ref_conds:
        p = comfy.samplers.get_area_and_mult(entry, x, sigma)
        if p is None:
            continue
        record = records.get(p.uuid)
        if record is None or record.mass.shape[0] != batch:
            continue
        region = tuple(p.input_x.shape[2:])
        grid = tuple(record.grid)
        if len(grid) == len(region) + 1 and grid[0] == 1:
            grid = grid[1:]  # a video DiT's one-frame video, guided as an image
        if len(grid) != len(region) or (len(grid) == 3 and grid[0] != region[0]):
            continue  # recorded on a window of the frames (context windows), not on this latent
        mass_map = record.mass.reshape(batch, 1, *grid).to(device=x.device, dtype=torch.float32)
        mass_map = upsample_mask(mass_map, region)
        mult = p.mult[:, :1].to(device=x.device, dtype=torch.float32)
        total_region, weight_region = total, weight
        if p.area is not None:
            dims = len(p.area) // 2
            for i in range(dims):
                total_region = total_region.narrow(i + 2, p.area[i + dims], p.area[i])
                weight_region = weight_region.narrow(i + 2, p.area[i + dims], p.area[i])
        total_region += mass_map * mult
        weight_region += mult
        found = True
    if not found:
        return None
    return torch.where(weight > 0, total / weight.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(total))


def sag_latent_mask(mass_map: torch.Tensor, threshold: float) -> torch.Tensor:
    """``[B, 1, H, W]`` float mask of the latent pixels whose key mass exceeds ``threshold``."""
    return sag_mask(mass_map.flatten(1), tuple(mass_map.shape[-2:]), threshold)


def as_frames(latent: torch.Tensor) -> torch.Tensor:
    """A ``[B, C, T, H, W]`` video as ``[B * T, C, H, W]`` frames (an image latent as it is): SAG's mask and
    blur act on each frame in space."""
    return latent if latent.ndim == 4 else latent.movedim(2, 1).flatten(0, 1)


def from_frames(frames: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``as_frames`` undone: frames back in the shape of ``like``."""
    if like.ndim == 4 or (like.ndim == 5 and like.shape[2] == 1):
        return frames.reshape(like.shape)
    batch, channels, length = like.shape[:3]
    return frames.reshape(batch, length, channels, *like.shape[3:]).movedim(1, 2)


def sag_latent(latent: torch.Tensor) -> torch.Tensor:
    """The latent SAG maps and blurs: an image ``[B, C, H, W]`` (also the one frame of a
    ``[B, C, 1, H, W]``), or a video ``[B, C, T, H, W]`` as it is."""
    return latent if latent.ndim == 5 and latent.shape[2] > 1 else single_frame(latent)


def single_frame(latent: torch.Tensor) -> torch.Tensor:
    """The ``[B, C, H, W]`` image of a latent: itself, or the one frame of a latent with a time axis
    (an image model on a video VAE's latent, ``[B, C, 1, H, W]``). SAG's mask and blur work on that image."""
    if latent.ndim == 5 and latent.shape[2] == 1:
        return latent[:, :, 0]
    if latent.ndim != 4:
        raise ValueError(f"Self-Attention Guidance works on image latents; this one has shape {tuple(latent.shape)}.")
    return latent


def renoise(model_sampling, sigma, x, x0_ref, degraded_x0):
    """``degraded_x0`` noised with the noise of ``x`` (relative to ``x0_ref``), in the model's own parameterisation.

    The host's ``noise_scaling(sigma, noise, x0)`` is ``a(sigma) * noise + c(sigma) * x0`` for every
    sampling type (EPS/V/EDM: c = 1; CONST/flow: c = 1 - sigma), so keeping the noise term of ``x``
    and swapping the x0 term is ``x + noise_scaling(sigma, 0, degraded_x0 - x0_ref)``.
    """
    return x + model_sampling.noise_scaling(sigma, torch.zeros_like(x), degraded_x0 - x0_ref)


def _flat(t):
    """``[B, heads, L, D]`` -> ``[B, L, heads * D]``, the layout ``key_attention_mass`` takes."""
    batch, heads, length, dim = t.shape
    return t.transpose(1, 2).reshape(batch, length, heads * dim)


def key_mass_recorder(instance: str, records: dict):
    """DiT: the call's output untouched, plus, for the rows of the chunks tagged for ``instance`` to record,
    the attention mass each image token receives from the image tokens, stored as
    ``records[entry uuid] = KeyMassRecord(mass [B, h * w], (h, w))`` (on a video DiT ``[B, t * h * w]`` on
    ``(t, h, w)``: every space-time token of the video, the map over the whole video's self-attention).

    Text tokens are left out: the mass is that of the joint attention probabilities of image queries
    over image keys, renormalised per query (the same as a softmax over the image keys alone), so it
    averages 1.0 per key as in a UNet and the threshold keeps its meaning. Only the generated image's
    ``h x w`` grid counts (not reference-image tokens); a block's image-only self-attention is not recorded,
    its joint attention is.
    """

    def handler(call: DiTAttention):
        out = call.run()
        ref_id = guidance_options(call.options).get(SAG_RECORD, {}).get(instance)
        chunks = call.chunks
        positions = [i for i, c in enumerate(chunks) if c == ref_id]
        if ref_id is None or not positions or not call.joint:
            return out
        grid = call.image_grid()
        image = call.image_tokens_of_grid()
        rows = chunk_rows(chunks, positions, call.q.shape[0], call.q.device)
        q, k = call.q_heads()[rows][:, :, image], call.k_heads()[rows][:, :, image]
        with torch.profiler.record_function("attention_guidance.sag_key_mass"):
            mass = key_attention_mass(_flat(q), _flat(k), q.shape[1], scale=call.scale)
        size = call.q.shape[0] // len(chunks)
        uuids = call.options.get("uuids") or [None] * len(chunks)
        for n, position in enumerate(positions):
            key = uuids[position] if uuids[position] is not None else position
            records[key] = KeyMassRecord(mass[n * size:(n + 1) * size], grid)
        return out

    return handler


def apply_sag(model, settings: SAGSettings):
    """A clone of ``model`` with SAG installed (a plain clone at scale 0)."""
    chosen = choose_layers(model, node=NODE, input_name="layer", spec=settings.layer, method=Method.SAG,
                           label="SAG layer", single=True)
    (site,) = chosen.sites
    scale, threshold, kernel_size, blur_sigma = settings.scale, settings.threshold, settings.kernel_size, settings.blur_sigma
    in_use = chosen.in_use
    m = model.clone()
    if scale == 0.0:
        return m
    instance = uuid.uuid4().hex
    records: dict = {}
    run = GuidanceRun()
    clear_after_sampling(m, run)
    watch = PostCfgWatch(m, "Self-Attention Guidance")

    window = SigmaWindow(m, settings.start_percent, settings.end_percent)

    def active(base_model, sigma) -> bool:
        return window.contains(base_model.model_sampling, sigma)

    def calc_cond_batch_wrapper(executor, base_model, conds, x_in, timestep, model_options):
        if not is_main_cond_call(conds, model_options):
            return executor(base_model, conds, x_in, timestep, model_options)
        records.clear()
        inactive = SAG_PREVIEW not in _model_guidance_options(model_options) and not active(base_model, timestep)
        if watch.guider_skips_post_cfg(timestep) or inactive:
            return executor(base_model, conds, x_in, timestep, model_options)
        # diffusers: the uncond map under CFG, the cond map without (the host drops the uncond at CFG 1)
        ref_id = 1 if conds[1] is not None else 0
        options = with_guidance_options(model_options, **{SAG_RECORD: {instance: ref_id}})
        return executor(base_model, conds, x_in, timestep, options)

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, calc_cond_batch_wrapper)
    clear_after_sampling(m, records)
    guard = DisplacementGuard(m, "Self-Attention Guidance",
                              lambda options: instance in guidance_options(options).get(SAG_RECORD, {}))
    if chosen.on_dit:
        install_dit_handler(m, dit_model(m, chosen), [site], key_mass_recorder(instance, records), guard)
    else:
        module_sites = [s for s in chosen.model.layout.sites if s.module == site.module]
        install_site_handler(m, module_sites, record_handler(instance, site.transformer_index, records,
                                                             f"SAG layer '{site.index_name}'"), guard)

    def reference_mask(args, ref_conds):
        x, sigma = args["input"], args["sigma"]
        image = sag_latent(x)
        mass_map = reference_mass_map(records, ref_conds, image, sigma)
        if mass_map is None:
            # The main call was not ours to tag (another guider's layout, context windows): record
            # the reference branch in a pass of its own.
            records.clear()
            options = with_guidance_options(args["model_options"], **{EXTRA_PASS: True, SAG_RECORD: {instance: 0}})
            comfy.samplers.calc_cond_batch(args["model"], [ref_conds], x, sigma, options)
            mass_map = reference_mass_map(records, ref_conds, image, sigma)
        if mass_map is None:
            return None
        return sag_latent_mask(as_frames(mass_map), threshold)

    def post_cfg_function(args):
        watch.post_cfg_ran()
        preview = _model_guidance_options(args["model_options"]).get(SAG_PREVIEW)
        try:
            if preview is None and not active(args["model"], args["sigma"]):
                return args["denoised"]
            use_uncond = args["uncond"] is not None
            ref_conds = args["uncond"] if use_uncond else args["cond"]
            x0_ref = args["uncond_denoised"] if use_uncond else args["cond_denoised"]
            with torch.profiler.record_function("attention_guidance.sag_mask"):
                mask = reference_mask(args, ref_conds)
            if preview is not None:
                preview(mask)
                return args["denoised"]
            if mask is None:
                if not run.warned:
                    run.warned = True
                    logging.warning(
                        "Self-Attention Guidance: no attention of the reference conditioning (the negative "
                        "under CFG, the positive at CFG 1) was recorded at layer '%s', so SAG skips this step. "
                        "Either none of its entries is active at this step (timestep range), a cache such as "
                        "EasyCache served this step without running the model, the sampler evaluates the "
                        "model in pieces (context windows), which SAG does not support, or a node applied "
                        "after SAG replaced that attention without calling it (apply attention guidance last).",
                        site.index_name)
                return args["denoised"]
            log_once_per_run(run, in_use)
            x = args["input"]
            with torch.profiler.record_function("attention_guidance.sag_blur"):
                frames = as_frames(sag_latent(x0_ref))
                degraded = from_frames(blur_under_mask(frames, mask, kernel_size, blur_sigma), x0_ref)
                x_degraded = renoise(args["model"].model_sampling, args["sigma"], x, x0_ref, degraded)
            options = with_guidance_options(args["model_options"], **{EXTRA_PASS: True})
            with torch.profiler.record_function("attention_guidance.sag_degraded_pass"):
                (degraded_denoised,) = comfy.samplers.calc_cond_batch(
                    args["model"], [as_own_entries(ref_conds, instance)], x_degraded, args["sigma"], options)
            return sag_guided(args["denoised"], degraded, degraded_denoised, scale)
        finally:
            records.clear()

    setattr(post_cfg_function, SAG_PATCH_ATTRIBUTE, instance)
    m.set_model_sampler_post_cfg_function(post_cfg_function)
    return m
