"""``python -m adaptive_core.tune policy-distill``: one small policy that imitates a teacher policy.

Policy distillation (Rusu et al. 2016, "Policy Distillation") trains a student network to reproduce a teacher
policy's actions; here the teacher is usually an ensemble (``policy-ensemble``: the mean of several PPO
policies), which decides better than any of its members but costs one MLP per member at every decision.  The
student has the members' size (a 64-64 tanh MLP by default; ``--hidden``), so it decides at the cost of one policy.
With ``--oracle-grids`` the teacher is :class:`OracleGridTeacher`: on the configurations and budgets that have an
oracle fixed grid, the student learns to land on it.

The data are the observation rows the sampler hands the controller (:func:`adaptive_core.sampler.sample_adaptive`,
``controller=``) on the teacher's training configurations, labelled with the teacher's deterministic actions:

1. round 0: the teacher samples, and its own rows are recorded;
2. rounds 1…R (DAgger, Ross et al. 2011): the *student* samples, and the teacher labels the rows the student
   visits.  A student that only saw the teacher's rows drifts to states the teacher never reached, where its
   errors compound; DAgger adds exactly those states.  Before each round's rows join the data set, the
   student's error on them is recorded: its imitation error on its own state distribution.

The regression is the mean squared error of the student's actions (before their final clip) to the teacher's,
Adam with a cosine learning rate.  The student normalises observations in its graph with the data's mean and
variance (as VecNormalize does for PPO); its manifest keeps the teacher's fallback range, so the student is
asked exactly where the teacher would have been.  Rows the teacher itself would hand to the heuristic (out of
its range) are not used.  Noise seeds: 0…N−1 (training pools are 0–255; the periodic evaluation uses 20000…
and the measurements 30000…, which distillation never sees).
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..policy import LEGACY_BASE_PLAN, N_OBSERVATIONS, OOD_Z, STD_FLOOR, load_policy
from .policy_train import DeterministicActor, _export_verified, _policy_manifest

#: The student's hidden layer widths: the PPO members' (``policy`` trains 64-64 tanh MLPs).
STUDENT_HIDDEN = (64, 64)
#: ε of the student's normalisation clip((o − μ)/√(σ² + ε), ±c), VecNormalize's default.
STUDENT_EPSILON = 1e-8


class ImitationRecorder:
    """A sampler controller that records each observation row it is asked about with the teacher's action on it.

    It acts as the teacher (``act=None``) or as ``act`` (a function raw observation rows → actions, the student
    during DAgger), with the teacher's action mapping (scale, minimum share, order dead zone, first λ-progress,
    early-step cap).
    Rows the teacher would not decide (outside its training range) fall back to the heuristic for both, and are
    not recorded."""

    def __init__(self, teacher, act=None) -> None:
        self.teacher, self.act = teacher, act
        self.name = f"imitation of {teacher.name}"
        self.action_scale, self.min_share = teacher.action_scale, teacher.min_share
        self.order_dead_zone = getattr(teacher, "order_dead_zone", 0.5)
        self.min_lambda_progress = getattr(teacher, "min_lambda_progress", 0.0)
        self.early_step_cap = getattr(teacher, "early_step_cap", None)
        self.base_options = getattr(teacher, "base_options", LEGACY_BASE_PLAN)
        self.observations: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []

    def decide(self, observation: np.ndarray):
        """(actions, per-row fallback reasons) as :meth:`adaptive_core.policy.Policy.decide`; records the rows."""
        observation = np.asarray(observation, dtype=np.float64)
        actions, reasons = self.teacher.decide(observation)
        inside = np.array([r is None for r in reasons], dtype=bool)
        if inside.any():
            self.observations.append(observation[inside].copy())
            self.targets.append(np.asarray(actions, dtype=np.float64)[inside].copy())
            if self.act is not None:
                actions = np.array(actions, dtype=np.float64)
                actions[inside] = self.act(observation[inside])
        return actions, reasons

    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(observations [R, N_OBSERVATIONS], teacher actions [R, n_actions]) recorded so far."""
        if not self.observations:
            return np.zeros((0, N_OBSERVATIONS)), np.zeros((0, self.teacher.n_actions))
        return np.concatenate(self.observations), np.concatenate(self.targets)

    def set_context(self, config, budget: int, grid) -> None:
        """Tell the teacher which configuration, budget and host σ grid the next run has (where it asks)."""
        if hasattr(self.teacher, "set_context"):
            self.teacher.set_context(config, budget, grid)


