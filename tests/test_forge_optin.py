"""Opt-in: scripts/ado_sampler.py against a real Forge checkout (lllyasviel/stable-diffusion-webui-forge).

Set FORGE_DIR to the checkout and FORGE_PYTHON to a Python that has Forge's requirements (default: this one):

    FORGE_DIR=/work/forge FORGE_PYTHON=/work/forge-venv/bin/python python -m pytest -q tests/test_forge_optin.py

tests/forge_optin_driver.py runs in that Python (Forge's start-up imports on CPU, the script loaded as Forge
loads extensions, a tiny model built in code sampled through Forge's own processing and CFG code) and
reports each stage; each stage is one test here, so the result shows how far Forge could be driven.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FORGE_DIR = os.environ.get("FORGE_DIR")
pytestmark = pytest.mark.skipif(not FORGE_DIR, reason="opt-in: set FORGE_DIR to a Forge checkout "
                                "(and FORGE_PYTHON to a Python with Forge's requirements)")
DRIVER = Path(__file__).with_name("forge_optin_driver.py")
STAGES = ["import", "register", "settings", "sample", "infotext", "flow", "policy_auto", "interrupt"]


@pytest.fixture(scope="module")
def forge_report() -> dict:
    python = os.environ.get("FORGE_PYTHON", sys.executable)
    proc = subprocess.run([python, str(DRIVER)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "FORGE_DIR": FORGE_DIR})
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"stages"')]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the Forge driver did not report (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    report = json.loads(lines[-1])
    print(json.dumps(report, indent=1))
    return report


@pytest.mark.parametrize("name", STAGES)
def test_forge_stage(forge_report, name):
    result = forge_report["stages"].get(name)
    if result is None:
        pytest.fail(f"stage {name!r} did not run: an earlier stage it needs failed")
    assert result == "ok", result
