"""nbln Stan programs against the NumPy reference, and the Numba Laplace code against
the Stan programs themselves (conditional log density, Stan's embedded NB Laplace).

Sizes are tiny (N <= 6 cells, G <= 5 genes); compiled programs are cached by httpstan.
"""

import numpy as np
import pytest
from scipy import linalg

from scribe_stan import stan
from scribe_stan.laplace.solver import LaplaceProblem
from scribe_stan.models import nbln, pln

CONTRACT = ["N", "G", "K", "counts", "log_lib", "log_M0", "sigma_M"]


def _sim(N=5, G=4, K=2, seed=3):
    return nbln.simulate(N, G, K, seed=seed, lib_target=60.0, sigma_M=0.5,
                         r_range=(0.5, 20.0))


def _capture(sim):
    """Capture prior centred on the data so the eta >= 0 truncation matters."""
    return {"log_M0": float(np.log(sim["counts"].sum(axis=1)).mean()), "sigma_M": 0.7}


def _random_point(rng, N, G, K):
    """Random (mu, W, d, log_r, x, eta); W dense with entries of either sign."""
    mu = 1.0 + 0.6 * rng.standard_normal(G)
    W = 0.7 * rng.standard_normal((G, K))
    d = rng.uniform(0.1, 0.6, G)
    log_r = rng.uniform(-1.0, 4.0, G)
    x = mu + 0.8 * rng.standard_normal((N, G))
    eta = rng.uniform(0.05, 2.0, N)
    return mu, W, d, log_r, x, eta


def _noncentred(data, mu, W, d, x, eta):
    """Stan's raw per-cell parameters (z, eta_std) for given x, eta; and log det L."""
    L = np.linalg.cholesky(pln.covariance(W, d))
    z = linalg.solve_triangular(L, (x - mu).T, lower=True).T
    a = pln.capture_prior_mean(data["log_lib"], data["log_M0"])
    return z, (eta - a) / data["sigma_M"], np.log(np.diag(L)).sum()


def _builders(sim):
    counts, cap = sim["counts"], _capture(sim)
    g = (sim["mu"], sim["W"], sim["d"], sim["log_r"])
    return {"nbln": nbln.stan_data(counts, sim["W"].shape[1], **cap),
            "nbln_conditional": nbln.conditional_stan_data(counts, *g, **cap),
            "nbln_laplace": nbln.laplace_stan_data(counts, *g, sim["eta"], **cap)}


@pytest.mark.parametrize("name", ["nbln", "nbln_conditional", "nbln_laplace"])
def test_data_contract(name):
    data = _builders(_sim())[name]
    declared = stan.data_variables(name)
    assert list(declared)[:len(CONTRACT)] == CONTRACT
    assert set(data) == set(declared), (sorted(data), sorted(declared))
    env = {k: data[k] for k in ("N", "G", "K")}
    for key, dims in declared.items():
        assert np.shape(data[key]) == tuple(int(eval(e, {}, env)) for e in dims), key


def test_nbln_log_density_matches_numpy():
    # nbln.stan is written in (mu_level, mu_dev, W, d, log_r, theta_z, theta_e, eta_q) as
    # pln.stan (mu's level and deviations, the whitened captured log-rates x - eta and
    # the quantile of eta given them; the whitening uses the negative binomial's working
    # weight), W unconstrained with the Laplace side's prior. Without the constraint Jacobians its target is
    # nbln.log_joint plus pln.observed_capture_coordinates' log_offset; no loadings term.
    sim = _sim()
    data = _builders(sim)["nbln"]
    N, G, K = data["N"], data["G"], data["K"]
    rng = np.random.default_rng(11)
    stan_lp, ref_lp = [], []
    for _ in range(3):
        mu, W, d, log_r, x, eta = _random_point(rng, N, G, K)
        a = pln.capture_prior_mean(data["log_lib"], data["log_M0"])
        coords = pln.observed_capture_coordinates(data["counts"], x, eta, mu, W, d, a,
                                                  data["sigma_M"], r=np.exp(log_r))
        params = {"W": W, "d": d, "log_r": log_r} | {
            k: coords[k] for k in pln.SAMPLED_COORDINATES}
        stan_lp.append(stan.log_prob("nbln", data, params, jacobian=False))
        ref = nbln.log_joint(data["counts"], mu, W, d, log_r, x, eta, log_M0=data["log_M0"],
                             sigma_M=data["sigma_M"], log_lib=data["log_lib"])
        ref_lp.append(ref + coords["log_offset"])
    np.testing.assert_allclose(stan_lp, ref_lp, rtol=1e-10, atol=0)
    assert np.abs(np.diff(ref_lp)).min() > 1.0  # the points really differ


