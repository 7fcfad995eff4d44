"""Per-cell integrated log predictive density, PSIS-LOO and ``compare_models``.

References used here are independent of the Laplace/IS code: plain Monte Carlo over the
population prior with the NumPy reference likelihoods of :mod:`scribe_stan.models`, the
simulation truth (which model generated the data), and NUTS (full joint, Stan).
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

import scribe_stan as ss
from scribe_stan.models import lnm, nbln, nbvcp, pln


def make_adata(counts, cells=None):
    n, g = counts.shape
    cells = [f"cell{i}" for i in range(n)] if cells is None else cells
    return ad.AnnData(np.asarray(counts, float), obs=pd.DataFrame(index=cells),
                      var=pd.DataFrame(index=[f"gene{j}" for j in range(g)]))


def fit_sim(sim, model, K=1, **kw):
    return ss.fit(make_adata(sim["counts"]), model=model, rank=K, progress=False,
                  library_size=np.exp(sim["log_lib"]), sigma_M=0.3, **kw)


# ------------------------------------------------------------- per-cell log predictive


def prior_monte_carlo(fit, cell, S, rng, theta=None):
    """log p(u_c | theta) by plain Monte Carlo over the latents' prior, and its se.

    ``theta``: globals (nbvcp ``m``, ``log_r``; lnm ``mu``, ``W``, ``d``, ``log_m_T``,
    ``log_r_T``) instead of the fit's MAP (nbvcp, lnm, lnmvcp)."""
    data = fit.data
    u = np.broadcast_to(data.counts[cell], (S, data.counts.shape[1]))
    a = pln.capture_prior_mean(data.log_lib[cell], data.log_M0)
    eta = stats.truncnorm.rvs(-a / data.sigma_M, np.inf, loc=a, scale=data.sigma_M, size=S,
                              random_state=rng)
    if fit.model == "nbvcp":
        t = theta or {"m": fit.m, "log_r": fit.log_r}
        ll = nbvcp.log_lik_cells(u, t["m"], t["log_r"], eta)
    elif fit.model in ("lnm", "lnmvcp"):
        t = theta or {"mu": fit.mu_alr, "W": fit.W_alr, "d": fit.d_alr,
                      "log_m_T": np.log(fit.m_T), "log_r_T": np.log(fit.r_T)}
        Sigma = t["W"] @ t["W"].T + np.diag(t["d"])
        y = rng.multivariate_normal(t["mu"], Sigma, size=S)
        log_mean = t["log_m_T"] - (eta if fit.model == "lnmvcp" else 0.0)
        ll = lnm.log_lik_cells(u, y, fit.ref, log_mean, np.exp(t["log_r_T"]))
    else:
        x = rng.multivariate_normal(fit.mu, fit.Sigma, size=S)
        ll = (pln.log_lik_cells(u, x, eta) if fit.model == "pln"
              else nbln.log_lik_cells(u, x, eta, fit.log_r))
    w = np.exp(ll - ll.max())
    return special.logsumexp(ll) - np.log(S), w.std() / w.mean() / np.sqrt(S)


SIMS = {"pln": lambda: pln.simulate(12, 3, 1, seed=2, lib_target=30.0),
        "nbln": lambda: nbln.simulate(12, 3, 1, seed=2, lib_target=30.0, r_range=(3., 9.)),
        "nbvcp": lambda: nbvcp.simulate(12, 3, seed=2, lib_target=30.0),
        "lnm": lambda: lnm.simulate(12, 3, 1, seed=2, total_mean=30.0),
        "lnmvcp": lambda: lnm.simulate(12, 3, 1, seed=2, total_mean=30.0, capture=True)}


@pytest.mark.parametrize("model", list(SIMS))
def test_log_predictive_matches_prior_monte_carlo(model):
    """Every model's per-cell value is log p(u_c | theta) of the whole count vector.

    For lnm this includes the NB total and the multinomial coefficient: leaving the
    coefficient out would miss the Monte Carlo reference by several nats.
    """
    from scribe_stan.log_predictive import is_estimate, weights_of_fit

    fit = fit_sim(SIMS[model](), model)
    weights = weights_of_fit(fit, 2000, np.random.default_rng(0))
    estimate, _ = is_estimate(weights.log_weights)
    w = np.exp(weights.log_weights - weights.log_weights.max(0))
    se_is = w.std(0) / w.mean(0) / np.sqrt(w.shape[0])
    rng = np.random.default_rng(5)
    for cell in range(4):
        ref, se_ref = prior_monte_carlo(fit, cell, 400_000, rng)
        tol = 4.5 * np.hypot(se_ref, se_is[cell]) + 0.01
        assert abs(estimate[cell] - ref) < tol, (cell, estimate[cell], ref, tol)
    # The Laplace value itself is close at these counts; IS corrects the rest.
    assert np.abs(estimate - weights.laplace).max() < 0.2


