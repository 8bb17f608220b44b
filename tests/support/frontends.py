"""The frontends the browser tests run: the host's own ``comfyui-frontend-package`` (1.32.9 beside the
embedded 0.3.75) and each release in scripts/host.py's ``TEST_FRONTENDS`` (installed by ``setup`` into
``.cache/frontends/<version>``, served with ``--front-end-root``), the newer ones with Nodes 2.0 (the
frontend's Vue node rendering, setting ``Comfy.VueNodes.Enabled``) off and on.

    with FrontendServers(work_dir) as servers:
        server = servers.get(Frontend("1.58.1", vue_nodes=True))
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from .server import REPO

VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"


def host_script():
    """scripts/host.py as a module (standard library only; its main() runs only as a script)."""
    name = "ag_host_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "host.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@dataclass(frozen=True)
class Frontend:
    version: str | None  # None: the comfyui-frontend-package of the host's environment
    vue_nodes: bool = False

    @property
    def served_version(self) -> str:
        return self.version or metadata.version("comfyui_frontend_package")

    def server_args(self) -> list[str]:
        """main.py's arguments that serve this frontend."""
        if self.version is None:
            return []
        root = host_script().frontend_root(self.version)
        if not (root / "index.html").is_file():
            raise RuntimeError(f"comfyui-frontend-package {self.version} is not installed in {root.parent.parent}; "
                               "run `python3 scripts/host.py setup` (it installs the frontends the browser tests use).")
        return ["--front-end-root", str(root)]

    def __str__(self) -> str:
        return f"frontend-{self.served_version}" + ("-nodes2" if self.vue_nodes else "")


def frontends_under_test() -> list[Frontend]:
    """The host's frontend as it is, then each newer release with Nodes 2.0 off and on."""
    newer = [Frontend(version, vue) for version in host_script().TEST_FRONTENDS for vue in (False, True)]
    return [Frontend(None), *newer]


class FrontendServers:
    """One example server per frontend release, started on first use; asking for another release stops
    the previous one (tests are grouped by frontend, so each starts once)."""

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.version = None
        self.server = None
        self.stack = contextlib.ExitStack()

    def get(self, frontend: Frontend):
        from .examples import example_server_running

        if self.server is None or self.version != frontend.version:
            self.stack.close()
            work = self.work_dir / (frontend.version or "bundled")
            self.server = self.stack.enter_context(example_server_running(work, frontend=frontend))
            self.version = frontend.version
        # the setting is the user's, kept by the server; the page reads it when it opens
        self.server.request(f"/settings/{VUE_NODES_SETTING}", data=frontend.vue_nodes)
        return self.server

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stack.close()
