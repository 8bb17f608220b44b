"""The example workflows (``example_workflows/*.json``) as the tests use them: which exist, which run on
a real stand-in of their architecture, the server they run on, and the small sizes they run at.

    with example_server_running(work_dir) as server:
        prompt = at_test_size(ui_to_api(load_example("sd15_sag"), server.object_info()))
        entry = server.require_success(server.run_prompt(prompt))
"""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from .browser import write_server_settings
from .example_models import write_example_input_images, write_example_model_folder
from .server import REPO, comfy_server_running

EXAMPLES_DIR = REPO / "example_workflows"
COMPAT_DIR = REPO / "tests" / "workflow_compat"
PYPROJECT = REPO / "pyproject.toml"
OUR_NODE_PREFIX = "AG_"
CORE_CNR_ID = "comfy-core"

# Examples whose every model has a stand-in of the same architecture family (see example_models.py):
# these execute end to end. The others (SDXL, SD3, Flux) are validated by the server; what then runs is
# an SD1.5-layout file under their model names, which shows nothing about their own architecture.
EXECUTED_EXAMPLES = {
    "sd15_sag", "sd15_pag_unconditional_cfg1", "sd15_sag_pag_chained",
    "sd15_controlnet_canny_empty_prompt_pag", "sd15_inpainting_pag", "sd15_sag_mask_preview",
}
# The example the browser test queues from the UI.
UI_QUEUED_EXAMPLE = "sd15_pag_unconditional_cfg1"

# Values changed before a test run so that a graph made for 512-1024 px and 20-30 steps runs in
# seconds on a CPU with random tiny models. Only core nodes' sizes and step counts; our nodes' inputs
# are never changed.
TEST_SIZE = 64
TEST_STEPS = 2
TEST_SIZE_INPUTS = {
    "EmptyLatentImage": {"width": TEST_SIZE, "height": TEST_SIZE, "batch_size": 1},
    "EmptySD3LatentImage": {"width": TEST_SIZE, "height": TEST_SIZE, "batch_size": 1},
    "EmptyHunyuanLatentVideo": {"width": TEST_SIZE, "height": TEST_SIZE, "length": 1, "batch_size": 1},
    "EmptyMochiLatentVideo": {"width": TEST_SIZE, "height": TEST_SIZE, "length": 7, "batch_size": 1},
    "KSampler": {"steps": TEST_STEPS},
    "KSamplerAdvanced": {"steps": TEST_STEPS},
    "AG_SAGMaskPreview": {"steps": TEST_STEPS},
}


def pack_metadata() -> dict:
    """``name`` and ``version`` from pyproject.toml's [project] table (the registry's cnr_id and ver)."""
    text = PYPROJECT.read_text(encoding="utf-8")
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
    return {key: re.search(rf'^{key}\s*=\s*"([^"]+)"', project, re.M).group(1) for key in ("name", "version")}


def example_names() -> list[str]:
    return sorted(path.stem for path in EXAMPLES_DIR.glob("*.json"))


def load_example(name: str) -> dict:
    return json.loads((EXAMPLES_DIR / f"{name}.json").read_text(encoding="utf-8"))


def compat_sets() -> list[Path]:
    """Frozen copies of the examples as released (``tests/workflow_compat/<version>/``)."""
    return sorted(path for path in COMPAT_DIR.glob("*") if path.is_dir())


def at_test_size(prompt: dict) -> dict:
    """The prompt with TEST_SIZE_INPUTS applied to literal values (links are left alone)."""
    resized = json.loads(json.dumps(prompt))
    for entry in resized.values():
        for name, value in TEST_SIZE_INPUTS.get(entry["class_type"], {}).items():
            if name in entry["inputs"] and not isinstance(entry["inputs"][name], list):
                entry["inputs"][name] = value
        if entry["class_type"] == "AG_SAGMaskPreview" and isinstance(entry["inputs"].get("step"), int):
            entry["inputs"]["step"] = min(entry["inputs"]["step"], TEST_STEPS - 1)
    return resized


@contextlib.contextmanager
def example_server_running(work_dir: Path, frontend=None):
    """The real ComfyUI server with the pack, the example models' stand-ins, their input images, and
    user settings for the browser (no first-run template browser); ``frontend`` (a
    ``support.frontends.Frontend``) serves another frontend release than the host's."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_server_settings(work_dir / "user")
    write_example_input_images(work_dir / "input")
    config = write_example_model_folder(work_dir / "example_models")
    extra_args = ["--extra-model-paths-config", str(config), *(frontend.server_args() if frontend else [])]
    with comfy_server_running(work_dir, extra_args=extra_args) as server:
        yield server
