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
