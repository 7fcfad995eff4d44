"""Laplace per-cell posteriors against NUTS on the conditional program (same globals).

Stated tolerance (SPEC targets, moderate counts): mean |standardized mean difference|
<= 0.1 and median sd ratio in [0.9, 1.1], for the log-rates x and the capture loss eta.
"""

import anndata
import numpy as np
import pytest

import scribe_stan as ss
from scribe_stan.models import pln


@pytest.fixture(scope="module")
def trees():
    sim = pln.simulate(25, 6, 1, seed=21, lib_target=400.0, sigma_M=0.5)
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    laplace = ss.fit(adata, rank=1, progress=False)
    assert laplace.converged.all()
    hmc = ss.fit(adata, method="hmc", conditional_on=laplace, chains=2, draws=600,
                 warmup=500, seed=3, progress=False)
    return laplace.to_datatree(draws=2000, seed=1), hmc.to_datatree()


def test_laplace_matches_conditional_nuts(trees):
    laplace_tree, hmc_tree = trees
    table = ss.compare(laplace_tree, hmc_tree, var_names=["x", "eta"])
    assert (table["mean_abs_smd"] <= 0.1).all(), table
    assert table["median_sd_ratio"].between(0.9, 1.1).all(), table
    # 90% central intervals of the Laplace posterior hold about 90% of NUTS draws
    assert table["mean_coverage"].between(0.85, 0.95).all(), table


def test_comparison_detects_a_shifted_posterior(trees):
    laplace_tree, hmc_tree = trees
    shifted = laplace_tree.copy()
    post = shifted["posterior"].to_dataset()
    sd = hmc_tree["posterior"]["x"].std(("chain", "draw"))
    shifted["posterior"] = post.assign(x=post["x"] + 0.5 * sd)
    table = ss.compare(shifted, hmc_tree, var_names=["x"])
    assert table.loc["x", "mean_abs_smd"] > 0.4
