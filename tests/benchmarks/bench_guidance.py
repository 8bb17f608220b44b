"""Speed and memory of the guidance patches, side by side in one process and one run.

Samples the same seed with CFG only, the host's PAG / SAG / SAG+PAG nodes and ours, and our PAG
over half the schedule, on a full-width SD1.5-shaped UNet (real channel counts, random weights).
Prints per configuration: best wall time of N rounds over all configurations, ratio to CFG only
and to the host's equivalent node (each the median over rounds of the ratio within a round),
diffusion-model forward calls and rows per step, the ratio to its floor (the same forwards of the bare
diffusion model, timed in the same round: what is left above 1.0x is the sampler's and the guidance's
own work), peak extra memory of a sampling step (live tensors on CPU from the profiler's allocation
records; the allocator's peak on CUDA), the bare forward times by rows; then the targets of issue 18,
each marked met or missed by the median over rounds of its per-round ratio:

- each configuration's ratio to CFG only <= 1.05x its floor ratio (its bare forwards over CFG only's,
  timed in the same round), and ours never slower than the host's equivalent node;
- peak memory per step: a configuration that batches a copy into the sampler's forward <= 1.5x the
  host's equivalent (the rows it adds), and <= the host's where the host's memory check splits the
  batch (measured with the host seeing almost no free memory); SAG <= the host's SAG;

and last the per-step work on the tiny test model, where the forwards cost little and the sampler's and
the guidance's own Python work shows (ms per step, ratios to CFG only and to the host's node).
The defaults (SD1.5-shaped, 32x32 latent, batch 1, 2 steps, 2 rounds) took 4 min 9 s on 2 idle CPU
cores (2026-11-30); ``--batch 1 2`` adds the batch-2 tables (11 min 49 s on 2026-11-30, past the 10-minute
bound of a default run); more rounds (--repeats) give steadier ratios. A new node is one more entry in
``configurations``. The rows "uncond" are PAG's and SEG's placement 'uncond branch' (the negative
perturbed, nothing batched: the same forwards as CFG only). ``--tiny-only`` prints only the per-step
work on the tiny test model.

    python3 scripts/host.py setup
    COMFYUI_PATH=.cache/comfyui .cache/venv/bin/python tests/benchmarks/bench_guidance.py [--latent 32] [--batch 1 2]

``--compile`` measures instead the model compiled after our nodes as the newest host's TorchCompileModel
compiles it (``disable_dynamic`` where the host's clone takes it, and its guard filter that drops every guard
on transformer_options; ``--no-guard-filter``: 0.3.75's TorchCompileModel as it is; ``--backend``, inductor by
default): each configuration's first run (which compiles), the graphs it compiled, the speed-up over the
eager model in rounds side by side, each configuration's ratio to CFG only eager and compiled, and the target
that compiled guidance keeps its eager ratio (at most 1.05x of it), and the graphs compiled during those
rounds (0 when nothing recompiles per step or per guided/unguided switch). On 2 CPU cores inductor takes many
minutes for the full-width UNet; ``--latent 16 --steps 2 --repeats 2 --batch 1`` keeps it shorter.

It runs on the GPU wherever torch sees one (``AG_HOST_DEVICE=cpu`` keeps it on the CPU); for the GPU
machine some sessions are lent, see gpu_bundle.py and run_on_gpu.sh beside this file.

This is a measurement, not a test: it never fails on a slow machine, it reports.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

# kineto (torch.profiler) logs every profiler start/stop, and on a CPU-only machine a failed GPU count, as ERROR
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
import torch  # noqa: E402

# conftest keeps the host on the CPU unless told otherwise: on a GPU machine the benchmark runs there
# (AG_HOST_DEVICE=cpu forces the CPU)
os.environ.setdefault("AG_HOST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import conftest  # noqa: E402,F401  (host on sys.path, device flag, the pack as `attention_guidance`)

import comfy.ldm.modules.attention  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.supported_models  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters as dynamo_counters  # noqa: E402
from comfy_extras.nodes_torch_compile import TorchCompileModel  # noqa: E402
from comfy_extras.nodes_pag import PerturbedAttentionGuidance as HostPAG  # noqa: E402
from comfy_extras.nodes_sag import SelfAttentionGuidance as HostSAG  # noqa: E402

from attention_guidance.nodes.pag import PerturbedAttentionGuidance  # noqa: E402
from attention_guidance.nodes.sag import SelfAttentionGuidance  # noqa: E402
from attention_guidance.nodes.seg import SmoothedEnergyGuidance  # noqa: E402
from support.models import build_model, count_model_calls, initialise_weights, make_conditioning, sample, short_of_memory  # noqa: E402

# support.models pins one thread for the tiny test models; a full-width UNet wants every core.
torch.set_num_threads(os.cpu_count() or 1)

SD15_FULL = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, num_heads=8,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_resblock=False,
    use_temporal_attention=False,
)
SDXL_FULL = dict(
    use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
    use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_resblock=False,
    use_temporal_attention=False,
)


FULL_CONFIGS = {"sd15": SD15_FULL, "sdxl": SDXL_FULL}


def build(arch: str, dtype: torch.dtype):
    device = comfy.model_management.get_torch_device()
    if arch == "sdxl":
        config = comfy.supported_models.SDXL(dict(SDXL_FULL))
        config.set_inference_dtype(dtype, None)
        model = comfy.model_base.SDXL(config, device=device)
    else:
        config = comfy.supported_models.SD15(dict(SD15_FULL))
        config.set_inference_dtype(dtype, None)
        model = comfy.model_base.BaseModel(config, device=device)
    initialise_weights(model.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conditioning(arch: str, batch: int):
    g = torch.Generator().manual_seed(0)
    context = FULL_CONFIGS[arch]["context_dim"]
    extras = {}
    if arch == "sdxl":
        extras = dict(pooled_output=torch.randn(batch, 1280, generator=g), width=1024, height=1024, crop_w=0,
                      crop_h=0, target_width=1024, target_height=1024)
    return ([[torch.randn(batch, 77, context, generator=g), dict(extras)]],
            [[torch.randn(batch, 77, context, generator=g), dict(extras)]])


@dataclasses.dataclass
class Configuration:
    """One row of the tables: the patched model, the host's equivalent node (a row name) if there is one,
    whether it adds a batched copy to the sampler's forward (its memory target is then 1.5x the host's,
    the rows it adds) and whether it is ours (the targets are ours; the host's rows are references).
    A new node is one more entry in ``configurations``."""

    model: object
    host: str | None = None
    batched_copy: bool = False
    ours: bool = True


def configurations(model) -> dict[str, Configuration]:
    def ours_pag(m, **kw):
        args = dict(scale=3.0, layers="mid", adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0)
        args.update(kw)
        return PerturbedAttentionGuidance.execute(m, **args).result[0]

    def ours_seg(m, **kw):
        args = dict(scale=3.0, blur_sigma=10000.0, layers="mid", start_percent=0.0, end_percent=1.0)
        args.update(kw)
        return SmoothedEnergyGuidance.execute(m, **args).result[0]

    def ours_sag(m):
        return SelfAttentionGuidance.execute(m, scale=0.5, blur_sigma=2.0, threshold=1.0, kernel_size=9,
                                             layer="m0.0", start_percent=0.0, end_percent=1.0).result[0]

    def host_pag(m):
        return HostPAG.execute(m, 3.0).result[0]

    def host_sag(m):
        return HostSAG.execute(m, 0.5, 2.0).result[0]

    return {
        "CFG only": Configuration(model, ours=False),
        "host PAG": Configuration(host_pag(model), ours=False),
        "our PAG": Configuration(ours_pag(model), "host PAG", batched_copy=True),
        "host SAG": Configuration(host_sag(model), ours=False),
        "our SAG": Configuration(ours_sag(model), "host SAG"),
        "host SAG+PAG": Configuration(host_pag(host_sag(model)), ours=False),
        "our SAG+PAG": Configuration(ours_pag(ours_sag(model)), "host SAG+PAG", batched_copy=True),
        "our PAG end 0.5": Configuration(ours_pag(model, end_percent=0.5), "host PAG", batched_copy=True),
        # placement 'uncond branch': CFG's own negative perturbed, nothing batched (its floor is CFG only's)
        "our PAG uncond": Configuration(ours_pag(model, placement="uncond branch")),
        "our SEG": Configuration(ours_seg(model), "host PAG", batched_copy=True),
        "our SEG uncond": Configuration(ours_seg(model, placement="uncond branch")),
        "our SAG+PAG uncond": Configuration(ours_sag(ours_pag(model, placement="uncond branch")), "host SAG"),
    }


def tensor_memory_peak(run) -> int:
    """Peak bytes of live CPU tensors while ``run()`` runs, above the level at its start.

    Counted from the profiler's allocation records (each op's own allocations at its start, frees as
    they happen), so it does not depend on what the C allocator keeps cached from earlier runs, which
    made RSS deltas depend on the order of the configurations. Scratch memory an op frees before it
    returns is not seen."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    changes = sorted((event.time_range.start,
                      event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage)
                     for event in prof.events())
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak


