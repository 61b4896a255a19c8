"""Opt-in: the real ComfyUI server (``COMFYUI_DIR``; ``main.py --cpu``) with this repository in
``custom_nodes/`` (plus the test-only tiny-model pack from tests/comfyui_test_pack).

* ``/object_info`` lists ADO's nodes and ``ado_adaptive`` in the samplers' dropdowns; ``web/`` is served;
* every example workflow matches the server's node declarations (types, sockets, widget count);
* a queued prompt on the tiny model runs: history carries the chart, the websocket carries progress and
  the ``ado.trace`` message of the KSampler-dropdown path;
* in headless Chromium (``CHROMIUM`` or ``chromium`` on PATH, Python ``playwright``): each example workflow
  loads with no missing node, a queued run draws the chart on the node; ``ADO_SCREENSHOT_DIR=<folder>`` saves
  screenshots of the nodes with their charts.

Run: ``COMFYUI_DIR=... <python with ComfyUI's requirements> -m pytest -q tests/test_comfyui_server.py``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import comfyui_host
import comfyui_workflow as cw

REPO = comfyui_host.REPO
EXAMPLES = sorted((REPO / "example_workflows").glob("*.json"))
ADO_NODES = ["ADOAdaptiveSampler", "ADOAdaptiveKSampler", "ADOTraceToSigmas"]
PACK_DIR = "ComfyUI-ADO"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def _post(url: str, body: dict):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A ComfyUI server on a free port, base directory in a temp folder whose custom_nodes/ holds this repo."""
    path = comfyui_host.comfyui_dir()
    if path is None:
        pytest.skip(comfyui_host.SKIP_REASON)
    for module in ("aiohttp", "sqlalchemy", "alembic", "comfyui_frontend_package"):
        if subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode:
            pytest.skip(f"{sys.executable} lacks {module}: install ComfyUI's requirements.txt to run its server")
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "custom_nodes").mkdir()
    os.symlink(REPO, base / "custom_nodes" / PACK_DIR)
    os.symlink(comfyui_host.TEST_PACK, base / "custom_nodes" / "ado_test_pack")
    port = _free_port()
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", str(base), "--disable-auto-launch", "--preview-method", "latent2rgb",
                             "--database-url", "sqlite:///:memory:"],
                            cwd=path, stdout=log, stderr=subprocess.STDOUT, env=comfyui_host.server_env(path))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited:\n{(base / 'server.log').read_text()[-3000:]}")
            try:
                _get(url + "/system_stats", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"ComfyUI did not start:\n{(base / 'server.log').read_text()[-3000:]}")
        _post(url + "/settings/Comfy.TutorialCompleted", True)  # no first-run template dialog in the browser
        info = json.loads(_get(url + "/object_info")[1])
        print(f"\nComfyUI server under test: {path} at {comfyui_host.commit(path)}")
        yield {"url": url, "info": info, "log": base / "server.log", "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_object_info_lists_the_nodes(server):
    info = server["info"]
    names = {"ADOAdaptiveSampler": "ADO Adaptive Sampler", "ADOAdaptiveKSampler": "ADO Adaptive KSampler",
             "ADOTraceToSigmas": "ADO Trace to Sigmas"}
    for node_id, display in names.items():
        assert info[node_id]["display_name"] == display and info[node_id]["python_module"].endswith(PACK_DIR)
    assert info["ADOAdaptiveSampler"]["output"] == ["SAMPLER"]
    assert info["ADOAdaptiveKSampler"]["output"] == ["LATENT", "ADO_TRACE"]
    assert info["ADOTraceToSigmas"]["output"] == ["SIGMAS"]
    for node in ("KSampler", "KSamplerAdvanced", "KSamplerSelect"):
        assert "ado_adaptive" in info[node]["input"]["required"]["sampler_name"][0], node
    log = server["log"].read_text()
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if PACK_DIR in line)
    status, body = _get(server["url"] + f"/extensions/{PACK_DIR}/ado_trace.js")
    assert status == 200 and b"ado.trace" in body
    assert f"/extensions/{PACK_DIR}/ado_trace.js" in json.loads(_get(server["url"] + "/extensions")[1])
    templates = json.loads(_get(server["url"] + "/workflow_templates")[1])  # shown as templates in the UI
    assert sorted(templates[PACK_DIR]) == sorted(p.stem for p in EXAMPLES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_matches_the_server(server, path):
    info = server["info"]
    wf = json.loads(path.read_text())
    for node in wf["nodes"]:
        assert node["type"] in info, f"missing node type {node['type']}"
        decl = cw._inputs(info[node["type"]])
        sockets = [n for n, _, w in decl if not w]
        assert [i["name"] for i in node["inputs"]] == sockets[:len(node["inputs"])]
        n_widgets = sum(1 + bool(isinstance(s[1] if len(s) > 1 else None, dict) and s[1].get("control_after_generate"))
                        for _, s, w in decl if w)
        assert len(node["widgets_values"]) == n_widgets, node["type"]
        values = iter(node["widgets_values"])
        for name, spec, w in decl:
            if not w:
                continue
            v = next(values)
            if isinstance(spec[0], list) and name != "ckpt_name":  # no checkpoints on the test server
                assert v in spec[0], f"{node['type']}.{name}={v!r} is not offered"
            if isinstance(spec[1] if len(spec) > 1 else None, dict) and spec[1].get("control_after_generate"):
                next(values)


def _run_prompt(server, prompt: dict):
    """Queue ``prompt`` with a websocket open; returns (history entry, websocket messages)."""
    import websocket  # websocket-client
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(server["url"].replace("http", "ws") + f"/ws?clientId={client_id}", timeout=120)
    try:
        prompt_id = _post(server["url"] + "/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        messages = []
        while True:
            raw = ws.recv()
            if not isinstance(raw, str):
                continue  # preview images (binary)
            msg = json.loads(raw)
            messages.append(msg)
            data = msg.get("data", {})
            if msg["type"] == "execution_error":
                pytest.fail(f"the prompt failed: {data}")
            if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                break
    finally:
        ws.close()
    history = json.loads(_get(server["url"] + f"/history/{prompt_id}")[1])[prompt_id]
    return history, messages


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_queued_prompt_runs_and_returns_the_chart(server, kind):
    wf = cw.tiny_workflow(server["info"], kind, steps=8)
    history, messages = _run_prompt(server, wf.api())
    assert history["status"]["status_str"] == "success"
    ks = next(n["id"] for n in wf.nodes if n["type"] == "ADOAdaptiveKSampler")
    (chart,) = history["outputs"][str(ks)]["ado_trace"]
    assert 1 <= chart["nfe"] <= chart["nfe_budget"] == 8
    assert chart["model_type"] == ("flow" if kind == "flow" else "ve") and chart["calls"]
    sink = next(n["id"] for n in wf.nodes if n["type"] == "ADOTestLatentSink")
    assert history["outputs"][str(sink)]["latent"][0]["finite"]
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == str(ks)]
    assert len(progress) == chart["nfe"] and progress[-1]["value"] == progress[-1]["max"] == 8


def test_ksampler_dropdown_sends_the_chart_over_the_websocket(server):
    wf = cw.tiny_workflow(server["info"], "eps", steps=6, dropdown=True)
    prompt = wf.api()
    ks = next(k for k, v in prompt.items() if v["class_type"] == "KSampler")
    history, messages = _run_prompt(server, prompt)
    assert history["status"]["status_str"] == "success"
    (trace,) = [m["data"] for m in messages if m["type"] == "ado.trace"]
    assert trace["node"] == ks and 1 <= trace["trace"]["nfe"] <= 6


# --- headless browser -----------------------------------------------------------------------------------------

def _chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(server):
    """The ComfyUI frontend in headless Chromium, loaded and ready."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Python package playwright is not installed")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium: set CHROMIUM or install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1600, "height": 1000})
        errors = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.goto(server["url"], wait_until="domcontentloaded")
        pg.wait_for_function("() => window.app && window.app.graph && window.LiteGraph "
                             "&& window.LiteGraph.registered_node_types['ADOAdaptiveKSampler']", timeout=120_000)
        pg.errors = errors
        yield pg
        browser.close()


LOAD_JS = """async (wf) => {
  await window.app.loadGraphData(wf);
  await new Promise(r => setTimeout(r, 500));
  const types = window.LiteGraph.registered_node_types;
  const missing = wf.nodes.map(n => n.type).filter(t => !types[t]);
  const loaded = window.app.graph._nodes.map(n => n.type);
  const text = document.body.innerText;
  return {missing, loaded, dialog: /missing node|nodes are missing|not found/i.test(text)};
}"""


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_workflow_loads_in_the_browser(page, path):
    wf = json.loads(path.read_text())
    res = page.evaluate(LOAD_JS, wf)
    assert res["missing"] == [] and not res["dialog"], res
    assert sorted(res["loaded"]) == sorted(n["type"] for n in wf["nodes"])
    assert not [e for e in page.errors if "ado" in e.lower()], page.errors


def test_missing_node_check_is_not_vacuous(page, server):
    """Control: a workflow with an unknown node type is flagged by the same check (dialog and type list)."""
    wf = json.loads(EXAMPLES[0].read_text())
    wf["nodes"][0]["type"] = "NoSuchNodeADOTest"
    res = page.evaluate(LOAD_JS, wf)
    assert res["missing"] == ["NoSuchNodeADOTest"] and res["dialog"]
    page.keyboard.press("Escape")


@pytest.mark.parametrize("dropdown", [False, True], ids=["ado_ksampler", "ksampler_dropdown"])
def test_chart_renders_after_a_run(page, server, dropdown):
    wf = cw.tiny_workflow(server["info"], "eps", steps=10, dropdown=dropdown)
    ks = next(n["id"] for n in wf.nodes if n["type"] in ("ADOAdaptiveKSampler", "KSampler"))
    res = page.evaluate(LOAD_JS, wf.ui())
    assert res["missing"] == []
    page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function(f"() => !!window.app.graph.getNodeById({ks}).__adoTrace", timeout=120_000)
    chart = page.evaluate(f"() => window.app.graph.getNodeById({ks}).__adoTrace")
    assert 1 <= chart["nfe"] <= 10
    menu = page.evaluate(f"""() => {{
      const node = window.app.graph.getNodeById({ks}), options = [];
      node.getExtraMenuOptions(window.app.canvas, options);
      return {{entries: options.filter(o => o).map(o => o.content), json: node.__adoTraceJson}};
    }}""")
    assert "Copy ADO trace (JSON)" in menu["entries"]
    assert json.loads(menu["json"])["nfe"] == chart["nfe"]
    # the chart is not saved: widgets_values and the API prompt are as before the run
    saved = page.evaluate(f"""async () => {{
      const node = window.app.graph.serialize().nodes.find(n => n.id === {ks});
      const prompt = await window.app.graphToPrompt();
      return {{values: node.widgets_values, inputs: Object.keys(prompt.output[String({ks})].inputs)}};
    }}""")
    before = next(n for n in wf.ui()["nodes"] if n["id"] == ks)["widgets_values"]
    assert saved["values"] == before
    assert "ado_chart" not in saved["inputs"]
    # frame the node on screen and take its picture
    rect = page.evaluate(f"""() => {{
      const app = window.app, node = app.graph.getNodeById({ks}), ds = app.canvas.ds;
      ds.scale = 1.0; ds.offset = [60 - node.pos[0], 80 - node.pos[1]];
      app.canvas.setDirty(true, true); app.canvas.draw(true, true);
      const r = app.canvas.canvas.getBoundingClientRect(), th = window.LiteGraph.NODE_TITLE_HEIGHT;
      return {{x: r.left + 50, y: r.top + 80 - th - 10, w: node.size[0] + 20, h: node.size[1] + th + 20}};
    }}""")
    page.wait_for_timeout(300)
    png = page.screenshot(clip={"x": rect["x"], "y": rect["y"], "width": rect["w"], "height": rect["h"]})
    out = os.environ.get("ADO_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / ("ksampler_dropdown_chart.png" if dropdown else "ado_ksampler_chart.png")).write_bytes(png)
    # the chart's colours are on the node: the σ line (#4fa3ff) and the NFE bar (#5fd35f)
    import io

    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)

    def near(target, tol=40):
        return sum(c for c, rgb in colours if all(abs(a - b) <= tol for a, b in zip(rgb, target)))
    assert near((0x4f, 0xa3, 0xff)) > 30, "no σ line drawn"
    assert near((0x5f, 0xd3, 0x5f)) > 30, "no NFE bar drawn"
    assert not [e for e in page.errors if "ado" in e.lower()], page.errors
    if dropdown:  # switched to another sampler, the next run drops the old chart
        page.evaluate(f"""() => {{
          const node = window.app.graph.getNodeById({ks});
          node.widgets.find(w => w.name === "sampler_name").value = "euler";
          return window.app.queuePrompt(0, 1);
        }}""")
        page.wait_for_function(f"""() => {{
          const node = window.app.graph.getNodeById({ks});
          return node.__adoTrace === null && !node.widgets.some(w => w.name === "ado_chart");
        }}""", timeout=60_000)
