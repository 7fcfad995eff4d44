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


@pytest.mark.slow
def test_infer_grn_stan_end_to_end_agrees_with_truth_and_fast_estimate(monkeypatch):
    """``infer_grn(method="stan")`` on a 5-gene tree: the same grn.stan build as above.

    Prior: the 4 true edges and one false edge (5 edges + 4 free degradation rates + 5
    diffusions = 14 parameters <= the 15 entries of Sigma, so the support is identified).
    Every true edge must come back with the true sign in the posterior mean and with a
    90% interval around its mean, the false edge with a smaller |posterior mean| than
    every true edge, and the fast Lyapunov estimate (on the Poisson-mode latents of the
    same cells, same hard support) with the same signs on the true edges.
    """
    import pandas as pd

    from scribe_stan import grn_infer
    from scribe_stan.laplace import reference

    G, N = 5, 100
    J = -np.diag([1.0, 0.8, 1.2, 0.9, 1.1])  # lower triangular: stable for any weights
    true = [(0, 1, 1.2), (0, 2, -1.4), (1, 3, 1.0), (2, 4, -1.0)]  # (regulator, target, J)
    for r, t, w in true:
        J[t, r] = w
    Sigma = grn.lyapunov_covariance(J, np.diag([0.3, 0.25, 0.3, 0.3, 0.25]))
    rng = np.random.default_rng(5)
    mu = np.log([20.0, 15.0, 10.0, 12.0, 14.0])
    x = rng.multivariate_normal(mu, Sigma, size=N)
    counts = rng.poisson(np.exp(x))
    a, sig = np.zeros(N), np.full(N, 0.3)
    modes = [reference.cell_mode(counts[c], mu, Sigma, a[c], sig[c]) for c in range(N)]
    genes = pd.Index([f"g{i}" for i in range(G)])
    src = grn_infer.LatentSource(model="pln", genes=genes, obs_names=pd.Index(range(N)),
                                 x=np.array([m[0] for m in modes]), counts=counts,
                                 log_lib=np.log(counts.sum(axis=1)), mu=mu,
                                 eta=np.array([m[1] for m in modes]), a=a, sigma=sig)
    monkeypatch.setattr(grn_infer, "latent_source", lambda fit, key=None: src)
    prior = pd.DataFrame({"regulator": [f"g{r}" for r, _, _ in true] + ["g3"],
                          "target": [f"g{t}" for _, t, _ in true] + ["g4"],
                          "confidence": 1.0})
    res = grn_infer.infer_grn(object(), prior=prior, method="stan", seed=0,
                              stan_kwargs={"chains": 2, "draws": 150, "warmup": 150,
                                           "backend": "pystan"})
    e = res.edges.set_index(["regulator", "target"])
    assert {"posterior_mean", "posterior_lower", "posterior_upper", "inclusion"} <= set(e)
    assert np.all(e["posterior_lower"] <= e["posterior_mean"])
    assert np.all(e["posterior_mean"] <= e["posterior_upper"])
    means = {(f"g{r}", f"g{t}"): e.loc[(f"g{r}", f"g{t}"), "posterior_mean"]
             for r, t, _ in true}
    for (r, t, w) in true:
        assert np.sign(means[(f"g{r}", f"g{t}")]) == np.sign(w), (r, t)
    assert abs(e.loc[("g3", "g4"), "posterior_mean"]) < min(np.abs(list(means.values())))
    assert res.J.shape == (G, G) and res.info["divergences"] >= 0
    fast = grn_infer.infer_grn(object(), prior=prior, method="lyapunov", alpha=0.0)
    f = fast.edges.set_index(["regulator", "target"])
    for (r, t, w) in true:
        assert f.loc[(f"g{r}", f"g{t}"), "sign"] == np.sign(w), (r, t)
