"""Build ComfyUI workflows (UI format, as "Save" writes them, and API format, as ``/prompt`` takes them) from a
server's ``/object_info``, so widget order and sockets follow what the server declares (hosts.md §3).

Also writes ADO's ``example_workflows/`` (run with a ComfyUI server that has ADO installed):

    python tests/comfyui_workflow.py --server http://127.0.0.1:8188 --out example_workflows
"""
from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def fetch_object_info(server: str) -> dict:
    """GET ``/object_info`` of a running ComfyUI server."""
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as r:
        return json.loads(r.read())


def _inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, is_widget) of a node's inputs in the server's declared order."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = (isinstance(typ, list) or typ in WIDGET_TYPES) and not opts.get("forceInput")
            out.append((name, spec, is_widget))
    return out


class Workflow:
    """A graph of nodes and links, written out as UI-format or API-format JSON."""

    def __init__(self, object_info: dict):
        self.info = object_info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, node_type: str, pos=(0, 0), size=(320, 200), **widgets) -> int:
        """Add a node with widget values by name (others take the declared default); returns its id.

        Raises KeyError for a node type the server does not know or a widget it does not declare.
        """
        if node_type not in self.info:
            raise KeyError(f"the server has no node {node_type!r}")
        info = self.info[node_type]
        names = {n for n, _, w in _inputs(info) if w}
        unknown = set(widgets) - names
        if unknown:
            raise KeyError(f"{node_type} has no widget(s) {sorted(unknown)}")
        values = []
        for name, spec, is_widget in _inputs(info):
            if not is_widget:
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            default = opts.get("default", spec[0][0] if isinstance(spec[0], list) and spec[0] else None)
            values.append(widgets.get(name, default))
            if opts.get("control_after_generate"):
                values.append("fixed")
        node_id = len(self.nodes) + 1
        self.nodes.append({
            "id": node_id, "type": node_type, "pos": list(pos), "size": list(size), "flags": {}, "order": node_id - 1,
            "mode": 0,
            "inputs": [{"name": n, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
                       for n, spec, w in _inputs(info) if not w],
            "outputs": [{"name": name, "type": typ, "links": [], "slot_index": i}
                        for i, (typ, name) in enumerate(zip(info["output"], info.get("output_name", info["output"])))],
            "properties": {"Node name for S&R": node_type},
            "widgets_values": values,
            "_widgets": {**{n: widgets.get(n) for n in names if n in widgets}},
        })
        return node_id

    def connect(self, src: int, output: str | int, dst: int, input_name: str) -> None:
        """Link output ``output`` (name or index) of node ``src`` to socket ``input_name`` of node ``dst``."""
        s, d = self.nodes[src - 1], self.nodes[dst - 1]
        slot = output if isinstance(output, int) else [o["name"] for o in s["outputs"]].index(output)
        in_slot = [i["name"] for i in d["inputs"]].index(input_name)
        link_id = len(self.links) + 1
        typ = s["outputs"][slot]["type"]
        s["outputs"][slot]["links"].append(link_id)
        d["inputs"][in_slot]["link"] = link_id
        self.links.append([link_id, src, slot, dst, in_slot, typ])

    def ui(self) -> dict:
        """The workflow as the frontend saves it (``widgets_values`` positional)."""
        nodes = [{k: v for k, v in n.items() if not k.startswith("_")} for n in self.nodes]
        return {"last_node_id": len(nodes), "last_link_id": len(self.links), "nodes": nodes, "links": self.links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}

    def api(self) -> dict:
        """The workflow as a ``/prompt`` body's ``prompt`` (widgets by name, links as [node, slot])."""
        prompt = {}
        for n in self.nodes:
            info = self.info[n["type"]]
            inputs, values = {}, iter(n["widgets_values"])
            for name, spec, is_widget in _inputs(info):
                if is_widget:
                    inputs[name] = next(values)
                    if isinstance(spec[1] if len(spec) > 1 else None, dict) and spec[1].get("control_after_generate"):
                        next(values)
            for i in n["inputs"]:
                if i["link"] is not None:
                    _, src, slot, _, _, _ = self.links[i["link"] - 1]
                    inputs[i["name"]] = [str(src), slot]
            prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
        return prompt


CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
POSITIVE = "a lighthouse on a rocky cliff at sunset, dramatic sky, detailed photograph"
NEGATIVE = "blurry, low quality, watermark"


def _sd15_front(wf: Workflow, ckpt: str = CKPT):
    """Checkpoint loader, two prompts and an empty latent; returns their ids."""
    ck = wf.add("CheckpointLoaderSimple", (20, 200), (315, 100), ckpt_name=ckpt)
    pos = wf.add("CLIPTextEncode", (380, 40), (420, 160), text=POSITIVE)
    neg = wf.add("CLIPTextEncode", (380, 260), (420, 160), text=NEGATIVE)
    lat = wf.add("EmptyLatentImage", (380, 480), (315, 110), width=512, height=512, batch_size=1)
    wf.connect(ck, "CLIP", pos, "clip")
    wf.connect(ck, "CLIP", neg, "clip")
    return ck, pos, neg, lat


def _decode_save(wf: Workflow, ck: int, src: int, output, pos, prefix: str):
    dec = wf.add("VAEDecode", pos, (210, 50))
    save = wf.add("SaveImage", (pos[0] + 240, pos[1]), (400, 450), filename_prefix=prefix)
    wf.connect(src, output, dec, "samples")
    wf.connect(ck, "VAE", dec, "vae")
    wf.connect(dec, "IMAGE", save, "images")


def _ado_ksampler(wf: Workflow, ck, pos, neg, lat, xy=(850, 100)):
    ks = wf.add("ADOAdaptiveKSampler", xy, (320, 440), seed=42, steps=12, cfg=7.0, scheduler="karras", denoise=1.0,
                mode="budget", rtol=0.05)
    wf.connect(ck, "MODEL", ks, "model")
    wf.connect(pos, "CONDITIONING", ks, "positive")
    wf.connect(neg, "CONDITIONING", ks, "negative")
    wf.connect(lat, "LATENT", ks, "latent_image")
    return ks


def example_workflows(object_info: dict) -> dict[str, dict]:
    """ADO's example workflows (SD1.5 checkpoint), by file name."""
    out = {}
    wf = Workflow(object_info)
    ck, pos, neg, lat = _sd15_front(wf)
    ks = _ado_ksampler(wf, ck, pos, neg, lat)
    _decode_save(wf, ck, ks, "LATENT", (1210, 100), "ADO_txt2img")
    out["ado_txt2img.json"] = wf.ui()

    wf = Workflow(object_info)
    ck, pos, neg, lat = _sd15_front(wf)
    noise = wf.add("RandomNoise", (850, 20), (315, 82), noise_seed=42)
    guider = wf.add("CFGGuider", (850, 140), (315, 100), cfg=7.0)
    sampler = wf.add("ADOAdaptiveSampler", (850, 280), (315, 230), nfe_budget=0, mode="budget")
    sched = wf.add("BasicScheduler", (850, 550), (315, 110), scheduler="karras", steps=12, denoise=1.0)
    sca = wf.add("SamplerCustomAdvanced", (1200, 100), (300, 330))
    wf.connect(ck, "MODEL", guider, "model")
    wf.connect(pos, "CONDITIONING", guider, "positive")
    wf.connect(neg, "CONDITIONING", guider, "negative")
    wf.connect(ck, "MODEL", sched, "model")
    for src, name, inp in ((noise, "NOISE", "noise"), (guider, "GUIDER", "guider"), (sampler, "SAMPLER", "sampler"),
                           (sched, "SIGMAS", "sigmas"), (lat, "LATENT", "latent_image")):
        wf.connect(src, name, sca, inp)
    _decode_save(wf, ck, sca, "output", (1540, 100), "ADO_custom_advanced")
    out["ado_sampler_custom_advanced.json"] = wf.ui()

    wf = Workflow(object_info)
    ck, pos, neg, lat = _sd15_front(wf)
    ks = _ado_ksampler(wf, ck, pos, neg, lat)
    _decode_save(wf, ck, ks, "LATENT", (1210, 40), "ADO_original")
    t2s = wf.add("ADOTraceToSigmas", (850, 600), (320, 160), sample=0)
    fixed = wf.add("ADOAdaptiveSampler", (850, 800), (315, 230), nfe_budget=0, mode="fixed")
    sc = wf.add("SamplerCustom", (1210, 560), (320, 440), add_noise=True, noise_seed=42, cfg=7.0)
    wf.connect(ks, "trace", t2s, "trace")
    wf.connect(ck, "MODEL", sc, "model")
    wf.connect(pos, "CONDITIONING", sc, "positive")
    wf.connect(neg, "CONDITIONING", sc, "negative")
    wf.connect(fixed, "SAMPLER", sc, "sampler")
    wf.connect(t2s, "SIGMAS", sc, "sigmas")
    wf.connect(lat, "LATENT", sc, "latent_image")
    _decode_save(wf, ck, sc, "output", (1570, 560), "ADO_replay")
    out["ado_replay.json"] = wf.ui()

    wf = Workflow(object_info)
    ck, pos, neg, lat = _sd15_front(wf)
    ks = wf.add("KSampler", (850, 100), (320, 470), seed=42, steps=12, cfg=7.0, sampler_name="ado_adaptive",
                scheduler="karras", denoise=1.0)
    wf.connect(ck, "MODEL", ks, "model")
    wf.connect(pos, "CONDITIONING", ks, "positive")
    wf.connect(neg, "CONDITIONING", ks, "negative")
    wf.connect(lat, "LATENT", ks, "latent_image")
    _decode_save(wf, ck, ks, "LATENT", (1210, 100), "ADO_ksampler")
    out["ado_ksampler_dropdown.json"] = wf.ui()
    return out


def tiny_workflow(object_info: dict, kind: str = "eps", steps: int = 8, dropdown: bool = False) -> Workflow:
    """A runnable workflow on the test-only tiny model (tests/comfyui_test_pack): ADO KSampler → sink, or with
    ``dropdown`` ComfyUI's KSampler with ``sampler_name="ado_adaptive"``."""
    wf = Workflow(object_info)
    model = wf.add("ADOTestTinyModel", (20, 60), (300, 60), kind=kind)
    pos = wf.add("ADOTestConditioning", (20, 180), (300, 60), value=1.0)
    neg = wf.add("ADOTestConditioning", (20, 300), (300, 60), value=-1.0)
    lat = wf.add("EmptyLatentImage", (20, 420), (300, 110), width=64, height=64, batch_size=1)
    if dropdown:
        ks = wf.add("KSampler", (360, 60), (340, 420), seed=3, steps=steps, cfg=3.0, sampler_name="ado_adaptive",
                    scheduler="karras")
    else:
        ks = wf.add("ADOAdaptiveKSampler", (360, 60), (340, 420), seed=3, steps=steps, cfg=3.0, scheduler="karras",
                    mode="budget")
    sink = wf.add("ADOTestLatentSink", (740, 60), (220, 60))
    wf.connect(model, "MODEL", ks, "model")
    wf.connect(pos, "CONDITIONING", ks, "positive")
    wf.connect(neg, "CONDITIONING", ks, "negative")
    wf.connect(lat, "LATENT", ks, "latent_image")
    wf.connect(ks, "LATENT", sink, "samples")
    return wf


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "example_workflows"))
    a = p.parse_args()
    info = fetch_object_info(a.server)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, wf in example_workflows(info).items():
        (out / name).write_text(json.dumps(wf, indent=2) + "\n")
        print("wrote", out / name)


if __name__ == "__main__":
    main()
