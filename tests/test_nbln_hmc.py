"""nbln end to end through ``ss.fit``: Laplace per-cell posteriors against NUTS on the
conditional program (same globals), DataTree shapes, and the full-joint HMC path.

Stated tolerance (SPEC targets, moderate counts, as tests/test_laplace_vs_hmc.py): mean
|standardized mean difference| <= 0.1, median sd ratio in [0.9, 1.1] and 90% interval
coverage in [0.85, 0.95], for the log-rates x and the capture loss eta.
"""

import anndata
import numpy as np
import pytest

import scribe_stan as ss
from scribe_stan.models import nbln


@pytest.fixture(scope="module")
def sim():
    return nbln.simulate(25, 6, 1, seed=21, lib_target=400.0, sigma_M=0.5,
                         r_range=(2.0, 30.0))


@pytest.fixture(scope="module")
def laplace_fit(sim):
    fit = ss.fit(anndata.AnnData(sim["counts"].astype(np.float32)), model="nbln", rank=1,
                 progress=False)
    assert fit.converged.all()
    return fit


def test_laplace_matches_conditional_nuts(sim, laplace_fit):
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    hmc = ss.fit(adata, model="nbln", method="hmc", conditional_on=laplace_fit, chains=2,
                 draws=600, warmup=500, seed=3, progress=False)
    assert hmc.program == "nbln_conditional"
    table = ss.compare(laplace_fit.to_datatree(draws=2000, seed=1), hmc.to_datatree(),
                       var_names=["x", "eta"])
    print(table.to_string())
    assert (table["mean_abs_smd"] <= 0.1).all(), table
    assert table["median_sd_ratio"].between(0.9, 1.1).all(), table
    assert table["mean_coverage"].between(0.85, 0.95).all(), table


def test_laplace_datatree_shapes(sim, laplace_fit):
    N, G = sim["counts"].shape
    assert laplace_fit.r.shape == (G,)
    np.testing.assert_allclose(laplace_fit.r, np.exp(laplace_fit.log_r))
    tree = laplace_fit.to_datatree(draws=30, seed=0)
    post = tree["posterior"]
    assert post["r"].dims == ("chain", "draw", "gene") and post["r"].shape == (1, 30, G)
    np.testing.assert_allclose(post["r"].values[0, 0], laplace_fit.r)
    assert post["x"].shape == (1, 30, N, G) and post["eta"].shape == (1, 30, N)
    pp = tree["posterior_predictive"]["counts"]
    assert pp.dims == ("chain", "draw", "cell", "gene") and pp.shape == (1, 30, N, G)
    assert tree["log_likelihood"]["counts"].shape == (1, 30, N)
    assert tree.attrs["model"] == "nbln"


def test_replicated_counts_are_negative_binomial(sim, laplace_fit):
    """Posterior-predictive variance exceeds Poisson's by about m^2 / r."""
    tree = laplace_fit.to_datatree(draws=4000, seed=2)
    rep = tree["posterior_predictive"]["counts"].values[0]  # (draws, N, G)
    x = tree["posterior"]["x"].values[0]
    rate = np.exp(x - tree["posterior"]["eta"].values[0][..., None])
    # law of total variance: Var(y) = E[m] + Var(m) + E[m^2] / r  (per cell and gene)
    expected = rate.mean(0) + rate.var(0) + (rate**2).mean(0) / laplace_fit.r
    ratio = rep.var(0) / expected
    assert abs(np.median(ratio) - 1.0) < 0.05, np.median(ratio)


def test_full_joint_hmc_end_to_end():
    small = nbln.simulate(8, 4, 1, seed=5, lib_target=200.0, sigma_M=0.5)
    adata = anndata.AnnData(small["counts"].astype(np.float32))
    fit = ss.fit(adata, model="nbln", method="hmc", rank=1, chains=1, draws=50, warmup=50,
                 seed=1, progress=False)
    assert fit.program == "nbln"
    tree = fit.to_datatree()
    post = tree["posterior"]
    assert post["r"].dims == ("chain", "draw", "gene") and post["r"].shape == (1, 50, 4)
    assert post["x"].shape == (1, 50, 8, 4)
    assert tree["posterior_predictive"]["counts"].shape == (1, 50, 8, 4)
    assert tree["log_likelihood"]["counts"].shape == (1, 50, 8)


def test_to_anndata_stores_dispersions(sim, laplace_fit):
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    out = laplace_fit.to_anndata(adata)
    np.testing.assert_allclose(out.var["nbln_r"].to_numpy(), laplace_fit.r)
    assert "nbln_r" not in adata.var  # the input is left untouched
