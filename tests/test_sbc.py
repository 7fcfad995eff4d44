"""Simulation-based calibration machinery (scribe_stan.sbc).

(a) ranks, randomized PIT and the ECDF simultaneous-band test on a conjugate normal
model with exact posterior draws: no flags when the posterior is right, flags when it
is too narrow or shifted; (b) the prior sampler against the priors *as written in the
Stan programs* (hyperparameters parsed from the program text, KS tests); (c) one tiny
end-to-end SBC run of stan/nbvcp.stan (slow).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from scribe_stan import sbc
from scribe_stan import stan as sst

# --------------------------------------------------------------------------------------
# (a) rank / ECDF machinery on a model with an exact posterior
# --------------------------------------------------------------------------------------


def _conjugate_pit(n_sims, L, *, sd_factor=1.0, shift=0.0, seed=0):
    """theta_j ~ N(0, 1) (3 independent parameters), 4 obs y ~ N(theta_j, 1) each.

    Exact posterior N(sum(y) / 5, 1/5); ``sd_factor``/``shift`` (in posterior sds)
    corrupt it. Returns the randomized PIT DataFrame.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_sims):
        theta = rng.standard_normal(3)
        y = theta[:, None] + rng.standard_normal((3, 4))
        mean, sd = y.sum(axis=1) / 5, np.sqrt(1 / 5)
        draws = mean[:, None] + sd * (shift + sd_factor * rng.standard_normal((3, 4 * L)))
        truth = {f"theta[{j}]": theta[j] for j in range(3)}
        post = {f"theta[{j}]": draws[j] for j in range(3)}
        rows.append(sbc.ranks_of_truth(truth, post, L))
    ranks = pd.DataFrame(rows)
    assert ranks.to_numpy().min() >= 0 and ranks.to_numpy().max() <= L
    return pd.DataFrame(sbc.pit_from_ranks(ranks.to_numpy(), L, rng), columns=ranks.columns)


def test_exact_posterior_is_not_flagged():
    cal = sbc.calibration_table(_conjugate_pit(300, 99, seed=1), prob=0.99)
    assert len(cal) == 3 and (cal["n"] == 300).all()
    assert not cal["flagged"].any(), cal
    assert np.allclose(cal["mean_pit"], 0.5, atol=0.06)


@pytest.mark.parametrize("corruption", [{"sd_factor": 0.6}, {"shift": 0.5}, {"sd_factor": 1.6}])
def test_wrong_posterior_is_flagged(corruption):
    cal = sbc.calibration_table(_conjugate_pit(300, 99, seed=2, **corruption), prob=0.99)
    assert cal["flagged"].all(), cal


def test_band_has_its_nominal_false_alarm_rate():
    """Uniform PIT values leave the 90 % band in about 10 % of repetitions."""
    rng = np.random.default_rng(3)
    band = sbc.ecdf_band(100, prob=0.9)
    flags = [sbc.ecdf_band_test(rng.uniform(size=100), band)["flagged"] for _ in range(400)]
    assert 0.05 < np.mean(flags) < 0.16


def test_ranks_and_pit_validate():
    with pytest.raises(ValueError, match="draws < L"):
        sbc.ranks_of_truth({"a": 0.0}, {"a": np.zeros(5)}, 10)
    with pytest.raises(ValueError, match="0 .. 10"):
        sbc.pit_from_ranks([11], 10, np.random.default_rng(0))
    # the truth above every kept draw has rank L; thinning keeps exactly L draws
    assert sbc.ranks_of_truth({"a": 1e9}, {"a": np.arange(600.0)}, 100) == {"a": 100}
    assert sbc.ranks_of_truth({"a": -1.0}, {"a": np.arange(600.0)}, 100) == {"a": 0}


# --------------------------------------------------------------------------------------
# (b) the prior sampler follows the priors written in the Stan programs
# --------------------------------------------------------------------------------------

_NUM = r"([-\d.]+|log\([\d.]+\))"


def _stan_prior(model, pattern):
    """Hyperparameters of ``pattern`` (two numbers) in the resolved Stan program."""
    code = sst.program_code(model)
    match = re.search(pattern.replace("#", _NUM), code)
    assert match, f"{pattern} not found in stan/{model}.stan"
    return [float(eval(v, {"log": np.log})) for v in match.groups()]  # noqa: S307


