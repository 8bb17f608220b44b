"""The real ComfyUI server, started as a subprocess for end-to-end tests.

    with comfy_server_running(work_dir) as server:
        prompt_id = server.queue_prompt(api_graph)
        entry = server.wait_for_history(prompt_id)
        png = server.fetch_image(server.output_images(entry)[0])

or, in a test module, ``from support.server import comfy_server`` and use the ``comfy_server`` fixture.

The server is ``<sys.executable> <COMFYUI_PATH>/main.py --cpu`` on a free port of 127.0.0.1, with
output/input/temp/user folders and the database under the work folder, so the host's own
folders are left alone. The pack is loaded as ComfyUI loads any pack, from a ``custom_nodes`` folder
named in an ``--extra-model-paths-config`` YAML (a link to this repository, unless the host's own
``custom_nodes`` already holds it); other custom nodes are not loaded. Checkpoints come from
``.cache/models/checkpoints``, where the tiny random SD1.5 checkpoint is written once.
The server always stops at the end (its whole process group is killed).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK_NAME = "attention_guidance"
CHECKPOINTS = REPO / ".cache" / "models" / "checkpoints"
STARTUP_TIMEOUT_S = 240.0
PROMPT_TIMEOUT_S = 300.0
LOG_TAIL_CHARS = 6000


def comfyui_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH") or REPO / ".cache" / "comfyui").resolve()
    if not (path / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI main.py in {path}; run `python3 scripts/host.py setup` or set COMFYUI_PATH.")
    return path


def tiny_checkpoint_module():
    """scripts/tiny_checkpoint.py as a module (scripts/ is not a package)."""
    name = "ag_tiny_checkpoint"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "tiny_checkpoint.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def tiny_checkpoint() -> Path:
    """The tiny random SD1.5 checkpoint in .cache/models/checkpoints, written on first use."""
    module = tiny_checkpoint_module()
    return module.write_tiny_sd15_checkpoint(CHECKPOINTS / module.DEFAULT_PATH.name)


def _pack_folder_in(host: Path) -> Path | None:
    folder = host / "custom_nodes"
    if folder.is_dir():
        for entry in folder.iterdir():
            with contextlib.suppress(OSError):
                if entry.resolve() == REPO:
                    return entry
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServerError(AssertionError):
    pass


class ComfyServer:
    """HTTP helpers around one running server."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, output_dir: Path):
        self.process = process
        self.url = url
        self.log_path = log_path
        self.output_dir = output_dir
        self.client_id = uuid.uuid4().hex

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            return f"<no server log: {error}>"
        return text[-chars:]

    def _fail(self, message: str) -> ComfyServerError:
        return ComfyServerError(f"{message}\n--- ComfyUI server log ({self.log_path}), tail ---\n{self.log_tail()}")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise self._fail(f"the ComfyUI server exited with code {self.process.returncode}")

    def request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> bytes:
        body = None if data is None else json.dumps(data).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=body,
                                         headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def get_json(self, path: str, timeout: float = 30.0):
        return json.loads(self.request(path, timeout=timeout))

    def object_info(self, node_class: str | None = None) -> dict:
        path = "/object_info" if node_class is None else f"/object_info/{urllib.parse.quote(node_class)}"
        return self.get_json(path)

    def queue_prompt(self, prompt: dict) -> str:
        """POST an API-format graph; returns its prompt id. A graph the server rejects raises with its node_errors."""
        self._check_alive()
        try:
            answer = json.loads(self.request("/prompt", {"prompt": prompt, "client_id": self.client_id}))
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace")
            raise self._fail(f"POST /prompt was rejected with HTTP {error.code}: {detail}") from None
        if answer.get("node_errors"):
            raise self._fail(f"POST /prompt reported node errors: {json.dumps(answer['node_errors'])}")
        return answer["prompt_id"]

    def wait_for_history(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        """The /history entry of a finished prompt (succeeded or failed), polled for at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.25)
        queue = self.get_json("/queue")
        raise self._fail(f"prompt {prompt_id} did not finish within {timeout:.0f} s; /queue: {json.dumps(queue)[:2000]}")

    def run_prompt(self, prompt: dict, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        return self.wait_for_history(self.queue_prompt(prompt), timeout)

    @staticmethod
    def execution_error(entry: dict) -> dict | None:
        """The ``execution_error`` message of a failed prompt (node_id, node_type, exception_message, ...)."""
        for event, data in entry.get("status", {}).get("messages", []):
            if event == "execution_error":
                return data
        return None

    def require_success(self, entry: dict) -> dict:
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            error = self.execution_error(entry)
            summary = json.dumps({k: error.get(k) for k in ("node_id", "node_type", "exception_type", "exception_message")}) if error else json.dumps(status)
            traceback = "".join(error.get("traceback", [])) if error else ""
            raise self._fail(f"prompt failed: {summary}\n{traceback}")
        return entry

    @staticmethod
    def output_images(entry: dict) -> list[dict]:
        """Image records (filename, subfolder, type) of every output node, in node id order."""
        images = []
        for node_id in sorted(entry.get("outputs", {}), key=str):
            images += entry["outputs"][node_id].get("images", [])
        return images

    def fetch_image(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        return self.request(f"/view?{query}")


def write_extra_model_paths(work_dir: Path, host: Path) -> Path:
    """YAML for --extra-model-paths-config: the pack's custom_nodes folder (a link) and the checkpoints."""
    lines = ["attention_guidance_test:", f"    checkpoints: {json.dumps(str(CHECKPOINTS))}"]
    if _pack_folder_in(host) is None:
        custom_nodes = work_dir / "custom_nodes"
        custom_nodes.mkdir(exist_ok=True)
        link = custom_nodes / PACK_NAME
        if not link.is_symlink():
            link.symlink_to(REPO, target_is_directory=True)
        lines.append(f"    custom_nodes: {json.dumps(str(custom_nodes))}")
    path = work_dir / "extra_model_paths.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
            return


@contextlib.contextmanager
def comfy_server_running(work_dir: Path, extra_args=(), startup_timeout: float = STARTUP_TIMEOUT_S):
    """Start ComfyUI with the pack, wait until /object_info answers, yield a ComfyServer, always stop it."""
    host = comfyui_path()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tiny_checkpoint()
    config = write_extra_model_paths(work_dir, host)
    folders = {name: work_dir / name for name in ("output", "input", "temp", "user")}
    for folder in folders.values():
        folder.mkdir(exist_ok=True)
    in_host = _pack_folder_in(host)
    port = _free_port()
    command = [
        sys.executable, str(host / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--extra-model-paths-config", str(config),
        "--output-directory", str(folders["output"]), "--input-directory", str(folders["input"]),
        "--temp-directory", str(folders["temp"]), "--user-directory", str(folders["user"]),
        "--database-url", f"sqlite:///{work_dir / 'comfyui.db'}",
        "--disable-all-custom-nodes", "--whitelist-custom-nodes", in_host.name if in_host else PACK_NAME,
        "--disable-api-nodes", "--disable-auto-launch", *extra_args,
    ]
    log_path = work_dir / "comfyui.log"
    with open(log_path, "wb") as log:
        log.write(("$ " + " ".join(command) + "\n").encode("utf-8"))
        log.flush()
        process = subprocess.Popen(command, cwd=host, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = ComfyServer(process, f"http://127.0.0.1:{port}", log_path, folders["output"])
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            server._check_alive()
            try:
                server.request("/object_info", timeout=10)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise server._fail(f"the ComfyUI server did not answer /object_info within {startup_timeout:.0f} s") from None
                time.sleep(0.5)
        yield server
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    with comfy_server_running(tmp_path_factory.mktemp("comfy_server")) as server:
        yield server