class OracleGridTeacher:
    """A teacher that lands each step on the oracle fixed grid of the configuration and budget being sampled, where
    there is one, and acts as ``policy`` elsewhere.

    The oracle grid (:mod:`adaptive_core.bench.trained_oracle`, or the analytic benchmark's ``oracle``) was fitted
    with the reference in the loop, which no policy can do at run time: a teacher with privileged information
    whose behaviour the student learns from what it can observe ("Learning by Cheating", Chen et al. 2019; guided
    policy search, Levine & Koltun 2013).  After k model calls the grid's next point is its σ_k; the step action
    is the one that takes the sampler's planned share of the remaining λ-span (:func:`adaptive_core.sampler.
    _policy_next`) onto it, a₀ = log₄(share to σ_k / planned share), clipped to [−1, 1]; where a student has
    already passed σ_k, the next grid point ahead.  The order action is 0 (the heuristic's order).  The position
    is read off the observation (λ-progress between the host grid's ends, the share of the budget used, the
    planned share), so the teacher needs :meth:`set_context` before each run.  Fallback rows are ``policy``'s.

    The heuristic's order drops to 2 on steps longer than ``high_order_max_step`` (1.5 in λ), and a fitted grid
    tends to put a step right at that edge, where the error jumps.  A student a few per cent off the grid would
    land on the other side, with the other order.  So a grid step within ``order_margin`` of the edge is
    labelled as a step ``order_margin`` clear of it, on the grid's side; ``order_margin=0`` follows the grid
    exactly.

    With ``grid_rows_in_range`` every row of a run that has a grid is labelled, even where ``policy`` would fall
    back to the heuristic (a new network's features may lie outside ``policy``'s training range; the grid needs
    no range).  The student of such rows needs the range of its own data (``export_student(fallback_range=
    "data")``).
    """

    def __init__(self, policy, grids: dict, order_margin: float = 0.0, grid_rows_in_range: bool = False) -> None:
        from ..sampler import DEFAULTS
        if not order_margin >= 0:
            raise ValueError(f"order_margin must be ≥ 0, got {order_margin}")
        self.policy, self.grids, self.order_margin = policy, grids, float(order_margin)
        self.grid_rows_in_range = bool(grid_rows_in_range)
        self._edge = float(DEFAULTS["high_order_max_step"])
        self._lam = None

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def set_context(self, config, budget: int, grid) -> None:
        """Select the oracle grid of ``config`` at ``budget`` (None: act as the policy); ``grid`` is the host σ
        grid the run starts from, whose ends define λ-progress."""
        from ..controller import planning_start
        from ..schedules import half_log_snr
        sigmas = self.grids.get(config.key, {}).get(str(int(budget)), {}).get("sigmas")
        if sigmas is None:
            self._lam = None
            return
        nonzero = [float(s) for s in sigmas if float(s) > 0]
        if len(nonzero) != int(budget):
            raise ValueError(f"{config.key}: the oracle grid for {budget} calls has {len(nonzero)} nonzero points")
        host = [float(s) for s in grid if float(s) > 0]
        mt = config.model_type
        self._lam = np.array([half_log_snr(s, mt) for s in nonzero])
        self._ends = (float(planning_start(np.array([half_log_snr(host[0], mt)]))[0]), half_log_snr(host[-1], mt))
        self._budget = int(budget)

    def decide(self, observation: np.ndarray):
        """(actions, fallback reasons): the oracle grid's step where a grid is selected, else ``policy``'s."""
        from ..policy import LAMBDA_PROGRESS_INDEX, OBSERVATION_NAMES
        actions, reasons = self.policy.decide(observation)
        if self._lam is None:
            return actions, reasons
        if self.grid_rows_in_range:
            reasons = [None if r is None or np.isfinite(o).all() else r for r, o in zip(reasons, observation)]
        obs = np.asarray(observation, dtype=np.float64)
        start, end = self._ends
        lam_now = start + obs[:, LAMBDA_PROGRESS_INDEX] * (end - start)
        calls = np.rint(obs[:, OBSERVATION_NAMES.index("budget_used")] * self._budget).astype(int)
        planned = np.exp(obs[:, OBSERVATION_NAMES.index("log_base_share")])
        out = np.zeros_like(np.asarray(actions, dtype=np.float64))
        for r in range(len(obs)):
            ahead = np.flatnonzero(self._lam > lam_now[r] + 1e-6)
            ahead = ahead[ahead >= min(calls[r], len(self._lam) - 1)] if ahead.size else ahead
            target = self._lam[ahead[0]] if ahead.size else end
            step, edge, margin = target - lam_now[r], self._edge, self.order_margin
            if edge < step < edge + margin:
                target = min(lam_now[r] + edge + margin, end)
            elif edge - margin < step <= edge:
                target = lam_now[r] + edge - margin
            share = (target - lam_now[r]) / max(end - lam_now[r], 1e-12)
            out[r, 0] = np.clip(np.log(max(share, 1e-6) / planned[r]) / np.log(4.0), -1.0, 1.0)
        return out, reasons


