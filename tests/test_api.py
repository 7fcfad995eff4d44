"""Public entry point ``scribe_stan.fit``: bad input, AnnData in/out, DataTree shape.

Small simulated pln data (``scribe_stan.models.pln.simulate``) wrapped in AnnData; every
Laplace fit here takes seconds.
"""

import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scribe_stan as ss
from scribe_stan.models import pln

N, G, K = 40, 8, 2
FORMATS = ["dense", "csr"]


def make_adata(counts, fmt="dense", dtype=None):
    X = np.asarray(counts) if dtype is None else np.asarray(counts).astype(dtype)
    X = sp.csr_matrix(X) if fmt == "csr" else X.copy()
    n, g = X.shape
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]),
                   var=pd.DataFrame(index=[f"gene{j}" for j in range(g)]))
    a.obs["batch"] = "b0"
    a.var["symbol"] = [f"SYM{j}" for j in range(g)]
    a.uns["note"] = {"k": 1}
    return a


@pytest.fixture(scope="module")
def sim():
    return pln.simulate(N, G, K, seed=3)


@pytest.fixture(scope="module")
def lap(sim):
    adata = make_adata(sim["counts"])
    return adata, ss.fit(adata, model="pln", rank=K, progress=False, seed=0)


def snapshot(a):
    return a.copy()


def _mat(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def assert_unchanged(a, before):
    """The caller's AnnData equals its snapshot: matrix type, dtype, values, annotations."""
    assert type(a.X) is type(before.X) and a.X.dtype == before.X.dtype
    np.testing.assert_array_equal(_mat(a.X), _mat(before.X))  # NaN == NaN here
    pd.testing.assert_frame_equal(a.obs, before.obs)
    pd.testing.assert_frame_equal(a.var, before.var)
    assert list(a.layers.keys()) == list(before.layers.keys())
    for k in before.layers.keys():
        np.testing.assert_array_equal(_mat(a.layers[k]), _mat(before.layers[k]))
    assert set(a.obsm.keys()) == set(before.obsm.keys())
    assert set(a.varm.keys()) == set(before.varm.keys())
    assert set(a.uns.keys()) == set(before.uns.keys())


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

BAD_VALUES = [
    (0.5, "non-integer"),
    (-1.0, "negative"),
    (np.nan, "NaN"),
    (np.inf, "infinite"),
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value, word", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_invalid_counts_raise_and_leave_data_untouched(sim, fmt, value, word):
    X = sim["counts"].astype(float)
    X[3, 5] = value
    adata = make_adata(X, fmt)
    before = snapshot(adata)
    with pytest.raises(ValueError) as err:
        ss.fit(adata, rank=K, progress=False)
    msg = str(err.value)
    assert word in msg
    assert "finite, non-negative integer counts" in msg  # what is allowed
    assert "cell3" in msg and "gene5" in msg  # where the first one is
    assert_unchanged(adata, before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_library_cell_raises(sim, fmt):
    X = sim["counts"].copy()
    X[7] = 0
    adata = make_adata(X, fmt)
    before = snapshot(adata)
    with pytest.raises(ValueError, match=r"1 cell with zero library size.*'cell7'"):
        ss.fit(adata, rank=K, progress=False)
    assert_unchanged(adata, before)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rank_not_below_genes_raises(sim, fmt):
    adata = make_adata(sim["counts"], fmt)
    before = snapshot(adata)
    with pytest.raises(ValueError, match=rf"rank K={G} is out of range for G={G} genes; "
                                          r"allowed: 1 <= K < G"):
        ss.fit(adata, rank=G, progress=False)
    with pytest.raises(ValueError, match=r"rank K=0"):
        ss.fit(adata, rank=0, progress=False)
    with pytest.raises(TypeError, match="rank K must be an integer"):
        ss.fit(adata, rank=2.0, progress=False)
    assert_unchanged(adata, before)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"layer": "spliced"},
         r"Unknown layer 'spliced'; available layers: 'counts'; or layer=None"),
        ({"model": "zinb"}, r"Unknown model 'zinb'; allowed: 'pln'"),
        ({"method": "vi"}, r"Unknown method 'vi'; allowed: 'laplace', 'hmc'"),
        ({"device": "gpu"}, r"Unknown device 'gpu'; allowed: 'cpu', 'cuda', 'auto'"),
        ({"method": "hmc", "backend": "stan"},
         r"Unknown backend 'stan'; allowed: 'auto', 'cmdstanpy', 'pystan'"),
        ({"sigma_M": -1.0}, r"sigma_M must be a positive finite number.*allowed: 0 < value"),
        ({"M0": 0.0}, r"M0 must be a positive finite number"),
        ({"genes": 1}, r"genes=1 is out of range for 8 non-zero genes .*allowed: None \(all\), "
                       r"an integer from 2 to 8, or a list of gene names"),
        ({"genes": ["gene0", "nope"]}, r"genes not found.*'nope'"),
    ],
    ids=["layer", "model", "method", "device", "backend", "sigma_M", "M0", "genes-int",
         "genes-names"],
)
def test_unknown_names_raise_with_allowed_values(sim, fmt, kwargs, pattern):
    adata = make_adata(sim["counts"], fmt)
    adata.layers["counts"] = adata.X.copy()
    before = snapshot(adata)
    with pytest.raises(ValueError, match=pattern):
        ss.fit(adata, rank=K, progress=False, **kwargs)
    assert_unchanged(adata, before)


