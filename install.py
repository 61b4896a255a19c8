"""ADO's installer: adds what this Python environment lacks for ADO's runtime, and nothing else.

Run as ``python install.py`` by ComfyUI-Manager (after its line-by-line ``requirements.txt``, cwd = this
folder) and by AUTOMATIC1111/Forge on every start (``launch_utils.run_extension_installer``); it can also be
run by hand with the host's Python.  ``python install.py --dry-run`` prints the plan and changes nothing.

Rules (hosts.md §2.7, §5.1):
* torch is the host's: it is never installed, upgraded or replaced.  Without torch, ADO says so and
  installs nothing for it.
* ONNX Runtime (for ADO's small learned monitor/policy): installed only if no distribution provides the
  ``onnxruntime`` module yet; then ``onnxruntime-gpu`` if the host's torch is a CUDA 12+ build, else
  ``onnxruntime``.  An installed ``onnxruntime``, ``onnxruntime-gpu`` or other variant is never replaced
  (installing the CPU package over the GPU one breaks it: ComfyUI-WD14-Tagger#23).
* Nothing already installed changes: pip runs with a constraints file that pins every installed
  distribution to its current version, so a new package that would need an upgrade fails instead.
* Idempotent and quiet when nothing is missing (no pip call, no torch import): A1111 runs it on every start.
* Failures end with a one-paragraph message and exit status 2 (package registry unreachable) or 1 (any
  other failure), never a traceback.

pip's own settings apply (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, pip.conf, ...), and A1111's ``INDEX_URL``
is honoured as A1111's ``launch_utils.run_pip`` does.
"""
from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PREFIX = "[ADO install]"
#: Distributions known to provide the ``onnxruntime`` import package.
ONNXRUNTIME_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                     "onnxruntime-silicon", "onnxruntime-rocm", "onnxruntime-qnn", "ort-nightly", "ort-nightly-gpu")
#: pip output that means the package registry could not be reached.
UNREACHABLE = re.compile(r"NewConnectionError|Failed to establish a new connection|Max retries exceeded|"
                         r"Temporary failure in name resolution|Name or service not known|Network is unreachable|"
                         r"Connection refused|ConnectTimeout|ReadTimeout|timed out|ProxyError|SSLError|"
                         r"Could not fetch URL|No route to host", re.I)
NOT_FOUND = re.compile(r"No matching distribution found|Could not find a version that satisfies", re.I)
#: A version pip accepts in a constraint (PEP 440, as in the spec's appendix); others are left unpinned.
PEP440 = re.compile(r"v?(?:[0-9]+!)?[0-9]+(?:\.[0-9]+)*(?:[-_.]?(?:a|b|c|rc|alpha|beta|pre|preview)[-_.]?[0-9]*)?"
                    r"(?:-[0-9]+|[-_.]?(?:post|rev|r)[-_.]?[0-9]*)?(?:[-_.]?dev[-_.]?[0-9]*)?"
                    r"(?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?", re.I)


class InstallError(Exception):
    """A failure to report as one message; ``status`` is the exit status (2: registry unreachable)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def say(message: str) -> None:
    """Print one line of the installer's report (flushed: hosts interleave it with their own output)."""
    print(f"{PREFIX} {message}", flush=True)


def installed_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None if it is not installed."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def onnxruntime_providers() -> list[str]:
    """'name version' of every installed distribution that provides the ``onnxruntime`` module (empty if
    none; a module without a known distribution counts as 'onnxruntime (unknown distribution)')."""
    found = [f"{d} {v}" for d in ONNXRUNTIME_DISTS if (v := installed_version(d)) is not None]
    if not found:
        for dist in metadata.packages_distributions().get("onnxruntime", []):
            found.append(f"{dist} {installed_version(dist)}")
    if not found and importlib.util.find_spec("onnxruntime") is not None:
        found.append("onnxruntime (unknown distribution)")
    return found


