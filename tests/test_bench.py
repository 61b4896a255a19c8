"""The benchmark harness: oracle search, best-peer selection, report files, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from adaptive_core import sample_adaptive
from adaptive_core.bench import run as bench
from adaptive_core.bench.metrics import median_sample_rmse, psnr, rmse
from adaptive_core.bench.oracle import optimize_schedule
from adaptive_core.schedules import karras_sigmas
from adaptive_core.testbeds import make_testbed


def test_metrics():
    a, b = torch.zeros(4, 3), torch.ones(4, 3)
    assert rmse(a, b) == 1.0 and abs(psnr(1.0) - 20 * math.log10(2.0)) < 1e-12
    b[0] = 10.0
    assert median_sample_rmse(a, b) == 1.0  # one outlier sample does not move the median


def test_oracle_search_does_not_get_worse_than_its_start():
    tb = make_testbed("gaussian", "ve")
    x = tb.noise(range(8))
    ref = tb.reference(x)

    def run(sigmas):
        return sample_adaptive(tb, x, sigmas, model_type="ve", mode="fixed")
    start = karras_sigmas(6, tb.sigma_min, tb.sigma_max)
    grid, err = optimize_schedule(run, ref, start, "ve", sweeps=1, iters=4)
    assert err <= rmse(run(start), ref)
    assert grid[0] == start[0] and grid[-1] == 0 and len(grid) == len(start)
    assert (grid[1:] < grid[:-1]).all()


def test_jittered_objective_scores_the_neighbourhood_and_is_deterministic():
    """With ``jitter`` the search's objective is the RMS over the grid and its antithetic ±jitter moves: never
    below the grid's own RMSE at the optimum's neighbours' worst, the same on a second call, and bad settings are
    refused."""
    from adaptive_core.bench.oracle import jitter_patterns
    tb = make_testbed("gmm_digits", "flow")
    x = tb.noise(range(4))
    ref = tb.reference(x)
    calls = []

    def run(sigmas):
        calls.append(sigmas)
        return sample_adaptive(tb, x, sigmas, model_type="flow", mode="fixed")
    start = karras_sigmas(5, tb.sigma_min, tb.sigma_max)
    plain_grid, plain = optimize_schedule(run, ref, start, "flow", sweeps=1, iters=2)
    n_plain = len(calls)
    grid, robust = optimize_schedule(run, ref, start, "flow", sweeps=1, iters=2, jitter=0.05)
    assert len(calls) - n_plain > 3 * n_plain   # five sampling runs per trial, less the moves that reorder points
    again, robust_again = optimize_schedule(run, ref, start, "flow", sweeps=1, iters=2, jitter=0.05)
    assert torch.equal(grid, again) and robust == robust_again
    # the returned score is the RMS of the grid's RMSE and those of its moves along the fixed patterns (flow: the
    # point at σ = 1 and the last point stay)
    from adaptive_core.schedules import half_log_snr, sigma_from_half_log_snr
    lam = torch.tensor([half_log_snr(float(s), "flow") for s in grid[:-1]], dtype=torch.float64)
    scores = [rmse(run(grid), ref)]
    for pattern in torch.cat([jitter_patterns(len(lam), 2), -jitter_patterns(len(lam), 2)]):
        moved = lam.clone()
        moved[1:-1] += 0.05 * pattern[1:-1]
        if bool((moved[2:] > moved[1:-1]).all()):
            sig = [sigma_from_half_log_snr(float(v), "flow") for v in moved]
            scores.append(rmse(run(torch.tensor([*sig, 0.0], dtype=torch.float64)), ref))
    assert len(scores) > 1 and robust == pytest.approx(math.sqrt(sum(v * v for v in scores) / len(scores)), rel=1e-9)
    assert plain == pytest.approx(rmse(run(plain_grid), ref), rel=1e-12)   # without jitter: the grid's own RMSE
    patterns = jitter_patterns(6, 2)
    assert patterns.shape == (2, 6) and set(patterns.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(patterns, jitter_patterns(6, 2))
    for bad in ({"jitter": -0.1}, {"jitter": 0.1, "jitter_draws": 0}):
        with pytest.raises(ValueError, match="jitter"):
            optimize_schedule(run, ref, start, "flow", **bad)


def test_best_peer_ignores_peers_over_budget_and_ado():
    cfg = {"methods": {"ado": {"8": {"rmse": 0.001, "nfe": 8}},
                       "a": {"8": {"rmse": 0.01, "nfe": 8}},
                       "b": {"8": {"rmse": 0.005, "nfe": 19}},
                       "c": {"8": {"rmse": 0.02, "nfe": 7}}}}
    assert bench.best_peer(cfg, 8) == ("a", 0.01)


def test_nfe_to_match():
    cfg = {"methods": {"ado": {"5": {"rmse": 0.1}, "8": {"rmse": 0.01}, "10": {"rmse": 0.005}}}}
    assert bench.nfe_to_match(cfg, 0.02) == 8
    assert bench.nfe_to_match(cfg, 0.001) is None


def test_cli_writes_table_plot_and_json(tmp_path, capsys):
    code = bench.main(["--testbed", "gaussian", "--model-type", "ve", "flow", "--nfe", "5", "8", "--seeds", "4",
                       "--out", str(tmp_path), "--jobs", "1", "--oracle-fit", "2"])
    assert code == 0
    data = json.loads((tmp_path / "results.json").read_text())
    cfg = data["configs"]["gaussian-ve"]
    assert set(cfg["methods"]["ado"]) >= {"5", "8"}
    assert "oracle" in cfg["methods"] and "dpmpp_2m+karras" in cfg["methods"]
    assert cfg["headline"]["5"]["ratio_to_best_peer"] > 0
    assert (tmp_path / "error_vs_nfe.png").stat().st_size > 10_000
    text = (tmp_path / "README.md").read_text()
    assert "## gaussian-flow" in text and "**" in text
    assert "gaussian-ve" in capsys.readouterr().out


def test_generality_check_runs_and_writes_its_table(tmp_path):
    from adaptive_core.bench import generality
    out = tmp_path / "generality.md"
    assert generality.main(["--seeds", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.count("\n| ") == 1 + 2 * len(generality.VARIANTS)  # header + a row per variant and NFE
    model = generality.ImperfectDenoiser(make_testbed("gaussian", "ve"))
    x = torch.zeros(1, 4, 16, 16)
    assert not torch.equal(model(x + 1, torch.tensor([0.1])), model.testbed(x + 1, torch.tensor([0.1])))
    assert model.nfe == 1
    from adaptive_core.domain import job_domain      # the wrapped testbed's domain: unguided, as the testbed
    assert job_domain(model, "ve").guidance == job_domain(model.testbed, "ve").guidance == "unguided"
    # a policy beside the heuristic: its RMSE and ratio per row, one more column; a non-policy name is refused
    rows = generality.run(2, (5,), ("policy:ppo_ve_flow",), first_seed=7)
    assert len(rows) == len(generality.VARIANTS)
    for r in rows:
        got = r["policy:ppo_ve_flow"]
        assert got["rmse"] > 0 and got["ratio_to_ado"] == pytest.approx(got["rmse"] / r["ado"])
    assert generality.main(["--seeds", "1", "--nfe", "5", "--controller", "policy:ppo_ve_flow", "--out",
                            str(out)]) == 0
    assert "policy:ppo_ve_flow / ADO |" in out.read_text()
    with pytest.raises(SystemExit):
        generality.main(["--seeds", "1", "--controller", "heuristic", "--out", str(out)])


def test_trained_bench_runs_at_a_tiny_size(tmp_path):
    from adaptive_core.bench import trained
    assert trained.main(["--model-type", "flow", "--cfg", "1.0", "2.5", "--samples", "10", "--nfe", "5",
                         "--reference-steps", "12", "--peers", "euler+simple", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["runs"]) == {"flow, CFG 1", "flow, CFG 2.5"}
    rows = data["runs"]["flow, CFG 2.5"]["methods"]
    assert set(rows) == {"ado", "euler+simple", trained.TARGET[0]} and set(rows["ado"]) == {"5", "30"}
    assert rows["ado"]["5"]["nfe_used"] <= 5 and rows["euler+simple"]["30"]["nfe_used"] == 30
    # guidance changes the samples, so the two runs differ
    assert rows["ado"]["5"]["rmse"] != data["runs"]["flow, CFG 1"]["methods"]["ado"]["5"]["rmse"]
    text = (tmp_path / "README.md").read_text()
    assert (tmp_path / "fd_vs_nfe.png").exists() and "FD within 5% of target" in text and "| 5 | " in text
    assert trained.main(["--from-json", str(tmp_path / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "README.md").read_text() == text
    assert trained.nfe_within({"5": {"fd": 10.4}, "8": {"fd": 9.0}}, 10.0) == 5
    assert trained.fd_turn({"5": {"fd": 12.0}, "8": {"fd": 10.0}, "10": {"fd": 9.9}, "20": {"fd": 10.5}}) == 8
    with pytest.raises(ValueError, match="unknown peer"):
        trained.peers_for("ve", ["no_such_sampler"])


def test_trained_oracle_fits_a_grid_that_policy_eval_reruns_on_its_own_seeds(tmp_path, capsys):
    """The UNet's oracle grid (bench.trained_oracle): fitted with the reference in the loop on seeds 0..2, it is a
    descending grid over the testbed's range with budget+1 points, no worse on its fit seeds than its starts;
    the CLI writes it, keeps configurations it did not re-fit, and policy-eval runs it on held-out seeds."""
    pytest.importorskip("onnxruntime")
    from adaptive_core.bench import trained_oracle
    from adaptive_core.policy import POLICY_DIR
    from adaptive_core.tune.policy_eval import measure
    out = tmp_path / "oracle.json"
    earlier = {"sigmas": [80.0, 1.0, 0.5, 0.1, 0.0]}
    out.write_text(json.dumps({"configs": {"mnist_unet-ve-cfg2": {"4": earlier},
                                           "mnist_unet-flow-cfg1": {"9": earlier}}}))
    torch.set_num_threads(1)
    assert trained_oracle.main(["--model-type", "flow", "--cfg", "1", "--nfe", "4", "--fit-seeds", "3", "--jobs",
                                "1", "--out", str(out)]) == 0
    assert "mnist_unet-flow-cfg1 | 4 |" in capsys.readouterr().out
    assert [r["nfe"] for r in json.loads(out.read_text())["meta"]["runs"]] == [[4]]
    data = json.loads(out.read_text())["configs"]
    assert set(data) == {"mnist_unet-flow-cfg1", "mnist_unet-ve-cfg2"} and data["mnist_unet-ve-cfg2"]["4"] == earlier
    assert list(data["mnist_unet-flow-cfg1"]) == ["4", "9"] and data["mnist_unet-flow-cfg1"]["9"] == earlier
    fit = data["mnist_unet-flow-cfg1"]["4"]
    grid = torch.tensor(fit["sigmas"], dtype=torch.float64)
    assert len(grid) == 5 and grid[-1] == 0 and bool((grid[1:] < grid[:-1]).all()) and fit["fit_seeds"] == [0, 3]
    assert 0 < fit["fit_rmse"] < 1 and 0 < fit["fit_heuristic_rmse"] < 1
    grids = trained_oracle.load_oracle_grids(out)
    assert grids["mnist_unet-flow-cfg1"]["methods"]["oracle"]["4"]["sigmas"] == fit["sigmas"]
    assert trained_oracle.load_oracle_grids(tmp_path / "missing.json") == {}
    (tmp_path / "bad.json").write_text(json.dumps({"grids": []}))
    with pytest.raises(ValueError, match="oracle grid file"):
        trained_oracle.load_oracle_grids(tmp_path / "bad.json")
    with pytest.raises(SystemExit):
        trained_oracle.main(["--nfe", "2", "--out", str(out)])
    # the host's Karras grid is one of the search's starts: the fitted grid is no worse on the fit seeds
    from adaptive_core.tune.policy_env import (
        Config,
        make_config_testbed,
        noise_and_reference,
    )
    config = Config("mnist_unet", "flow", 1.0)
    tb = make_config_testbed(config)
    x, ref = noise_and_reference(config, tb, range(3))
    karras = sample_adaptive(tb, x, bench.host_sigmas(tb, 4), model_type="flow", mode="fixed")
    assert fit["fit_rmse"] <= rmse(karras, ref) + 1e-9
    # policy-eval: the grid runs on the held-out seeds, beside the heuristic and the policy
    res = measure(POLICY_DIR / "ppo_ve_flow.json", [("mnist_unet", "flow")], [4], range(30000, 30002), None, None,
                  cfg_scales=[1.0], trained_oracle=out)
    (row,) = res["rows"]
    assert row["oracle_grid"] == fit["sigmas"] and row["oracle_rmse"] > 0
    assert row["policy_vs_oracle"] == pytest.approx(row["policy"] / row["oracle_rmse"])


def test_trained_oracle_joint_cfg_fits_one_grid_for_every_scale(tmp_path):
    """--joint-cfg: one grid fitted to the images of both CFG scales (CfgBlocks denoises each block at its own
    scale), written under both scales' keys."""
    from adaptive_core.bench import trained_oracle
    from adaptive_core.tune.policy_env import Config, config_noise, make_config_testbed
    torch.set_num_threads(1)
    one, two = (make_config_testbed(Config("mnist_unet", "ve", c)) for c in (1.0, 2.0))
    x = config_noise(Config("mnist_unet", "ve", 1.0), one, range(3))
    two.set_labels(one.labels)
    blocks = trained_oracle.CfgBlocks([one, two], [3, 3])
    sigma = torch.full((6,), 2.0)
    both = blocks(torch.cat([x, x]), sigma)
    assert torch.equal(both[:3], one(x, sigma[:3])) and torch.equal(both[3:], two(x, sigma[3:]))
    assert not torch.equal(both[:3], both[3:]) and blocks.nfe == 1
    with pytest.raises(ValueError, match="block size"):
        trained_oracle.CfgBlocks([one, two], [3])
    out = tmp_path / "joint.json"
    assert trained_oracle.main(["--model-type", "ve", "--nfe", "4", "--fit-seeds", "2", "--jobs", "1",
                                "--joint-cfg", "--out", str(out)]) == 0
    data = json.loads(out.read_text())["configs"]
    assert set(data) == {"mnist_unet-ve-cfg1", "mnist_unet-ve-cfg2"}
    assert data["mnist_unet-ve-cfg1"] == data["mnist_unet-ve-cfg2"]
    assert data["mnist_unet-ve-cfg1"]["4"]["fit_cfg"] == [1.0, 2.0]