def test_laplace_loo_is_a_proper_pmf_over_counts():
    """pln, two genes: exp(log p(u | theta)) summed over a grid of count vectors is ~1."""
    from scribe_stan.fit_data import FitData as _Data
    from scribe_stan.log_predictive import is_estimate, lognormal_weights

    mu, W, d = np.array([1.0, 0.3]), np.array([[0.4], [0.3]]), np.array([0.2, 0.2])
    grid = np.stack(np.meshgrid(np.arange(40), np.arange(30), indexing="ij"), -1).reshape(-1, 2)
    data = _Data(counts=grid.astype(np.int64), log_lib=np.full(len(grid), np.log(5.0)),
                 obs_names=pd.Index(map(str, range(len(grid)))), var_names=pd.Index(["a", "b"]),
                 log_M0=np.log(10.0), sigma_M=0.3)
    w, _ = lognormal_weights(data, mu, W, d, None, 400, np.random.default_rng(0))
    total = np.exp(is_estimate(w.log_weights)[0]).sum()
    assert abs(total - 1.0) < 0.01, total


# ------------------------------------------------------------------- model comparison


@pytest.fixture(scope="module")
def nbln_data_fits():
    sim = nbln.simulate(150, 10, 1, seed=1, lib_target=300.0, r_range=(0.5, 1.5))
    source = fit_sim(sim, "nbvcp")
    return {"pln": fit_sim(sim, "pln"),
            "nbln": fit_sim(sim, "nbln", informative_priors_from=source), "nbvcp": source}


def test_compare_models_prefers_nbln_on_nbln_data(nbln_data_fits):
    """nbln fitted by the cascade from nbvcp (a plain Laplace fit of these data lets the
    log-normal variance d absorb the NB overdispersion and ends near pln)."""
    table = ss.compare_models({k: nbln_data_fits[k] for k in ("pln", "nbln")}, draws=200)
    assert table.index[0] == "nbln", table
    # pln's deficit is significant: more than 2 standard errors of the paired difference
    assert table.loc["pln", "elpd_diff"] < -2 * table.loc["pln", "dse"], table
    assert set(table.columns) >= {"elpd", "se", "elpd_diff", "dse", "p", "k_max",
                                  "frac_k_high", "n_globals", "wall_s"}
    assert (table["n_cells"] == 150).all()


def test_compare_models_does_not_pick_nbln_on_pln_data():
    sim = pln.simulate(150, 10, 1, seed=1, lib_target=300.0)
    fits = {"pln": fit_sim(sim, "pln"), "nbln": fit_sim(sim, "nbln")}
    table = ss.compare_models(fits, draws=200)
    if table.index[0] == "nbln":  # allowed only by a margin within 2 paired se
        assert -table.loc["pln", "elpd_diff"] < 2 * table.loc["pln", "dse"], table


def test_compare_models_refuses_other_cells_or_genes(nbln_data_fits):
    base = nbln_data_fits["nbvcp"]
    counts = base.data.counts
    fewer_cells = ss.fit(make_adata(counts[:100]), model="nbvcp", progress=False)
    fewer_genes = ss.fit(make_adata(counts[:, :8]), model="nbvcp", progress=False)
    with pytest.raises(ValueError, match="'a' and 'b'.*different cells.*150 vs 100"):
        ss.compare_models({"a": base, "b": fewer_cells})
    with pytest.raises(ValueError, match="different genes.*only in 'a': \\['gene8', 'gene9'\\]"):
        ss.compare_models({"a": base, "b": fewer_genes})
    renamed = ss.fit(make_adata(counts, cells=[f"c{i}" for i in range(150)]), model="nbvcp",
                     progress=False)
    with pytest.raises(ValueError, match="different cells"):
        ss.compare_models({"a": base, "b": renamed})
    with pytest.raises(ValueError, match="at least two"):
        ss.compare_models({"a": base})
    with pytest.raises(ValueError, match="latents.*allowed"):
        ss.loo(base, latents="joint")


# ----------------------------------------------------------------------- against NUTS


@pytest.fixture(scope="module")
def pln_laplace_and_nuts():
    sim = pln.simulate(30, 4, 1, seed=11, lib_target=200.0)
    kw = {"library_size": np.exp(sim["log_lib"]), "sigma_M": 0.3, "rank": 1,
          "progress": False}
    adata = make_adata(sim["counts"])
    return (ss.fit(adata, model="pln", **kw),
            ss.fit(adata, model="pln", method="hmc", chains=2, draws=300, warmup=300, seed=1,
                   **kw))


