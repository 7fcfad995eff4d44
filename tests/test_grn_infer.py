"""GRN inference: Lyapunov adjoint gradient, recovery, stability, priors, baselines.

NumPy only (no Laplace fit, no Stan): latent sources are built from reference modes.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pandas as pd
import pytest

from scribe_stan import grn, grn_eval, grn_infer, grn_prior
from scribe_stan.laplace import reference


def _chain_network():
    J = -np.diag([1.0, 0.7, 1.5, 0.8, 1.2])
    for r, t, w in [(0, 1, 0.6), (0, 2, -0.8), (1, 3, 0.5), (2, 4, -0.7)]:
        J[t, r] = w
    D = np.array([0.3, 0.2, 0.4, 0.25, 0.3])
    return J, D


def test_lyapunov_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    J, D = _chain_network()
    J = J + 0.05 * rng.standard_normal(J.shape)
    S = grn.lyapunov_covariance(J, np.diag(D)) + 0.05 * np.eye(5)
    val, gJ, gD, _ = grn_infer.lyapunov_nll(J, D, S)
    h = 1e-6
    for (i, j) in [(1, 0), (0, 3), (2, 2)]:
        E = np.zeros_like(J)
        E[i, j] = h
        fd = (grn_infer.lyapunov_nll(J + E, D, S)[0] - grn_infer.lyapunov_nll(J - E, D, S)[0])
        assert fd / (2 * h) == pytest.approx(gJ[i, j], rel=1e-5, abs=1e-8)
    e = np.zeros(5)
    e[3] = h
    fd = grn_infer.lyapunov_nll(J, D + e, S)[0] - grn_infer.lyapunov_nll(J, D - e, S)[0]
    assert fd / (2 * h) == pytest.approx(gD[3], rel=1e-5)


def test_recovers_sparse_jacobian_from_exact_sigma_with_true_support():
    J, D = _chain_network()
    Sigma = grn.lyapunov_covariance(J, np.diag(D))
    free = J != 0
    S0 = Sigma.copy()
    fit = grn_infer.fit_lyapunov(Sigma, free=free, alpha=0.0)
    scale = np.exp(np.mean(np.log(-np.diag(J))))  # the estimator's scale convention
    np.testing.assert_allclose(fit.J, J / scale, atol=2e-3)
    np.testing.assert_allclose(fit.D, D / scale, atol=2e-3)
    np.testing.assert_array_equal(Sigma, S0)  # input not mutated
    assert fit.abscissa < 0


def test_unstable_jacobian_has_infinite_objective_and_fit_is_stable():
    J = np.array([[0.1, 0.0], [0.5, -1.0]])
    assert grn_infer.lyapunov_nll(J, np.ones(2), np.eye(2))[0] == np.inf
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 6)) @ rng.standard_normal((6, 6))
    fit = grn_infer.fit_lyapunov(np.cov(x.T), alpha=0.01, max_iter=300)
    assert fit.abscissa < 0
    assert np.all(np.linalg.eigvals(fit.J).real < 0)


def test_fit_lyapunov_rejects_bad_s():
    with pytest.raises(ValueError, match="positive definite"):
        grn_infer.fit_lyapunov(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="alpha"):
        grn_infer.fit_lyapunov(np.eye(3), alpha=-1)


# ------------------------------------------------------------------------------ priors


def test_read_prior_dorothea_style_and_letters():
    t = pd.DataFrame({"tf": ["A", "A", "B", "B"], "target": ["B", "C", "C", "C"],
                      "confidence": ["A", "D", "B", "C"], "mor": [1, -1, 1, -1]})
    t0 = t.copy()
    p = grn_prior.read_prior(t)
    pd.testing.assert_frame_equal(t, t0)
    e = p.edges.set_index(["regulator", "target"])
    assert e.loc[("A", "B"), "confidence"] == 1.0 and e.loc[("A", "C"), "confidence"] == 0.4
    assert e.loc[("B", "C"), "sign"] == 0  # conflicting duplicate signs -> unknown
    assert len(grn_prior.read_prior(t, levels="AB")) == 2


def test_prior_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown confidence labels.*'Z'"):
        grn_prior.read_prior(pd.DataFrame({"tf": ["a"], "target": ["b"], "confidence": ["Z"]}))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        grn_prior.read_prior(pd.DataFrame({"tf": ["a"], "target": ["b"], "weight": [2.0]}))
    with pytest.raises(ValueError, match="sign"):
        grn_prior.read_prior(pd.DataFrame({"tf": ["a"], "target": ["b"], "sign": [3]}))
    with pytest.raises(ValueError, match="target column"):
        grn_prior.read_prior(pd.DataFrame({"tf": ["a"], "gene": ["b"]}))
    p = grn_prior.read_prior(pd.DataFrame({"tf": ["X1"], "target": ["X2"]}))
    with pytest.raises(ValueError, match="empty prior support"):
        p.match(["g0", "g1"])
    p2 = grn_prior.read_prior(pd.DataFrame({"tf": ["g0", "X1"], "target": ["g1", "g0"]}))
    with pytest.warns(UserWarning, match="not among"):
        m, unknown = p2.match(["g0", "g1"])
    assert unknown == ["X1"] and len(m) == 1
    with pytest.raises(ValueError, match="noisy_or"):
        grn_prior.combine_priors(p, how="sum")


def test_mask_and_combined_sources():
    mask = pd.DataFrame([[0, 1.0, -0.5]], index=["g0"], columns=["g0", "g1", "g2"])
    p1 = grn_prior.read_prior(mask, name="mask")
    assert set(zip(p1.edges.regulator, p1.edges.target)) == {("g0", "g1"), ("g0", "g2")}
    assert p1.edges.set_index("target").loc["g2", "sign"] == -1
    p2 = grn_prior.read_prior(pd.DataFrame({"regulator": ["g0"], "target": ["g1"],
                                            "confidence": [0.5]}), name="t")
    c = grn_prior.combine_priors(p1, p2)
    assert c.edges.set_index("target").loc["g1", "confidence"] == pytest.approx(1.0)
    c = grn_prior.combine_priors(p1, p2, how="mean")
    assert c.edges.set_index("target").loc["g1", "confidence"] == pytest.approx(0.75)


# ---------------------------------------------------------------- latent moments, API


@functools.lru_cache
def _source_cached(N, G, K, seed):
    return _source_build(N, G, K, seed)


def _source(N=8, G=5, K=2, seed=0):
    src, dense = _source_cached(N, G, K, seed)
    return dataclasses.replace(src), dense


def _source_build(N, G, K, seed):
    """A LatentSource at exact reference modes of a small pln problem."""
    sim_rng = np.random.default_rng(seed)
    mu = np.log(sim_rng.uniform(3, 10, G))
    W = 0.4 * sim_rng.standard_normal((G, K))
    d = sim_rng.uniform(0.1, 0.3, G)
    Sigma = W @ W.T + np.diag(d)
    x = sim_rng.multivariate_normal(mu, Sigma, size=N)
    counts = sim_rng.poisson(np.exp(x))
    a = np.full(N, 0.3)
    sigma = np.full(N, 0.5)
    modes = [reference.cell_mode(counts[c], mu, Sigma, a[c], 0.5) for c in range(N)]
    src = grn_infer.LatentSource(
        model="pln", genes=pd.Index([f"g{i}" for i in range(G)]),
        obs_names=pd.Index([f"c{i}" for i in range(N)]), x=np.array([m[0] for m in modes]),
        counts=counts, log_lib=np.log(counts.sum(axis=1)), mu=mu, W=W, d=d,
        eta=np.array([m[1] for m in modes]), a=a, sigma=sigma)
    dense = np.mean([reference.cell_covariance(counts[c], mu, Sigma, a[c], 0.5)[:G, :G]
                     for c in range(N)], axis=0)
    return src, dense


def test_posterior_covariance_block_matches_dense_reference():
    src, dense = _source()
    rows, cols = np.array([0, 2, 3]), np.array([1, 2, 4])
    blk = grn_infer.posterior_covariance_block(src, rows, cols, chunk_cells=3) / 8
    np.testing.assert_allclose(blk, dense[np.ix_(rows, cols)], rtol=1e-6, atol=1e-10)
    var = grn_infer._posterior_variance(src, np.arange(5)) / 8
    np.testing.assert_allclose(var, np.diag(dense), rtol=1e-6)


@pytest.mark.parametrize("method", ["lyapunov", "correlation", "partial_correlation", "ridge",
                                    "prior", "random"])
def test_infer_grn_methods_share_one_interface(method, monkeypatch):
    src, _ = _source(N=60, G=5)
    monkeypatch.setattr(grn_infer, "latent_source", lambda fit, key=None: src)
    prior = pd.DataFrame({"tf": ["g0", "g0", "g1", "zz"], "target": ["g1", "g2", "g3", "g0"],
                          "confidence": ["A", "B", "C", "A"]})
    x0 = src.x.copy()
    with pytest.warns(UserWarning, match="not among"):
        res = grn_infer.infer_grn(object(), prior=prior, method=method, genes=5,
                                  support="soft", max_iter=200, n_bags=3)
    assert res.unknown_genes == ["zz"]
    assert {"regulator", "target", "score", "sign", "rank"} <= set(res.edges.columns)
    assert res.edges["score"].is_monotonic_decreasing
    np.testing.assert_array_equal(src.x, x0)
    if method == "lyapunov":
        assert res.J.shape == (5, 5) and np.all(np.linalg.eigvals(res.J.to_numpy()).real < 0)
    with pytest.warns(UserWarning):
        hard = grn_infer.infer_grn(object(), prior=prior, method=method, genes=5,
                                   support="hard", max_iter=200)
    assert set(zip(hard.edges.regulator, hard.edges.target)) <= {("g0", "g1"), ("g0", "g2"),
                                                                 ("g1", "g3")}


def test_infer_grn_bad_arguments(monkeypatch):
    src, _ = _source()
    monkeypatch.setattr(grn_infer, "latent_source", lambda fit, key=None: src)
    with pytest.raises(ValueError, match="unknown method 'pca'.*'lyapunov'"):
        grn_infer.infer_grn(object(), method="pca")
    with pytest.raises(ValueError, match="unknown support"):
        grn_infer.infer_grn(object(), support="medium")
    with pytest.raises(ValueError, match="pass prior="):
        grn_infer.infer_grn(object(), method="prior")
    with pytest.raises(ValueError, match="not among the 5 fitted"):
        grn_infer.infer_grn(object(), genes=["g0", "nope"])


def test_result_writes_csv_and_anndata(tmp_path, monkeypatch):
    import anndata

    src, _ = _source(N=40)
    monkeypatch.setattr(grn_infer, "latent_source", lambda fit, key=None: src)
    res = grn_infer.infer_grn(object(), method="lyapunov", max_iter=100)
    paths = res.to_csv(tmp_path / "grn.csv")
    assert [p.name for p in paths] == ["grn.csv", "grn.J.csv"]
    ad = anndata.AnnData(np.zeros((40, 5)), var=pd.DataFrame(index=src.genes))
    out = res.to_anndata(ad)
    assert "grn" not in ad.uns and out.uns["grn"]["J"].shape == (5, 5)
    out.write_h5ad(tmp_path / "o.h5ad")
    back = anndata.read_h5ad(tmp_path / "o.h5ad")
    assert len(back.uns["grn"]["edges"]) == len(res.edges)
    fig = res.plot(top=5)
    assert fig.axes


def test_edge_metrics_beeline():
    truth = pd.DataFrame({"regulator": ["a", "a"], "target": ["b", "c"], "sign": [1, -1]})
    perfect = pd.DataFrame({"regulator": ["a", "a", "b"], "target": ["b", "c", "a"],
                            "score": [2.0, 1.0, 0.5], "sign": [1, -1, 1]})
    m = grn_eval.edge_metrics(perfect, truth, ["a", "b", "c"])
    assert m["auprc"] == pytest.approx(1.0) and m["auprc_ratio"] == pytest.approx(3.0)
    assert m["epr"] == pytest.approx(3.0) and m["sign_accuracy"] == 1.0


def _fit_h5ad(tmp_path):
    """An h5ad shaped like fit.to_anndata's output (pln keys), from reference modes."""
    import anndata

    src, _ = _source(N=40)
    ad = anndata.AnnData(src.counts.astype(np.int64),
                         obs=pd.DataFrame(index=src.obs_names),
                         var=pd.DataFrame(index=src.genes))
    ad.obs["pln_eta"] = src.eta
    ad.obsm["pln_x"] = src.x
    ad.var["pln_mu"], ad.var["pln_d"] = src.mu, src.d
    ad.varm["pln_W"] = src.W
    ad.uns["pln"] = {"model": "pln", "M0": float(np.exp(0.3) * 1.0), "sigma_M": 0.5,
                     "genes": np.asarray(src.genes, dtype=str)}
    path = tmp_path / "fit.h5ad"
    ad.write_h5ad(path)
    return path, src