def test_flow_plan_report_runs_and_compares_with_the_earlier_plan(tmp_path):
    """``python -m adaptive_core.bench.flow_plan`` on a tiny run: JSON, table and plot, and the ratios it reports are
    those of its own rows (the shipped flow plan against ``prediction="data", flow_shift=None``)."""
    from adaptive_core.bench import flow_plan
    out = tmp_path / "fp"
    assert flow_plan.main(["--testbeds", "gaussian", "--nfe", "5", "12", "--seeds", "2", "--peers", "none",
                           "--jobs", "1", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["testbeds"][0]["rows"]
    assert [r["nfe"] for r in rows] == [5, 12] and all(r["ado"] > 0 and r["ado_before"] > 0 for r in rows)
    assert rows[0]["ado"] != rows[0]["ado_before"]              # the few-step flow plan is not the earlier one
    ratios = [r["ado"] / r["ado_before"] for r in rows]
    assert res["summary"]["vs_before"]["geomean"] == pytest.approx(math.exp(sum(map(math.log, ratios)) / 2))
    assert "vs_best_peer" not in res["summary"]
    assert "| 5 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_guided_order_report_runs_ado_at_the_order_the_rule_picks(tmp_path, monkeypatch):
    """``python -m adaptive_core.bench.guided_order`` on a tiny run (the MNIST network, 2 images, a 16-step reference):
    JSON, table and plot; at CFG 1.5 ADO as shipped is its order-3 row, at CFG 3 neither (order 2, and order 1 on the
    long steps), and the summary's ratios are those of its rows."""
    from adaptive_core.bench import guided_order
    monkeypatch.setattr(guided_order, "REFERENCE_STEPS", 16)
    out = tmp_path / "go"
    assert guided_order.main(["--testbeds", "mnist_unet", "--model-types", "ve", "--cfg", "1.5", "3", "--nfe", "6",
                              "--seeds", "2", "--peers", "none", "--jobs", "1", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    low, high = res["configs"]
    assert (low["cfg"], low["auto_order"], high["cfg"], high["auto_order"]) == (1.5, 3, 3.0, 2)
    assert low["rows"][0]["ado"] == low["rows"][0]["order3"] != low["rows"][0]["order2"]
    # at 6 calls some steps are longer than 1 in λ: there ADO as shipped takes order 1, unlike order 2 alone
    assert len({high["rows"][0]["ado"], high["rows"][0]["order2"], high["rows"][0]["order3"]}) == 3
    r = high["rows"][0]
    assert res["summary"]["rule_order2"]["order2_vs_order3"]["geomean"] == pytest.approx(r["order2"] / r["order3"])
    assert res["summary"]["rule_order2"]["ado_vs_order2"]["geomean"] == pytest.approx(r["ado"] / r["order2"])
    assert "| 6 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    with pytest.raises(SystemExit):
        guided_order.main(["--testbeds", "gaussian"])           # not a class-conditional testbed


def test_tolerance_report_spends_more_calls_on_a_tighter_tolerance(tmp_path):
    """``python -m adaptive_core.bench.tolerance`` on a tiny run (the Gaussian testbed as a flow model, 3 images,
    two tolerances): JSON, table and plot; the tighter tolerance spends more calls and lands closer to the exact
    solution, budget mode runs the tolerance run's mean calls, and the summary's ratios are those of the rows."""
    from adaptive_core.bench import tolerance
    out = tmp_path / "tol"
    assert tolerance.main(["--configs", "gaussian:flow", "--rtol", "0.01", "0.2", "--seeds", "3", "--peers", "none",
                           "--jobs", "1", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    loose, tight = res["configs"][0]["rows"]
    assert (loose["rtol"], tight["rtol"]) == (0.2, 0.01)
    assert loose["mean_nfe"] < tight["mean_nfe"] <= 40 and tight["tolerance"] < loose["tolerance"]
    assert tight["nfe"] == round(tight["mean_nfe"]) and tight["peers"] == {}
    summ = res["summary"]["tolerance_vs_budget"]
    assert summ["cells"] == 2 and summ["worst"] == pytest.approx(max(r["tolerance"] / r["budget"]
                                                                     for r in (loose, tight)))
    assert "| 0.01 |" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0
    for bad in (["--configs", "mnist"], ["--configs", "gaussian:ve:3"], ["--rtol", "0"], ["--peers", "euler"]):
        with pytest.raises(SystemExit):
            tolerance.main(bad)