def torch_build() -> tuple[str | None, str | None]:
    """(torch version, CUDA version of the build or None) of the installed torch, without importing it:
    read from the distribution metadata and ``torch/version.py``.  (None, None) if torch is absent."""
    version = installed_version("torch")
    spec = importlib.util.find_spec("torch")
    if version is None and spec is None:
        return None, None
    cuda = None
    if spec is not None and spec.submodule_search_locations:
        version_py = Path(list(spec.submodule_search_locations)[0]) / "version.py"
        try:
            text = version_py.read_text(encoding="utf-8")
        except OSError:
            text = ""
        m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([0-9][^'\"]*)['\"]", text, re.M)
        cuda = m.group(1) if m else None
        if version is None:
            m = re.search(r"^__version__\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
            version = m.group(1) if m else "unknown"
    return version, cuda


def onnxruntime_choice(cuda: str | None) -> tuple[str, str]:
    """(distribution to install, why) for a torch build with CUDA version ``cuda`` (None: CPU or absent)."""
    if cuda is None:
        return "onnxruntime", "no CUDA torch here"
    major = cuda.split(".")[0]
    if major.isdigit() and int(major) < 12:
        return "onnxruntime", (f"torch is built for CUDA {cuda}; onnxruntime-gpu from the package registry "
                               f"needs CUDA 12+")
    return "onnxruntime-gpu", f"torch is built for CUDA {cuda}"


def plan() -> list[tuple[str, str]]:
    """What to install: (pip requirement, reason) pairs; prints what is already present."""
    todo = []
    torch_version, cuda = torch_build()
    if torch_version is None:
        say("torch is not installed in this Python. ADO uses the host's torch and never installs it: "
            "install torch for your hardware first (ComfyUI, A1111 and Forge do this themselves).")
    else:
        say(f"torch {torch_version} ({'CUDA ' + cuda if cuda else 'no CUDA'}) present: left as it is")
    if importlib.util.find_spec("numpy") is None:
        todo.append(("numpy", "ADO's core needs numpy"))
    providers = onnxruntime_providers()
    if providers:
        say(f"ONNX Runtime present ({', '.join(providers)}): left as it is")
        names = {p.split()[0] for p in providers}
        if "onnxruntime" in names and len(names) > 1:
            say("note: the CPU package 'onnxruntime' is installed beside " + ", ".join(sorted(names - {"onnxruntime"}))
                + "; they share one module and the CPU build may hide the GPU one. ADO does not change this.")
    else:
        dist, why = onnxruntime_choice(cuda)
        todo.append((dist, f"ADO's quality monitor runs on ONNX Runtime; {why}"))
    return todo


def installed_constraints() -> str:
    """A pip constraints file pinning every installed distribution to its current version."""
    pins = {}
    for dist in metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) and PEP440.fullmatch(version):
            pins[re.sub(r"[-_.]+", "-", name).lower()] = f"{name}=={version}"
    return "\n".join(sorted(pins.values())) + "\n"


def pip_install(requirement: str) -> None:
    """``python -m pip install requirement`` in this Python, with every installed distribution pinned;
    raises InstallError with pip's last lines on failure (status 2 if the registry was unreachable)."""
    with tempfile.TemporaryDirectory(prefix="ado-install-") as tmp:
        constraints = Path(tmp) / "installed.txt"
        constraints.write_text(installed_constraints(), encoding="utf-8")
        cmd = [sys.executable, "-m", "pip", "install", "--prefer-binary", "--disable-pip-version-check",
               "--constraint", str(constraints), requirement]
        if os.environ.get("INDEX_URL"):
            cmd[4:4] = ["--index-url", os.environ["INDEX_URL"]]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout or ""
    if proc.returncode == 0:
        done = [line for line in out.splitlines() if line.startswith("Successfully installed")]
        say(done[-1] if done else f"{requirement}: already satisfied")
        return
    tail = "\n".join(out.strip().splitlines()[-6:])
    if "No module named pip" in out:
        raise InstallError(f"this Python ({sys.executable}) has no pip, so {requirement} cannot be installed "
                           f"from here; install it with the tool that manages this environment. Nothing was "
                           f"changed.")
    if UNREACHABLE.search(out):
        raise InstallError(f"could not install {requirement}: the package registry could not be reached "
                           f"(offline, proxy or firewall?). Nothing was changed. ADO's sampler works without "
                           f"it; to finish later, run: {sys.executable} -m pip install {requirement}\n"
                           f"pip said:\n{tail}", status=2)
    if NOT_FOUND.search(out):
        raise InstallError(f"could not install {requirement}: pip found no build of it that fits this "
                           f"Python/platform and the installed packages without changing them (or, if it says "
                           f"'from versions: none', could not read the package registry). Nothing was changed."
                           f"\npip said:\n{tail}")
    raise InstallError(f"pip could not install {requirement} (exit status {proc.returncode}); nothing already "
                       f"installed was changed.\npip said:\n{tail}")


def main(argv: list[str] | None = None) -> int:
    """Install what is missing (or, with --dry-run, only print it); returns the exit status."""
    parser = argparse.ArgumentParser(description="Install what ADO needs into this Python environment.")
    parser.add_argument("--dry-run", action="store_true", help="print what would be installed; change nothing")
    args = parser.parse_args(argv)
    try:
        todo = plan()
        if not todo:
            say("nothing to install")
            return 0
        for requirement, why in todo:
            if args.dry_run:
                say(f"would install {requirement} ({why})")
                continue
            say(f"installing {requirement} ({why}); this can take a few minutes")
            pip_install(requirement)
        return 0
    except InstallError as e:
        say(f"FAILED: {e}")
        return e.status
    except Exception as e:  # a clear line instead of a traceback in the host's start-up log
        say(f"FAILED: unexpected {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
