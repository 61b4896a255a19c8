"""Generality check: ADO's defaults on testbed variants they were not chosen on.

``python -m adaptive_core.bench.generality [--seeds 64] [--first-seed 0] [--nfe 8 20] [--controller policy:NAME ...]
[--out docs/bench/generality.md]``

Variants: other spectrum exponents of the Gaussian testbed, other flow shifts (which also move σ_min),
and an imperfect denoiser (the exact one plus a smooth systematic error, as a trained network has; its
reference is a 200-step high-order solve of that same model).  Each row compares ADO with the best of a
few strong peers at the same NFE and the same noises.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from .. import sample_adaptive
from ..schedules import karras_sigmas
from ..testbeds import make_testbed
from .metrics import rmse
from .run import run_method

PEERS = {"ve": ["dpmpp_2m+karras", "dpmpp_2m+exponential", "dpmpp_3m+karras", "diffusers_unipc_3+karras",
                "diffusers_deis_3+karras"],
         "flow": ["dpmpp_2m+simple", "dpmpp_2m+karras", "lms+simple", "diffusers_unipc_3+karras",
                  "diffusers_deis_3+simple"]}

VARIANTS = [("gaussian, exponent 1", "gaussian", "ve", {"exponent": 1.0}, False),
            ("gaussian, exponent 3", "gaussian", "ve", {"exponent": 3.0}, False),
            ("gmm_digits flow, shift 1", "gmm_digits", "flow", {"shift": 1.0}, False),
            ("gmm_digits flow, shift 6", "gmm_digits", "flow", {"shift": 6.0}, False),
            ("gmm_digits ve, imperfect denoiser", "gmm_digits", "ve", {}, True)]


class ImperfectDenoiser:
    """A testbed's exact denoiser plus a smooth systematic error, D + 0.03·sin(3·D), counting its calls.  It declares
    the testbed's guidance scale (``cfg_scale``, read by :func:`adaptive_core.sampler.detect_guidance_scale`), so
    the run keeps the testbed's domain: the error is the denoiser's, not another kind of job."""

    def __init__(self, testbed) -> None:
        self.testbed, self.nfe = testbed, 0
        self.cfg_scale = getattr(testbed, "cfg_scale", None)

    def reset_nfe(self) -> None:
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        d = self.testbed.denoise(x, torch.as_tensor(sigma, dtype=x.dtype).reshape(-1))
        return d + 0.03 * torch.sin(3 * d)


def run(seeds: int, nfes=(8, 20), controllers=(), first_seed: int = 0) -> list[dict]:
    """ADO and the best of :data:`PEERS` on every variant and NFE; returns one row per (variant, NFE).  Each of
    ``controllers`` (e.g. ``"policy:ppo_ve_flow"``) also runs ADO on the same grid and noises; its RMSE and its
    ratio to ADO's default (heuristic) controller go into the row under the controller's name."""
    from tqdm.auto import tqdm
    rows = []
    for label, name, model_type, params, imperfect in tqdm(VARIANTS, desc="variants"):
        tb = make_testbed(name, model_type, **params)
        x = tb.noise(range(first_seed, first_seed + seeds))
        model = ImperfectDenoiser(tb) if imperfect else tb
        if imperfect:
            ref = sample_adaptive(model, x, karras_sigmas(200, tb.sigma_min, tb.sigma_max), model_type=model_type,
                                  mode="fixed", predictor="exact")
        else:
            ref = tb.reference(x)
        for nfe in nfes:
            ado = rmse(run_method("ado", tb, x, nfe, model)[0], ref)
            peers = {p: rmse(run_method(p, tb, x, nfe, model)[0], ref) for p in PEERS[model_type]}
            best = min(peers, key=peers.get)
            row = {"variant": label, "nfe": nfe, "ado": ado, "best_peer": best, "best_peer_rmse": peers[best],
                   "ratio": ado / peers[best]}
            for controller in controllers:
                out = sample_adaptive(model, x, karras_sigmas(nfe, tb.sigma_min, tb.sigma_max), nfe_budget=nfe,
                                      model_type=model_type, controller=controller)
                err = rmse(out, ref)
                row[controller] = {"rmse": err, "ratio_to_ado": err / ado}
            rows.append(row)
    return rows


def main(argv=None) -> int:
    """CLI: run the variants, print and write a markdown table."""
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench.generality", description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/generality.md"))
    ap.add_argument("--nfe", nargs="+", type=int, default=[8, 20])
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--controller", nargs="+", default=[],
                    help="also run ADO with these controllers (policy:NAME or policy:/path.json) and report each "
                         "one's RMSE ratio to ADO's default controller")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.first_seed < 0 or any(n < 2 for n in args.nfe):
        ap.error("need --seeds ≥ 1, --first-seed ≥ 0 and every --nfe ≥ 2")
    for controller in args.controller:
        if not controller.startswith("policy:"):
            ap.error(f"--controller {controller!r}: expected policy:NAME or policy:/path/to/manifest.json")
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = run(args.seeds, tuple(args.nfe), tuple(args.controller), args.first_seed)
    command = " ".join(["python -m adaptive_core.bench.generality", *(sys.argv[1:] if argv is None else argv)])
    extra = "".join(f" {c} / ADO |" for c in args.controller)
    lines = ["# Generality: ADO's defaults on variants they were not chosen on", "",
             f"Command: `{command}` (noise seeds {args.first_seed}–{args.first_seed + args.seeds - 1}). RMSE to "
             "the reference from the same noises; ratio < 1 means ADO is better than the best of the listed "
             "peers" + ("; the last columns are each controller's RMSE over ADO's with its default (heuristic) "
                        "controller." if args.controller else "."), "",
             "| variant | NFE | ADO | best peer | ADO / best peer |" + extra,
             "|---|---|---|---|---|" + "---|" * len(args.controller)]
    lines += [f"| {r['variant']} | {r['nfe']} | {r['ado']:.3g} | {r['best_peer']} {r['best_peer_rmse']:.3g} | "
              f"{r['ratio']:.2f} |" + "".join(f" {r[c]['ratio_to_ado']:.3f} |" for c in args.controller)
              for r in rows]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