@pytest.mark.parametrize("lib", [np.ones(N - 1), np.r_[np.ones(N - 1), 0.0],
                                 np.r_[np.ones(N - 1), np.nan]], ids=["shape", "zero", "nan"])
def test_bad_library_size_raises(sim, lib):
    adata = make_adata(sim["counts"])
    with pytest.raises(ValueError, match=rf"library_size must be {N} positive finite values"):
        ss.fit(adata, rank=K, library_size=lib, progress=False)


def test_not_an_anndata_raises_type_error(sim):
    with pytest.raises(TypeError, match="adata must be an anndata.AnnData; got ndarray"):
        ss.fit(sim["counts"], rank=K, progress=False)


def test_conditional_on_other_genes_raises(sim, lap):
    _, fit = lap
    other = make_adata(sim["counts"])
    with pytest.raises(ValueError, match="conditional_on was fitted on other cells or genes"):
        ss.fit(other, method="hmc", rank=K, genes=4, conditional_on=fit, progress=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_all_zero_genes_dropped_with_warning(sim, fmt):
    X = sim["counts"].copy()
    X[:, 2] = 0
    adata = make_adata(X, fmt)
    before = snapshot(adata)
    with pytest.warns(UserWarning, match=r"Dropping 1 all-zero gene of 8.*'gene2'"):
        fit = ss.fit(adata, rank=K, progress=False)
    assert "gene2" not in fit.var_names and len(fit.var_names) == G - 1
    assert fit.x_hat.shape == (N, G - 1)
    out = fit.to_anndata(adata)
    assert np.isnan(out.var.loc["gene2", "pln_mu"]) and np.isnan(out.varm["pln_W"][2]).all()
    assert np.isfinite(out.var.drop(index="gene2")["pln_mu"]).all()
    assert_unchanged(adata, before)


# --------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------


def test_dense_sparse_and_layer_inputs_give_the_same_fit(sim, lap):
    adata, fit = lap
    sparse = make_adata(sim["counts"], "csr", dtype=np.float32)
    fit_sp = ss.fit(sparse, rank=K, progress=False, seed=0)
    layered = make_adata(np.zeros_like(sim["counts"], dtype=float) + 0.5)  # not counts
    layered.layers["counts"] = sp.csr_matrix(sim["counts"])
    fit_layer = ss.fit(layered, rank=K, layer="counts", progress=False, seed=0)
    for other in (fit_sp, fit_layer):
        assert other.objective == pytest.approx(fit.objective, rel=1e-12)
        np.testing.assert_allclose(other.mu, fit.mu, rtol=1e-10)
        np.testing.assert_allclose(other.x_hat, fit.x_hat, rtol=1e-10)


def test_fit_result_shapes(lap):
    adata, fit = lap
    assert fit.converged.dtype == bool and fit.converged.shape == (N,)
    assert fit.converged.all()
    assert fit.mu.shape == (G,) and fit.W.shape == (G, K) and fit.d.shape == (G,)
    assert fit.x_hat.shape == (N, G) and fit.eta_hat.shape == (N,)
    assert (fit.eta_hat >= 0).all() and (fit.d > 0).all()
    assert np.isfinite(fit.objective)
    assert list(fit.obs_names) == list(adata.obs_names)
    assert list(fit.var_names) == list(adata.var_names)


def test_gauge_invariant_loadings_and_effective_rank(lap):
    adata, fit = lap
    np.testing.assert_allclose(fit.W_perp, fit.W - fit.W.mean(axis=0), atol=1e-15)
    gauge = fit.gauge
    assert gauge["norm_perp"] == pytest.approx(np.linalg.norm(fit.W_perp))
    assert gauge["norm_parallel"] == pytest.approx(np.sqrt(G) * np.linalg.norm(fit.W.mean(0)))
    assert 0 <= fit.effective_rank <= K
    out = fit.to_anndata(adata)
    np.testing.assert_array_equal(out.varm["pln_W_perp"], fit.W_perp)
    assert out.uns["pln"]["effective_rank"] == fit.effective_rank
    tree = fit.to_datatree(draws=3, genes=["gene1", "gene4"])
    # W_perp removes the means over all fitted genes, not over the stored subset
    idx = list(adata.var_names).index("gene4")
    np.testing.assert_allclose(tree["posterior"]["W_perp"].values[0, 0, 1], fit.W_perp[idx])



    adata, fit = lap
    before = snapshot(adata)
    out = fit.to_anndata(adata)
    assert out is not adata
    assert_unchanged(adata, before)
    for key in ("pln_eta", "pln_capture_efficiency", "pln_converged"):
        assert key in out.obs and key not in adata.obs
    np.testing.assert_allclose(out.obs["pln_capture_efficiency"], np.exp(-fit.eta_hat))
    np.testing.assert_array_equal(out.obsm["pln_x"], fit.x_hat)
    np.testing.assert_array_equal(out.varm["pln_W"], fit.W)
    np.testing.assert_array_equal(out.var["pln_mu"], fit.mu)
    assert out.uns["pln"]["rank"] == K and out.uns["pln"]["objective"] == fit.objective
    assert "pln" not in adata.uns
    # the copy is independent of the input
    out.X[0, 0] += 1
    assert adata.X[0, 0] == before.X[0, 0]
    custom = fit.to_anndata(adata, key_added="run1")
    assert "run1_x" in custom.obsm and "run1" in custom.uns


def test_to_datatree_groups_dims_and_coords(lap):
    adata, fit = lap
    draws = 30
    tree = fit.to_datatree(draws=draws, seed=1)
    for group in ("posterior", "sample_stats", "log_likelihood", "posterior_predictive",
                  "observed_data"):
        assert group in tree.children, group
    post = tree["posterior"]
    assert post["x"].dims == ("chain", "draw", "cell", "gene")
    assert post["x"].shape == (1, draws, N, G)
    assert post["eta"].dims == ("chain", "draw", "cell")
    assert post["W"].dims == ("chain", "draw", "gene", "factor")
    assert post.sizes["factor"] == K
    assert post["Sigma"].dims == ("chain", "draw", "gene", "gene_2")
    assert list(post["cell"].values) == list(adata.obs_names)
    assert list(post["gene"].values) == list(adata.var_names)
    stats = tree["sample_stats"]
    assert {"lp", "lp_approx"} <= set(stats.data_vars)
    assert stats["lp"].dims == ("chain", "draw") and stats["lp"].shape == (1, draws)
    assert np.isfinite(stats["lp"].values).all() and np.isfinite(stats["lp_approx"]).all()
    assert tree["log_likelihood"]["counts"].dims == ("chain", "draw", "cell")
    assert tree["posterior_predictive"]["counts"].dims == ("chain", "draw", "cell", "gene")
    obs = tree["observed_data"]["counts"]
    assert obs.dims == ("cell", "gene")
    np.testing.assert_array_equal(obs.values, adata.X)
    # globals are point estimates; per-cell latents are draws around the modes
    np.testing.assert_allclose(post["mu"].values[0, 0], fit.mu)
    assert (post["mu"].values == fit.mu).all() and (post["d"].values == fit.d).all()
    assert (post["x"].std(dim=("chain", "draw")) > 0).all()


def test_to_datatree_gene_subset(lap):
    adata, fit = lap
    tree = fit.to_datatree(draws=5, genes=3)
    top3 = np.sort(np.argsort(-np.asarray(adata.X).mean(axis=0), kind="stable")[:3])
    assert list(tree["posterior"]["gene"].values) == list(adata.var_names[top3])
    assert tree["posterior"]["x"].shape == (1, 5, N, 3)
    tree = fit.to_datatree(draws=5, genes=["gene4", "gene1"])
    assert list(tree["posterior"]["gene"].values) == ["gene4", "gene1"]


def test_to_datatree_genome_scale_guard(lap):
    _, fit = lap
    draws = 2 * 10**8 // (N * G) + 1
    with pytest.raises(ValueError, match=r"draws\*cells\*genes .* exceeds .*allowed: draws <= "
                                         rf"{draws - 1} "):
        fit.to_datatree(draws=draws)
    with pytest.raises(ValueError, match="genes not found among the fitted genes"):
        fit.to_datatree(draws=5, genes=["nope"])


def test_compare_laplace_with_itself(lap):
    _, fit = lap
    t1 = fit.to_datatree(draws=400, seed=1)
    t2 = fit.to_datatree(draws=400, seed=2)
    table = ss.compare(t1, t2, var_names=["x", "eta"])
    assert table.loc["x", "mean_abs_smd"] < 0.2
    assert 0.8 < table.loc["x", "median_sd_ratio"] < 1.2


# ------------------------------------------------------------------ issue 18: the boundary


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"backend": "pystan"}, ValueError,
     r"backend='pystan' applies to method='hmc'.*allowed with method='laplace': 'auto'"),
    ({"tol": -1.0}, ValueError, r"tol must be a positive finite number; got -1.0"),
    ({"max_iter": 0}, ValueError, r"max_iter must be an integer >= 1; got 0"),
    ({"max_iter": 2.5}, TypeError, r"max_iter must be an integer >= 1; got 2.5"),
    ({"seed": -1}, ValueError, r"seed must be an integer >= 0; got -1"),
    ({"genes": "gene1"}, TypeError, r"genes must be None, an integer or a list of gene "
                                    r"names; got 'gene1' of type str \(for one gene pass "
                                    r"\['gene1'\]\)"),
    ({"genes": 2.0}, TypeError, r"got 2.0 of type float"),
    ({"genes": True}, TypeError, r"got True of type bool"),
    ({"genes": []}, ValueError, r"genes lists 0 gene names; need at least 2"),
    ({"model": "nbvcp", "device": "cuda"}, ValueError,
     r"device='cuda' is not available for nbvcp: its Laplace kernels run on the CPU only"),
], ids=["backend-laplace", "tol", "max_iter", "max_iter-float", "seed", "genes-str",
        "genes-float", "genes-bool", "genes-empty", "cuda-nbvcp"])
