"""The policy-headroom measurement (adaptive_core.tune.policy_headroom): its continuations, its neighbour rule, the
run it observes, and a small end-to-end report."""
import json

import numpy as np
import pytest
import torch

from adaptive_core.sampler import sample_adaptive
from adaptive_core.schedules import half_log_snr
from adaptive_core.testbeds import make_testbed
from adaptive_core.tune import policy_headroom as ph


def _lam(grid, model_type):
    return np.array([half_log_snr(float(s), model_type) for s in grid if float(s) > 0])


@pytest.mark.parametrize("model_type", ["ve", "flow"])
def test_continuations_move_only_the_points_after_the_call(model_type):
    grid, _ = ph.oracle_grid_of(f"gaussian-{model_type}", 8)
    lam = _lam(grid, model_type)
    for k in (1, 4):
        grids = ph.continuation_grids(grid, model_type, k)
        assert len(grids) == 1 + len(ph.CONTINUATION_SHIFTS) + len(ph.CONTINUATION_TILTS)
        assert torch.equal(grids[0], grid.to(torch.float64))
        for g in grids[1:]:
            assert g[-1] == 0 and bool((g[1:] < g[:-1]).all()), g
            moved = _lam(g, model_type)
            np.testing.assert_allclose(moved[:k], lam[:k], rtol=1e-9)            # calls 1..k happened already
            np.testing.assert_allclose(moved[-1], lam[-1], rtol=1e-9)            # the last point stays
            assert np.abs(moved[k:-1] - lam[k:-1]).max() > 0.01                  # the rest moved
    with pytest.raises(ValueError, match="after_call"):
        ph.continuation_grids(grid, model_type, len(lam) - 1)
    with pytest.raises(ValueError, match="descending"):
        ph.continuation_grids(torch.tensor([1.0, 2.0, 0.0]), model_type, 1)


@pytest.mark.parametrize("model_type", ["ve", "flow"])
def test_observed_run_is_the_fixed_grid_run(model_type):
    """The observer keeps the plan, so the run it watches is ADO's fixed-grid run on the same grid, and it sees one
    observation row per image at every call that decides a step."""
    tb = make_testbed("gmm_digits", model_type)
    grid, prediction = ph.oracle_grid_of(f"gmm_digits-{model_type}", 5)
    x = tb.noise(range(6))
    obs, out = ph.grid_observations(tb, x, grid, model_type, prediction)
    fixed = sample_adaptive(tb, x, grid, model_type=model_type, mode="fixed", **ph.run_options(prediction))
    torch.testing.assert_close(out, fixed, rtol=1e-6, atol=1e-7)
    assert len(obs) == 3 and all(o.shape == (6, 17) for o in obs)   # calls 1-3 of 5 (the 5th is the end point)
    # from call 2 on the observation depends on the image (a flow run's first call is at pure noise, where the
    # denoiser predicts the same for every image)
    assert not np.allclose(obs[1], obs[1][:1])


def test_neighbour_rule_learns_a_choice_that_the_observation_decides():
    rng = np.random.default_rng(0)
    obs_train, obs_test = rng.normal(size=(400, 5)), rng.normal(size=(100, 5))
    # choice 1 is better where the first observation is positive, choice 0 elsewhere; other columns are noise
    def errors(obs):
        e = np.full((len(obs), 3), 2.0)
        e[:, 0] = np.where(obs[:, 0] > 0, 3.0, 1.0)
        e[:, 1] = np.where(obs[:, 0] > 0, 1.0, 3.0)
        return e
    choice = ph.nearest_neighbour_choice(obs_train, errors(obs_train), obs_test, 16)
    right = np.where(obs_test[:, 0] > 0, 1, 0)
    assert (choice == right).mean() > 0.85
    # with every training image as a neighbour the rule is the best single column
    all_k = ph.nearest_neighbour_choice(obs_train, errors(obs_train), obs_test, len(obs_train))
    assert len(set(all_k.tolist())) == 1
    with pytest.raises(ValueError, match="k"):
        ph.nearest_neighbour_choice(obs_train, errors(obs_train), obs_test, 0)
    with pytest.raises(ValueError, match="shapes"):
        ph.nearest_neighbour_choice(obs_train, errors(obs_train)[:10], obs_test, 4)


def test_bad_cells_and_missing_grids_are_named():
    assert ph.parse_cell("mnist_unet:ve:2:8") == ("mnist_unet", "ve", 2.0, 8)
    for bad, msg in [("gmm_digits:ve:5", "TESTBED:MODEL_TYPE:CFG:NFE"), ("nope:ve:1:5", "unknown testbed"),
                     ("gmm_digits:edm:1:5", "model type"), ("gmm_digits:ve:2:5", "unconditional"),
                     ("gmm_digits:ve:1:2", "NFE"), ("gmm_digits:ve:x:5", "CFG must be a number")]:
        with pytest.raises(ValueError, match=msg):
            ph.parse_cell(bad)
    with pytest.raises(ValueError, match="no oracle grid"):
        ph.oracle_grid_of("gmm_digits-ve", 97)


def test_small_report_end_to_end(tmp_path):
    out = tmp_path / "headroom.json"
    assert ph.main(["--cell", "gaussian:ve:1:5", "--train-seeds", "64", "--seeds", "12", "--per-image-oracle", "2",
                    "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    (row,) = rep["rows"]
    assert row["configuration"] == "gaussian-ve" and row["nfe"] == 5 and set(row["decide_after_call"]) == {"1", "2"}
    for cell in row["decide_after_call"].values():
        assert cell["per_image_best_continuation"] <= cell["best_single_continuation"] <= cell["shared_grid"] + 1e-12
        assert all(np.isfinite(cell[f"nearest_{n}"]) for n in ph.NEIGHBOURS)
    assert row["per_image_oracle"]["images"] == 2 and 0 < row["per_image_oracle"]["ratio"]
    assert out.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        ph.main(["--cell", "gaussian:ve:1:5", "--train-seeds", "8", "--out", str(out)])
