"""nbvcp Stan program against the NumPy reference, and the fast fit against NUTS.

Sizes are small (the log-density test uses N = 5 cells, G = 4 genes; the NUTS
comparison 40 cells x 5 genes, 2 chains x 600 draws); httpstan caches the build.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import scribe_stan as ss
from scribe_stan.fits import nbvcp as nbvcp_fit
from scribe_stan import stan as sst
from scribe_stan.models import nbvcp, pln

CONTRACT = ["N", "G", "counts", "log_lib", "log_M0", "sigma_M"]


def test_data_contract():
    sim = nbvcp.simulate(5, 4, seed=1, lib_target=80.0)
    data = nbvcp.stan_data(sim["counts"], log_M0=sim["log_M0"], sigma_M=0.5)
    declared = sst.data_variables("nbvcp")
    assert list(declared) == CONTRACT
    assert set(data) == set(declared)
    sizes = {"N": data["N"], "G": data["G"]}
    for key, dims in declared.items():
        assert np.shape(data[key]) == tuple(sizes[d] for d in dims), key
    assert isinstance(data["N"], int) and isinstance(data["G"], int)
    assert np.issubdtype(data["counts"].dtype, np.integer)


# nbvcp.stan samples (m_free, log_r, eta_level, eta_dev) with m = m_free + eta_level and
# eta = log1p_exp(eta_level + eta_dev), and writes every term on (m, log_r, eta). Without
# the Jacobians (of the constraint and of the softplus, jacobian +=) its target is the
# NumPy log_joint itself. Absolute values are compared, so every constant (NB
# normalization, truncation, priors) is checked.


def test_log_density_matches_numpy():
    sim = nbvcp.simulate(5, 4, seed=3, lib_target=80.0)
    log_lib = np.log(sim["counts"].sum(axis=1))
    capture = {"log_M0": float(log_lib.mean()), "sigma_M": 0.7}  # the truncation matters
    data = nbvcp.stan_data(sim["counts"], **capture)
    rng = np.random.default_rng(11)
    for _ in range(3):
        m = sim["m"] + 0.5 * rng.standard_normal(4)
        log_r = rng.normal(1.0, 1.5, 4)
        eta = rng.uniform(0.05, 2.0, 5)
        level, dev = pln.capture_coordinates(eta)
        params = {"m_free": m - level, "log_r": log_r, "eta_level": level, "eta_dev": dev}
        stan_lp = sst.log_prob("nbvcp", data, params, backend="pystan", jacobian=False)
        ref = nbvcp.log_joint(sim["counts"], m, log_r, eta, **capture)
        assert stan_lp == pytest.approx(ref, rel=1e-10, abs=0)


@pytest.fixture(scope="module")
def small_fits():
    """Laplace and NUTS fits of the same simulated data (40 cells x 5 genes)."""
    sim = nbvcp.simulate(40, 5, seed=7, lib_target=300.0, sigma_M=0.5)
    adata = ad.AnnData(sim["counts"].astype(np.float32))
    kw = dict(model="nbvcp", library_size=np.exp(sim["log_lib"]), M0=np.exp(sim["log_M0"]),
              sigma_M=sim["sigma_M"], progress=False)
    lap = ss.fit(adata, method="laplace", **kw)
    hmc = ss.fit(adata, method="hmc", backend="pystan", chains=2, draws=600, warmup=600,
                 seed=3, **kw)
    return sim, adata, lap, hmc


def test_hmc_fit_end_to_end(small_fits):
    sim, adata, _, hmc = small_fits
    assert isinstance(hmc, ss.HmcFit) and hmc.model == "nbvcp" and hmc.program == "nbvcp"
    tree = hmc.to_datatree()
    post = tree["posterior"]
    assert post["m"].shape == (2, 600, 5) and post["r"].shape == (2, 600, 5)
    assert post["eta"].shape == (2, 600, 40)
    assert tree["log_likelihood"]["counts"].shape == (2, 600, 40)
    assert tree["posterior_predictive"]["counts"].shape == (2, 600, 40, 5)
    # generated r is exp(log_r), and log_lik is the NumPy NB likelihood of the draw
    draws = hmc.draws.posterior
    np.testing.assert_allclose(draws["r"], np.exp(draws["log_r"]), rtol=1e-12)
    ll = nbvcp.log_lik_cells(sim["counts"], draws["m"][0, 0], draws["log_r"][0, 0],
                             draws["eta"][0, 0])
    np.testing.assert_allclose(draws["log_lik"][0, 0], ll, rtol=1e-8)
    mom = nbvcp_fit.posterior_moments(hmc)
    assert mom["m"][0].shape == (5,) and mom["eta"][1].shape == (40,)
    assert list(mom["var_names"]) == list(adata.var_names)


def test_laplace_matches_nuts(small_fits):
    """Fast-fit moments against NUTS on the same posterior.

    The fast fit's globals are the maximizer of the Laplace marginal (not the posterior
    mean) with sds from a joint Gaussian; eta's sd adds the propagated uncertainty of
    the globals. Averaged over entries: |mean difference| / NUTS sd <= 0.2 for m and
    eta, <= 0.4 for log_r (skewed posterior with 40 cells); geometric-mean sd ratio in
    [0.85, 1.15] for m and eta, [0.7, 1.4] for log_r. (Measured with 4 x 1000 draws:
    <= 0.08 and 0.98 - 1.03 for m and eta; <= 0.19 and 0.78 - 1.2 for log_r.) NUTS's
    Monte Carlo error on 1200 draws is about 0.05 sd on means, 3% on sds.
    """
    _, _, lap, hmc = small_fits
    assert lap.converged.all()
    assert int(np.sum(hmc.draws.sample_stats["diverging"])) == 0
    ml, mh = nbvcp_fit.posterior_moments(lap), nbvcp_fit.posterior_moments(hmc)
    limits = {"m": (0.2, 0.85, 1.15), "eta": (0.2, 0.85, 1.15), "log_r": (0.4, 0.7, 1.4)}
    for key, (smd_max, lo, hi) in limits.items():
        (mean_l, sd_l), (mean_h, sd_h) = ml[key], mh[key]
        smd = np.abs(mean_l - mean_h) / sd_h
        ratio = sd_l / sd_h
        assert smd.mean() <= smd_max, (key, smd)
        assert lo <= np.exp(np.mean(np.log(ratio))) <= hi, (key, ratio)
    # the conditional (1-D Laplace) sd of eta leaves out the globals' uncertainty
    assert np.all(ml["eta_given_globals"][1] < ml["eta"][1])
