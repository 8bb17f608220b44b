"""Does the guidance make samples better? A quality benchmark against CFG at matched strength.

A tiny class-conditional SD-style UNet (the host's own ``UNetModel`` in its ``BaseModel``, eps,
SD1.x schedule), trained on scikit-learn's bundled digits by ``scripts/train_quality_model.py``, is
loaded as a ComfyUI MODEL; the pack's nodes patch it as a user's graph would (each node's
``execute``, the classes taken from the pack's public extension by node id) and the KSampler node's
own function (``nodes.common_ksampler``) samples N images per row, the same N noises and the same
requested classes (``i % 10``) in every row, so rows are paired sample by sample.

A small CNN judge trained on the same digits scores each row:

- ``accuracy``: fraction of samples the judge classifies as the requested digit;
- ``precision`` / ``recall``: k-NN (k=3) precision and recall (Kynkäänniemi et al. 2019) in the judge's
  64-wide feature space against all 1,797 real digits: precision = fraction of samples inside the real
  data's manifold (fidelity), recall = fraction of real digits inside the samples' manifold (diversity);
- ``fid``: Fréchet distance in the same features (lower is better);
- ``saturation``: fraction of pixels outside the data's range [-1, 1] by more than half a grey level
  (1/16) before clamping.

Each metric has ``value``, ``delta`` (row minus its baseline row) and ``ci`` (95 % paired bootstrap
interval of the delta, resampling sample indices, the same indices for every row; the real set is
fixed; recall's generated-set radii are those of the full row). ``vs_cfg_frontier``: the row's
precision minus CFG's precision-recall curve (the CFG rows, linear between them, flat beyond their
ends) at the row's recall, bootstrapped the same way: ``above`` when the interval is above 0 (a trade
no CFG scale gives), ``below`` when it is below 0, else ``on``; ``baseline`` for the CFG rows that make
the curve.

    COMFYUI_PATH=.cache/comfyui .cache/venv/bin/python tests/benchmarks/quality.py [--n 500] [--noise-seed 0]
        [--json PATH] [--plot PNG] [--grid PNG --grid-row KEY] [--rows KEY ...] [--threads 2]

The default (N=500, 10 DDIM steps, 21 rows: 42 forwards of 500 images per step in all) is sized for
at most 10 minutes on 2 idle CPU cores: at light load a row of 2 forwards per step took 1.4 s for 60
images, about 12 s for 500. On the shared machine under a load of 4 to 7, two runs side by side on one
thread each took 1,585 s and 1,607 s (2026-12-03).
``--plot`` needs matplotlib. This is a measurement, not a test: tests/test_quality_benchmark.py runs it
at small N and checks its output's shape, not its results.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import conftest  # noqa: E402,F401  (host on sys.path, CPU flag, the pack as `attention_guidance`)
import quality_model as qm  # noqa: E402
import nodes as host_nodes  # noqa: E402  (the host's nodes.py: common_ksampler is the KSampler node's function)

METRICS = ("accuracy", "precision", "recall", "fid", "saturation")
SAMPLER, SCHEDULER = "ddim", "ddim_uniform"
KNN_K = 3
# out of range = more than half of one of the digits' 17 grey levels (2/16 in [-1, 1]) outside [-1, 1]
SATURATION_MARGIN = 1.0 / 16

# node defaults that the rows do not vary
PAG_DEFAULTS = {"adaptive_scale": 0.0, "start_percent": 0.0, "end_percent": 1.0, "rescale": 0.0}
SAG_DEFAULTS = {"scale": 0.75, "blur_sigma": 1.0, "threshold": 1.0, "kernel_size": 9, "layer": "auto",
                "start_percent": 0.0, "end_percent": 1.0}
SEG_DEFAULTS = {"start_percent": 0.0, "end_percent": 1.0}


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    method: str
    cfg: float
    baseline: str | None
    patches: tuple = ()  # ((node_id, inputs), ...) applied in order
    scale: float | None = None
    layers: str | None = None


def _pag(scale, layers):
    return ("AG_PerturbedAttentionGuidance", {"scale": scale, "layers": layers, **PAG_DEFAULTS})


def _seg(sigma, layers, scale=3.0):
    return ("AG_SmoothedEnergyGuidance", {"scale": scale, "blur_sigma": sigma, "layers": layers, **SEG_DEFAULTS})


def _sag(scale=0.75):
    return ("AG_SelfAttentionGuidance", {**SAG_DEFAULTS, "scale": scale})


# Layers of this UNet (the pack's index names): d0 = encoder 8x8, d1 = encoder 4x4, m0 = middle (4x4),
# u0-u1 = decoder 4x4, u2-u3 = decoder 8x8.
ROWS = [
    Row("cfg1", "cfg", 1.0, None),
    Row("cfg1.5", "cfg", 1.5, "cfg1"),
    Row("cfg2", "cfg", 2.0, "cfg1"),
    Row("cfg2.5", "cfg", 2.5, "cfg1"),
    Row("cfg3", "cfg", 3.0, "cfg1"),
    *[Row(f"pag_{layers}_s{scale:g}", "pag", 1.0, "cfg1", (_pag(scale, layers),), scale, layers)
      for layers in ("d0", "m0", "u0-1", "u2-3") for scale in (2.0, 5.0)],
    Row("seg_mid_sinf", "seg", 1.0, "cfg1", (_seg(10000.0, "auto"),), 3.0, "auto (m0)"),
    *[Row(f"seg_u2-3_s{name}", "seg", 1.0, "cfg1", (_seg(sigma, "u2-3"),), 3.0, "u2-3")
      for name, sigma in (("1", 1.0), ("3", 3.0), ("inf", 10000.0))],
    Row("sag_cfg1", "sag", 1.0, "cfg1", (_sag(),), 0.75, "auto (m0.0)"),
    Row("sag_cfg2", "sag", 2.0, "cfg2", (_sag(),), 0.75, "auto (m0.0)"),
    Row("sag+pag_cfg2", "sag+pag", 2.0, "cfg2", (_sag(), _pag(2.0, "u0-1")), None, "sag auto, pag u0-1 s2"),
]
ROW_KEYS = [row.key for row in ROWS]


def node_classes() -> dict:
    """{node_id: node class} from the pack's public extension, as the host registers them."""
    from attention_guidance.nodes import AttentionGuidanceExtension

    classes = asyncio.run(AttentionGuidanceExtension().get_node_list())
    return {cls.GET_SCHEMA().node_id: cls for cls in classes}


