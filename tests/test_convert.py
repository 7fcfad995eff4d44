"""Tests for scribe_stan.convert: the one DataTree shape shared by all solvers."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import xarray as xr

from scribe_stan.convert import (
    GROUPS,
    VARIABLE_DIMS,
    build_datatree,
    corr_from_cov,
    to_datatree_from_stan,
)

N, G, K = 6, 4, 2
CELLS = [f"cell_{i}" for i in range(N)]
GENES = [f"gene_{g}" for g in range(G)]


def _globals(rng, C, S):
    W = rng.normal(size=(C, S, G, K))
    d = np.exp(rng.normal(size=(C, S, G)))
    Sigma = np.einsum("csgk,cshk->csgh", W, W) + d[..., None] * np.eye(G)
    return {"mu": rng.normal(size=(C, S, G)), "W": W, "d": d, "Sigma": Sigma}


def _full_inputs(rng, C=2, S=100):
    post = _globals(rng, C, S)
    post["x"] = rng.normal(size=(C, S, N, G))
    post["eta"] = np.abs(rng.normal(size=(C, S, N)))
    return {
        "posterior": post,
        "sample_stats": {
            "lp": rng.normal(size=(C, S)),
            "diverging": np.zeros((C, S), dtype=bool),
            "tree_depth": np.full((C, S), 3),
            "energy": rng.normal(size=(C, S)),
            "step_size": np.full((C, S), 0.3),
            "acceptance_rate": rng.uniform(size=(C, S)),
        },
        "log_likelihood": {"counts": -np.abs(rng.normal(size=(C, S, N))) - 5.0},
        "posterior_predictive": {"counts": rng.poisson(3.0, size=(C, S, N, G))},
        "observed_data": {"counts": rng.poisson(3.0, size=(N, G))},
    }


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture
def tree():
    rng = np.random.default_rng(1)
    return build_datatree(
        **_full_inputs(rng),
        cell_names=CELLS,
        gene_names=GENES,
        n_factors=K,
        attrs={"solver": "hmc", "backend": "cmdstanpy", "seed": 7, "stan_hash": "abc123"},
    )


def test_groups_dims_coords(tree):
    assert set(tree.children) == set(GROUPS)
    post = tree["posterior"]
    # every stored variable has the table's dims (the table also covers other models)
    assert {"mu", "d", "W", "Sigma", "corr", "x", "eta"} <= set(post.data_vars)
    for name in post.data_vars:
        assert post[name].dims == ("chain", "draw", *VARIABLE_DIMS["posterior"][name]), name
    assert post["x"].shape == (2, 100, N, G)
    assert list(post["cell"].values) == CELLS
    assert list(post["gene"].values) == GENES
    assert list(post["gene_2"].values) == GENES
    assert list(post["factor"].values) == list(range(K))
    for name in tree["sample_stats"].data_vars:
        assert tree["sample_stats"][name].dims == ("chain", "draw")
    assert tree["log_likelihood"]["counts"].dims == ("chain", "draw", "cell")
    assert tree["posterior_predictive"]["counts"].dims == ("chain", "draw", "cell", "gene")
    assert tree["observed_data"]["counts"].dims == ("cell", "gene")
    assert list(tree["observed_data"]["cell"].values) == CELLS


def test_corr_added_from_sigma(tree):
    post = tree["posterior"]
    sig = post["Sigma"].values
    corr = post["corr"].values
    np.testing.assert_allclose(np.diagonal(corr, axis1=-2, axis2=-1), 1.0)
    i, j = 0, 2
    expect = sig[..., i, j] / np.sqrt(sig[..., i, i] * sig[..., j, j])
    np.testing.assert_allclose(corr[..., i, j], expect)
    np.testing.assert_allclose(corr, np.swapaxes(corr, -1, -2))


def test_corr_given_is_kept():
    rng = np.random.default_rng(2)
    post = _globals(rng, 1, 10)
    mine = np.broadcast_to(np.eye(G), (1, 10, G, G)).copy()
    post["corr"] = mine
    t = build_datatree(posterior=post, cell_names=CELLS, gene_names=GENES, n_factors=K, attrs={})
    np.testing.assert_array_equal(t["posterior"]["corr"].values, mine)


def test_corr_from_cov_simple():
    cov = np.array([[4.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(corr_from_cov(cov), [[1.0, 0.5], [0.5, 1.0]])


def test_attrs_on_root_and_posterior(tree):
    for attrs in (tree.attrs, tree["posterior"].attrs):
        assert attrs["solver"] == "hmc"
        assert attrs["backend"] == "cmdstanpy"
        assert attrs["seed"] == 7
        assert attrs["stan_hash"] == "abc123"
        for key in ("numpy_version", "arviz_base_version", "arviz_stats_version",
                    "xarray_version", "scribe_stan_version"):
            assert isinstance(attrs[key], str) and attrs[key]


def test_attrs_none_is_serialisable():
    rng = np.random.default_rng(3)
    t = build_datatree(posterior={"mu": rng.normal(size=(1, 5, G))}, cell_names=CELLS,
                       gene_names=GENES, n_factors=K, attrs={"seed": None, "flag": True})
    assert t.attrs["seed"] == "None"
    assert t.attrs["flag"] == 1


def test_subset_posterior_and_missing_groups():
    rng = np.random.default_rng(4)
    post = _globals(rng, 1, 20)
    t = build_datatree(posterior=post, sample_stats={"lp": rng.normal(size=(1, 20)),
                                                     "lp_approx": rng.normal(size=(1, 20))},
                       cell_names=CELLS, gene_names=GENES, n_factors=K, attrs={})
    assert set(t.children) == {"posterior", "sample_stats"}
    assert "x" not in t["posterior"].data_vars
    assert "corr" in t["posterior"].data_vars


def test_unknown_variable_lists_known():
    with pytest.raises(ValueError, match=r"unknown variable.*'foo'.*known variables.*'Sigma'"):
        build_datatree(posterior={"foo": np.zeros((1, 2, 3))}, cell_names=CELLS,
                       gene_names=GENES, n_factors=K, attrs={})
    with pytest.raises(ValueError, match=r"sample_stats.*known variables.*'lp_approx'"):
        build_datatree(posterior={"mu": np.zeros((1, 2, G))}, sample_stats={"bogus": np.zeros((1, 2))},
                       cell_names=CELLS, gene_names=GENES, n_factors=K, attrs={})


def test_shape_errors():
    with pytest.raises(ValueError, match=r"posterior/mu: expected shape"):
        build_datatree(posterior={"mu": np.zeros((1, 2, G + 1))}, cell_names=CELLS,
                       gene_names=GENES, n_factors=K, attrs={})
    with pytest.raises(ValueError, match=r"posterior/W"):
        build_datatree(posterior={"W": np.zeros((1, 2, G, K + 1))}, cell_names=CELLS,
                       gene_names=GENES, n_factors=K, attrs={})
    with pytest.raises(ValueError, match=r"\(chain, draw\)"):
        build_datatree(posterior={"mu": np.zeros((1, 2, G)), "eta": np.zeros((1, 3, N))},
                       cell_names=CELLS, gene_names=GENES, n_factors=K, attrs={})
    with pytest.raises(ValueError, match=r"observed_data/counts"):
        build_datatree(posterior={"mu": np.zeros((1, 2, G))},
                       observed_data={"counts": np.zeros((1, 2, N, G))},
                       cell_names=CELLS, gene_names=GENES, n_factors=K, attrs={})
    with pytest.raises(ValueError, match="unique"):
        build_datatree(posterior={"mu": np.zeros((1, 2, G))}, cell_names=CELLS,
                       gene_names=["a"] * G, n_factors=K, attrs={})


def test_square_case_counts_dims():
    """N == G must not confuse the (cell,) vs (cell, gene) counts layouts."""
    rng = np.random.default_rng(5)
    names = [f"c{i}" for i in range(G)]
    t = build_datatree(posterior={"mu": rng.normal(size=(1, 5, G))},
                       log_likelihood={"counts": rng.normal(size=(1, 5, G))},
                       posterior_predictive={"counts": rng.poisson(2, size=(1, 5, G, G))},
                       cell_names=names, gene_names=GENES, n_factors=K, attrs={})
    assert t["log_likelihood"]["counts"].dims == ("chain", "draw", "cell")
    assert t["posterior_predictive"]["counts"].dims == ("chain", "draw", "cell", "gene")


def test_arviz_stats_on_tree(tree):
    import arviz_stats

    summ = arviz_stats.summary(tree, var_names=["mu"])
    assert len(summ) == G
    assert {"mean", "sd", "r_hat", "ess_bulk"} <= set(summ.columns)
    assert any(GENES[0] in str(idx) for idx in summ.index)
    ess = arviz_stats.ess(tree, var_names=["Sigma"])
    rhat = arviz_stats.rhat(tree, var_names=["eta"])
    ess_ds = ess["posterior"] if "posterior" in getattr(ess, "children", {}) else ess
    rhat_ds = rhat["posterior"] if "posterior" in getattr(rhat, "children", {}) else rhat
    assert ess_ds["Sigma"].dims == ("gene", "gene_2")
    assert rhat_ds["eta"].dims == ("cell",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = arviz_stats.loo(tree, pointwise=True)
    assert np.isfinite(res.elpd)
    assert res.n_data_points == N


def test_loo_approximate_posterior_laplace_like():
    """A Laplace-style tree (point globals, lp/lp_approx per draw) supports approximate LOO."""
    import arviz_stats

    rng = np.random.default_rng(6)
    S = 400
    mu = np.broadcast_to(rng.normal(size=G), (1, S, G)).copy()
    lp_approx = rng.normal(size=(1, S)) - 10
    t = build_datatree(
        posterior={"mu": mu, "eta": rng.normal(size=(1, S, N))},
        sample_stats={"lp": lp_approx + 0.01 * rng.normal(size=(1, S)), "lp_approx": lp_approx},
        log_likelihood={"counts": -np.abs(rng.normal(size=(1, S, N))) - 5.0},
        cell_names=CELLS, gene_names=GENES, n_factors=K,
        attrs={"solver": "laplace"},
    )
    mu_draws = t["posterior"]["mu"].values
    assert np.ptp(mu_draws, axis=(0, 1)).max() == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = arviz_stats.loo_approximate_posterior(
            t, t["sample_stats"]["lp"], t["sample_stats"]["lp_approx"]
        )
    assert np.isfinite(res.elpd)


@dataclasses.dataclass
class _FakeStanResult:
    posterior: dict
    sample_stats: dict
    backend: str = "cmdstanpy"
    stan_hash: str = "deadbeef"
    seed: int = 3
    versions: dict = dataclasses.field(default_factory=lambda: {"cmdstan": "2.37.0"})


def test_to_datatree_from_stan():
    rng = np.random.default_rng(7)
    inputs = _full_inputs(rng, C=4, S=50)
    post = dict(inputs["posterior"])
    post["log_lik"] = inputs["log_likelihood"]["counts"]
    post["y_rep"] = inputs["posterior_predictive"]["counts"]
    post["z_raw"] = rng.normal(size=(4, 50, N, K))  # non-centred auxiliary: dropped
    stats = dict(inputs["sample_stats"])
    stats["n_steps"] = np.full((4, 50), 7)
    stats["n_leapfrog"] = np.ones((4, 50))  # not in the table: dropped
    fake = _FakeStanResult(posterior=post, sample_stats=stats)
    t = to_datatree_from_stan(fake, cell_names=CELLS, gene_names=GENES,
                              observed_counts=inputs["observed_data"]["counts"],
                              attrs={"backend": "pystan", "seed": 1})
    assert set(t.children) == set(GROUPS)
    assert "z_raw" not in t["posterior"].data_vars
    assert "log_lik" not in t["posterior"].data_vars
    assert "corr" in t["posterior"].data_vars
    W = post["W"]
    np.testing.assert_allclose(t["posterior"]["W_perp"].values,
                               W - W.mean(axis=-2, keepdims=True))
    assert t["posterior"]["W_perp"].dims == ("chain", "draw", "gene", "factor")
    np.testing.assert_array_equal(t["log_likelihood"]["counts"].values, post["log_lik"])
    np.testing.assert_array_equal(t["posterior_predictive"]["counts"].values, post["y_rep"])
    assert list(t["posterior"]["factor"].values) == list(range(K))
    assert t.attrs["solver"] == "hmc" and t.attrs["backend"] == "pystan"  # attrs win
    assert t.attrs["stan_hash"] == "deadbeef" and t.attrs["seed"] == 1
    assert t["posterior"].attrs["cmdstan_version"] == "2.37.0"
    assert "n_steps" in t["sample_stats"].data_vars
    assert "n_leapfrog" not in t["sample_stats"].data_vars
    assert t["posterior"].sizes["chain"] == 4


def test_tree_roundtrips_netcdf(tree, tmp_path):
    if not any(_has(m) for m in ("netCDF4", "h5netcdf")):
        pytest.skip("no netCDF backend (netCDF4 / h5netcdf) installed")
    path = tmp_path / "tree.nc"
    tree.to_netcdf(path)
    back = xr.open_datatree(path)
    try:
        assert set(back.children) == set(GROUPS)
        assert back.attrs["solver"] == "hmc"
    finally:
        back.close()


def test_tree_roundtrips_zarr(tree, tmp_path):
    pytest.importorskip("zarr")
    path = tmp_path / "tree.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree.to_zarr(path)
        back = xr.open_datatree(path, engine="zarr")
    assert set(back.children) == set(GROUPS)
    assert back.attrs["solver"] == "hmc"
    assert back["posterior"].attrs["stan_hash"] == "abc123"
    assert list(back["posterior"]["gene"].values) == GENES