def _draws(model, n=300, N=6, G=5, K=1, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        log_lib = rng.normal(sbc.LOG_LIB_LOC, sbc.LOG_LIB_SCALE, size=N)
        d = sbc.draw_prior(model, N, G, K, rng, log_lib=log_lib)
        d["log_lib"] = log_lib
        out.append(d)
    return out


def _ks(sample, dist):
    p = stats.kstest(np.ravel(sample), dist.cdf).pvalue
    assert p > 1e-3, p


@pytest.mark.parametrize("model", sbc.MODELS)
def test_prior_draw_covers_the_parameters_block(model):
    params = sst._declarations(sst._block(sst.program_code(model), "parameters"))
    if model in ("pln", "nbln", "lnmvcp"):  # per-cell coordinates: simulate adds them
        draw, _ = sbc.simulate(model, sbc.SBCSettings(N=6, G=5, K=1),
                               np.random.default_rng(0))
    else:
        draw = _draws(model, n=1)[0]
    missing = set(params) - set(draw) - {"tau"}  # tau: size 0 with the "normal" loadings
    assert not missing, missing


@pytest.mark.parametrize("model", ["pln", "nbln"])
def test_pln_family_prior(model):
    draws = _draws(model)
    loc, scale = _stan_prior(model, r"normal_lpdf\(mu \| #, #\)")
    _ks([d["mu"] for d in draws], stats.norm(loc, scale))
    shape, rate = _stan_prior(model, r"gamma_lpdf\(d \| #, #\)")
    _ks([d["d"] for d in draws], stats.gamma(shape, scale=1 / rate))
    assert "std_normal_lpdf(to_vector(W))" in sst.program_code(model)
    _ks([d["W"] for d in draws], stats.norm())
    # x_c ~ MultiNormal(mu, W W' + diag(d)): whitened residuals are standard normal
    white = [np.linalg.solve(np.linalg.cholesky(d["W"] @ d["W"].T + np.diag(d["d"])),
                             (d["x"] - d["mu"]).T) for d in draws]
    _ks(white, stats.norm())
    if model == "nbln":
        loc, scale = _stan_prior(model, r"normal_lpdf\(log_r \| #, #\)")
        _ks([d["log_r"] for d in draws], stats.norm(loc, scale))


@pytest.mark.parametrize("model", ["pln", "nbvcp", "lnmvcp"])
def test_capture_prior(model):
    """eta_c ~ Normal(log M0 - log L_c, sigma_M) truncated to eta_c >= 0 (PIT is uniform)."""
    draws = _draws(model)
    log_M0, sigma_M = np.log(1e5), 1.0
    pit = [stats.truncnorm.cdf(d["eta"], (0 - a) / sigma_M, np.inf, loc=a, scale=sigma_M)
           for d in draws for a in [log_M0 - d["log_lib"]]]
    _ks(pit, stats.uniform())
    assert min(d["eta"].min() for d in draws) >= 0


def test_nbvcp_prior():
    draws = _draws("nbvcp")
    loc, scale = _stan_prior("nbvcp", r"normal_lpdf\(m \| #, #\)")
    _ks([d["m"] for d in draws], stats.norm(loc, scale))
    loc, scale = _stan_prior("nbvcp", r"normal_lpdf\(log_r \| #, #\)")
    _ks([d["log_r"] for d in draws], stats.norm(loc, scale))


@pytest.mark.parametrize("model", ["lnm", "lnmvcp"])
def test_lnm_prior(model):
    draws = _draws(model)
    loc, scale = _stan_prior(model, r"normal_lpdf\(mu_alr \| #, #\)")
    _ks([d["mu_alr"] for d in draws], stats.norm(loc, scale))
    shape, rate = _stan_prior(model, r"gamma_lpdf\(d_alr \| #, #\)")
    _ks([d["d_alr"] for d in draws], stats.gamma(shape, scale=1 / rate))
    loc, scale = _stan_prior(model, r"normal_lpdf\(log_m_T \| #, #\)")
    _ks([d["log_m_T"] for d in draws], stats.norm(loc, scale))
    loc, scale = _stan_prior(model, r"normal_lpdf\(log_r \| #, #\)")  # dispersion_lpdf
    _ks([d["log_r_T"] for d in draws], stats.norm(loc, scale))
    assert all(d["y"].shape == (6, 4) for d in draws)


def test_simulate_rejects_on_totals_only():
    settings = sbc.SBCSettings(N=6, G=4, max_total=50.0)
    rng = np.random.default_rng(4)
    n_rej = 0
    for _ in range(10):
        truth, n = sbc.simulate("pln", settings, rng)
        assert truth["counts"].sum(axis=1).max() <= 50
        n_rej += n
    assert n_rej > 0  # Normal(0, 10) log-rates make totals above 50 common
    data = sbc.stan_data("pln", truth, settings)
    assert set(data) == set(sst.data_variables("pln"))
    assert np.array_equal(data["log_lib"], truth["log_lib"])


def test_simulate_redraws_empty_data_and_undetected_genes():
    # Normal(0, 10) on log m_T makes most lnm data sets all zeros; min_total redraws them.
    settings = sbc.SBCSettings(N=6, G=4, min_total=100.0, all_genes_detected=True)
    rng = np.random.default_rng(5)
    n_rej = 0
    for _ in range(10):
        truth, n = sbc.simulate("lnmvcp", settings, rng)
        assert 100 <= truth["counts"].sum(axis=1).max() <= settings.max_total
        assert truth["counts"].sum(axis=0).min() > 0
        n_rej += n
    assert n_rej > 0
    with pytest.raises(ValueError, match="min_total"):
        sbc.SBCSettings(min_total=2e4)


def test_quantities_skip_loadings_and_match_shapes():
    settings = sbc.SBCSettings(N=6, G=4)
    truth = _draws("pln", n=1, G=4)[0]
    q = sbc.quantities("pln", truth, settings)
    assert not any(k.startswith("W") for k in q)
    assert len([k for k in q if k.startswith("Sigma")]) == 10
    assert len([k for k in q if k.startswith("corr")]) == 6
    stacked = {k: np.stack([v, v]) for k, v in truth.items() if isinstance(v, np.ndarray)}
    q2 = sbc.quantities("pln", stacked, settings)
    assert set(q2) == set(q) and all(v.shape == (2,) for v in q2.values())
    with pytest.raises(ValueError, match="unknown model"):
        sbc.quantities("poisson", truth, settings)


# --------------------------------------------------------------------------------------
# (c) end to end on one Stan program
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sbc_end_to_end_nbvcp():
    settings = sbc.SBCSettings(N=8, G=3, chains=2, warmup=150, draws=100, L=50,
                               laplace_draws=50)
    res = sbc.run_sbc("nbvcp", n_sims=2, settings=settings, seed=7)
    assert res.ranks.shape == (2, 3 + 3 + 3)  # m[3], r[3], eta of 3 tracked cells
    r = res.ranks.to_numpy()
    assert r.min() >= 0 and r.max() <= settings.L
    lp = res.laplace_pit
    assert set(lp["latent"]) <= {"eta"} and lp["pit"].between(0, 1).all()
    summary = res.summary(prob=0.99)
    assert summary["n_sims"] == 2 and set(summary["per_quantity"]) == set(res.ranks.columns)
    assert summary["stan_hash"] == sst.program_hash("nbvcp")
    assert set(res.well_mixed()) <= set(res.sims.index)


def test_nested_laplace_draws_cover_the_true_latents_where_point_globals_do_not():
    """Laplace check alone on SBC simulations (truth from the prior): with 20 cells the
    globals are uncertain, point-globals intervals are too narrow, nested ones are not."""
    settings = sbc.SBCSettings(N=20, G=5, K=1, laplace_draws=300, all_genes_detected=True)
    seeds = range(100, 108)
    point, sims_p = sbc.laplace_study("pln", seeds, settings, globals="point")
    nested, sims_n = sbc.laplace_study("pln", seeds, settings, globals="laplace")
    assert sims_p["error"].isna().all() and sims_n["error"].isna().all()
    assert list(point.columns) == sbc.PIT_COLUMNS
    # the same simulations, elements and truth: only the draws differ
    assert point[["sim", "latent", "cell", "gene"]].equals(nested[["sim", "latent", "cell",
                                                                   "gene"]])
    cov_p, cov_n = sbc.coverage_table(point), sbc.coverage_table(nested)
    assert cov_n.loc["x", "n"] >= 0.95 * 8 * 20 * 5  # cells with no counts are not fitted
    c_point, c_nested = cov_p.loc["x", "coverage_90"], cov_n.loc["x", "coverage_90"]
    assert 0.85 <= c_nested <= 0.97, (c_point, c_nested)
    assert c_nested > c_point + 0.05, (c_point, c_nested)


def test_laplace_study_refuses_an_unknown_globals_choice():
    with pytest.raises(ValueError, match="allowed: \\('point', 'laplace'\\)"):
        sbc.laplace_study("lnm", [0], sbc.SBCSettings(), globals="full")
