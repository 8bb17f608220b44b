"""Our per-step work never makes the CPU wait for the device.

On a GPU, reading a tensor's value on the host (``.item()``, ``float()``, ``int()``, ``bool()``,
``.tolist()``, ``.cpu()``) or making a tensor from Python numbers (``torch.tensor``: a copy from the
host) waits until every kernel queued before it has run. These tests sample in the real host with a
torch function mode that sees every such call and records those made by the pack's own code (or by a
host helper the pack calls directly, such as ``percent_to_sigma``), on the CPU, where the calls are the
same as on a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import attention_guidance
from attention_guidance.nodes.pag import PerturbedAttentionGuidance
from attention_guidance.nodes.sag import SelfAttentionGuidance
from support.dit_models import build_dit, empty_dit_latent, make_dit_conditioning
from support.models import build_model, make_conditioning, sample

# calls that wait for the device when the tensor lives there, or copy Python numbers from the host
WAITING = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy", "tensor", "as_tensor"}
PACK = Path(attention_guidance.__file__).resolve().parent
OUR_CODE = tuple(str(PACK / folder) for folder in ("nodes", "guidance_core", "sag_core", "pag_core"))
TORCH = str(Path(torch.__file__).resolve().parent)


def _is_ours(filename: str) -> bool:
    return str(Path(filename).resolve()).startswith(OUR_CODE)


class WaitingCalls(TorchFunctionMode):
    """Records ``(function, our file:line, the function that made the call)`` of each waiting call made by
    our code."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in WAITING:
            callers = [frame for frame in self._callers(sys._getframe(1)) if not frame.f_code.co_filename.startswith(TORCH)]
            # ours directly, or through a host helper ours called (callers[1])
            for frame in callers[:2]:
                if _is_ours(frame.f_code.co_filename):
                    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
                    self.calls.append((name, where, callers[0].f_code.co_name))
                    break
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _callers(frame):
        while frame is not None:
            yield frame
            frame = frame.f_back


def pag(model, layers="mid", **window):
    args = dict(scale=3.0, layers=layers, adaptive_scale=0.0, start_percent=0.0, end_percent=1.0, rescale=0.0)
    return PerturbedAttentionGuidance.execute(model, **dict(args, **window)).result[0]


def sag(model, layer="m0.0", **window):
    args = dict(scale=0.75, blur_sigma=1.0, threshold=1.0, kernel_size=9, layer=layer, start_percent=0.0,
                end_percent=1.0)
    return SelfAttentionGuidance.execute(model, **dict(args, **window)).result[0]


def waiting_calls(patched, positive, negative, latent, cfg, steps):
    mode = WaitingCalls()
    with mode:
        sample(patched, positive, negative, latent, steps=steps, cfg=cfg, seed=3)
    return mode.calls


@pytest.fixture(scope="module")
def unet():
    return build_model("sd15", seed=0)


@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("nodes", ["pag", "sag", "sag+pag"])
def test_unet_steps_never_wait_for_the_device(unet, nodes, cfg):
    patched = unet
    for node in nodes.split("+"):
        patched = {"pag": pag, "sag": sag}[node](patched)
    positive, negative = make_conditioning("sd15", batch=2, seed=1)
    calls = waiting_calls(patched, positive, negative, torch.zeros(2, 4, 8, 8), cfg, steps=3)
    assert calls == []


def test_a_window_reads_the_sigma_once_per_step_per_node(unet):
    # a partial window (and PAG's adaptive scale) needs the sigma's value: once per step, before the
    # forward is launched, and never again in the post-CFG function
    patched = pag(sag(unet, end_percent=0.7), start_percent=0.1, end_percent=0.9, adaptive_scale=0.001)
    positive, negative = make_conditioning("sd15", batch=1, seed=1)
    steps = 4
    calls = waiting_calls(patched, positive, negative, torch.zeros(1, 4, 8, 8), 4.0, steps=steps)
    per_step = [call for call in calls if "percent_to_sigma" not in call[2]]
    # per step: each node's sigma and PAG's adaptive timestep
    assert len(per_step) <= steps * 3, per_step
    # per run: each window end (PAG's two, SAG's end) through the host's percent_to_sigma, which makes a
    # tensor from a Python number and reads its result (ModelSamplingDiscrete, 0.3.75)
    assert len(calls) - len(per_step) <= 3 * 2, calls


def test_dit_steps_never_wait_for_the_device():
    model = build_dit("flux", seed=0)
    patched = pag(sag(model, layer="double.1"), layers="single.0")
    positive, negative = make_dit_conditioning("flux", batch=1, seed=1)
    latent = empty_dit_latent(model, (1, 16, 8, 8))
    for cfg in (1.0, 3.0):
        assert waiting_calls(patched, positive, negative, latent, cfg, steps=3) == []
