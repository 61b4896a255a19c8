"""Planner and tolerance-controller maths."""
import numpy as np
import pytest

from adaptive_core import controller as ctl


def test_plan_lambdas_endpoints_monotone_and_flow_start():
    lam = ctl.plan_lambdas(np.array([-2.0, -np.inf]), np.array([3.0, 5.0]), 6, 10.0)
    assert lam.shape == (2, 7)
    assert lam[0, 0] == -2.0 and lam[0, -1] == 3.0 and np.isneginf(lam[1, 0]) and lam[1, -1] == 5.0
    assert (np.diff(lam[:, 1:], axis=1) > 0).all()
    uniform = ctl.plan_lambdas(np.array([0.0]), np.array([3.0]), 3, float("inf"))
    assert np.allclose(uniform, [[0, 1, 2, 3]])
    with pytest.raises(ValueError):
        ctl.plan_lambdas(np.array([0.0]), np.array([1.0]), 0, 7.0)


def test_replan_flat_activity_is_uniform_and_decay_stretches_the_end():
    now, end = np.array([0.0, 0.0]), np.array([4.0, 4.0])
    pts = ctl.replan_lambdas(now, end, 4, np.array([0.5, -2.0]), 0.25)
    assert np.allclose(pts[0], [1, 2, 3, 4])          # rising activity is not extrapolated: uniform
    steps = np.diff(np.concatenate([[0.0], pts[1]]))
    assert pts[1, -1] == 4.0 and (steps > 0).all() and (np.diff(steps) > 0).all()  # geometric growth


def test_equidistribute_balances_the_integral():
    pts = ctl.equidistribute(np.array([0.0]), np.array([2.0]), 2, lambda g: np.zeros_like(g), 1.0)
    assert np.allclose(pts, [[1.0, 2.0]], atol=1e-9)
    prior = ctl.prior_plan(np.array([-2.68]), np.array([3.53]), 4, 0.33)
    assert prior[0, 0] == -2.68 and prior[0, -1] == 3.53 and (np.diff(prior) > 0).all()


def test_tolerance_controller_shrinks_on_large_error_and_grows_on_small():
    tc = ctl.ToleranceController()
    h = np.array([1.0, 1.0])
    new = tc.propose(h, np.array([10.0, 0.01]), np.array([2, 2]))
    assert new[0] < 1.0 < new[1] and new[1] <= 4.0 and new[0] >= 0.2
    assert list(tc.accept(np.array([0.5, 2.0]))) == [True, False]


def test_reserve_budget_reaches_the_end_and_never_overshoots():
    lam, end = np.array([0.0]), np.array([10.0])
    assert ctl.reserve_budget(lam, np.array([0.1]), end, np.array([1]))[0] == pytest.approx(5.0)
    assert ctl.reserve_budget(lam, np.array([50.0]), end, np.array([3]))[0] == 10.0
    assert ctl.reserve_budget(lam, np.array([9.0]), end, np.array([3]))[0] == 10.0  # a tiny last step is merged


def test_planned_activity_slope_matches_the_first_plan():
    # σ^{1/ρ}-uniform points in ve have density e^{−λ/ρ} = a^exponent for a ∝ e^{−λ/(ρ·exponent)}
    assert ctl.planned_activity_slope(10.0, 0.25) == pytest.approx(-0.4)
    assert ctl.planned_activity_slope(float("inf"), 0.25) == 0.0
    assert ctl.planned_activity_slope("prior", 0.25) == ctl.PRIOR_DECAY
    lam = ctl.plan_lambdas(np.array([-3.0]), np.array([3.0]), 12, 10.0)[0, 1:]
    pts = ctl.replan_lambdas(np.array([lam[0]]), np.array([3.0]), 11,
                             np.array([ctl.planned_activity_slope(10.0, 0.25)]), 0.25)[0]
    np.testing.assert_allclose(pts, lam[1:], atol=1e-9)


def test_replanning_keeps_the_plan_unless_the_activity_decays_faster_than_planned():
    import torch

    from adaptive_core import sample_adaptive
    from adaptive_core.testbeds import make_testbed
    from adaptive_core.trace import Trace, replay_sigmas

    def taken(model, x, sigmas, **opts):
        tr = Trace()
        sample_adaptive(model, x, sigmas, nfe_budget=10, model_type="ve", trace=tr, **opts)
        return replay_sigmas(tr)

    sigmas = torch.tensor([14.6, 1.0, 0.03, 0.0], dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    # a prediction that never changes has no decay to exploit: the first plan is kept exactly
    still = lambda x, s: torch.full_like(x, 0.5)  # noqa: E731
    assert torch.equal(taken(still, x, sigmas), taken(still, x, sigmas, adapt=False))
    # the Gaussian testbed's activity decays fast at small σ: the run coarsens its end
    tb = make_testbed("gaussian", "ve")
    xg = tb.noise([0])
    adapted, planned = taken(tb, xg, sigmas), taken(tb, xg, sigmas, adapt=False)
    assert not torch.equal(adapted, planned)
    assert adapted[-3] > planned[-3]  # the step onto σ_min starts from a larger σ: the end is coarser