def apply_patches(model, patches, nodes_by_id):
    for node_id, inputs in patches:
        model = nodes_by_id[node_id].execute(model=model, **inputs).result[0]
    return model


def sample_row(model, tokens, row: Row, n: int, steps: int, noise_seed: int, nodes_by_id, chunk: int) -> torch.Tensor:
    """(n, 1, 16, 16) samples of ``row``: the KSampler node's function, one noise seed per chunk."""
    patched = apply_patches(model, row.patches, nodes_by_id)
    labels = torch.arange(n) % qm.NUM_CLASSES
    out = []
    for start in range(0, n, chunk):
        part = labels[start:start + chunk]
        positive, negative = qm.conditioning(tokens, part)
        latent = {"samples": torch.zeros(len(part), 1, qm.RESOLUTION, qm.RESOLUTION)}
        seed = noise_seed * 1000003 + start
        (result,) = host_nodes.common_ksampler(patched, seed, steps, row.cfg, SAMPLER, SCHEDULER, positive, negative,
                                               latent)
        out.append(result["samples"].float())
    return torch.cat(out)


# ---------------------------------------------------------------- metrics


def judge_outputs(judge, images: torch.Tensor):
    with torch.no_grad():
        x = images.clamp(-1, 1)
        features = judge.features(x)
        predicted = judge.fc2(features).argmax(1)
    return features.double().numpy(), predicted.numpy()


def _pairwise(a, b):
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(d, 0))


