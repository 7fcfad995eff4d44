"""lnm / lnmvcp with Stan NUTS: Laplace per-cell posteriors vs the conditional program,
and ``ss.fit(..., method="hmc")`` end to end.

Stated tolerance (as tests/test_laplace_vs_hmc.py, SPEC targets for moderate counts):
mean |standardized mean difference| <= 0.1, median sd ratio in [0.9, 1.1] and 90%
central-interval coverage in [0.85, 0.95], for the ALR coordinates y (and eta).
"""

import anndata
import numpy as np
import pytest

import scribe_stan as ss
from scribe_stan.models import lnm


@pytest.mark.parametrize("model", ["lnm", "lnmvcp"])
def test_laplace_matches_conditional_nuts(model):
    sim = lnm.simulate(25, 6, 1, ref=1, capture=model == "lnmvcp", seed=21, total_mean=400.0)
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    cap = {"library_size": np.exp(sim["log_lib"]), "M0": np.exp(sim["log_M0"]),
           "sigma_M": 0.5}
    laplace = ss.fit(adata, model=model, rank=1, progress=False, **cap)
    assert laplace.converged.all()
    hmc = ss.fit(adata, model=model, method="hmc", conditional_on=laplace, chains=2,
                 draws=600, warmup=500, seed=3, progress=False, **cap)
    names = ["y", "eta"] if model == "lnmvcp" else ["y"]
    table = ss.compare(laplace.to_datatree(draws=2000, seed=1), hmc.to_datatree(),
                       var_names=names)
    assert (table["mean_abs_smd"] <= 0.1).all(), table
    assert table["median_sd_ratio"].between(0.9, 1.1).all(), table
    assert table["mean_coverage"].between(0.85, 0.95).all(), table


@pytest.mark.parametrize("model", ["lnm", "lnmvcp"])
def test_full_program_hmc_end_to_end(model):
    sim = lnm.simulate(10, 4, 1, ref=0, capture=model == "lnmvcp", seed=5, total_mean=200.0)
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    fit = ss.fit(adata, model=model, method="hmc", rank=1, reference_gene="0", chains=2,
                 draws=100, warmup=150, seed=1, progress=False)
    assert fit.program == model and fit.reference_gene == "0"
    tree = fit.to_datatree()
    post = tree["posterior"]
    assert post["y"].shape == (2, 100, 10, 3)
    assert list(post["y"].coords["gene_alr"].values) == ["1", "2", "3"]
    assert post["Sigma_clr"].shape == (2, 100, 4, 4)
    np.testing.assert_allclose(post["Sigma_clr"].values.sum(axis=-1), 0.0, atol=1e-9)
    assert tree["log_likelihood"]["counts"].shape == (2, 100, 10)
    assert tree["posterior_predictive"]["counts"].shape == (2, 100, 10, 4)
    if model == "lnmvcp":
        assert post["eta"].shape == (2, 100, 10) and (post["eta"].values >= 0).all()
    else:
        # the NB total's mean is learned: posterior median of m_T near the mean total
        m_T = np.median(post["m_T"].values)
        assert abs(np.log(m_T) - np.log(sim["counts"].sum(1).mean())) < 0.3
