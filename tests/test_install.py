"""install.py in throwaway virtual environments.

One venv is created per test session and copied for each case (a copy of a venv works for
``python -m pip``; creating one takes ~10 s).  The host's torch and the ONNX Runtime builds are small
stand-in wheels made here (a dist-info plus the import package, ``torch/version.py`` saying which CUDA),
served from a local folder with pip's index switched off, so every case but the first runs offline:

* nothing of ADO's installed (CPU torch, no onnxruntime): installs the real ``onnxruntime`` from the
  package registry (skipped with the reason when the registry cannot be reached); a second run does nothing;
* plain ``onnxruntime`` present (with CUDA torch): nothing installed, ``onnxruntime-gpu`` not added;
* ``onnxruntime-gpu`` present (with CPU torch): left as it is, plain ``onnxruntime`` not installed over it;
* torch absent: torch is not installed even though the folder offers it; onnxruntime is;
plus: CUDA torch picks ``onnxruntime-gpu``; nothing installed changes (an onnxruntime that would need a
newer torch fails instead of upgrading torch); an unreachable registry gives exit status 2 and a message;
a Python without pip gets a message, not a traceback.
"""
from __future__ import annotations

import ast
import base64
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "install.py"


def make_wheel(folder: Path, name: str, version: str, files: dict[str, str], requires=()) -> Path:
    """A minimal pure-Python wheel (PEP 427) of distribution ``name`` holding ``files`` (path → text)."""
    stem = name.replace("-", "_")
    info = f"{stem}-{version}.dist-info"
    entries = dict(files)
    entries[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))
    entries[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: ado-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, text in entries.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    entries[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = folder / f"{stem}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in entries.items():
            z.writestr(path, text)
    return wheel


def torch_files(version: str, cuda: str | None) -> dict[str, str]:
    """A stand-in torch package whose version.py has the layout of the real one."""
    return {"torch/__init__.py": f"__version__ = {version!r}\n",
            "torch/version.py": f"from typing import Optional\n__version__ = {version!r}\n"
                                f"cuda: Optional[str] = {cuda!r}\nhip: Optional[str] = None\n"}


def ort_files(kind: str) -> dict[str, str]:
    """A stand-in onnxruntime import package that says which build it is."""
    return {"onnxruntime/__init__.py": f"__version__ = '1.0.0'\ndef get_device():\n    return {kind!r}\n"}


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory) -> Path:
    """The stand-in wheels, in one folder pip reads with --find-links."""
    d = tmp_path_factory.mktemp("wheels")
    make_wheel(d, "torch", "2.13.0+cpu", torch_files("2.13.0+cpu", None))
    make_wheel(d, "numpy", "1.26.4", {"numpy/__init__.py": "__version__ = '1.26.4'\n"})
    make_wheel(d, "onnxruntime", "1.0.0", ort_files("CPU"))
    make_wheel(d, "onnxruntime-gpu", "1.0.0", ort_files("GPU"))
    return d


@pytest.fixture(scope="session")
def base_venv(tmp_path_factory) -> Path:
    """An empty venv with pip, created once and copied per case."""
    d = tmp_path_factory.mktemp("base") / "venv"
    venv.EnvBuilder(with_pip=True, symlinks=True).create(d)
    return d


@pytest.fixture
def make_env(base_venv, tmp_path, wheelhouse):
    """make_env(*wheels): a fresh copy of the base venv with the given wheels installed; returns its python."""
    def make(*wheels: Path) -> Path:
        d = tmp_path / "venv"
        shutil.copytree(base_venv, d, symlinks=True)
        python = d / "bin" / "python"
        if wheels:
            subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, wheels)],
                           check=True, env=offline_env(wheelhouse), capture_output=True)
        return python
    return make


