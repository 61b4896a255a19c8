"""Packaging: pyproject.toml (project metadata, Comfy registry table, optional groups) and requirements.txt
(ComfyUI-Manager installs it line by line into the host's environment)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import adaptive_core

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")


def requirement_lines(path: Path) -> list[str]:
    """The package lines of a requirements file (comments and blanks dropped), as pip reads them."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_project_metadata(pyproject):
    project = pyproject["project"]
    assert project["version"] == adaptive_core.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])                 # registry: semver
    assert project["license"] == {"text": "GPL-3.0-or-later"}
    assert project["dependencies"] == []                                    # nothing may replace the host's torch
    assert set(project["optional-dependencies"]) >= {"dev", "bench", "tune"}


def test_setuptools_accepts_the_file():
    config = pytest.importorskip("setuptools.config.pyprojecttoml")
    parsed = config.read_configuration(ROOT / "pyproject.toml")            # validates the [project] table
    assert parsed["project"]["name"] == "adaptive-diffusion-optimizer"


def test_comfy_registry_table(pyproject):
    comfy = pyproject["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "includes"} <= set(comfy)
    # the frontend comes from __init__.py's WEB_DIRECTORY; a `web` key as well would serve web/ twice
    assert "web" not in comfy


def test_dev_group_matches_requirements_dev(pyproject):
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    assert dev == requirement_lines(ROOT / "requirements-dev.txt")
    assert "torch==2.13.0" in dev                                           # the CPU build, pinned


def test_requirements_txt_installs_nothing_into_a_host():
    # ComfyUI-Manager runs `pip install <line>` per line: a torch or onnxruntime line would replace the
    # host's torch build or clobber an installed onnxruntime-gpu; install.py handles ONNX Runtime instead.
    assert requirement_lines(ROOT / "requirements.txt") == []
