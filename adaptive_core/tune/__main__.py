"""``python -m adaptive_core.tune monitor ...`` (train and export the quality monitor),
``python -m adaptive_core.tune monitor-eval ...`` (measure it: docs/monitor/README.md) and
``python -m adaptive_core.tune policy ...`` (train and export the PPO step policy: docs/policy/README.md),
``python -m adaptive_core.tune policy-eval ...`` (measure it), ``python -m adaptive_core.tune policy-ensemble ...``
(export the mean of trained policies as one), ``python -m adaptive_core.tune policy-distill ...`` (train one
small policy to imitate another, e.g. an ensemble), ``python -m adaptive_core.tune policy-critic ...`` (fit the
critic that fine-tuning a policy file starts from), ``python -m adaptive_core.tune policy-calibrate ...`` (fit a
policy's step offset to a new model by a paired line search), ``python -m adaptive_core.tune policy-adapt ...``
(adapt a policy to another trained network: its oracle grids, distillation, measurement),
``python -m adaptive_core.tune policy-headroom ...`` (how much room a step policy has, and how much of it its
observations reveal) and ``python -m adaptive_core.tune policy-study ...`` (the trials of a shared Optuna search)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def monitor_main(argv) -> int:
    """Collect training data on the testbeds, train the monitor MLP, export ONNX + manifest, plot."""
    ap = argparse.ArgumentParser(prog="python -m adaptive_core.tune monitor",
                                 description="Train the quality monitor and export it as ONNX + JSON manifest.")
    ap.add_argument("--seeds", type=int, default=96, help="training noises per testbed (seeds 0..N-1)")
    ap.add_argument("--val-seeds", type=int, default=32, help="held-out noises per testbed (seeds 10000..)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "policies" / "quality_monitor.onnx",
                    help="ONNX file to write; the manifest goes next to it with the suffix .json")
    ap.add_argument("--data", type=Path, default=REPO / "build" / "monitor_data.safetensors",
                    help="where the training data are cached (safetensors); reused if present, see --fresh")
    ap.add_argument("--fresh", action="store_true", help="collect the data again even if --data exists")
    ap.add_argument("--plot", type=Path, default=REPO / "docs" / "monitor" / "predicted_vs_true_train.png")
    ap.add_argument("--quick", action="store_true", help="a small run for a smoke test (few seeds, budgets, epochs)")
    ap.add_argument("--with-imperfect", action="store_true",
                    help="also train on the imperfect-denoiser variants (monitor_data.IMPERFECT_TESTBEDS)")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from ..features import FEATURE_NAMES
    from . import monitor_data as md
    from . import monitor_train as mt
    torch.set_num_threads(1)
    specs = md.TRAIN_TESTBEDS[:4] if args.quick else md.TRAIN_TESTBEDS
    if args.with_imperfect:
        specs = tuple(specs) + md.IMPERFECT_TESTBEDS
    ado_budgets = (5, 10, 20) if args.quick else md.ADO_BUDGETS
    peer_budgets = (8, 15) if args.quick else md.PEER_BUDGETS
    seeds = range(8 if args.quick else args.seeds)
    val_seeds = range(10000, 10000 + (4 if args.quick else args.val_seeds))
    epochs = 3 if args.quick else args.epochs
    meta = {"testbeds": [s.label for s in specs], "ado_budgets": list(ado_budgets), "peer_budgets": list(peer_budgets),
            "peers": md.PEERS, "train_seeds": [seeds.start, seeds.stop], "val_seeds": [val_seeds.start, val_seeds.stop],
            "feature_names": list(FEATURE_NAMES)}
    data_path = args.data.with_name(args.data.stem + ("_quick" if args.quick else "") + args.data.suffix)
    val_path = data_path.with_name(data_path.stem + "_val" + data_path.suffix)
    if args.fresh or not (data_path.exists() and val_path.exists()):
        data_path.parent.mkdir(parents=True, exist_ok=True)
        md.save_data(md.collect(specs, seeds, ado_budgets, peer_budgets), data_path, meta)
        md.save_data(md.collect(specs, val_seeds, ado_budgets, peer_budgets), val_path, meta)
    train, val = md.load_data(data_path), md.load_data(val_path)
    print(f"training rows {len(train['features'])}, held-out-seed rows {len(val['features'])}")
    model, history = mt.train_monitor(train, val, hidden=args.hidden, depth=args.depth, epochs=epochs)
    pred = mt.predict_torch(model, val["features"])
    true = mt.targets_of(val)
    metrics = {"val_huber_loss": history["val_loss"][-1], "train_huber_loss": history["train_loss"][-1],
               "val_spearman_to_final": md.spearman(pred[:, 0], true[:, 0]),
               "val_spearman_to_reference": md.spearman(pred[:, 1], true[:, 1]),
               "val_mean_abs_error_decades": [float(v) for v in np.abs(pred - true).mean(0)]}
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})
    mt.export_onnx(model, args.out)
    from ..monitor import sha256_of_file
    training = {"command": "python -m adaptive_core.tune monitor " + " ".join(argv), "created": mt.timestamp(),
                "model": {"kind": "MLP", "hidden": args.hidden, "depth": args.depth, "activation": "SiLU",
                          "epochs": epochs, "loss": "Huber(0.5) on log10 RMSE", "optimiser": "AdamW, cosine lr"},
                "data": {**meta, "train": mt.dataset_summary(train), "val": mt.dataset_summary(val),
                         "train_file_sha256": sha256_of_file(data_path),
                         "targets": "per image and model call: log10 RMSE of the denoised prediction to the run's "
                                    "final sample and to the testbed's reference solution (floor 1e-5)"},
                "held_out_testbed": md.HELD_OUT_TESTBED.label, "metrics": metrics, "torch": torch.__version__}
    manifest = mt.write_manifest(model, args.out, training)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    mt.plot_predicted_vs_true([("held-out seeds: to final sample", true[:, 0], pred[:, 0]),
                               ("held-out seeds: to reference", true[:, 1], pred[:, 1])], args.plot)
    print(f"wrote {args.out}, {manifest}, {args.plot}")
    return 0


def main(argv=None) -> int:
    """Dispatch ``monitor``, ``monitor-eval``, ``policy``, ``policy-eval``, ``policy-study``, ``policy-ensemble``,
    ``policy-distill``, ``policy-critic``, ``policy-calibrate``, ``policy-adapt`` and ``policy-headroom``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("monitor", "monitor-eval", "policy", "policy-eval", "policy-study",
                                       "policy-ensemble", "policy-distill", "policy-critic", "policy-calibrate",
                                       "policy-adapt", "policy-headroom"):
        print("usage: python -m adaptive_core.tune {monitor,monitor-eval,policy,policy-eval,policy-study,policy-ensemble,"
              "policy-distill,policy-critic,policy-calibrate,policy-adapt,policy-headroom} [options]   (-h after the command)")
        return 2
    if argv[0] == "policy-study":
        from .policy_train import study_main
        return study_main(argv[1:])
    if argv[0] == "policy-ensemble":
        from .policy_train import ensemble_main
        return ensemble_main(argv[1:])
    if argv[0] == "policy-distill":
        from .policy_distill import main as distill_main
        return distill_main(argv[1:])
    if argv[0] == "policy-headroom":
        from .policy_headroom import main as headroom_main
        return headroom_main(argv[1:])
    if argv[0] == "policy-adapt":
        from .policy_adapt import main as adapt_main
        return adapt_main(argv[1:])
    if argv[0] == "policy-calibrate":
        from .policy_calibrate import main as calibrate_main
        return calibrate_main(argv[1:])
    if argv[0] == "policy-critic":
        from .policy_critic import main as critic_main
        return critic_main(argv[1:])
    if argv[0] == "monitor":
        return monitor_main(argv[1:])
    if argv[0] == "policy":
        from .policy_train import main as policy_main
        return policy_main(argv[1:])
    if argv[0] == "policy-eval":
        from .policy_eval import main as policy_eval_main
        return policy_eval_main(argv[1:])
    from .monitor_eval import main as eval_main
    return eval_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