def _kth_radius(x, k):
    d = _pairwise(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


class Real:
    def __init__(self, features):
        self.features = features
        self.radii = _kth_radius(features, KNN_K)
        self.mu = features.mean(0)
        cov = np.cov(features, rowvar=False)
        w, v = np.linalg.eigh(cov)
        self.cov_sqrt = (v * np.sqrt(np.maximum(w, 0))) @ v.T
        self.cov_trace = np.trace(cov)


class Generated:
    """Per-sample quantities of one row, from which any bootstrap resample's metrics follow."""

    def __init__(self, real: Real, images: torch.Tensor, labels: np.ndarray, judge):
        features, predicted = judge_outputs(judge, images)
        self.features = features
        self.correct = (predicted == labels).astype(np.float64)
        self.saturated = (images.abs() > 1.0 + SATURATION_MARGIN).float().mean(dim=(1, 2, 3)).double().numpy()
        d = _pairwise(features, real.features)  # (n, real)
        self.in_real = (d <= real.radii[None, :]).any(1).astype(np.float64)
        self.covers = (d.T <= _kth_radius(features, KNN_K)[None, :])  # (real, n)

    def metrics(self, real: Real, idx=None) -> dict:
        idx = np.arange(len(self.correct)) if idx is None else idx
        f = self.features[idx]
        mu = f.mean(0)
        cov = np.cov(f, rowvar=False)
        inner = np.linalg.eigvalsh(real.cov_sqrt @ cov @ real.cov_sqrt)
        fid = float(((mu - real.mu) ** 2).sum() + np.trace(cov) + real.cov_trace - 2 * np.sqrt(np.maximum(inner, 0)).sum())
        return {
            "accuracy": float(self.correct[idx].mean()),
            "precision": float(self.in_real[idx].mean()),
            "recall": float(self.covers[:, idx].any(1).mean()),
            "fid": fid,
            "saturation": float(self.saturated[idx].mean()),
        }


def frontier_gap(point: dict, curve: list[dict]) -> float:
    """precision minus CFG's curve at the point's recall (linear between CFG rows, flat beyond them)."""
    pts = sorted((c["recall"], c["precision"]) for c in curve)
    return point["precision"] - float(np.interp(point["recall"], [p[0] for p in pts], [p[1] for p in pts]))


def evaluate(results: dict, real: Real, rows: list[Row], n_boot: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    n = len(next(iter(results.values())).correct)
    full = {key: gen.metrics(real) for key, gen in results.items()}
    boots = {key: [] for key in results}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        for key, gen in results.items():
            boots[key].append(gen.metrics(real, idx))
    cfg_keys = [r.key for r in rows if r.method == "cfg" and r.key in results]
    records = []
    for row in rows:
        if row.key not in results:
            continue
        base = row.baseline if row.baseline in results else None
        metrics = {}
        for name in METRICS:
            value = full[row.key][name]
            if base is None:
                metrics[name] = {"value": value, "delta": 0.0, "ci": [0.0, 0.0]}
                continue
            deltas = np.array([b[name] - bb[name] for b, bb in zip(boots[row.key], boots[base])])
            metrics[name] = {"value": value, "delta": value - full[base][name],
                             "ci": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))]}
        if row.method == "cfg" or len(cfg_keys) < 2:
            placement, gap, gap_ci = "baseline", None, None
        else:
            gaps = np.array([frontier_gap(boots[row.key][i], [boots[k][i] for k in cfg_keys]) for i in range(n_boot)])
            gap = frontier_gap(full[row.key], [full[k] for k in cfg_keys])
            gap_ci = [float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))]
            placement = "above" if gap_ci[0] > 0 else "below" if gap_ci[1] < 0 else "on"
        records.append({
            "row": row.key, "method": row.method, "cfg": row.cfg, "scale": row.scale, "layers": row.layers,
            "baseline": row.baseline, "metrics": metrics, "vs_cfg_frontier": placement,
            "frontier_gap": None if gap is None else {"value": gap, "ci": gap_ci},
        })
    return records


# ---------------------------------------------------------------- output


