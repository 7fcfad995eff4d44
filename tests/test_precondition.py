"""The outer preconditioner: the block change of variables is exact, and the per-gene
blocks of :func:`block_scaling` match the objective's curvature (finite differences of
the exact gradient)."""

import numpy as np
import pytest

from scribe_stan.laplace import driver
from scribe_stan.laplace.solver import (
    LaplaceProblem,
    OuterLayout,
    block_scaling,
    objective,
)
from scribe_stan.models import pln


def _dense(scale):
    """T of a BlockScale as a dense matrix (z = T theta)."""
    T = np.diag(scale.diag.copy())
    for idx, L in zip(scale.index, scale.chol):
        T[np.ix_(idx, idx)] = L.T
    return T


def test_block_change_of_variables_is_exact():
    rng = np.random.default_rng(0)
    P, b = 11, 3
    index = np.array([[0, 4, 5], [1, 2, 7]])
    A = rng.normal(size=(2, b, b))
    chol = np.linalg.cholesky(A @ np.swapaxes(A, 1, 2) + b * np.eye(b))
    diag = rng.uniform(0.5, 2.0, P)
    diag[index] = 1.0
    scale = driver.BlockScale(diag, index, chol)
    T = _dense(scale)
    theta, grad = rng.normal(size=P), rng.normal(size=P)
    np.testing.assert_allclose(scale.forward(theta), T @ theta, rtol=1e-13)
    np.testing.assert_allclose(scale.backward(T @ theta), theta, rtol=1e-12)
    # f(theta) = grad' theta is grad' T^{-1} z in z: its gradient is T^{-T} grad
    np.testing.assert_allclose(scale.gradient(grad), np.linalg.solve(T.T, grad), rtol=1e-12)


def test_blocks_must_be_unbounded():
    scale = driver.BlockScale(np.ones(3), np.array([[0, 1]]), np.eye(2)[None])
    with pytest.raises(ValueError, match="unbounded"):
        driver.maximize(lambda t: (-t @ t, -2 * t), np.ones(3), np.array([-1.0, -np.inf, 0]),
                        np.full(3, np.inf), scaling=lambda t: scale)


def test_block_scaling_matches_the_curvature_of_each_gene():
    sim = pln.simulate(400, 6, 2, seed=3, lib_target=300.0, loading_scale=0.6)
    P = LaplaceProblem(sim["counts"], sigma_M=sim["sigma_M"], newton_tol=1e-13,
                       log_lib=sim["log_lib"], log_M0=sim["log_M0"])
    G, K = 6, 2
    layout = OuterLayout(G, K)
    mu, W, d = sim["mu"], sim["W"], sim["d"]
    theta = layout.pack(mu, W, d)
    scale = block_scaling(P, mu, W, d)
    _, g0 = objective(P, theta, layout)
    h = 1e-5
    worst = worst_diag = 1.0
    for idx, L in zip(scale.index, scale.chol):
        H = np.empty((K + 1, K + 1))
        for j, i in enumerate(idx):
            e = np.zeros_like(theta)
            e[i] = h
            H[:, j] = -(objective(P, theta + e, layout)[1][idx] - g0[idx]) / h
        H = 0.5 * (H + H.T)
        # the preconditioned block L^{-1} H L^{-T}: identity if the block were exact
        Li = np.linalg.inv(L)
        ev = np.linalg.eigvalsh(Li @ H @ Li.T)
        assert 0.1 < ev.min() and ev.max() < 3.0, ev  # curvature within a small factor
        worst = max(worst, ev.max() / ev.min())
        # the same block's diagonal alone (a diagonal scale) leaves it worse conditioned
        s = 1 / np.sqrt(np.sum(L**2, axis=1))
        ev_diag = np.linalg.eigvalsh(s[:, None] * H * s[None, :])
        worst_diag = max(worst_diag, ev_diag.max() / ev_diag.min())
    assert worst < min(1.5, worst_diag), (worst, worst_diag)
