"""The outer L-BFGS-B driver with a renewed diagonal preconditioner."""

import numpy as np

from scribe_stan.laplace.outer import minimize_rescaled


def _problem(P=40, seed=0):
    """Separable convex f(t) = sum_i w_i (exp(t_i) - b_i t_i), minimum at t = log b.

    The curvature w_i exp(t_i) spans ten orders of magnitude over coordinates and changes
    along the path, which is what the renewed scale is for.
    """
    rng = np.random.default_rng(seed)
    w = 10.0 ** rng.uniform(-4, 4, P)
    b = np.exp(rng.uniform(-3, 3, P))

    def fun(t):
        return float(np.sum(w * (np.exp(t) - b * t))), w * (np.exp(t) - b)

    return fun, (lambda t: np.sqrt(w * np.exp(t))), np.log(b)


def test_reaches_the_minimum_with_and_without_renewal():
    fun, scale_at, t_star = _problem()
    lower, upper = np.full(t_star.size, -20.0), np.full(t_star.size, 20.0)
    values = []
    for every in (None, 3):
        res = minimize_rescaled(fun, np.zeros(t_star.size), lower, upper, scale_at,
                                max_iter=500, tol=1e-14, rescale_every=every,
                                callback=values.append)
        # near the minimum in the whitened coordinates (the start is O(1-100) away)
        np.testing.assert_allclose((res.x - t_star) * scale_at(t_star), 0.0, atol=1e-3)
        assert res.fun <= fun(t_star)[0] + 1e-8 * abs(fun(t_star)[0])
        assert (res.n_rescale > 0) == (every is not None)
    assert len(values) > 0 and all(np.isfinite(values))


def test_iteration_budget_is_shared_across_restarts_and_bounds_hold():
    fun, scale_at, t_star = _problem(seed=1)
    lower = np.full(t_star.size, -20.0)
    upper = np.where(np.arange(t_star.size) % 2 == 0, t_star - 0.5, 20.0)  # half bind
    start = np.full(t_star.size, 3.0)
    res = minimize_rescaled(fun, start, lower, upper, scale_at, max_iter=7, tol=1e-14,
                            rescale_every=2)
    assert res.nit == 7 and res.n_rescale == 3
    assert np.all(res.x <= upper + 1e-12) and np.all(res.x >= lower - 1e-12)
    full = minimize_rescaled(fun, start, lower, upper, scale_at, max_iter=500, tol=1e-14,
                             rescale_every=2)
    assert full.nit < 500
    target = np.minimum(t_star, upper)
    np.testing.assert_allclose((full.x - target) * scale_at(target), 0.0, atol=1e-3)
