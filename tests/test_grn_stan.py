"""stan/grn.stan against its NumPy reference, and a short NUTS run on a tiny network.

One build of one small program (cached), log densities at three points, then 2 chains x
150 draws on 4 genes x 40 cells (about a minute with the build cached).
"""

from __future__ import annotations

import numpy as np
import pytest

from scribe_stan import grn, stan
from scribe_stan.models import grn as grn_model


def _data(N=6, G=4, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(5.0, size=(N, G))
    counts[:, 0] += 1
    t, r = np.array([1, 2, 3]), np.array([0, 0, 1])
    return grn_model.stan_data(counts, t, r, grn_model.edge_scales([1.0, 0.6, 0.2]),
                               log_M0=np.log(counts.sum(axis=1)).mean() + 1.0, sigma_M=0.7)


def _point(rng, data):
    N, G, E = data["N"], data["G"], data["E"]
    return {"mu": 1.5 + 0.5 * rng.standard_normal(G), "J_edge": 0.4 * rng.standard_normal(E),
            "log_gamma_free": 0.3 * rng.standard_normal(G - 1),
            "log_D": -1.0 + 0.3 * rng.standard_normal(G), "z": rng.standard_normal((N, G)),
            "eta": rng.uniform(0.1, 2.0, N)}


def test_data_contract():
    data = _data()
    declared = stan.data_variables("grn")
    assert set(data) == set(declared)
    assert list(declared)[:6] == ["N", "G", "counts", "log_lib", "log_M0", "sigma_M"]


def test_stan_data_errors():
    with pytest.raises(ValueError, match="small networks"):
        grn_model.stan_data(np.ones((3, 13), int), [1], [0], [1.0])
    with pytest.raises(ValueError, match="target != regulator"):
        grn_model.stan_data(np.ones((3, 4), int), [1], [1], [1.0])


@pytest.mark.slow
def test_grn_log_density_matches_numpy():
    data = _data()
    rng = np.random.default_rng(3)
    s, ref = [], []
    for _ in range(3):
        p = _point(rng, data)
        s.append(stan.log_prob("grn", data, p, backend="pystan", jacobian=False))
        ref.append(grn_model.log_joint(data, p))
    np.testing.assert_allclose(s, ref, rtol=1e-9)
    assert np.abs(np.diff(ref)).min() > 1.0


@pytest.mark.slow
def test_grn_nuts_signs_agree_with_fast_estimate():
    """NUTS on a 4-gene chain network; posterior-mean signs of J vs the truth."""
    G = 4
    J = -np.diag([1.0, 0.8, 1.2, 0.9])
    J[1, 0], J[2, 0], J[3, 1] = 0.7, -0.7, 0.6
    D = np.diag([0.3, 0.25, 0.3, 0.3])
    Sigma = grn.lyapunov_covariance(J, D)
    rng = np.random.default_rng(1)
    N = 40
    x = rng.multivariate_normal(np.log([20, 15, 10, 12]), Sigma, size=N)
    counts = rng.poisson(np.exp(x))
    t, r = np.array([1, 2, 3]), np.array([0, 0, 1])
    data = grn_model.stan_data(counts, t, r, grn_model.edge_scales(np.ones(3)),
                               log_lib=np.log(counts.sum(axis=1)),
                               log_M0=float(np.log(counts.sum(axis=1)).mean()), sigma_M=0.3)
    init = {"mu": np.log(counts.mean(axis=0) + 0.5), "J_edge": np.zeros(3),
            "log_gamma_free": np.zeros(G - 1), "log_D": np.full(G, -1.0),
            "z": np.zeros((N, G)), "eta": np.full(N, 0.3)}
    dr = stan.sample("grn", data, backend="pystan", chains=2, draws=150, warmup=150, seed=2,
                     inits=init)
    Je = dr.posterior["J_edge"].reshape(-1, 3)
    assert np.all(np.sign(Je.mean(axis=0)) == np.sign(J[t, r]))
    assert dr.posterior["Sigma"].shape == (2, 150, G, G)