def test_laplace_loo_agrees_with_nuts_integrated_loo(pln_laplace_and_nuts):
    """Like with like: both integrate each cell's latents; NUTS also averages the globals."""
    laplace, nuts = pln_laplace_and_nuts
    l_lap = ss.loo(laplace, draws=400)
    l_nuts = ss.loo(nuts, draws=60, max_draws=120)
    assert abs(l_lap.elpd - l_nuts.elpd) < min(l_lap.se, l_nuts.se)
    # the plug-in correction p (12 globals) is close to NUTS's effective number p_loo
    assert l_lap.p == 12 and 0 < l_nuts.p < 2 * l_lap.p
    # the globals drawn from their Laplace Gaussian instead of plugged in: the same
    # number as NUTS's, with an effective number of parameters of its own
    l_nested = ss.loo(laplace, draws=100, globals="laplace", max_draws=100)
    assert abs(l_nested.elpd - l_nuts.elpd) < min(l_nested.se, l_nuts.se)
    assert 0 < l_nested.p < 2 * l_lap.p
    with pytest.raises(ValueError, match=r"applies to Laplace fits.*HMC fit's globals are "
                                         r"already posterior draws: use globals='point'"):
        ss.loo(nuts, globals="laplace")
    assert np.mean(l_nuts.pareto_k.values > 0.7) <= 0.1
    # the conditional log_lik LOO targets the same numbers through a harmonic mean and
    # is far less reliable: more cells with large k-hat than the integrated LOO
    l_cond = ss.loo(nuts, latents="conditional")
    assert (l_cond.pareto_k > 0.7).sum() > (l_nuts.pareto_k > 0.7).sum()
    with pytest.raises(ValueError, match="not on the same footing"):
        ss.compare_models({"laplace": laplace, "nuts": nuts.to_datatree()})


def test_hmc_posterior_predictive_levels(pln_laplace_and_nuts):
    _, nuts = pln_laplace_and_nuts
    with pytest.raises(ValueError, match="level='map' needs point estimates"):
        ss.posterior_predictive(nuts, level="map")
    for level in ("laplace", "per_cell", "marginal", "library_anchored"):
        tree = ss.posterior_predictive(nuts, level=level, draws=20, seed=0)
        assert tree["posterior_predictive"]["counts"].shape == (1, 20, 30, 4)
    with pytest.raises(ValueError, match="got a hmc pln fit.*posterior draws"):
        ss.posterior_predictive(nuts, level="laplace", draws=2, globals="laplace")


def test_nbvcp_laplace_loo_agrees_with_nuts_and_hmc_ppc():
    sim = nbvcp.simulate(30, 4, seed=3, lib_target=200.0)
    kw = {"library_size": np.exp(sim["log_lib"]), "sigma_M": 0.3, "progress": False}
    adata = make_adata(sim["counts"])
    laplace = ss.fit(adata, model="nbvcp", **kw)
    nuts = ss.fit(adata, model="nbvcp", method="hmc", chains=2, draws=300, warmup=300,
                  seed=1, **kw)
    table = ss.compare_models({"laplace": laplace, "nuts": nuts}, draws=60, max_draws=120)
    diff = table["elpd"].max() - table["elpd"].min()
    assert diff < table["se"].min(), table
    assert table.loc["laplace", "p"] == 8  # m and log r of 4 genes
    k_nuts = table.attrs["loo"]["nuts"].pareto_k.values
    assert np.mean(k_nuts > 0.7) <= 0.1, k_nuts
    marginal = ss.posterior_predictive(nuts, level="marginal", draws=20, seed=0)
    assert marginal["posterior"]["eta"].values.min() >= 0.0
    with pytest.raises(ValueError, match="per_cell.*does not apply to nbvcp"):
        ss.posterior_predictive(nuts, level="per_cell")


# ------------------------------------------- LOO over the globals' Laplace Gaussian


NESTED_SIMS = {"nbvcp": lambda: nbvcp.simulate(30, 4, seed=3, lib_target=200.0),
               "lnm": lambda: lnm.simulate(30, 4, 1, seed=2, total_mean=100.0),
               "lnmvcp": lambda: lnm.simulate(30, 4, 1, seed=2, total_mean=100.0,
                                              capture=True)}


def nested_log_prior(fit, g, s):
    """The globals' log prior at draw s as a density in the Gaussian's coordinates,
    written out from the model's priors (scipy) and the change of variables."""
    if fit.model == "nbvcp":  # (m, log r): the prior's own coordinates
        return nbvcp.log_prior_globals(g["m"][s], g["log_r"][s])
    mu, W, d = g["mu"][s], g["W"][s], g["d"][s]
    comp = (stats.norm.logpdf(mu, pln.MU_LOC, pln.MU_SCALE).sum()
            + stats.norm.logpdf(W, 0.0, pln.W_SCALE).sum()
            + stats.gamma.logpdf(d, pln.D_SHAPE, scale=1.0 / pln.D_RATE).sum()
            + np.log(d).sum())  # (m, W, log d) -> (mu, W, d): Jacobian prod d
    return comp + lnm.log_prior_totals(g["log_m_T"][s], g["log_r_T"][s])