def run_configurations(controller, configs, budgets, seeds, progress=None) -> None:
    """Sample every configuration at every budget from the noises of ``seeds`` with ``controller`` (the env's
    host σ grid, budget mode; on a trained testbed the class is ``seed mod 10``).  Only the controller's side
    effects are kept: no reference is computed.  A controller with ``set_context`` hears the configuration,
    budget and host grid before each run."""
    from ..sampler import sample_adaptive
    from .policy_env import config_noise, host_grid, make_config_testbed
    for config in configs:
        tb = make_config_testbed(config)
        x = config_noise(config, tb, seeds)
        for budget in budgets:
            if hasattr(controller, "set_context"):
                controller.set_context(config, int(budget), host_grid(tb, budget))
            sample_adaptive(tb, x, host_grid(tb, budget), nfe_budget=int(budget), model_type=config.model_type,
                            controller=controller)
            if progress is not None:
                progress.update(1)


def new_student(observations: np.ndarray, n_actions: int, hidden=STUDENT_HIDDEN, seed: int = 0,
                clip_obs: float = 10.0) -> DeterministicActor:
    """A fresh tanh MLP actor (PyTorch's default initialisation, seeded) that normalises observations with the
    mean and variance of ``observations`` (the variance floored at the fallback rule's std floor, squared, so a
    column that hardly varies in the data does not blow up)."""
    torch.manual_seed(seed)
    layers, width = [], N_OBSERVATIONS
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.Tanh()]
        width = int(h)
    return DeterministicActor(nn.Sequential(*layers), nn.Linear(width, n_actions), observations.mean(0),
                              np.maximum(observations.var(0), STD_FLOOR ** 2), STUDENT_EPSILON, clip_obs)


def student_actions(student: DeterministicActor, observation: np.ndarray) -> np.ndarray:
    """The student's deterministic actions [R, n_actions] (float64) for raw observation rows."""
    with torch.no_grad():
        return student(torch.as_tensor(np.asarray(observation), dtype=torch.float32)).double().numpy()


def _check_rows(observations, targets) -> None:
    """Raise ValueError unless there are some observation rows and as many target rows."""
    if len(observations) == 0 or len(observations) != len(targets):
        raise ValueError(f"need as many target rows as observation rows (and some), got {len(observations)} "
                         f"and {len(targets)}")


