"""The Numba Laplace code against the Stan programs themselves: Stan's embedded Laplace
(``stan/pln_laplace.stan``) and the conditional program's log density, through both
Stan backends."""

import numpy as np

from scribe_stan import stan
from scribe_stan.laplace.solver import LaplaceProblem
from scribe_stan.models import pln


def _case(seed=7, N=6, G=5, K=2):
    sim = pln.simulate(N, G, K, seed=seed, lib_target=80.0, sigma_M=0.5)
    rng = np.random.default_rng(seed)
    mu = sim["mu"] + 0.2 * rng.standard_normal(G)
    W = sim["W"] + 0.1 * rng.standard_normal((G, K))
    d = sim["d"] * np.exp(0.2 * rng.standard_normal(G))
    return sim, mu, W, d


def test_laplace_value_equals_stan_embedded_laplace(backend):
    sim, mu, W, d = _case()
    eta = sim["eta"]
    data = pln.laplace_stan_data(sim["counts"], mu, W, d, eta, log_M0=sim["log_M0"],
                                 sigma_M=sim["sigma_M"], log_lib=sim["log_lib"])
    stan_value = stan.fixed_param("pln_laplace", data, backend=backend)["log_marginal"].reshape(-1)
    P = LaplaceProblem(sim["counts"], log_M0=sim["log_M0"], sigma_M=sim["sigma_M"],
                       log_lib=sim["log_lib"], newton_tol=1e-14)
    ours = P.log_marginal(mu, W, d, eta=eta)
    assert P.converged.all()
    np.testing.assert_allclose(ours, stan_value, rtol=1e-6)


def test_numba_log_joint_equals_stan_conditional_log_density(backend):
    sim, mu, W, d = _case(seed=8)
    N, G = sim["counts"].shape
    data = pln.conditional_stan_data(sim["counts"], mu, W, d, log_M0=sim["log_M0"],
                                     sigma_M=sim["sigma_M"], log_lib=sim["log_lib"])
    P = LaplaceProblem(sim["counts"], log_M0=sim["log_M0"], sigma_M=sim["sigma_M"],
                       log_lib=sim["log_lib"])
    L = np.linalg.cholesky(pln.covariance(W, d))
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = sim["x"] + 0.3 * rng.standard_normal((N, G))
        eta = np.abs(sim["eta"] + 0.2 * rng.standard_normal(N))
        params = {"z": np.linalg.solve(L, (x - mu).T).T,
                  "eta_std": (eta - P.a) / sim["sigma_M"]}
        stan_lp = stan.log_prob("pln_conditional", data, params, backend=backend)
        # non-centred x = mu + L z and eta = a + sigma_M eta_std: per cell the Stan
        # density exceeds the one in (x, eta) by log det L + log sigma_M.
        shift = N * (np.sum(np.log(np.diag(L))) + np.log(sim["sigma_M"]))
        np.testing.assert_allclose(P.log_joint(mu, W, d, x, eta).sum() + shift, stan_lp,
                                   rtol=1e-10)
