"""The oracle fixed schedule on a trained testbed (the MNIST UNet by default, or ``--testbed photo_unet``): the
best σ grid per model type, CFG scale and budget, found with the reference in the loop
(:func:`~adaptive_core.bench.oracle.optimize_schedule`).

``python -m adaptive_core.bench.trained_oracle [--testbed mnist_unet] [--model-type ve flow] [--cfg 1 2]
[--nfe 5 8 10] [--fit-seeds 32] [--joint-cfg] [--out docs/bench/trained/oracle.json] [--jobs 2]``

It is the analytic benchmark's oracle (``python -m adaptive_core.bench``) on the trained UNet: ADO's integrator
on a fixed grid, each interior evaluation point moved in half-log-SNR by coordinate descent (cf. OSS, AYS and
the DMN trust-region search, arXiv 2402.17376), from three starts (ADO's own plan, the host's Karras grid and
a λ-uniform grid).  The grid is fitted on the noise seeds 0 … ``fit_seeds`` − 1 (on a class-conditional
network, class = seed mod 10; inside the policy's UNet training pool; an unconditional network has CFG 1 only)
against the reference the policy measurements use
(:data:`~adaptive_core.tune.policy_env.TRAINED_REFERENCE_STEPS`-step λ-uniform solve).  The grids are written
to ``--out``; ``python -m adaptive_core.tune policy-eval`` runs them on its held-out seeds, so its "policy /
oracle" ratio compares the two on the same images.  Fitting the reference into a grid is what no sampler can
do at run time: the oracle is a bound for fixed schedules, not a competitor.  ``--joint-cfg`` fits one grid per
model type and budget to both CFG scales' images at once (what a policy that cannot see the scale could follow;
``policy-distill --oracle-grids`` teaches it).

An analytic testbed or one of its variants (``--testbed gaussian@exponent=1.5``, see
:func:`adaptive_core.testbeds.split_variant_name`) is fitted the same way against its exact reference (CFG 1,
``--reference-steps`` unused): ``policy-adapt`` uses that to teach a policy spectra and noise ranges beyond the
shipped testbeds.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path("docs/bench/trained/oracle.json")


class CfgBlocks:
    """One denoiser made of the same network at several CFG scales: the batch is split into consecutive blocks of
    ``sizes`` images, block i denoised by ``testbeds[i]`` (a batch of another size goes to the first one, as the
    oracle search's one-image plan run does).  Lets one σ grid be fitted to several CFG scales at once."""

    def __init__(self, testbeds, sizes) -> None:
        if len(testbeds) != len(sizes) or not testbeds:
            raise ValueError(f"need one block size per testbed, got {len(testbeds)} testbeds and {len(sizes)} sizes")
        self.testbeds, self.sizes = list(testbeds), [int(n) for n in sizes]
        first = self.testbeds[0]
        self.model_type, self.sigma_min, self.sigma_max = first.model_type, first.sigma_min, first.sigma_max
        self.shift, self.name, self.nfe = first.shift, first.name, 0

    def reset_nfe(self) -> None:
        """Start counting model calls from 0."""
        self.nfe = 0

    def noise(self, *args, **kwargs) -> torch.Tensor:
        """The first testbed's noise (every block uses the same network and noise law)."""
        return self.testbeds[0].noise(*args, **kwargs)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        self.nfe += 1
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        if x.shape[0] != sum(self.sizes):
            return self.testbeds[0](x, sigma)
        out, start = [], 0
        for tb, n in zip(self.testbeds, self.sizes):
            out.append(tb(x[start:start + n], sigma[start:start + n]))
            start += n
        return torch.cat(out)


def fit_config(model_type: str, cfg, nfes, fit_seeds: int, reference_steps: int | None = None,
               progress=None, testbed: str = "mnist_unet", jitter: float = 0.0) -> dict:
    """Fit the oracle grid for each budget in ``nfes`` on ``testbed`` (a trained one, or an analytic one or variant
    at CFG 1, against its exact reference) in ``model_type`` at the CFG scale ``cfg``, or at several scales at once
    (a list: one grid fitted to the images of every scale together, :class:`CfgBlocks`).  With ``jitter`` > 0 the
    grid is the best one whose gain survives moving its points by ±``jitter`` in λ
    (:func:`~adaptive_core.bench.oracle.optimize_schedule`).

    Returns {str(nfe): {"sigmas", "prediction", "fit_rmse", "fit_heuristic_rmse", "fit_seeds", "fit_cfg",
    "reference_steps", "jitter"}}: the grid, the integrator form it was fitted in (the data prediction the policies
    run on, :data:`~adaptive_core.policy.LEGACY_BASE_PLAN`), its RMSE to the reference on the fit images (the grid
    itself, unmoved), ADO's (heuristic controller, host grid) RMSE on the same images for scale, the seed range
    [first, end), the CFG scales, the reference's step count (None on an analytic testbed: its reference is exact)
    and the jitter it was fitted with."""
    from ..policy import LEGACY_BASE_PLAN
    from ..tune.policy_env import (
        TRAINED_REFERENCE_STEPS,
        Config,
        make_config_testbed,
        noise_and_reference,
    )
    from .metrics import rmse
    from .run import run_method, run_oracle
    if fit_seeds < 2:
        raise ValueError(f"need at least 2 fit seeds, got {fit_seeds}")
    bad = [n for n in nfes if int(n) < 3]
    if bad:
        raise ValueError(f"the oracle search needs a budget of at least 3 model calls, got {bad}")
    cfgs = [float(c) for c in (cfg if isinstance(cfg, (list, tuple)) else [cfg])]
    steps = TRAINED_REFERENCE_STEPS if reference_steps is None else int(reference_steps)
    testbeds, xs, refs = [], [], []
    for c in cfgs:
        config = Config(testbed, model_type, c)
        if c != 1.0 and not config.conditional:
            raise ValueError(f"{testbed}: only a class-conditional trained testbed takes CFG ≠ 1 (got CFG {c:g})")
        tb = make_config_testbed(config)
        x, ref = noise_and_reference(config, tb, range(fit_seeds), steps)
        testbeds.append(tb)
        xs.append(x)
        refs.append(ref)
    model = testbeds[0] if len(cfgs) == 1 else CfgBlocks(testbeds, [len(x) for x in xs])
    x, ref = torch.cat(xs), torch.cat(refs)
    out = {}
    for nfe in nfes:
        if progress is not None:
            progress.set_postfix_str(f"nfe={nfe}")
        # in the integrator form the policies it teaches run on (adaptive_core.policy.LEGACY_BASE_PLAN)
        fitted, extra = run_oracle(model, x, ref, int(nfe), len(x), jitter=jitter,
                                   prediction=LEGACY_BASE_PLAN["prediction"])
        heuristic, _ = run_method("ado", model, x, int(nfe))
        out[str(int(nfe))] = {"sigmas": extra["sigmas"], "prediction": extra["prediction"],
                              "fit_rmse": rmse(fitted, ref),
                              "fit_heuristic_rmse": rmse(heuristic, ref), "fit_seeds": [0, int(fit_seeds)],
                              "fit_cfg": cfgs, "reference_steps": steps if config.trained else None,
                              "jitter": float(jitter)}
        if progress is not None:
            progress.update(1)
    return out


def _job(job) -> dict:
    """One model type at one CFG scale (or at several, fitted jointly) with its own progress bar (a process-pool
    task).  Returns {config key: grids}; a joint fit's grids go under every scale's key."""
    from tqdm.auto import tqdm

    from ..tune.policy_env import Config
    testbed, model_type, cfgs, nfes, fit_seeds, reference_steps, jitter, position = job
    torch.set_num_threads(1)
    keys = [Config(testbed, model_type, float(c)).key for c in cfgs]
    with tqdm(total=len(nfes), desc=" + ".join(keys), unit="grid", position=position) as bar:
        grids = fit_config(model_type, list(cfgs), nfes, fit_seeds, reference_steps, bar, testbed, jitter)
    return {key: grids for key in keys}


def load_oracle_grids(path: Path | None) -> dict:
    """{config key: {"methods": {"oracle": {nfe: {"sigmas", ...}}}}} from ``--out`` of this module, in the
    analytic benchmark's layout (``docs/bench/results.json``); {} when ``path`` is None or missing."""
    if path is None or not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    try:
        return {key: {"methods": {"oracle": grids}} for key, grids in data["configs"].items()}
    except (KeyError, AttributeError, TypeError) as e:
        raise ValueError(f"{path}: not an oracle grid file of adaptive_core.bench.trained_oracle ({e})") from None


def main(argv=None) -> int:
    """CLI (see the module docstring)."""
    from ..testbeds import (
        CONDITIONAL_TESTBED_NAMES,
        TESTBED_NAMES,
        TRAINED_TESTBED_NAMES,
        split_variant_name,
    )
    from ..tune.policy_env import TRAINED_REFERENCE_STEPS
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.bench.trained_oracle",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--testbed", default="mnist_unet",
                    help=f"a trained testbed {TRAINED_TESTBED_NAMES}, or an analytic one {TESTBED_NAMES} or its "
                         "variant NAME@PARAM=VALUE (e.g. gaussian@exponent=1.5)")
    ap.add_argument("--model-type", nargs="+", default=["ve", "flow"], choices=["ve", "flow"])
    ap.add_argument("--cfg", nargs="+", type=float, default=None,
                    help="classifier-free guidance scales (default 1 2 on a class-conditional testbed, 1 otherwise)")
    ap.add_argument("--nfe", nargs="+", type=int, default=[5, 8, 10])
    ap.add_argument("--fit-seeds", type=int, default=32, help="noise seeds 0..N-1 the grids are fitted on")
    ap.add_argument("--reference-steps", type=int, default=TRAINED_REFERENCE_STEPS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="grid file; the grids already in it that are "
                                                                  "not re-fitted are kept")
    ap.add_argument("--jobs", type=int, default=2, help="configurations fitted in parallel processes")
    ap.add_argument("--joint-cfg", action="store_true",
                    help="fit one grid per model type and budget to the images of every --cfg scale together (the "
                         "policy does not observe the CFG scale); it is written under each scale's key")
    ap.add_argument("--jitter", type=float, default=0.0,
                    help="fit the best grid whose gain survives moving its points by ± this much in λ (e.g. 0.02; "
                         "5 sampling runs per trial instead of 1): on a network whose D(x, σ) ripples in σ the plain "
                         "optimum can be a needle that a step policy landing near it does not keep")
    args = ap.parse_args(argv)
    try:
        split_variant_name(args.testbed)
    except ValueError as e:
        ap.error(f"--testbed: {e}")
    if args.cfg is None:
        args.cfg = [1.0, 2.0] if args.testbed in CONDITIONAL_TESTBED_NAMES else [1.0]
    if args.testbed not in CONDITIONAL_TESTBED_NAMES and args.cfg != [1.0]:
        ap.error(f"{args.testbed} is unconditional: --cfg can only be 1")
    if args.fit_seeds < 2 or any(n < 3 for n in args.nfe) or any(c < 0 for c in args.cfg) or args.jobs < 1 \
            or not args.jitter >= 0:
        ap.error("need --fit-seeds ≥ 2, every --nfe ≥ 3, --cfg ≥ 0, --jobs ≥ 1 and --jitter ≥ 0")
    if args.joint_cfg:
        todo = [(m, tuple(args.cfg)) for m in args.model_type]
    else:   # the CFG-2 runs cost twice the model calls: start them first so the pool ends together
        todo = sorted(((m, (c,)) for m in args.model_type for c in args.cfg), key=lambda mc: -mc[1][0])
    jobs = [(args.testbed, m, c, sorted(set(args.nfe)), args.fit_seeds, args.reference_steps, args.jitter, i)
            for i, (m, c) in enumerate(todo)]
    t0 = time.time()
    fitted: dict = {}
    if args.jobs > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as pool:
            for part in pool.map(_job, jobs):
                fitted.update(part)
    else:
        for job in jobs:
            fitted.update(_job(job))
    old = json.loads(args.out.read_text()) if args.out.is_file() else {"configs": {}}
    configs = dict(old.get("configs", {}))
    for key, grids in fitted.items():   # budgets fitted now replace those of an earlier run; the others stay
        configs[key] = dict(sorted({**configs.get(key, {}), **grids}.items(), key=lambda kv: int(kv[0])))
    argv = sys.argv[1:] if argv is None else argv
    run = {"command": " ".join(["python -m adaptive_core.bench.trained_oracle", *argv]), "nfe": sorted(set(args.nfe)),
           "seconds": round(time.time() - t0, 1), "torch": torch.__version__,
           "machine": f"{platform.machine()}, {args.jobs} process(es) of 1 thread"}
    result = {"meta": {"runs": old.get("meta", {}).get("runs", []) + [run]}, "configs": dict(sorted(configs.items()))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"oracle grids fitted on seeds 0..{args.fit_seeds - 1} ({run['seconds']:.0f} s) -> {args.out}")
    print("| configuration | NFE | ADO (heuristic) RMSE | oracle grid RMSE | ratio (fit seeds, in-sample) |")
    print("|---|---|---|---|---|")
    for key, grids in fitted.items():
        for n, g in grids.items():
            print(f"| {key} | {n} | {g['fit_heuristic_rmse']:.4f} | {g['fit_rmse']:.4f} | "
                  f"{g['fit_rmse'] / g['fit_heuristic_rmse']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
