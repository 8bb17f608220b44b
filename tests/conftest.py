"""Test set-up: the real ComfyUI host in-process, on the CPU, and the pack importable as a package.

The host is ``$COMFYUI_PATH`` when set (``scripts/host.py test`` sets it), else the embedded default
that ``scripts/host.py setup`` provisions under ``.cache/comfyui``.
"""
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_MODULE = "attention_guidance"


def _host_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui")
    if not (path / "comfy").is_dir():
        raise RuntimeError(
            f"No ComfyUI host at {path}. Run `python3 scripts/host.py setup` (or set COMFYUI_PATH "
            "to a ComfyUI checkout) before running the tests."
        )
    return path


def _load_pack():
    """Import the repository as a package, as ComfyUI does, under a fixed name for the tests."""
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    spec.loader.exec_module(module)
    return module


HOST = _host_path()
if str(HOST) not in sys.path:
    sys.path.insert(0, str(HOST))
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from comfy.cli_args import args as _comfy_args  # noqa: E402

# the tests run on the CPU; tests/benchmarks/bench_guidance.py sets AG_HOST_DEVICE=cuda where there is a GPU
_comfy_args.cpu = os.environ.get("AG_HOST_DEVICE", "cpu") == "cpu"
_load_pack()


import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "without_autograd: run the module's tests under torch.no_grad(), as ComfyUI "
                            "runs a prompt")


@pytest.fixture(autouse=True)
def _without_autograd_where_marked(request):
    """Modules marked ``without_autograd`` (``pytestmark``) run as ComfyUI runs a prompt, keeping no autograd graph:
    their model stacks are long (up to 54 blocks), and with autograd on what the host and the tests keep between
    tests adds up to gigabytes in the one process of the whole suite."""
    if request.node.get_closest_marker("without_autograd") is None:
        yield
        return
    with torch.no_grad():
        yield
