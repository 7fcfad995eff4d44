"""Stan programs of lnm / lnmvcp against the NumPy reference (scribe_stan.models.lnm).

Tiny sizes (N = 5 cells, G = 5 genes, K = 2); compiled programs are cached by httpstan.
Tolerance: relative 1e-10 on the absolute log density (every constant is checked), and
differences between random points to 1e-8 (so priors, likelihood and capture terms that
move between points are checked too).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from scribe_stan import stan as ss
from scribe_stan.models import lnm, pln

PROGRAMS = ["lnm", "lnm_conditional", "lnmvcp", "lnmvcp_conditional"]
CONTRACT = ["N", "G", "K", "counts", "log_lib", "log_M0", "sigma_M"]
N, G, K, REF = 5, 5, 2, 1


def _sim():
    return lnm.simulate(N, G, K, ref=REF, capture=True, seed=4, total_mean=80.0)


def _capture(sim):
    log_lib = np.log(sim["counts"].sum(axis=1)) + 0.2
    return {"log_M0": float(log_lib.mean()), "sigma_M": 0.7, "log_lib": log_lib}


def _random_point(rng):
    D = G - 1
    mu = 0.5 * rng.standard_normal(D)
    W = 0.7 * rng.standard_normal((D, K))  # dense, entries of either sign
    d = rng.uniform(0.1, 0.6, D)
    y = mu + 0.8 * rng.standard_normal((N, D))
    eta = rng.uniform(0.05, 2.0, N)
    return mu, W, d, float(np.log(70.0) + 0.3 * rng.standard_normal()), \
        float(np.log(5.0) + rng.standard_normal()), y, eta


def _builders(sim):
    cap = _capture(sim)
    cond = (sim["mu"], sim["W"], sim["d"], sim["log_m_T"], sim["log_r_T"])
    return {
        "lnm": lnm.stan_data(sim["counts"], K, REF, **cap),
        "lnmvcp": lnm.stan_data(sim["counts"], K, REF, **cap),
        "lnm_conditional": lnm.conditional_stan_data(sim["counts"], REF, *cond, **cap),
        "lnmvcp_conditional": lnm.conditional_stan_data(sim["counts"], REF, *cond, **cap),
    }


def _eval_dims(dims, data):
    return tuple(int(eval(e, {}, {k: data[k] for k in ("N", "G", "K")})) for e in dims)


@pytest.mark.parametrize("name", PROGRAMS)
def test_data_contract(name):
    data = _builders(_sim())[name]
    declared = ss.data_variables(name)
    assert list(declared)[: len(CONTRACT) + 1] == CONTRACT + ["ref"]
    assert set(data) == set(declared), (sorted(data), sorted(declared))
    for key, dims in declared.items():
        assert np.shape(data[key]) == _eval_dims(dims, data), key
    assert data["ref"] == REF + 1  # Stan is 1-based


@pytest.mark.parametrize("model", ["lnm", "lnmvcp"])
def test_joint_log_density_matches_numpy(model):
    sim = _sim()
    data = _builders(sim)[model]
    cap = _capture(sim)
    rng = np.random.default_rng(7)
    stan_lp, ref_lp = [], []
    for _ in range(3):
        mu, W, d, log_m, log_r, y, eta = _random_point(rng)
        L = np.linalg.cholesky(pln.covariance(W, d))
        z = linalg.solve_triangular(L, (y - mu).T, lower=True).T
        params = {"mu_alr": mu, "W_alr": W, "d_alr": d, "log_m_T": log_m,
                  "log_r_T": log_r, "z": z}
        # non-centred z: std_normal(z) = log N(y) + log det L per cell. W_alr is
        # unconstrained with lnm.log_joint's prior: no loadings term in the offset.
        offset = N * np.log(np.diag(L)).sum()
        if model == "lnmvcp":
            # eta is sampled as its quantile eta_q; the program adds log |d eta/d eta_q|
            # as a Jacobian, so the density without Jacobians is the density in eta
            a = pln.capture_prior_mean(cap["log_lib"], cap["log_M0"])
            params["eta_q"], log_jacobian = lnm.capture_quantile_coordinates(
                eta, np.asarray(data["counts"]).sum(axis=1), log_m, log_r, a, cap["sigma_M"])
            with_jacobian = ss.log_prob(model, data, params, backend="pystan", jacobian=True)
        stan_lp.append(ss.log_prob(model, data, params, backend="pystan", jacobian=False))
        if model == "lnmvcp":  # the Jacobians: eta_q -> eta, and the bounds of eta_q, d
            q = params["eta_q"]
            np.testing.assert_allclose(
                with_jacobian - stan_lp[-1],
                log_jacobian + np.log(q * (1 - q)).sum() + np.log(d).sum(), rtol=1e-9)
        ref_lp.append(offset + lnm.log_joint(
            data["counts"], REF, mu, W, d, log_m, log_r, y,
            eta if model == "lnmvcp" else None, **cap))
    stan_lp, ref_lp = np.array(stan_lp), np.array(ref_lp)
    np.testing.assert_allclose(stan_lp, ref_lp, rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.diff(stan_lp), np.diff(ref_lp), rtol=1e-8,
                               atol=1e-8 * np.abs(ref_lp).max())
    assert np.abs(np.diff(ref_lp)).min() > 1.0


@pytest.mark.parametrize("model", ["lnm", "lnmvcp"])
def test_conditional_log_density_matches_numpy(model):
    sim = _sim()
    cap = _capture(sim)
    rng = np.random.default_rng(8)
    mu, W, d, log_m, log_r, _, _ = _random_point(rng)
    data = lnm.conditional_stan_data(sim["counts"], REF, mu, W, d, log_m, log_r, **cap)
    L = np.linalg.cholesky(pln.covariance(W, d))
    stan_lp, ref_lp = [], []
    for _ in range(3):
        *_, y, eta = _random_point(rng)
        z = linalg.solve_triangular(L, (y - mu).T, lower=True).T
        params = {"z": z}
        log_mean = np.full(N, log_m)
        ref = N * np.log(np.diag(L)).sum() + pln.log_latent_prior_cells(y, mu, W, d).sum()
        if model == "lnmvcp":
            a = pln.capture_prior_mean(cap["log_lib"], cap["log_M0"])
            params["eta_std"] = (eta - a) / cap["sigma_M"]
            ref += (N * np.log(cap["sigma_M"])
                    + pln.log_capture_prior(eta, a, cap["sigma_M"]).sum())
            log_mean = log_mean - eta
        ref += lnm.log_lik_cells(data["counts"], y, REF, log_mean, np.exp(log_r)).sum()
        stan_lp.append(ss.log_prob(f"{model}_conditional", data, params, backend="pystan",
                                   jacobian=False))
        ref_lp.append(ref)
    np.testing.assert_allclose(stan_lp, ref_lp, rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.diff(stan_lp), np.diff(ref_lp), rtol=1e-8,
                               atol=1e-8 * np.abs(ref_lp).max())