def test_nbln_conditional_log_density_matches_numpy():
    sim = _sim()
    rng = np.random.default_rng(12)
    mu, W, d, log_r, _, _ = _random_point(rng, 5, 4, 2)
    data = nbln.conditional_stan_data(sim["counts"], mu, W, d, log_r, **_capture(sim))
    N = data["N"]
    a = pln.capture_prior_mean(data["log_lib"], data["log_M0"])
    stan_lp, ref_lp = [], []
    for _ in range(3):
        x = mu + 0.8 * rng.standard_normal((N, 4))
        eta = rng.uniform(0.05, 2.0, N)
        z, eta_std, logdet_L = _noncentred(data, mu, W, d, x, eta)
        stan_lp.append(stan.log_prob("nbln_conditional", data, {"z": z, "eta_std": eta_std},
                                     jacobian=False))
        ref = (nbln.log_lik_cells(data["counts"], x, eta, log_r).sum()
               + pln.log_latent_prior_cells(x, mu, W, d).sum()
               + pln.log_capture_prior(eta, a, data["sigma_M"]).sum())
        ref_lp.append(ref + N * logdet_L + N * np.log(data["sigma_M"]))
    np.testing.assert_allclose(stan_lp, ref_lp, rtol=1e-10, atol=0)
    assert np.abs(np.diff(ref_lp)).min() > 1.0


def _case(seed=7, N=6, G=5, K=2):
    sim = nbln.simulate(N, G, K, seed=seed, lib_target=80.0, sigma_M=0.5, r_range=(0.5, 20.0))
    rng = np.random.default_rng(seed)
    mu = sim["mu"] + 0.2 * rng.standard_normal(G)
    W = sim["W"] + 0.1 * rng.standard_normal((G, K))
    d = sim["d"] * np.exp(0.2 * rng.standard_normal(G))
    return sim, mu, W, d


def test_laplace_value_equals_stan_embedded_nb_laplace():
    """Per-gene r; Stan's generic embedded Laplace with the NB2 likelihood (see the
    header of stan/nbln_laplace.stan for why not the NB-specific function)."""
    sim, mu, W, d = _case()
    cap = {"log_M0": sim["log_M0"], "sigma_M": sim["sigma_M"], "log_lib": sim["log_lib"]}
    data = nbln.laplace_stan_data(sim["counts"], mu, W, d, sim["log_r"], sim["eta"], **cap)
    stan_value = stan.fixed_param("nbln_laplace", data)["log_marginal"].reshape(-1)
    P = LaplaceProblem(sim["counts"], newton_tol=1e-14, **cap)
    ours = P.log_marginal(mu, W, d, log_r=sim["log_r"], eta=sim["eta"])
    assert P.converged.all()
    np.testing.assert_allclose(ours, stan_value, rtol=1e-6)
    # and the dispersion matters at this tolerance: Poisson values are far off
    assert np.max(np.abs(P.log_marginal(mu, W, d, eta=sim["eta"]) / stan_value - 1)) > 1e-3


def test_numba_log_joint_equals_stan_conditional_log_density():
    sim, mu, W, d = _case(seed=8)
    N, G = sim["counts"].shape
    cap = {"log_M0": sim["log_M0"], "sigma_M": sim["sigma_M"], "log_lib": sim["log_lib"]}
    data = nbln.conditional_stan_data(sim["counts"], mu, W, d, sim["log_r"], **cap)
    P = LaplaceProblem(sim["counts"], **cap)
    L = np.linalg.cholesky(pln.covariance(W, d))
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = sim["x"] + 0.3 * rng.standard_normal((N, G))
        eta = np.abs(sim["eta"] + 0.2 * rng.standard_normal(N))
        params = {"z": np.linalg.solve(L, (x - mu).T).T,
                  "eta_std": (eta - P.a) / sim["sigma_M"]}
        stan_lp = stan.log_prob("nbln_conditional", data, params)
        # non-centred x = mu + L z and eta = a + sigma_M eta_std: per cell the Stan
        # density exceeds the one in (x, eta) by log det L + log sigma_M.
        shift = N * (np.sum(np.log(np.diag(L))) + np.log(sim["sigma_M"]))
        ours = P.log_joint(mu, W, d, x, eta, log_r=sim["log_r"]).sum()
        np.testing.assert_allclose(ours + shift, stan_lp, rtol=1e-10)
