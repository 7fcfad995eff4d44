"""Numba Newton-Woodbury Laplace kernels against dense linear algebra, finite
differences and simulation truth."""

import numpy as np
import pytest
from scipy import stats

from scribe_stan.laplace import reference as ref
from scribe_stan.laplace.solver import LaplaceProblem, OuterLayout, fit_laplace, objective
from scribe_stan.models import pln


def _problem(seed, N=5, G=6, K=2, sigma_M=0.5, lib_target=60.0):
    sim = pln.simulate(N, G, K, seed=seed, sigma_M=sigma_M, lib_target=lib_target)
    rng = np.random.default_rng(seed + 100)
    # globals away from the truth, so the test does not rely on a lucky point
    mu = sim["mu"] + 0.3 * rng.standard_normal(G)
    W = sim["W"] + 0.2 * rng.standard_normal((G, K))
    d = sim["d"] * np.exp(0.3 * rng.standard_normal(G))
    return sim, mu, W, d


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fix_eta", [False, True])
def test_laplace_value_matches_dense_reference(seed, fix_eta):
    sim, mu, W, d = _problem(seed)
    P = LaplaceProblem(sim["counts"], sigma_M=0.5, newton_tol=1e-14, log_lib=sim["log_lib"])
    eta = sim["eta"] if fix_eta else None
    value = P.log_marginal(mu, W, d, eta=eta)
    Sigma = pln.covariance(W, d)
    expected = [ref.cell_laplace(u, mu, Sigma, a, 0.5, eta=None if eta is None else eta[c])
                for c, (u, a) in enumerate(zip(sim["counts"], P.a))]
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    assert P.converged.all()


def test_mode_has_zero_gradient():
    sim, mu, W, d = _problem(3, N=8, G=7, K=3)
    P = LaplaceProblem(sim["counts"], sigma_M=0.5, newton_tol=1e-14, log_lib=sim["log_lib"])
    modes = P.modes(mu, W, d)
    Sinv = np.linalg.inv(pln.covariance(W, d))
    u = sim["counts"]
    lam = np.exp(modes.x - modes.eta[:, None])
    g_x = u - lam - (modes.x - mu) @ Sinv
    g_eta = -(u - lam).sum(axis=1) - (modes.eta - P.a) / 0.5**2
    scale = u.sum(axis=1, keepdims=True)
    assert np.max(np.abs(g_x) / scale) < 1e-9
    assert np.max(np.abs(g_eta) / scale[:, 0]) < 1e-9


def test_woodbury_draws_match_dense_covariance_and_densities():
    sim, mu, W, d = _problem(4, N=2, G=5, K=2)
    P = LaplaceProblem(sim["counts"], sigma_M=0.5, newton_tol=1e-14, log_lib=sim["log_lib"])
    P.modes(mu, W, d)
    out = P.sample(mu, W, d, 40000, np.random.default_rng(0))
    c = 1
    Sigma = pln.covariance(W, d)
    cov = ref.cell_covariance(sim["counts"][c], mu, Sigma, P.a[c], 0.5)
    z = np.column_stack([out["x"][:, c], out["eta"][:, c]])
    emp = np.cov(z, rowvar=False)
    sd = np.sqrt(np.diag(cov))
    # Monte Carlo sd of a covariance entry is about sd_i sd_j sqrt(2 / S)
    assert np.max(np.abs(emp - cov) / np.outer(sd, sd)) < 0.05
    # lp_approx is the Gaussian's log density, lp the exact joint density given globals
    mode = np.append(P.x[c], P.eta[c])
    np.testing.assert_allclose(out["lp_approx"][:5, c],
                               stats.multivariate_normal(mode, cov).logpdf(z[:5]), rtol=1e-9)
    u = sim["counts"][c:c + 1]
    for i in range(3):
        x_i, e_i = out["x"][i, c:c + 1], out["eta"][i, c:c + 1]
        exact = (pln.log_lik_cells(u, x_i, e_i) + pln.log_latent_prior_cells(x_i, mu, W, d)
                 + pln.log_capture_prior(e_i, P.a[c:c + 1], 0.5))
        np.testing.assert_allclose(out["lp"][i, c], exact[0], rtol=1e-10)
        np.testing.assert_allclose(out["log_lik"][i, c], pln.log_lik_cells(u, x_i, e_i)[0],
                                   rtol=1e-10)


def test_outer_gradient_matches_finite_differences():
    sim, mu, W, d = _problem(5, N=6, G=5, K=2)
    P = LaplaceProblem(sim["counts"], sigma_M=0.5, newton_tol=1e-14, log_lib=sim["log_lib"])
    layout = OuterLayout(5, 2)
    theta = layout.pack(mu, W, d)
    _, grad = objective(P, theta, layout)
    h = 1e-5
    fd = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        fd[i] = (objective(P, theta + e, layout)[0] - objective(P, theta - e, layout)[0]) / (2 * h)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())


def test_fixed_eta_gradient_matches_finite_differences():
    sim, mu, W, d = _problem(6, N=4, G=5, K=2)
    P = LaplaceProblem(sim["counts"], sigma_M=0.5, newton_tol=1e-14, log_lib=sim["log_lib"])
    eta = sim["eta"]

    def f(mu, W, d):
        return P.log_marginal(mu, W, d, eta=eta).sum()

    _, g_mu, g_W, g_d = P.log_marginal(mu, W, d, eta=eta, grad=True)
    h = 1e-6
    for i in range(5):
        e = np.zeros(5)
        e[i] = h
        np.testing.assert_allclose(g_mu[i], (f(mu + e, W, d) - f(mu - e, W, d)) / (2 * h),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_d[i], (f(mu, W, d + e) - f(mu, W, d - e)) / (2 * h),
                                   rtol=1e-5, atol=1e-6)
    E = np.zeros_like(W)
    E[2, 1] = h
    np.testing.assert_allclose(g_W[2, 1], (f(mu, W + E, d) - f(mu, W - E, d)) / (2 * h),
                               rtol=1e-5, atol=1e-6)


def test_recovers_mu_and_sigma_on_simulated_data():
    sim = pln.simulate(3000, 10, 2, seed=11, lib_target=400.0, loading_scale=0.5)
    sol = fit_laplace(sim["counts"], 2, sigma_M=sim["sigma_M"], log_M0=sim["log_M0"],
                      log_lib=sim["log_lib"])
    assert sol.modes.converged.all()
    assert sol.success, sol.message
    Sigma_true = pln.covariance(sim["W"], sim["d"])
    Sigma_hat = pln.covariance(sol.W, sol.d)
    rel = np.linalg.norm(Sigma_hat - Sigma_true) / np.linalg.norm(Sigma_true)
    assert rel < 0.15, rel
    assert np.max(np.abs(sol.mu - sim["mu"])) < 0.15
    # the per-cell modes track the true latents
    assert np.corrcoef(sol.modes.x.ravel(), sim["x"].ravel())[0, 1] > 0.9


def test_nonconverged_cells_are_flagged_and_warned():
    sim = pln.simulate(20, 6, 1, seed=2, lib_target=100.0)
    # a tolerance of 0 can never be met, so every cell must come back flagged
    P = LaplaceProblem(sim["counts"], newton_tol=0.0, max_newton=3)
    modes = P.modes(sim["mu"], sim["W"], sim["d"])
    assert not modes.converged.any()
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sol = fit_laplace(sim["counts"], 1, newton_tol=0.0, max_iter=1)
    assert not sol.modes.converged.any()