def fit_student(student: DeterministicActor, observations: np.ndarray, targets: np.ndarray, *, epochs: int,
                lr: float = 1e-3, batch_size: int = 256, seed: int = 0) -> list[float]:
    """Fit ``student`` to the teacher's actions by the mean squared error of its unclipped output (Adam, cosine
    learning rate over all epochs).  Returns the mean training loss of each epoch."""
    _check_rows(observations, targets)
    x = torch.as_tensor(observations, dtype=torch.float32)
    y = torch.as_tensor(targets, dtype=torch.float32)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    student.train()
    for _ in range(epochs):
        order, total = torch.randperm(len(x), generator=gen), 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            loss = torch.mean((student.raw_action(x[idx]) - y[idx]) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    student.eval()
    return losses


def imitation_error(student: DeterministicActor, observations: np.ndarray, targets: np.ndarray,
                    order_dead_zone: float = 0.5) -> dict:
    """How far the student's actions are from the teacher's on given rows: RMS difference of the step action
    (a₀, which scales the step by 4^a₀), its largest difference, and the share of rows whose order decision
    (a₁ against the dead zone) differs."""
    _check_rows(observations, targets)
    got = student_actions(student, observations)
    out = {"rows": len(observations),
           "step_action_rms_error": float(np.sqrt(np.mean((got[:, 0] - targets[:, 0]) ** 2))),
           "step_action_max_error": float(np.max(np.abs(got[:, 0] - targets[:, 0])))}
    if targets.shape[1] > 1:
        def order(a):
            return np.where(a <= -order_dead_zone, -1, np.where(a >= order_dead_zone, 1, 0))
        out["order_decisions_differing"] = float(np.mean(order(got[:, 1]) != order(targets[:, 1])))
    return out


def distill(teacher, configs, budgets, seeds, *, rounds: int = 2, epochs: int = 60, dagger_epochs: int = 30,
            lr: float = 1e-3, hidden=STUDENT_HIDDEN, seed: int = 0, log=print):
    """Distil ``teacher`` (a :class:`~adaptive_core.policy.Policy`) into a fresh MLP: round 0 on the teacher's
    own rows, then ``rounds`` DAgger rounds on the student's (module docstring).  Returns (student, history)."""
    from tqdm import tqdm
    runs_per_round = len(configs) * len(budgets)
    bar = tqdm(total=runs_per_round * (rounds + 1), desc="distil: sampling runs", unit="run")
    data = ImitationRecorder(teacher)
    run_configurations(data, configs, budgets, seeds, bar)
    obs, target = data.rows()
    if len(obs) == 0:
        bar.close()
        raise RuntimeError("the teacher was never asked for a decision: no rows to learn from")
    student = new_student(obs, target.shape[1], hidden, seed)
    history = {"rounds": []}
    t0 = time.time()
    losses = fit_student(student, obs, target, epochs=epochs, lr=lr, seed=seed)
    history["rounds"].append({"round": 0, "acting": "teacher", "new_rows": len(obs), "rows": len(obs),
                              "final_loss": losses[-1], "fit_seconds": round(time.time() - t0, 1),
                              "fit_error": imitation_error(student, obs, target, data.order_dead_zone)})
    log(f"round 0 (teacher acts): {len(obs)} rows, loss {losses[-1]:.3g}")
    for r in range(1, rounds + 1):
        rec = ImitationRecorder(teacher, act=lambda o: student_actions(student, o))
        run_configurations(rec, configs, budgets, seeds, bar)
        new_obs, new_target = rec.rows()
        on_policy = imitation_error(student, new_obs, new_target, data.order_dead_zone)
        obs, target = np.concatenate([obs, new_obs]), np.concatenate([target, new_target])
        t0 = time.time()
        losses = fit_student(student, obs, target, epochs=dagger_epochs, lr=lr, seed=seed + r)
        history["rounds"].append({"round": r, "acting": "student", "new_rows": len(new_obs),
                                  "rows": len(obs), "error_on_own_rows_before_fit": on_policy,
                                  "final_loss": losses[-1], "fit_seconds": round(time.time() - t0, 1)})
        log(f"round {r} (student acts): {len(new_obs)} new rows; its error there before refitting: "
            f"step action RMS {on_policy['step_action_rms_error']:.3f}"
            + (f", order decisions differing {on_policy['order_decisions_differing']:.1%}"
               if "order_decisions_differing" in on_policy else "") + f"; loss after {losses[-1]:.3g}")
    bar.close()
    return student, history


def trained_on_of(configs, budgets) -> dict:
    """The manifest's ``trained_on`` for a policy distilled on ``configs`` (:class:`~.policy_env.Config`) and
    ``budgets``."""
    testbeds = list(dict.fromkeys(f"{c.name}-{c.model_type}" for c in configs))
    return {"testbeds": testbeds, "model_types": sorted({c.model_type for c in configs}),
            "budgets": [int(b) for b in budgets],
            "cfg_scales": sorted({float(c.cfg) for c in configs if c.conditional}) or [1.0],
            "configurations": [c.key for c in configs]}


def export_student(student: DeterministicActor, teacher, onnx_path: Path, *, training: dict, metrics: dict,
                   trained_on: dict | None = None, fallback_range: str = "teacher") -> Path:
    """Write the student as one ONNX file (checked against the PyTorch student to 1e-5) and its manifest: the
    action mapping of the teacher, the student's own training record, ``trained_on`` (default: the teacher's)
    and the fallback range: the teacher's (``"teacher"``: the student is asked where the teacher would be) or
    that of the student's own data (``"data"``: when it learned rows outside the teacher's range, e.g. a new
    network's, from :class:`OracleGridTeacher` with ``grid_rows_in_range``).  Returns the manifest path."""
    if fallback_range not in ("teacher", "data"):
        raise ValueError(f"fallback_range must be 'teacher' or 'data', got {fallback_range!r}")
    onnx_path = Path(onnx_path)
    n_actions = int(student.action_net.out_features)
    mean = student.mean[0].double().numpy()
    var = (1.0 / student.inv_std[0].double() ** 2).numpy() - STUDENT_EPSILON
    _export_verified(student, onnx_path, mean, var, lambda probe: student_actions(student, probe))
    t_norm = teacher.manifest.normalisation
    if fallback_range == "teacher":
        centre, spread = list(t_norm["mean"]), list(t_norm["var"])
        why = "mean/var are the teacher's, for the fallback rule (the student is asked where the teacher would be)"
        range_text = "the teacher's training range centre"
    else:
        centre, spread = [float(v) for v in mean], [float(v) for v in var]
        why = "mean/var are those of the student's own training rows, for the fallback rule"
        range_text = "the student's training data centre"
    normalisation = {"applied_in_graph": True, "mean": centre, "var": spread,
                     "student_mean": [float(v) for v in mean], "student_var": [float(v) for v in var],
                     "epsilon": STUDENT_EPSILON, "clip_obs": student.clip_obs,
                     "formula": "the student computes clip((obs - student_mean) / sqrt(student_var), -clip_obs, "
                                f"clip_obs) in the graph; {why}"}
    return _policy_manifest(onnx_path, n_actions, normalisation,
                            trained_on=teacher.manifest.trained_on if trained_on is None else trained_on,
                            training=training, metrics=metrics, min_lambda_progress=teacher.min_lambda_progress,
                            early_step_cap=getattr(teacher, "early_step_cap", None), range_text=range_text,
                            base_plan=getattr(teacher, "base_options", None))   # the student runs on the teacher's plan


def main(argv) -> int:
    """``python -m adaptive_core.tune policy-distill``: distil a policy (usually an ensemble) into one MLP and
    export it as ONNX + manifest."""
    import argparse
    repo = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune policy-distill", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the policy to imitate: a manifest path or a bundled name")
    ap.add_argument("--name", required=True, help="student policy name: <out-dir>/<name>.onnx + .json")
    ap.add_argument("--out-dir", type=Path, default=repo / "build" / "policies")
    ap.add_argument("--seeds", type=int, default=256, help="noise seeds 0..N-1 per configuration and budget")
    ap.add_argument("--rounds", type=int, default=2, help="DAgger rounds after the teacher's own round")
    ap.add_argument("--epochs", type=int, default=60, help="epochs of the first fit")
    ap.add_argument("--dagger-epochs", type=int, default=30, help="epochs of each refit after a DAgger round")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", default="64,64", help="hidden layer widths of the student")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--testbeds", default=None,
                    help="name:model_type,... (default: the teacher's training testbeds from its manifest)")
    ap.add_argument("--budgets", default=None, help="comma-separated NFE budgets (default: the teacher's)")
    ap.add_argument("--oracle-grids", type=Path, default=None,
                    help="oracle fixed grids (python -m adaptive_core.bench.trained_oracle, e.g. "
                         "docs/bench/trained/oracle.json): on the configurations and budgets it has, the student "
                         "learns to land on the grid (OracleGridTeacher) instead of the teacher's steps")
    ap.add_argument("--order-margin", type=float, default=0.15,
                    help="with --oracle-grids: grid steps within this many units of λ of the heuristic's long-step "
                         "order limit are taught this far clear of it (OracleGridTeacher)")
    ap.add_argument("--fallback-range", choices=("teacher", "data"), default="teacher",
                    help="the student's out-of-range rule: the teacher's range, or (with --oracle-grids, where every "
                         "row of a run with a grid is then learned) the range of the student's own training rows")
    args = ap.parse_args(argv)
    from .policy_env import configs_of
    from .policy_train import policy_training_cells
    if args.seeds < 1 or args.rounds < 0 or args.epochs < 1 or args.dagger_epochs < 1:
        ap.error("--seeds, --epochs and --dagger-epochs must be at least 1 and --rounds at least 0")
    torch.set_num_threads(1)
    teacher = load_policy(args.teacher)
    try:
        specs, budgets, cfg_scales = policy_training_cells(teacher.manifest, args.testbeds, args.budgets)
    except ValueError as e:
        ap.error(f"teacher: {e}")
    configs = configs_of(specs, cfg_scales)
    oracle_note = None
    if args.fallback_range == "data" and args.oracle_grids is None:
        ap.error("--fallback-range data needs --oracle-grids (it lets the student learn rows outside the teacher's "
                 "range, which only the oracle grids label)")
    if args.oracle_grids is not None:
        from ..bench.trained_oracle import load_oracle_grids
        if not args.oracle_grids.is_file():
            ap.error(f"--oracle-grids: no such file {args.oracle_grids}")
        try:
            grids = {k: v["methods"]["oracle"] for k, v in load_oracle_grids(args.oracle_grids).items()}
        except ValueError as e:
            ap.error(f"--oracle-grids: {e}")
        covered = sorted(f"{c.key}@{b}" for c in configs for b in budgets if str(b) in grids.get(c.key, {}))
        if not covered:
            ap.error(f"--oracle-grids: {args.oracle_grids} has no grid for these configurations and budgets")
        if not args.order_margin >= 0:
            ap.error(f"--order-margin must be ≥ 0, got {args.order_margin}")
        teacher = OracleGridTeacher(teacher, grids, args.order_margin,
                                    grid_rows_in_range=args.fallback_range == "data")
        oracle_note = {"file": str(args.oracle_grids), "sha256": hashlib.sha256(args.oracle_grids.read_bytes())
                       .hexdigest(), "cells": covered, "order_margin": args.order_margin}
    hidden = [int(h) for h in args.hidden.split(",") if h]
    start = time.time()
    student, history = distill(teacher, configs, budgets, range(args.seeds), rounds=args.rounds, epochs=args.epochs,
                               dagger_epochs=args.dagger_epochs, lr=args.lr, hidden=hidden, seed=args.seed)
    seconds = round(time.time() - start, 1)
    training = {"command": "python -m adaptive_core.tune policy-distill " + " ".join(argv),
                "algorithm": "policy distillation (Rusu et al. 2016) with DAgger rounds (Ross et al. 2011)",
                "teacher": {"name": teacher.name, "sha256": teacher.manifest.sha256,
                            "training": teacher.manifest.training},
                "configurations": [c.key for c in configs], "budgets": budgets, "seeds": [0, args.seeds],
                "student": {"hidden": hidden, "activation": "tanh"}, "history": history,
                "oracle_grids": oracle_note,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__}
    from .policy_eval import training_seconds
    teacher_seconds = float(training_seconds(teacher.manifest) or 0.0)   # all of a staged teacher's PPO stages
    manifest = export_student(student, teacher, args.out_dir / f"{args.name}.onnx", training=training,
                              metrics={"train_seconds": round(teacher_seconds + seconds, 1),
                                       "distill_seconds": seconds},
                              trained_on=trained_on_of(configs, budgets), fallback_range=args.fallback_range)
    (args.out_dir / f"{args.name}_history.json").write_text(json.dumps(history, indent=1) + "\n")
    where = "the teacher's range" if args.fallback_range == "teacher" else "the range of its own training rows"
    print(f"wrote {manifest} ({seconds:.0f} s; fallback z {OOD_Z:g} on {where})")
    return 0


__all__ = [
    "STUDENT_EPSILON",
    "STUDENT_HIDDEN",
    "ImitationRecorder",
    "OracleGridTeacher",
    "distill",
    "export_student",
    "fit_student",
    "imitation_error",
    "main",
    "new_student",
    "run_configurations",
    "student_actions",
    "trained_on_of",
]