def test_latent_source_from_fit_h5ad(tmp_path):
    import anndata

    path, src = _fit_h5ad(tmp_path)
    got = grn_infer.latent_source(anndata.read_h5ad(path))
    np.testing.assert_allclose(got.x, src.x)
    np.testing.assert_allclose(got.W, src.W)
    with pytest.raises(ValueError, match="no fit results"):
        grn_infer.latent_source(anndata.AnnData(np.zeros((2, 2))))


def test_cli_grn(tmp_path, capsys):
    import json

    from scribe_stan import cli

    path, _ = _fit_h5ad(tmp_path)
    prior = tmp_path / "edges.csv"
    pd.DataFrame({"tf": ["g0", "g0", "g1", "TP53"], "target": ["g1", "g2", "g3", "g0"],
                  "confidence": ["A", "B", "C", "A"]}).to_csv(prior, index=False)
    out = tmp_path / "grn.csv"
    rc = cli.main(["grn", str(path), "--prior", str(prior), "--out", str(out),
                   "--figure", str(tmp_path / "g.png"), "--h5ad-out", str(tmp_path / "o.h5ad")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["unknown_prior_genes"] == 1 and line["candidate_edges"] == 3
    assert set(pd.read_csv(out).columns) >= {"regulator", "target", "score", "sign"}
    assert cli.main(["grn", str(path), "--prior", str(prior), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(["grn", str(path), "--method", "pca", "--out", str(tmp_path / "x.csv")]) == 2
    assert "allowed" in capsys.readouterr().err
