"""Tests for scribe_stan.compare on synthetic Gaussian draws with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from scribe_stan.compare import DETAIL_COLUMNS, SUMMARY_COLUMNS, compare, plot_comparison
from scribe_stan.convert import build_datatree

N, G, K = 40, 10, 2
CELLS = [f"cell_{i}" for i in range(N)]
GENES = [f"gene_{g}" for g in range(G)]


def _tree(rng, C, S, *, shift=0.0, scale=1.0, cells=CELLS, genes=GENES, mu_point=None,
          with_sigma=False):
    """Tree with x, eta ~ N(shift, scale^2) iid; mu random or a repeated point estimate."""
    n, g = len(cells), len(genes)
    post = {
        "x": shift + scale * rng.normal(size=(C, S, n, g)),
        "eta": shift + scale * rng.normal(size=(C, S, n)),
    }
    if mu_point is None:
        post["mu"] = rng.normal(size=(C, S, g))
    else:
        post["mu"] = np.broadcast_to(np.asarray(mu_point, float), (C, S, g)).copy()
    if with_sigma:
        W = rng.normal(size=(C, S, g, K))
        post["W"] = W
        post["Sigma"] = np.einsum("csgk,cshk->csgh", W, W) + np.eye(g)
    return build_datatree(posterior=post, cell_names=cells, gene_names=genes, n_factors=K,
                          attrs={})


@pytest.fixture(scope="module")
def shifted_pair():
    rng = np.random.default_rng(11)
    lap = _tree(rng, 1, 4000, shift=0.1, scale=1.2)  # Laplace: N(0.1, 1.2^2)
    hmc = _tree(rng, 4, 1000)  # HMC: N(0, 1), different chains/draws
    return lap, hmc


def test_known_gaussian_answers(shifted_pair):
    lap, hmc = shifted_pair
    prob = 0.9
    detail = compare(lap, hmc, var_names=["x", "eta"], prob=prob, detail=True)
    assert list(detail.columns) == DETAIL_COLUMNS
    assert detail.index.names == ["quantity", "element"]
    x = detail.loc["x"]
    assert len(x) == N * G
    # per element MC sd of smd ~ sqrt(1.44/4000 + 1/4000) = 0.025; 400 elements averaged
    assert x["smd"].mean() == pytest.approx(0.1, abs=0.01)
    assert x["sd_ratio"].median() == pytest.approx(1.2, abs=0.01)
    z = stats.norm.ppf(0.5 + prob / 2)
    expected_cov = stats.norm.cdf(0.1 + 1.2 * z) - stats.norm.cdf(0.1 - 1.2 * z)
    assert x["coverage"].mean() == pytest.approx(expected_cov, abs=0.01)
    assert not x["point_estimate"].any()

    summary = compare(lap, hmc, var_names=["x", "eta"], prob=prob)
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary.index.name == "quantity"
    assert summary.loc["x", "n"] == N * G
    assert summary.loc["eta", "n"] == N
    assert summary.loc["x", "mean_abs_smd"] == pytest.approx(0.1, abs=0.015)
    assert summary.loc["x", "median_sd_ratio"] == pytest.approx(1.2, abs=0.01)
    assert summary.loc["x", "mean_coverage"] == pytest.approx(expected_cov, abs=0.01)
    assert summary.loc["eta", "median_sd_ratio"] == pytest.approx(1.2, abs=0.05)
    assert summary.loc["eta", "mean_coverage"] == pytest.approx(expected_cov, abs=0.02)
    assert summary["min_sd_ratio"].le(summary["median_sd_ratio"]).all()
    assert summary["max_sd_ratio"].ge(summary["median_sd_ratio"]).all()
    assert not summary["point_estimate"].any()


def test_detail_values_match_definitions(shifted_pair):
    lap, hmc = shifted_pair
    detail = compare(lap, hmc, var_names="eta", detail=True)
    row = detail.loc[("eta", "eta[cell_3]")]
    a = lap["posterior"]["eta"].sel(cell="cell_3").values.ravel()
    b = hmc["posterior"]["eta"].sel(cell="cell_3").values.ravel()
    assert row["laplace_mean"] == pytest.approx(a.mean())
    assert row["hmc_mean"] == pytest.approx(b.mean())
    assert row["laplace_sd"] == pytest.approx(a.std(ddof=1))
    assert row["smd"] == pytest.approx((a.mean() - b.mean()) / b.std(ddof=1))
    assert row["sd_ratio"] == pytest.approx(a.std(ddof=1) / b.std(ddof=1))
    lo, hi = np.quantile(a, [0.05, 0.95])
    assert row["coverage"] == pytest.approx(np.mean((b >= lo) & (b <= hi)))


def test_identical_trees():
    rng = np.random.default_rng(12)
    t = _tree(rng, 2, 1000)
    prob = 0.8
    detail = compare(t, t, var_names=["x", "eta", "mu"], prob=prob, detail=True)
    np.testing.assert_allclose(detail["smd"], 0.0, atol=1e-12)
    np.testing.assert_allclose(detail["sd_ratio"], 1.0, rtol=1e-12)
    # fraction of draws inside their own central interval: prob up to ~1/S
    np.testing.assert_allclose(detail["coverage"], prob, atol=3e-3)
    summary = compare(t, t, prob=prob)
    assert list(summary.index) == ["x", "eta", "mu"]  # default order, no Sigma here


def test_alignment_by_labels_not_position():
    rng = np.random.default_rng(13)
    lap = _tree(rng, 1, 500, shift=0.3)
    hmc = _tree(rng, 2, 300)
    # the same HMC draws with cells and genes stored in reversed order
    post = hmc["posterior"]
    rev_post = {
        "x": post["x"].values[:, :, ::-1, ::-1],
        "eta": post["eta"].values[:, :, ::-1],
        "mu": post["mu"].values[:, :, ::-1],
    }
    hmc_rev = build_datatree(posterior=rev_post, cell_names=CELLS[::-1], gene_names=GENES[::-1],
                             n_factors=K, attrs={})
    a = compare(lap, hmc, detail=True)
    b = compare(lap, hmc_rev, detail=True)
    pd.testing.assert_frame_equal(a, b)
    assert "x[cell_0, gene_1]" in a.loc["x"].index


def test_point_estimate_path():
    rng = np.random.default_rng(14)
    hmc = _tree(rng, 4, 500)  # mu ~ N(0, 1) per gene
    point = np.zeros(G)
    point[-1] = 5.0  # far outside the HMC 90% interval
    lap = _tree(rng, 1, 200, mu_point=point)
    detail = compare(lap, hmc, var_names=["mu"], detail=True).loc["mu"]
    assert detail["point_estimate"].all()
    assert detail["sd_ratio"].isna().all()
    assert (detail["laplace_sd"] == 0).all()
    assert (detail["coverage"].iloc[:-1] == 1.0).all()
    assert detail["coverage"].iloc[-1] == 0.0
    hmc_mu = hmc["posterior"]["mu"].values.reshape(-1, G)
    expected_smd = (point - hmc_mu.mean(0)) / hmc_mu.std(0, ddof=1)
    np.testing.assert_allclose(detail["smd"].values, expected_smd)

    summary = compare(lap, hmc, var_names=["mu", "x"])
    assert bool(summary.loc["mu", "point_estimate"]) is True
    assert np.isnan(summary.loc["mu", "median_sd_ratio"])
    assert summary.loc["mu", "mean_coverage"] == pytest.approx((G - 1) / G)
    assert bool(summary.loc["x", "point_estimate"]) is False


def test_sigma_and_corr_triangles():
    rng = np.random.default_rng(15)
    lap = _tree(rng, 1, 200, with_sigma=True)
    hmc = _tree(rng, 2, 100, with_sigma=True)
    summary = compare(lap, hmc)
    assert list(summary.index) == ["Sigma", "corr", "x", "eta", "mu"]
    assert summary.loc["Sigma", "n"] == G * (G + 1) // 2
    assert summary.loc["corr", "n"] == G * (G - 1) // 2
    detail = compare(lap, hmc, var_names=["Sigma", "corr"], detail=True)
    sig_labels = list(detail.loc["Sigma"].index)
    assert "Sigma[gene_0, gene_0]" in sig_labels
    assert "Sigma[gene_0, gene_3]" in sig_labels
    assert "Sigma[gene_3, gene_0]" not in sig_labels
    assert "corr[gene_0, gene_0]" not in list(detail.loc["corr"].index)
    assert "W" not in summary.index


def test_w_refused():
    rng = np.random.default_rng(16)
    t = _tree(rng, 1, 50, with_sigma=True)
    with pytest.raises(ValueError, match="rotation"):
        compare(t, t, var_names=["W"])
    with pytest.raises(ValueError, match="rotation"):
        plot_comparison(t, t, var_names=["x", "W"])
    with pytest.raises(ValueError, match="W_perp.*rotation"):
        compare(t, t, var_names=["W_perp"])


def test_coordinate_mismatch_error():
    rng = np.random.default_rng(17)
    lap = _tree(rng, 1, 50)
    other_genes = GENES[:-1] + ["OTHER"]
    hmc = _tree(rng, 1, 50, genes=other_genes)
    with pytest.raises(ValueError, match=r"coordinate 'gene' differs.*gene_9.*OTHER"):
        compare(lap, hmc)
    hmc_fewer = _tree(rng, 1, 50, cells=CELLS[:5])
    with pytest.raises(ValueError, match=r"'cell' differs.*only in Laplace"):
        compare(lap, hmc_fewer, var_names=["eta"])


def test_missing_quantity_and_bad_prob():
    rng = np.random.default_rng(18)
    lap = _tree(rng, 1, 50, with_sigma=True)
    hmc = _tree(rng, 1, 50)
    with pytest.raises(ValueError, match=r"'Sigma' missing from HMC"):
        compare(lap, hmc, var_names=["Sigma"])
    with pytest.raises(ValueError, match="prob"):
        compare(lap, hmc, prob=1.5)
    # default silently restricts to quantities present in both
    assert "Sigma" not in compare(lap, hmc).index


def test_plot_comparison(shifted_pair, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lap, hmc = shifted_pair
    fig = plot_comparison(lap, hmc, var_names=("eta", "x"), max_panels=6)
    try:
        axes = [ax for ax in fig.axes if ax.get_title()]
        assert len(axes) == 6
        titles = [ax.get_title() for ax in axes]
        assert any(t.startswith("eta") for t in titles)
        assert any(t.startswith("x") and "cell_" in t and "gene_" in t for t in titles)
        legend_texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert "Laplace" in legend_texts and "HMC" in legend_texts
        out = tmp_path / "comparison.png"
        fig.savefig(out)
        assert out.exists() and out.stat().st_size > 1000
    finally:
        plt.close(fig)


def test_plot_comparison_point_estimates_and_explicit_elements(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(19)
    hmc = _tree(rng, 2, 300)
    lap = _tree(rng, 1, 300, mu_point=np.zeros(G))
    fig = plot_comparison(lap, hmc, var_names=["mu", "x"],
                          elements={"x": ["x[cell_2, gene_5]"]}, max_panels=4)
    try:
        titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert len(titles) == 4
        assert any("cell_2, gene_5" in t for t in titles)
        mu_axes = [ax for ax in fig.axes if ax.get_title().startswith("mu")]
        assert mu_axes and all(len(ax.lines) >= 1 for ax in mu_axes)
        out = tmp_path / "points.png"
        fig.savefig(out)
        assert out.exists()
    finally:
        plt.close(fig)
    with pytest.raises(ValueError, match="unknown element"):
        plot_comparison(lap, hmc, var_names=["x"], elements={"x": ["x[nope]"]})