def print_table(records: list[dict], out=sys.stdout) -> None:
    def cell(m, name, digits):
        v = m[name]
        return f"{v['value']:.{digits}f} ({v['delta']:+.{digits}f} [{v['ci'][0]:+.{digits}f},{v['ci'][1]:+.{digits}f}])"

    header = f"{'row':<16} {'base':<5} {'accuracy':<30} {'precision':<30} {'recall':<30} {'fid':<30} {'saturation':<30} frontier"
    print(header, file=out)
    for r in records:
        m = r["metrics"]
        print(f"{r['row']:<16} {r['baseline'] or '-':<5} {cell(m, 'accuracy', 3):<30} {cell(m, 'precision', 3):<30} "
              f"{cell(m, 'recall', 3):<30} {cell(m, 'fid', 2):<30} {cell(m, 'saturation', 4):<30} {r['vs_cfg_frontier']}",
              file=out)


def markdown_table(records: list[dict]) -> str:
    """The records as a Markdown table: value, and delta [95 % CI] against the baseline row."""
    digits = {"accuracy": 3, "precision": 3, "recall": 3, "fid": 1, "saturation": 4}
    lines = ["| row | cfg | vs | " + " | ".join(METRICS) + " | vs CFG curve |",
             "|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in records:
        cells = []
        for name in METRICS:
            m, d = r["metrics"][name], digits[name]
            cell = f"{m['value']:.{d}f}"
            if r["baseline"]:
                cell += f" ({m['delta']:+.{d}f} [{m['ci'][0]:+.{d}f}, {m['ci'][1]:+.{d}f}])"
            cells.append(cell)
        lines.append(f"| `{r['row']}` | {r['cfg']:g} | {r['baseline'] or '-'} | " + " | ".join(cells)
                     + f" | {r['vs_cfg_frontier']} |")
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> None:
    """CFG's precision-recall curve with every guidance row: all rows (left), the region of the curve (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6), dpi=100)
    cfg = sorted((r for r in records if r["method"] == "cfg"), key=lambda r: r["metrics"]["recall"]["value"])
    markers = {"pag": ("tab:blue", "s"), "seg": ("tab:green", "^"), "sag": ("tab:red", "D"), "sag+pag": ("tab:purple", "P")}
    cx = [r["metrics"]["recall"]["value"] for r in cfg]
    cy = [r["metrics"]["precision"]["value"] for r in cfg]
    for ax, zoom in zip(axes, (False, True)):
        ax.plot(cx, cy, "k-o", label="CFG 1 - 3")
        for r, x, y in zip(cfg, cx, cy):
            ax.annotate(f"cfg {r['cfg']:g}", (x, y), textcoords="offset points", xytext=(5, -11), fontsize=8)
        for r in records:
            if r["method"] == "cfg":
                continue
            color, marker = markers.get(r["method"], ("gray", "x"))
            x, y = r["metrics"]["recall"]["value"], r["metrics"]["precision"]["value"]
            if zoom and not (min(cx) - 0.1 <= x <= max(cx) + 0.1 and y >= min(cy) - 0.1):
                continue
            ax.scatter([x], [y], color=color, marker=marker, s=40, zorder=3)
            ax.annotate(r["row"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=color)
        if zoom:
            ax.set_xlim(min(cx) - 0.1, max(cx) + 0.1)
            ax.set_ylim(min(cy) - 0.1, max(cy) + 0.05)
            ax.set_title("around CFG's curve", fontsize=10)
        else:
            for method, (color, marker) in markers.items():
                ax.scatter([], [], color=color, marker=marker, label=method.upper())
            ax.legend(loc="lower left", fontsize=8)
            ax.set_title(title, fontsize=10)
        ax.set_xlabel("recall (k-NN, judge features): diversity")
        ax.set_ylabel("precision (k-NN, judge features): fidelity")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def save_grid(samples: dict, keys: list[str], path: Path, per_class: int = 6, zoom: int = 3) -> None:
    """One panel per row key, side by side: 10 rows (digits 0-9) of ``per_class`` samples each."""
    from PIL import Image, ImageDraw

    size = qm.RESOLUTION * zoom
    gap = 2
    panel_w = per_class * (size + gap)
    width = len(keys) * (panel_w + 12)
    height = 16 + qm.NUM_CLASSES * (size + gap)
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    for p, key in enumerate(keys):
        x0 = p * (panel_w + 12)
        draw.text((x0, 2), key, fill=0)
        images = samples[key]
        for digit in range(qm.NUM_CLASSES):
            for j in range(per_class):
                i = digit + qm.NUM_CLASSES * j
                if i >= len(images):
                    continue
                pixels = ((images[i, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
                tile = Image.fromarray(255 - pixels, "L").resize((size, size), Image.NEAREST)
                canvas.paste(tile, (x0 + j * (size + gap), 16 + digit * (size + gap)))
    canvas.save(path)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="samples per row (default 500)")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps (default 10)")
    parser.add_argument("--noise-seed", type=int, default=0, help="changes every noise (sampling and bootstrap)")
    parser.add_argument("--bootstrap", type=int, default=300, help="bootstrap resamples (default 300)")
    parser.add_argument("--rows", nargs="+", choices=ROW_KEYS, help="only these rows (baselines are added)")
    parser.add_argument("--chunk", type=int, default=500, help="samples per sampler call")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", type=Path, help="write the records here")
    parser.add_argument("--plot", type=Path, help="PNG of CFG's precision-recall curve with every guidance row")
    parser.add_argument("--grid", type=Path, help="PNG of samples: the baseline and --grid-row side by side")
    parser.add_argument("--grid-row", nargs="+", default=[], help="row keys to show beside cfg1 in --grid")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--no-hash-check", action="store_true", help="use weights whose sha256 is not recorded")
    options = parser.parse_args(argv)

    torch.set_num_threads(options.threads)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    if not options.no_hash_check:
        recorded = qm.recorded_hashes()
        for path in (qm.UNET_PATH, qm.JUDGE_PATH):
            if qm.sha256(path) != recorded.get(path.name):
                sys.exit(f"{path} does not match its sha256 in {qm.HASHES_PATH}")

    wanted = set(options.rows or ROW_KEYS)
    for row in ROWS:
        if row.key in wanted and row.baseline:
            wanted.add(row.baseline)
    if options.rows and any(ROWS[i].method != "cfg" for i, r in enumerate(ROWS) if r.key in wanted):
        wanted.update(r.key for r in ROWS if r.method == "cfg")  # the frontier needs CFG's curve
    rows = [r for r in ROWS if r.key in wanted]

    start = time.time()
    model, tokens = qm.load_unet()
    judge = qm.load_judge()
    nodes_by_id = node_classes()
    real_images, _ = qm.load_digits_images()
    real = Real(judge_outputs(judge, real_images)[0])
    labels = (torch.arange(options.n) % qm.NUM_CLASSES).numpy()
    print(f"digits UNet ({sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e6:.2f} M parameters), "
          f"N={options.n} per row, {SAMPLER}/{SCHEDULER} {options.steps} steps, noise seed {options.noise_seed}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)
    results, samples = {}, {}
    for row in rows:
        t0 = time.time()
        images = sample_row(model, tokens, row, options.n, options.steps, options.noise_seed, nodes_by_id, options.chunk)
        samples[row.key] = images
        results[row.key] = Generated(real, images, labels, judge)
        print(f"  {row.key:<16} sampled in {time.time() - t0:5.1f} s", flush=True)
    records = evaluate(results, real, rows, options.bootstrap, seed=10007 + options.noise_seed)
    print()
    print_table(records)
    print(f"\ntotal {time.time() - start:.0f} s")
    if options.json:
        options.json.write_text(json.dumps(records, indent=1), encoding="utf-8")
    if options.markdown:
        options.markdown.write_text(markdown_table(records), encoding="utf-8")
    if options.plot:
        plot(records, options.plot, f"digits UNet, N={options.n}, {options.steps} DDIM steps, noise seed {options.noise_seed}")
    if options.grid:
        save_grid(samples, ["cfg1", *[k for k in options.grid_row if k in samples]], options.grid)
    return records


if __name__ == "__main__":
    main()
