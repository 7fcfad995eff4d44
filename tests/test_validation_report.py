"""Metrics of the validation report on known cases, and the reduced report end to end."""

import sys
from pathlib import Path

import arviz_base as azb
import numpy as np
import pandas as pd
import pytest

VALIDATION = Path(__file__).resolve().parent.parent / "validation"
sys.path.insert(0, str(VALIDATION))

import make_report  # noqa: E402
import references  # noqa: E402

N, G = 5, 4
CELLS = [f"c{i}" for i in range(N)]
GENES = [f"g{j}" for j in range(G)]


def _tree(x, eta, sample_stats=None):
    groups = {"posterior": {"x": x, "eta": eta}}
    if sample_stats:
        groups["sample_stats"] = sample_stats
    return azb.from_dict(groups, dims={"x": ["cell", "gene"], "eta": ["cell"]},
                         coords={"cell": CELLS, "gene": GENES})


@pytest.fixture(scope="module")
def nuts():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 500, N, G)) * np.arange(1, G + 1) + 3.0
    eta = rng.standard_normal((4, 500, N))
    tree = _tree(x, eta)
    summary = references.summary_table(tree, ["x", "eta"])
    return tree, summary


def test_identical_posteriors_agree_exactly(nuts):
    tree, summary = nuts
    t = make_report.agreement(tree, tree["posterior"].to_dataset(), summary, ["x", "eta"])
    np.testing.assert_allclose(t["smd"], 0.0, atol=1e-12)
    np.testing.assert_allclose(t["sd_ratio"], 1.0, rtol=1e-12)
    assert t["coverage"].between(0.85, 0.95).all()  # 90% interval of the same draws


def test_shift_and_scale_give_the_known_smd_and_sd_ratio(nuts):
    tree, summary = nuts
    post = tree["posterior"].to_dataset()
    sd = post["x"].std(("chain", "draw"), ddof=1)
    mean = post["x"].mean(("chain", "draw"))
    # Laplace: the NUTS draws shifted by half an sd and widened by 1.5 about their mean
    lap = _tree(((post["x"] - mean) * 1.5 + mean + 0.5 * sd).values, post["eta"].values)
    t = make_report.agreement(lap, post, summary, ["x"])
    np.testing.assert_allclose(t["smd"], 0.5, rtol=1e-10)
    np.testing.assert_allclose(t["sd_ratio"], 1.5, rtol=1e-10)
    s = make_report.summarize(t)
    assert s.loc["x", "mean_abs_smd"] == pytest.approx(0.5)
    # the NUTS draws' share inside the shifted, widened 90% interval exceeds 0.9
    assert s.loc["x", "coverage"] > 0.93


def test_depth_bins_split_genes_at_the_median(nuts):
    tree, summary = nuts
    post = tree["posterior"].to_dataset()
    sd = post["x"].std(("chain", "draw"), ddof=1)
    shift = sd * xr_gene_weights(post)  # SMD 1 on g0, g1 (low), 0 on g2, g3 (high)
    lap = _tree((post["x"] + shift).values, post["eta"].values)
    t = make_report.agreement(lap, post, summary, ["x", "eta"])
    depth = make_report.depth_bins(t, pd.Series([1.0, 2.0, 30.0, 40.0], index=GENES))
    assert depth["genes"].tolist() == [2, 2]
    np.testing.assert_allclose(depth["mean_abs_smd"], [1.0, 0.0], atol=1e-10)


def xr_gene_weights(post):
    return post["x"].isel(chain=0, draw=0, cell=0).copy(data=[1.0, 1.0, 0.0, 0.0])


def test_diagnostics_pass_well_mixed_chains_and_flag_stuck_ones():
    rng = np.random.default_rng(1)
    ok_stats = {"diverging": np.zeros((4, 500), bool), "energy": rng.standard_normal((4, 500))}
    good = _tree(rng.standard_normal((4, 500, N, G)), rng.standard_normal((4, 500, N)),
                 ok_stats)
    d = references.diagnostics(good)
    assert d["passed"], d
    x = rng.standard_normal((4, 500, N, G))
    x[0] += 3.0  # one chain elsewhere
    bad_stats = {**ok_stats, "diverging": np.eye(4, 500, dtype=bool)}
    d = references.diagnostics(_tree(x, rng.standard_normal((4, 500, N)), bad_stats))
    assert not d["checks"]["rhat_lt_1.01"] and d["worst_rhat"] == "x"
    assert d["divergences"] == 4 and not d["passed"]


def test_unknown_pair_is_refused():
    with pytest.raises(ValueError, match="allowed: grn-pln"):
        references.check_pair("grn-poisson")


@pytest.mark.slow
def test_reduced_report_runs_on_the_stored_references(tmp_path):
    make_report.main(["--reduced", "--out", str(tmp_path)])
    text = (tmp_path / "REPORT.md").read_text()
    for pair in make_report.REDUCED_PAIRS:
        assert f"### {pair}" in text
        assert (tmp_path / "figures" / f"{pair}.png").stat().st_size > 10_000
    assert "Per-cell latents" in text and "embedded Laplace" in text
    assert "## Simulation-based calibration (SBC)" in text and "Flags:" in text
