"""Opt-in access to a real ComfyUI checkout for tests (``COMFYUI_DIR``); nothing of ComfyUI is stored here.

Run the opt-in tests with a Python that has ComfyUI's requirements (torch CPU is enough for sampling):

    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfyui_real.py
    COMFYUI_DIR=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest -q tests/test_comfyui_server.py

Without ``COMFYUI_DIR`` these tests skip with that reason (CI cannot install ComfyUI).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST_PACK = Path(__file__).resolve().parent / "comfyui_test_pack"
STUBS = Path(__file__).resolve().parent / "comfyui_stubs"
ENV = "COMFYUI_DIR"
SKIP_REASON = (f"opt-in: set {ENV} to a ComfyUI checkout and run with a Python that has its requirements "
               "(CI cannot install ComfyUI)")


def comfyui_dir() -> Path | None:
    """The checkout named by ``COMFYUI_DIR`` (must contain ``comfy/samplers.py``), or None if unset.

    Raises FileNotFoundError if the variable is set but does not point to a ComfyUI checkout.
    """
    value = os.environ.get(ENV)
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not (path / "comfy" / "samplers.py").is_file():
        raise FileNotFoundError(f"{ENV}={value} is not a ComfyUI checkout (no comfy/samplers.py)")
    return path


def commit(path: Path) -> str:
    """The checkout's git commit if it is a work tree, else the ``comfyui_version.py`` version."""
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").exists() else ""
        return text.strip().splitlines()[-1] if text else "unknown"


def torchvision_works() -> bool:
    """True if ``import torchvision`` succeeds (a wheel built for another torch raises on import)."""
    return subprocess.run([sys.executable, "-c", "import torchvision.transforms"], capture_output=True).returncode == 0


def import_comfy(path: Path):
    """Import ComfyUI's sampling stack (``comfy``, ``nodes``, ``latent_preview``, custom-sampler nodes) from
    ``path`` on the CPU; returns the ``comfy`` package.

    Puts the checkout first on ``sys.path`` (its ``nodes.py`` must win over this repository's ``nodes/``),
    uses the import-only torchvision stand-in when the installed torchvision is unusable, and sets
    ``--cpu`` before ``comfy.model_management`` is imported (hosts.md §4.2).  If the import fails (a Python
    without ComfyUI's requirements), ``sys.path`` and ``sys.modules`` are restored before the error is raised,
    so the rest of a test session is unaffected.
    """
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    try:
        if str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))
        if not torchvision_works() and str(STUBS) not in sys.path:
            sys.path.insert(1, str(STUBS))
        from comfy.cli_args import args
        args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.sample  # noqa: F401
        import comfy.samplers  # noqa: F401
        import comfy.utils  # noqa: F401
        import comfy_extras.nodes_custom_sampler  # noqa: F401
        import latent_preview  # noqa: F401
        import nodes  # noqa: F401  (ComfyUI's nodes.py: KSampler, common_ksampler)
        import comfy
        return comfy
    except BaseException:
        sys.path[:] = saved_path
        for name in set(sys.modules) - saved_modules:
            del sys.modules[name]
        raise


def server_env(path: Path) -> dict:
    """Environment for ``python main.py`` of the checkout (torchvision stand-in when needed)."""
    env = dict(os.environ)
    if not torchvision_works():
        env["PYTHONPATH"] = os.pathsep.join([str(STUBS)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env
