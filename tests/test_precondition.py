"""The outer preconditioner: the block change of variables is exact, and the per-gene
blocks of :func:`block_scaling` (pln) and of the lnm composition block's
:func:`~scribe_stan.laplace.lnm_solver.composition_scaling` match the objective's
curvature (finite differences of the exact gradient); the lnm fit reaches the same
optimum with blocks as with a diagonal scale."""

import numpy as np
import pytest

from scribe_stan.laplace import driver, lnm_solver
from scribe_stan.laplace.solver import (
    LaplaceProblem,
    OuterLayout,
    block_scaling,
    objective,
)
from scribe_stan.models import lnm, pln


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


def _block_conditioning(grad, theta, scale, h=1e-5):
    """Condition numbers of each finite-difference Hessian block whitened by the block
    preconditioner and by that block's diagonal alone (the worst of each over blocks).

    Asserts every whitened block is within a small factor of the identity: the blocks
    leave out parts of the curvature (the factors' adaptation; for lnm the multinomial's
    rank-one part), so they approximate it, not equal it.
    """
    g0 = grad(theta)
    worst = worst_diag = 1.0
    for idx, L in zip(scale.index, scale.chol):
        H = np.empty((idx.size, idx.size))
        for j, i in enumerate(idx):
            e = np.zeros_like(theta)
            e[i] = h
            H[:, j] = -(grad(theta + e)[idx] - g0[idx]) / h
        H = 0.5 * (H + H.T)
        # the preconditioned block L^{-1} H L^{-T}: identity if the block were exact
        Li = np.linalg.inv(L)
        ev = np.linalg.eigvalsh(Li @ H @ Li.T)
        assert 0.1 < ev.min() and ev.max() < 3.0, ev
        worst = max(worst, ev.max() / ev.min())
        # the same block's diagonal alone (a diagonal scale)
        s = 1 / np.sqrt(np.sum(L**2, axis=1))
        ev_diag = np.linalg.eigvalsh(s[:, None] * H * s[None, :])
        worst_diag = max(worst_diag, ev_diag.max() / ev_diag.min())
    return worst, worst_diag


def test_block_scaling_matches_the_curvature_of_each_gene():
    sim = pln.simulate(400, 6, 2, seed=3, lib_target=300.0, loading_scale=0.6)
    P = LaplaceProblem(sim["counts"], sigma_M=sim["sigma_M"], newton_tol=1e-13,
                       log_lib=sim["log_lib"], log_M0=sim["log_M0"])
    G, K = 6, 2
    layout = OuterLayout(G, K)
    mu, W, d = sim["mu"], sim["W"], sim["d"]
    theta = layout.pack(mu, W, d)
    scale = block_scaling(P, mu, W, d)
    worst, worst_diag = _block_conditioning(lambda t: objective(P, t, layout)[1], theta,
                                            scale)
    assert worst < min(1.5, worst_diag), (worst, worst_diag)


# --------------------------------------------------------------------------------------
# lnm composition block: the same per-gene blocks, carried to (m, W) coordinates
# --------------------------------------------------------------------------------------

REF = 2


def _lnm_problem(mode, seed=4):
    sim = lnm.simulate(400, 7, 2, ref=REF, seed=seed, total_mean=300.0)
    prob = lnm_solver.CompositionProblem(sim["counts"], REF, mode=mode, newton_tol=1e-13)
    d = sim["d"] if mode == "full" else None
    return sim, prob, d


@pytest.mark.parametrize("mode", ["full", "low_rank"])
def test_lnm_block_maps_are_consistent_with_the_objective(mode):
    sim, prob, d = _lnm_problem(mode)
    mu, W = sim["mu"], sim["W"]
    D, K = W.shape
    scale = lnm_solver.composition_scaling(prob, mu, W, d, precondition="block")
    # gene j's block is (m_j, W_j) in the optimizer's vector (m, W row-major, log d)
    np.testing.assert_array_equal(scale.index[:, 0], np.arange(D))
    np.testing.assert_array_equal(scale.index[:, 1:],
                                  D + np.arange(D)[:, None] * K + np.arange(K))
    T = _dense(scale)
    theta = lnm_solver._pack(mu, W, d)
    np.testing.assert_allclose(scale.forward(theta), T @ theta, rtol=1e-12)
    np.testing.assert_allclose(scale.backward(T @ theta), theta, rtol=1e-10, atol=1e-12)
    # the optimizer's gradient in z is that of f(T^{-1} z): central difference along v
    _, grad = lnm_solver.composition_objective(prob, theta, K)
    z, v = scale.forward(theta), np.random.default_rng(1).normal(size=theta.size)
    h = 1e-5
    fd = (lnm_solver.composition_objective(prob, scale.backward(z + h * v), K)[0]
          - lnm_solver.composition_objective(prob, scale.backward(z - h * v), K)[0]) / (2 * h)
    np.testing.assert_allclose(scale.gradient(grad) @ v, fd, rtol=1e-5)


def test_lnm_block_scaling_matches_the_curvature_in_log_mean_coordinates():
    sim, prob, d = _lnm_problem("full")
    mu, W = sim["mu"], sim["W"]
    K = W.shape[1]
    scale = lnm_solver.composition_scaling(prob, mu, W, d, precondition="block")
    theta = lnm_solver._pack(mu, W, d)
    worst, worst_diag = _block_conditioning(
        lambda t: lnm_solver.composition_objective(prob, t, K)[1], theta, scale)
    # without the Jacobian of m = mu + diag(Sigma)/2 the blocks would miss the coupling
    # of m_j with W_j: the block whitens each gene far better than its own diagonal
    assert worst < min(2.0, worst_diag / 2), (worst, worst_diag)


def test_lnm_block_and_diagonal_preconditioners_reach_the_same_optimum():
    sim = lnm.simulate(200, 8, 2, ref=REF, seed=4, total_mean=300.0)
    fits = {p: lnm_solver.fit_composition(sim["counts"], REF, 2, precondition=p)
            for p in lnm_solver.PRECONDITIONERS}
    block, diag = fits["block"], fits["diagonal"]
    assert block.success and diag.success
    assert abs(block.objective - diag.objective) < 1e-3
    Sigma = [f.W @ f.W.T + np.diag(f.d) for f in (diag, block)]
    np.testing.assert_allclose(Sigma[1], Sigma[0], atol=2e-2 * np.abs(Sigma[0]).max())
    np.testing.assert_allclose(block.mu, diag.mu, atol=2e-2)
    with pytest.raises(ValueError, match="allowed: block, diagonal"):
        lnm_solver.fit_composition(sim["counts"], REF, 2, precondition="dense")
