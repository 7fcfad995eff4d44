"""Outer-problem priors added for adaptive rank and the cascade (solver.OuterLayout).

Shrinkage loadings priors add log column scales to the optimizer vector; the cascade
holds or puts a prior on each gene's log-normal mean ``mu + Sigma_gg / 2``. Gradients
are checked against central finite differences of the exact objective, and the prior
values against the NumPy reference densities.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from scribe_stan.laplace.solver import LaplaceProblem, OuterLayout, fit_laplace, objective
from scribe_stan.models import loadings, pln


def _setup(seed=5, N=6, G=5, K=2):
    sim = pln.simulate(N, G, K, seed=seed, lib_target=300.0, sigma_M=0.5)
    rng = np.random.default_rng(seed)
    mu = sim["mu"] + 0.1 * rng.standard_normal(G)
    W = sim["W"] + 0.1 * rng.standard_normal((G, K))
    d = sim["d"] * 1.2
    P = LaplaceProblem(sim["counts"], sigma_M=0.5, newton_tol=1e-14, log_lib=sim["log_lib"])
    return sim, P, mu, W, d


def _fd(f, theta, h=1e-5):
    out = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        out[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return out


def _check_gradient(P, layout, theta):
    _, grad = objective(P, theta, layout)
    fd = _fd(lambda t: objective(P, t, layout)[0], theta)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6 * np.abs(fd).max())
    return grad


@pytest.mark.parametrize("prior", ["gaussian", "horseshoe", "neg"])
def test_shrinkage_prior_objective_and_gradient(prior):
    sim, P, mu, W, d = _setup()
    layout = OuterLayout(5, 2, loadings_prior=prior)
    log_tau = np.log([0.3, 0.05])
    theta = layout.pack(mu, W, d, None, log_tau)
    assert theta.size == 5 * 4 + 2
    np.testing.assert_array_equal(layout.log_tau(theta), log_tau)
    grad = _check_gradient(P, layout, theta)
    assert np.abs(grad[-2:]).min() > 1e-3  # the scales really move the objective
    lp = layout.log_prior(mu, W, d, None, log_tau)[0]
    np.testing.assert_allclose(lp, pln.log_prior_globals(mu, W, d, tau=np.exp(log_tau),
                                                         loadings_prior=prior), rtol=1e-12)


def test_log_mean_prior_acts_on_the_lognormal_mean():
    sim, P, mu, W, d = _setup(seed=6)
    loc, sd = sim["mu"] + 0.3, np.linspace(0.2, 0.6, 5)
    layout = OuterLayout(5, 2, log_mean_prior=(loc, sd))
    lp = layout.log_prior(mu, W, d, None)[0]
    s = mu + 0.5 * (np.sum(W**2, axis=1) + d)
    expected = (pln.log_prior_globals(mu, W, d)
                - stats.norm.logpdf(mu, pln.MU_LOC, pln.MU_SCALE).sum()
                + stats.norm.logpdf(s, loc, sd).sum())
    np.testing.assert_allclose(lp, expected, rtol=1e-12)
    _check_gradient(P, layout, layout.pack(mu, W, d))


def test_held_log_mean_makes_mu_follow_w_and_d():
    sim, P, mu, W, d = _setup(seed=7)
    log_mean = sim["mu"] + 0.5 * (np.sum(sim["W"] ** 2, axis=1) + sim["d"])
    layout = OuterLayout(5, 2, log_mean=log_mean)
    theta = layout.pack(mu, W, d)
    assert theta.size == 5 * 3  # mu is not an optimizer coordinate
    mu_, W_, d_, _ = layout.unpack(theta)
    np.testing.assert_allclose(mu_ + 0.5 * (np.sum(W_**2, axis=1) + d_), log_mean)
    _check_gradient(P, layout, theta)


def test_rank_adapts_under_shrinkage():
    """True rank 3, fitted with K=8: the horseshoe prunes the extra columns."""
    sim = pln.simulate(800, 30, 3, seed=11, lib_target=3000.0, loading_scale=0.5,
                       sigma_M=0.3)
    truth = pln.covariance(sim["W"], sim["d"])
    corr = lambda S: S / np.sqrt(np.outer(np.diag(S), np.diag(S)))  # noqa: E731
    fits = {K: fit_laplace(sim["counts"], K, log_M0=sim["log_M0"], sigma_M=sim["sigma_M"],
                           log_lib=sim["log_lib"], loadings_prior=prior, max_iter=3000)
            for K, prior in ((8, "horseshoe"), (3, "normal"))}
    big, small = fits[8], fits[3]
    assert abs(loadings.effective_rank(big.W) - 3) <= 1
    assert (np.exp(big.log_tau) < 10 * loadings.TAU_MIN).sum() >= 4  # pruned columns
    err = {K: np.linalg.norm(corr(pln.covariance(f.W, f.d)) - corr(truth))
           for K, f in fits.items()}
    assert err[8] <= 1.1 * err[3], err


def test_fit_rejects_unknown_or_misapplied_loadings_prior():
    import anndata as ad

    import scribe_stan as ss

    sim = pln.simulate(20, 5, 1, seed=1, lib_target=200.0)
    adata = ad.AnnData(X=sim["counts"].astype(float))
    with pytest.raises(ValueError, match="allowed: normal, gaussian, horseshoe, neg"):
        ss.fit(adata, model="pln", rank=1, loadings_prior="lasso", progress=False)
    with pytest.raises(ValueError, match="does not apply to model=.nbvcp.; it applies to: pln, nbln"):
        ss.fit(adata, model="nbvcp", loadings_prior="horseshoe", progress=False)


def test_cli_fit_with_shrinkage_prior(tmp_path, capsys):
    import json

    import anndata as ad

    from scribe_stan.cli import main

    sim = pln.simulate(60, 6, 1, seed=2, lib_target=300.0)
    path = tmp_path / "in.h5ad"
    ad.AnnData(X=sim["counts"].astype(float)).write_h5ad(path)
    rc = main(["fit", str(path), "--model", "pln", "--rank", "3", "--loadings-prior",
               "horseshoe", "--out", str(tmp_path / "out.h5ad"), "--draws", "0", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= summary["effective_rank"] <= 3
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.uns["pln"]["effective_rank"] == summary["effective_rank"]