def test_arguments_checked_before_fitting(sim, kwargs, error, pattern, monkeypatch):
    import scribe_stan.fit_data as fit_data
    import scribe_stan.specs.lognormal as lognormal

    def boom(*args, **kw):
        raise AssertionError("the solver ran although an argument was bad")

    monkeypatch.setattr(lognormal, "fit_laplace", boom)
    if "genes" not in kwargs:  # checked before the counts are even read
        monkeypatch.setattr(fit_data._validate, "counts_from_anndata", boom)
    adata = make_adata(sim["counts"])
    before = snapshot(adata)
    with pytest.raises(error, match=pattern):
        ss.fit(adata, **{"rank": K, "progress": False, **kwargs})
    assert_unchanged(adata, before)


def test_rank_for_nbvcp_is_ignored_with_a_warning(sim):
    adata = make_adata(sim["counts"])
    with pytest.warns(UserWarning, match=r"rank=3 is ignored for model='nbvcp'"):
        fit = ss.fit(adata, model="nbvcp", rank=3, progress=False, max_iter=20)
    assert fit.settings["rank"] is None


@pytest.mark.parametrize("axis", ["obs", "var"])
def test_duplicate_names_refused_before_fitting(sim, axis):
    adata = make_adata(sim["counts"])
    names = list(getattr(adata, f"{axis}_names"))
    names[3] = names[1]
    setattr(adata, f"{axis}_names", names)
    before = snapshot(adata)
    what = "var_names (gene names)" if axis == "var" else "obs_names (cell names)"
    with pytest.raises(ValueError, match=rf"{re.escape(what)} must be unique; duplicated 1 "
                                         rf"name: '{names[1]}'; make them unique first, e.g. "
                                         rf"adata.{axis}_names_make_unique\(\)"):
        ss.fit(adata, rank=K, progress=False)
    assert_unchanged(adata, before)