def offline_env(wheelhouse: Path, **extra) -> dict:
    """The environment for pip with no index, the stand-in folder as the only source, no user config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "INDEX_URL"}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheelhouse),
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.update(extra)
    return env


def run_install(python: Path, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(INSTALL), *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def installed(python: Path) -> dict[str, str]:
    """{distribution: version} in that venv (pip and setuptools left out)."""
    out = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    pairs = dict(line.split("==", 1) for line in out.splitlines() if "==" in line)
    return {k.lower(): v for k, v in pairs.items() if k.lower() not in ("pip", "setuptools")}


def ort_device(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import onnxruntime; print(onnxruntime.get_device())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def wheel(wheelhouse: Path, name: str) -> Path:
    return next(wheelhouse.glob(f"{name.replace('-', '_')}-*.whl"))


def cuda_torch(folder: Path) -> Path:
    return make_wheel(folder, "torch", "2.13.0+cu128", torch_files("2.13.0+cu128", "12.8"))


def test_nothing_installed_gets_onnxruntime_from_the_registry(make_env, wheelhouse):
    python = make_env(wheel(wheelhouse, "torch"))
    env = {k: v for k, v in os.environ.items() if k != "INDEX_URL"}   # the machine's own pip settings
    r = run_install(python, env)
    if r.returncode == 2:
        pytest.skip(f"package registry unreachable: {r.stdout.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing onnxruntime " in r.stdout and "Traceback" not in r.stdout + r.stderr
    after = installed(python)
    assert "onnxruntime" in after and "onnxruntime-gpu" not in after
    assert after["torch"] == "2.13.0+cpu"                     # the host's torch untouched
    assert ort_device(python) == "CPU"                         # the real package imports
    again = run_install(python, env)                           # idempotent: a second start does nothing
    assert again.returncode == 0 and "nothing to install" in again.stdout and "installing" not in again.stdout
    assert installed(python) == after


def test_plain_onnxruntime_present_is_kept(make_env, wheelhouse, tmp_path):
    python = make_env(cuda_torch(tmp_path), wheel(wheelhouse, "numpy"), wheel(wheelhouse, "onnxruntime"))
    before = installed(python)
    r = run_install(python, offline_env(wheelhouse))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "onnxruntime 1.0.0): left as it is" in r.stdout and "nothing to install" in r.stdout
    assert installed(python) == before                         # no onnxruntime-gpu added despite CUDA torch
    assert ort_device(python) == "CPU"


def test_onnxruntime_gpu_present_is_not_clobbered(make_env, wheelhouse):
    python = make_env(wheel(wheelhouse, "torch"), wheel(wheelhouse, "numpy"), wheel(wheelhouse, "onnxruntime-gpu"))
    before = installed(python)
    r = run_install(python, offline_env(wheelhouse))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "onnxruntime-gpu 1.0.0" in r.stdout and "nothing to install" in r.stdout
    assert installed(python) == before and "onnxruntime" not in before
    assert ort_device(python) == "GPU"                         # the GPU build still provides the module


def test_torch_absent_is_not_installed(make_env, wheelhouse):
    python = make_env()
    env = offline_env(wheelhouse)                              # the folder offers a torch: it must not be taken
    dry = run_install(python, env, "--dry-run")
    assert dry.returncode == 0 and "would install onnxruntime" in dry.stdout
    assert installed(python) == {}
    r = run_install(python, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torch is not installed" in r.stdout and "never installs it" in r.stdout
    assert installed(python) == {"numpy": "1.26.4", "onnxruntime": "1.0.0"}


def test_cuda_torch_picks_onnxruntime_gpu(make_env, wheelhouse, tmp_path):
    python = make_env(cuda_torch(tmp_path), wheel(wheelhouse, "numpy"))
    r = run_install(python, offline_env(wheelhouse))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installing onnxruntime-gpu (" in r.stdout
    assert installed(python) == {"torch": "2.13.0+cu128", "numpy": "1.26.4", "onnxruntime-gpu": "1.0.0"}


def test_installed_packages_never_change(make_env, wheelhouse, tmp_path):
    # an onnxruntime that needs a newer torch, and that torch on offer: the install must fail, not upgrade torch
    greedy = tmp_path / "greedy"
    greedy.mkdir()
    make_wheel(greedy, "onnxruntime", "9.0.0", ort_files("CPU"), requires=["torch>=3"])
    make_wheel(greedy, "torch", "3.0.0", torch_files("3.0.0", None))
    python = make_env(wheel(wheelhouse, "torch"), wheel(wheelhouse, "numpy"))
    r = run_install(python, offline_env(greedy))
    assert r.returncode == 1 and "FAILED" in r.stdout and "Traceback" not in r.stdout + r.stderr
    assert installed(python) == {"torch": "2.13.0+cpu", "numpy": "1.26.4"}


def test_unreachable_registry_is_a_clear_failure(make_env, wheelhouse):
    python = make_env(wheel(wheelhouse, "torch"), wheel(wheelhouse, "numpy"))
    env = offline_env(wheelhouse, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="1", PIP_TIMEOUT="5")
    del env["PIP_NO_INDEX"], env["PIP_FIND_LINKS"]
    r = run_install(python, env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "package registry could not be reached" in r.stdout and "Nothing was changed" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr
    assert installed(python) == {"torch": "2.13.0+cpu", "numpy": "1.26.4"}


def test_install_py_parses_with_the_oldest_supported_python_syntax():
    # hosts run install.py with their own Python (3.10 for A1111/Forge): no 3.11-only syntax or modules
    source = INSTALL.read_text()
    ast.parse(source, str(INSTALL), feature_version=(3, 10))
    assert "tomllib" not in source and sys.version_info >= (3, 10)


def test_onnxruntime_build_follows_the_torch_build():
    spec = importlib.util.spec_from_file_location("ado_install", INSTALL)
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    assert install.onnxruntime_choice(None)[0] == "onnxruntime"
    assert install.onnxruntime_choice("12.8")[0] == "onnxruntime-gpu"
    assert install.onnxruntime_choice("13.0")[0] == "onnxruntime-gpu"
    assert install.onnxruntime_choice("11.8")[0] == "onnxruntime"   # the registry's GPU build needs CUDA 12+


def test_python_without_pip_is_a_clear_failure(tmp_path, wheelhouse):
    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(bare)   # fast: no pip to install
    r = run_install(bare / "bin" / "python", offline_env(wheelhouse))
    assert r.returncode == 1 and "has no pip" in r.stdout and "Traceback" not in r.stdout + r.stderr