def cuda_memory_peak(run) -> int:
    """Peak bytes of the CUDA allocator while ``run()`` runs, above the level at its start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def memory_peak(model, positive, negative, latent, cfg) -> int:
    """Peak extra memory of one sampling step (every step of a configuration runs the same passes)."""
    def run():
        sample(model, positive, negative, latent, sampler_name="euler", steps=1, cfg=cfg, seed=1)

    device = comfy.model_management.get_torch_device()
    return cuda_memory_peak(run) if device.type == "cuda" else tensor_memory_peak(run)


class _Patch:
    """The part of pytest's monkeypatch that support.models.short_of_memory uses, undone on exit."""

    def __init__(self):
        self.undo = []

    def setattr(self, target, name, value):
        self.undo.append((target, name, getattr(target, name)))
        setattr(target, name, value)


@contextlib.contextmanager
def host_splits_every_batch():
    """The host's sampler sees almost no free memory, so its memory check runs every cond entry in a
    forward of its own (comfy.samplers._calc_cond_batch), as where the batch does not fit."""
    patch = _Patch()
    short_of_memory(patch)
    try:
        yield
    finally:
        for target, name, value in reversed(patch.undo):
            setattr(target, name, value)


def timed_run(model, positive, negative, latent, steps, cfg):
    """Wall time of one sampling run, and the rows of each diffusion-model forward it made."""
    device = comfy.model_management.get_torch_device()
    with count_model_calls(model) as calls:
        start = time.perf_counter()
        sample(model, positive, negative, latent, sampler_name="euler", steps=steps, cfg=cfg, seed=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, [c.batch_size for c in calls]


def bare_forward_seconds(model, arch: str, rows: int, latent_side: int) -> float:
    """Wall time of one forward of the unpatched diffusion model on ``rows`` rows: no sampler, no
    guidance. A configuration's floor is the sum of these over the forwards it runs."""
    device = comfy.model_management.get_torch_device()
    dtype = model.model.get_dtype()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 4, latent_side, latent_side, generator=g).to(device, dtype)
    timesteps = torch.full((rows,), 500.0, device=device)
    config = FULL_CONFIGS[arch]
    context = torch.randn(rows, 77, config["context_dim"], generator=g).to(device, dtype)
    adm = config["adm_in_channels"]
    y = torch.randn(rows, adm, generator=g).to(device, dtype) if adm else None
    with torch.no_grad():
        start = time.perf_counter()
        model.model.diffusion_model(x, timesteps, context=context, y=y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def measure_all(configs, positive, negative, latent, steps, repeats, cfg, arch):
    """Peak memory of each configuration (which also warms it up), then `repeats` timed rounds over all
    configurations, every other round in reverse order, each round closed by bare forwards of every row
    count the configurations used, which give each configuration's floor in that round. Each
    configuration keeps its time and floor per round, so that ratios can be taken within a round (see
    ``paired_ratio``)."""
    results = {name: {"times": [], "floors": [], "memory": memory_peak(config.model, positive, negative, latent, cfg)}
               for name, config in configs.items()}
    with host_splits_every_batch():
        for name, config in configs.items():
            if config.batched_copy:
                for measured in (name, config.host):
                    if "memory split" not in results[measured]:
                        results[measured]["memory split"] = memory_peak(configs[measured].model, positive,
                                                                        negative, latent, cfg)
    order = list(configs)
    bare_model = configs["CFG only"].model
    bare_rounds = []
    for round_index in range(repeats):
        for name in (order if round_index % 2 == 0 else order[::-1]):
            seconds, rows = timed_run(configs[name].model, positive, negative, latent, steps, cfg)
            results[name]["times"].append(seconds)
            results[name].update(forwards=len(rows) / steps, rows=sum(rows) / steps, calls=rows)
        row_counts = sorted({n for result in results.values() for n in result["calls"]})
        bare = {n: bare_forward_seconds(bare_model, arch, n, latent.shape[-1]) for n in row_counts}
        bare_rounds.append(bare)
        for result in results.values():
            result["floors"].append(sum(bare[n] for n in result["calls"]))
    return results, bare_rounds


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time in the same round. On a shared machine a slow spell
    usually lasts longer than one configuration, so it cancels within a round, where the ratio of two
    bests taken in different rounds would carry it."""
    return statistics.median(round_ratios(times, reference))


def round_ratios(times: list[float], reference: list[float]) -> list[float]:
    """time / reference time within each round."""
    return [t / r for t, r in zip(times, reference)]


def print_table(configs, measured):
    print("| configuration | time (s) | vs CFG only | vs host equivalent | forwards/step | rows/step | vs floor | peak memory per step (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, config in configs.items():
        result = measured[name]
        versus = f"{paired_ratio(result['times'], measured[config.host]['times']):.2f}x" if config.host else "-"
        print(f"| {name} | {min(result['times']):.3f} | {paired_ratio(result['times'], measured['CFG only']['times']):.2f}x | "
              f"{versus} | {result['forwards']:g} | {result['rows']:g} | {paired_ratio(result['times'], result['floors']):.2f}x | "
              f"{result['memory'] / 2**20:.0f} |", flush=True)


def target_checks(configs, measured) -> list[tuple[str, list[float], float]]:
    """(label, per-round ratios, limit) of each target of issue 18 for one batch size."""
    cfg = measured["CFG only"]
    checks = []
    for name, config in configs.items():
        if not config.ours:
            continue
        result = measured[name]
        # its ratio to CFG only over the ratio of the bare forwards it runs to CFG only's, in each round
        over_floor = [(t / c) / (f / cf) for t, c, f, cf in
                      zip(result["times"], cfg["times"], result["floors"], cfg["floors"])]
        checks.append((f"{name} vs CFG only <= 1.05x its floor ratio", over_floor, 1.05))
        if config.host:
            checks.append((f"{name} <= 1.0x {config.host}", round_ratios(result["times"], measured[config.host]["times"]), 1.0))
    for name, config in configs.items():
        if not (config.ours and config.host):
            continue
        memory = measured[name]["memory"] / max(measured[config.host]["memory"], 1)
        limit = 1.5 if config.batched_copy else 1.0
        checks.append((f"{name} memory <= {limit:g}x {config.host}", [memory], limit))
        if "memory split" in measured[name]:
            split = measured[name]["memory split"] / max(measured[config.host]["memory split"], 1)
            checks.append((f"{name} memory <= 1x {config.host} where the host splits the batch", [split], 1.0))
    return checks


def per_step_work(steps: int, rounds: int, cfg: float) -> None:
    """Per-step wall time of each configuration on the tiny SD1.5 test model (16x16 latent), where the
    forwards cost little and the sampler's and the guidance's own Python work shows."""
    model = build_model("sd15", seed=0)
    positive, negative = make_conditioning("sd15", batch=1, seed=1)
    latent = torch.zeros(1, 4, 16, 16)
    configs = configurations(model)
    times = {name: [] for name in configs}
    for config in configs.values():
        timed_run(config.model, positive, negative, latent, 2, cfg)  # warm-up
    for round_index in range(rounds):
        order = list(configs) if round_index % 2 == 0 else list(configs)[::-1]
        for name in order:
            seconds, rows = timed_run(configs[name].model, positive, negative, latent, steps, cfg)
            times[name].append(seconds / steps)
    print(f"\n## per-step work on the tiny test model (16x16 latent, batch 1, {steps} steps, {rounds} rounds)\n")
    print("| configuration | ms per step | vs CFG only | vs host equivalent |")
    print("|---|---|---|---|")
    for name, config in configs.items():
        versus = f"{paired_ratio(times[name], times[config.host]):.2f}x" if config.host else "-"
        print(f"| {name} | {min(times[name]) * 1000:.1f} | {paired_ratio(times[name], times['CFG only']):.2f}x | {versus} |")


# the configurations --compile measures (each new guards is a compile of the whole model: on a GPU inductor
# takes most of a minute for each)
COMPILED = ("CFG only", "our PAG", "our SAG", "our PAG end 0.5")


def sample_seconds(model, positive, negative, latent, steps, cfg) -> float:
    """Wall time of one sampling run, with nothing added to the model (``timed_run`` adds a counting
    wrapper, a new function each run, which the compiled model would see as a change and recompile)."""
    device = comfy.model_management.get_torch_device()
    start = time.perf_counter()
    sample(model, positive, negative, latent, sampler_name="euler", steps=steps, cfg=cfg, seed=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def unique_graphs() -> int:
    return dynamo_counters["stats"]["unique_graphs"]


def skip_torch_compile_dict(guard_entries):
    """The newest host's guard filter (comfy_api/torch_helpers/torch_compile.py, 0.38.1), which 0.3.75 lacks."""
    return [("transformer_options" not in entry.name) for entry in guard_entries]


def compile_model(model, backend: str, guard_filter: bool):
    """``model`` compiled as the newest host's TorchCompileModel does (with ``guard_filter``), else as 0.3.75's."""
    if not guard_filter:
        return TorchCompileModel.execute(model, backend=backend).result[0]
    import inspect

    from comfy_api.torch_helpers import set_torch_compile_wrapper

    takes = "disable_dynamic" in inspect.signature(model.clone).parameters
    clone = model.clone(disable_dynamic=True) if takes else model.clone()
    set_torch_compile_wrapper(model=clone, backend=backend, options={"guard_filter_fn": skip_torch_compile_dict})
    return clone


def compiled_speedup(configs, positive, negative, latent, steps, repeats, cfg, backend, guard_filter=True) -> None:
    """Each configuration with the host's TorchCompileModel applied after ours: its first run (which
    compiles), the graphs that compiled, then rounds of the eager and the compiled model side by side
    and the graphs compiled during them (0: nothing recompiles per step or per guided/unguided switch)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            # every configuration compiles the same diffusion model's code, each with its own guards
            setattr(torch._dynamo.config, name, 64)
    names = [name for name in COMPILED if name in configs]
    compiled = {name: compile_model(configs[name].model, backend, guard_filter) for name in names}
    how = "the newest host's guard filter" if guard_filter else "0.3.75's TorchCompileModel"
    print(f"\n## torch.compile after ours ({how}, backend {backend}, {repeats} rounds)\n")
    first = {}
    for name in names:
        before = unique_graphs()
        seconds = sample_seconds(compiled[name], positive, negative, latent, steps, cfg)
        first[name] = (seconds, unique_graphs() - before)
        print(f"- {name}: first run {seconds:.1f} s, {first[name][1]} graphs compiled", flush=True)
    warm = unique_graphs()
    eager_times = {name: [] for name in names}
    compiled_times = {name: [] for name in names}
    for round_index in range(repeats):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            eager_times[name].append(sample_seconds(configs[name].model, positive, negative, latent, steps, cfg))
            compiled_times[name].append(sample_seconds(compiled[name], positive, negative, latent, steps, cfg))
    recompiled = unique_graphs() - warm
    print()
    print("| configuration | eager (s) | compiled (s) | speed-up | eager, vs eager CFG only | compiled, vs compiled CFG only "
          "| first run (s) | graphs compiled in it |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {min(eager_times[name]):.3f} | {min(compiled_times[name]):.3f} | "
              f"{paired_ratio(eager_times[name], compiled_times[name]):.2f}x | "
              f"{paired_ratio(eager_times[name], eager_times['CFG only']):.2f}x | "
              f"{paired_ratio(compiled_times[name], compiled_times['CFG only']):.2f}x | {first[name][0]:.1f} | {first[name][1]} |")
    print()
    for name in names[1:]:
        # per round: the compiled ratio to CFG only over the eager one, both timed in that round
        kept = [(c / cc) / (e / ec) for c, cc, e, ec in zip(compiled_times[name], compiled_times["CFG only"],
                                                             eager_times[name], eager_times["CFG only"])]
        ratio = statistics.median(kept)
        print(f"- {name}: compiled ratio to CFG only / eager ratio = {ratio:.3f} (rounds {min(kept):.3f}-{max(kept):.3f}), "
              f"target <= 1.05: {'met' if ratio <= 1.05 else 'MISSED'}")
    print(f"\ngraphs compiled during the {repeats} timed rounds (after each configuration's first run): {recompiled}"
          + ("" if recompiled == 0 else " -- something recompiles per step"), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cfg", type=float, default=5.0,
                        help="CFG scale (1: the positive alone, where the host's SAG still adds a negative pass)")
    parser.add_argument("--fp16", action="store_true", help="fp16 weights (GPU runs)")
    parser.add_argument("--compile", action="store_true",
                        help="instead of the tables: the speed-up of the host's TorchCompileModel on our nodes")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--no-guard-filter", action="store_true",
                        help="--compile as 0.3.75's TorchCompileModel, without the newest host's guard filter")
    parser.add_argument("--work-steps", type=int, default=24,
                        help="steps of the per-step work measurement on the tiny model (0 skips it)")
    parser.add_argument("--tiny-only", action="store_true",
                        help="only the per-step work on the tiny test model (no full-width tables; seconds)")
    options = parser.parse_args()
    if options.tiny_only:
        started = time.perf_counter()
        per_step_work(options.work_steps or 24, max(options.repeats, 3), options.cfg)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        return

    dtype = torch.float16 if options.fp16 else torch.float32
    device = comfy.model_management.get_torch_device()
    print(f"# {options.arch.upper()}-shaped UNet, random weights, {dtype}, latent {options.latent}x{options.latent}, "
          f"{options.steps} euler steps, CFG {options.cfg:g}, {options.repeats} rounds; device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; host attention {comfy.ldm.modules.attention.optimized_attention.__name__}")
    started = time.perf_counter()
    model = build(options.arch, dtype)
    model.model.to(device)
    if options.compile:
        for batch in options.batch:
            positive, negative = conditioning(options.arch, batch)
            latent = torch.zeros(batch, 4, options.latent, options.latent)
            print(f"\n## batch {batch}")
            compiled_speedup(configurations(model), positive, negative, latent, options.steps, options.repeats,
                             options.cfg, options.backend, guard_filter=not options.no_guard_filter)
        print(f"\ntotal {time.perf_counter() - started:.0f} s")
        return
    results = {}
    for batch in options.batch:
        positive, negative = conditioning(options.arch, batch)
        latent = torch.zeros(batch, 4, options.latent, options.latent)
        print(f"\n## batch {batch}\n")
        configs = configurations(model)
        measured, bare_rounds = measure_all(configs, positive, negative, latent, options.steps, options.repeats,
                                            options.cfg, options.arch)
        print_table(configs, measured)
        bare = {n: statistics.median(r[n] for r in bare_rounds) for n in bare_rounds[0]}
        print("\nbare forwards of the diffusion model (median over rounds): "
              + ", ".join(f"{n} rows {seconds:.3f} s" for n, seconds in bare.items()))
        if batch in bare and 2 * batch in bare:
            print(f"a {batch}-row forward costs {bare[batch] / bare[2 * batch]:.2f} of a {2 * batch}-row one: "
                  f"the floor of a guidance that adds a {batch}-row forward to CFG is {1 + bare[batch] / bare[2 * batch]:.2f}x")
        results[batch] = (configs, measured)
    print("\n## targets (issue 18)\n")
    verdicts = []
    for batch, (configs, measured) in results.items():
        for label, ratios, limit in target_checks(configs, measured):
            ratio = statistics.median(ratios)
            verdict = "met" if ratio <= limit else "missed (met in some rounds)" if min(ratios) <= limit else "MISSED"
            verdicts.append(verdict)
            spread = f" (rounds {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
            shown = f"{ratio:.3f}" if "memory" in label else f"{ratio:.2f}"  # 1.00 can be a few KiB above
            print(f"- batch {batch}: {label}: {shown}{spread} {verdict}")
    _, first_measured = results[options.batch[0]]
    print(f"\nsummary: {verdicts.count('met')}/{len(verdicts)} targets met by the median over rounds, "
          f"{verdicts.count('missed (met in some rounds)')} more met in some rounds; forwards/step with PAG+CFG: "
          f"{first_measured['our PAG']['forwards']:g} (host: {first_measured['host PAG']['forwards']:g}); "
          f"tables {time.perf_counter() - started:.0f} s", flush=True)
    if options.work_steps:
        per_step_work(options.work_steps, max(options.repeats, 3), options.cfg)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