@pytest.mark.parametrize("model", list(NESTED_SIMS))
def test_nested_laplace_loo_of_nbvcp_and_lnm(model):
    """globals="laplace" LOO: the elpd of the plug-in Laplace LOO (the two differ by
    the optimism the plug-in's p removes: measured 0.1-2.1 nats on 40 cells, se 10-13),
    finite k-hat, the fit's modes untouched; one cell's integrated likelihood at one
    drawn theta against plain Monte Carlo over the latents' prior at that theta, and
    the log target's prior term against the model's priors written out."""
    from scribe_stan.model_comparison import _nested_log_lik

    fit = fit_sim(NESTED_SIMS[model](), model)
    eta0 = None if fit.eta_hat is None else fit.eta_hat.copy()
    y0 = None if model == "nbvcp" else fit.y_hat.copy()
    point = ss.loo(fit, draws=100)
    nested = ss.loo(fit, draws=50, globals="laplace", max_draws=60)
    print(model, point.elpd, nested.elpd, point.se, nested.se, nested.p)
    assert abs(nested.elpd - point.elpd) < 0.5 * min(point.se, nested.se)
    assert 0 < nested.p < 2 * point.p
    assert np.all(np.isfinite(nested.pareto_k.values)) and nested.n_samples == 60
    if eta0 is not None:
        np.testing.assert_array_equal(fit.eta_hat, eta0)
    if y0 is not None:
        np.testing.assert_array_equal(fit.y_hat, y0)
    with pytest.raises(ValueError, match="max_draws must be an integer >= 25"):
        ss.loo(fit, globals="laplace", max_draws=10)
    res = _nested_log_lik(fit, 2000, 2, np.random.default_rng(4))
    g = res["globals"]
    assert not np.allclose(g["log_q"][0], g["log_q"][1])  # two distinct draws
    for s in range(2):
        np.testing.assert_allclose(res["log_p"][s] - res["ll"][s].sum(),
                                   nested_log_prior(fit, g, s), rtol=1e-10)
    theta = {k: v[1] for k, v in g.items() if v is not None}
    ref, se_ref = prior_monte_carlo(fit, 0, 400_000, np.random.default_rng(5), theta)
    assert abs(res["ll"][1, 0] - ref) < 4.5 * se_ref + 0.02, (res["ll"][1, 0], ref, se_ref)


def test_stacking_weights_survive_whole_cell_log_densities():
    """Stacking weights are invariant to a per-cell shift of every model's elpd_i: on
    small log densities they equal ArviZ's own; shifted by -800 nats per cell (a whole
    cell's count vector), ArviZ's weights stall at uniform while ours stay put."""
    import arviz_stats
    from scribe_stan.model_comparison import stacking_weights

    rng = np.random.default_rng(3)
    base = rng.normal(-2.0, 0.5, size=(3, 200))
    base[1] += rng.normal(0.3, 0.6, size=200)  # a model better on most cells
    trees = {}
    for k, name in enumerate(("a", "b", "c")):
        draws = base[k] + 0.05 * rng.standard_normal((1, 400, 200))
        trees[name] = arviz_stats.loo(_loglik_tree(draws), pointwise=True)
    reference = arviz_stats.compare(trees, method="stacking", round_to="none")["weight"]
    assert reference.max() > 0.5  # the small-magnitude case is well posed for ArviZ
    np.testing.assert_allclose(stacking_weights(trees)[reference.index], reference,
                               atol=2e-3)
    shifted = {}
    for name, e in trees.items():
        e = __import__("copy").deepcopy(e)
        e.elpd_i = e.elpd_i - 800.0
        e.elpd = float(np.sum(e.elpd_i))
        shifted[name] = e
    np.testing.assert_allclose(stacking_weights(shifted)[reference.index], reference,
                               atol=2e-3)
    naive = arviz_stats.compare(shifted, method="stacking", round_to="none")["weight"]
    assert np.allclose(naive, 1 / 3)  # the underflow this function exists for


def _loglik_tree(draws):
    import xarray as xr

    ll = xr.DataArray(draws, dims=("chain", "draw", "cell"))
    return xr.DataTree.from_dict({
        "posterior": xr.Dataset({"theta": xr.DataArray(np.zeros(draws.shape[:2]),
                                                        dims=("chain", "draw"))}),
        "log_likelihood": xr.Dataset({"counts": ll})})