def test_to_anndata_refuses_other_data_and_reads_backed(lap, tmp_path):
    adata, fit = lap
    with pytest.raises(ValueError, match=r"adata lacks 1 of the 8 fitted genes"):
        fit.to_anndata(adata[:, 1:].copy())
    renamed = adata.copy()
    renamed.var_names = [f"other{j}" for j in range(G)]
    with pytest.raises(ValueError, match=r"adata lacks 8 of the 8 fitted genes"):
        fit.to_anndata(renamed)
    with pytest.raises(ValueError, match=r"adata holds other cells than the fit"):
        fit.to_anndata(adata[::-1].copy())
    with pytest.raises(TypeError, match="adata must be an anndata.AnnData"):
        fit.to_anndata(adata.X)
    # genes in another order: each value lands on its own gene
    shuffled = adata[:, list(range(G))[::-1]].copy()
    out = fit.to_anndata(shuffled)
    np.testing.assert_array_equal(out.var.loc[list(fit.var_names), "pln_mu"], fit.mu)
    # a backed AnnData: an in-memory result, the file unchanged
    path = tmp_path / "backed.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    out = fit.to_anndata(backed)
    assert not out.isbacked
    np.testing.assert_array_equal(out.obsm["pln_x"], fit.x_hat)
    backed.file.close()
    assert "pln" not in ad.read_h5ad(path).uns


def test_plot_ppc_refuses_a_fit(lap):
    _, fit = lap
    with pytest.raises(TypeError, match=r"plot_ppc takes a DataTree, got LaplaceFit; for a "
                                        r"fit pass scribe_stan.posterior_predictive\(fit\)"):
        ss.plot_ppc(fit)
