"""``python3 scripts/host.py serve`` as a new user starts it: its start-up output has no traceback (the
host's messages about its audio nodes without torchaudio are replaced by one line saying why, every other
line passes), and ``--frontend VERSION`` serves that ``comfyui-frontend-package`` release.
"""
import asyncio
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import nodes
import pytest

from support.frontends import host_script
from support.server import REPO, _free_port, comfyui_path, tiny_checkpoint

STARTED = "To see the GUI go to"
START_TIMEOUT_S = 240.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """serve --frontend <newest tested> on a free port, with its folders in a temporary one: the output
    up to "To see the GUI go to", and the page it serves at /."""
    host = host_script()
    version = host.TEST_FRONTENDS[-1]
    work = tmp_path_factory.mktemp("serve")
    folders = {name: work / name for name in ("user", "output", "input", "temp")}
    for folder in folders.values():
        folder.mkdir()
    tiny_checkpoint()  # so that serve finds a checkpoint and does not write one
    port = _free_port()
    command = [sys.executable, str(REPO / "scripts" / "host.py"), "serve", "--frontend", version, "--",
               "--port", str(port), "--cpu", "--user-directory", str(folders["user"]),
               "--output-directory", str(folders["output"]), "--input-directory", str(folders["input"]),
               "--temp-directory", str(folders["temp"]), "--database-url", f"sqlite:///{work / 'comfyui.db'}"]
    environment = dict(os.environ, AG_PYTHON=sys.executable, COMFYUI_PATH=str(comfyui_path()))
    log_path = work / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while STARTED not in log_path.read_text(encoding="utf-8", errors="replace"):
            assert process.poll() is None, f"serve exited with {process.returncode}:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"serve did not start in {START_TIMEOUT_S:.0f} s:\n{log_path.read_text()}"
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
            page = response.read()
        yield {"output": log_path.read_text(encoding="utf-8", errors="replace"), "page": page, "version": version}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_serve_starts_without_a_traceback_and_says_once_why_audio_nodes_are_off(served):
    output = served["output"]
    assert "Traceback" not in output, output
    assert "IMPORT FAILED" not in output and "Please do a: pip install" not in output, output
    import_lines = [line for line in output.splitlines() if line.strip().endswith("/attention_guidance")]
    assert import_lines and "IMPORT FAILED" not in import_lines[0], output
    note = host_script().MissingTorchaudioFilter.NOTE.strip()
    expected_notes = 0 if importlib.util.find_spec("torchaudio") else 1
    assert output.count(note) == expected_notes, output


def test_serve_frontend_serves_that_release(served):
    index = host_script().frontend_root(served["version"]) / "index.html"
    assert served["page"] == index.read_bytes()
    assert f"--front-end-root {index.parent}" in served["output"]


def host_import_failure_log(tmp_path, caplog, module_name: str, source: str) -> list[str]:
    """What the host logs when a node file fails to import (nodes.load_custom_node), as lines."""
    path = tmp_path / f"{module_name}.py"
    path.write_text(source, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        assert asyncio.run(nodes.load_custom_node(str(path), module_parent="comfy_extras")) is False
    text = "".join(record.getMessage().rstrip("\n") + "\n" for record in caplog.records)
    return text.splitlines(keepends=True)


def filtered(lines: list[str]) -> str:
    log_filter = host_script().MissingTorchaudioFilter()
    return "".join(log_filter.feed(line) for line in lines) + log_filter.finish()


def test_the_log_filter_hides_only_the_missing_torchaudio(tmp_path, caplog):
    # the error the host's audio nodes raise without torchaudio (raised here whether it is installed or not)
    audio = host_import_failure_log(
        tmp_path, caplog, "ag_audio_nodes",
        "raise ModuleNotFoundError(\"No module named 'torchaudio'\", name='torchaudio')\n")
    other = host_import_failure_log(tmp_path, caplog, "ag_other_nodes", "import ag_module_that_is_not_installed\n")
    assert any(line.startswith("Traceback") for line in audio) and any(line.startswith("Traceback") for line in other)
    note = host_script().MissingTorchaudioFilter.NOTE
    assert filtered(audio) == note
    assert filtered(other) == "".join(other)
    assert filtered(audio + other + audio) == note + "".join(other)
