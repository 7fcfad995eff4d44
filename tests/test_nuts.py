"""NUTS starts from a Laplace fit, the chain-split check and the metric argument."""

import anndata as ad
import arviz_base as azb
import numpy as np
import pandas as pd
import pytest
from scipy import linalg, stats

import scribe_stan as ss
from scribe_stan import nuts, stan
from scribe_stan.models import nbln, pln


@pytest.fixture(scope="module")
def small():
    sim = pln.simulate(15, 4, 1, seed=3, lib_target=200.0, sigma_M=0.5)
    adata = ad.AnnData(X=sim["counts"].astype(np.float32),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(15)]),
                       var=pd.DataFrame(index=[f"g{g}" for g in range(4)]))
    return adata


def _forward(init, counts, a, sigma_M):
    """x and eta from pln.stan's sampled coordinates, written from the program's text
    (capture_working_log_rate, capture_working_response, nbln_working_weight,
    capture_whitened_latent_lp, capture_conditional_*, capture_from_quantile), one cell
    at a time."""
    mu, W, d = init["mu_level"] + init["mu_dev"], init["W"], init["d"]
    G = mu.size
    B = np.column_stack([W, np.full(G, sigma_M)])

    def information(lam):  # Fisher information of the log rate
        if "log_r" not in init:
            return lam
        return lam * np.exp(init["log_r"]) / (lam + np.exp(init["log_r"]))

    x_obs = np.empty(counts.shape)
    prior_var = np.diag(B @ B.T) + d  # of x_obs[c, g]
    for c in range(counts.shape[0]):
        w0 = information(counts[c] + 0.5)
        x1 = ((mu - a[c]) / prior_var + w0 * np.log(counts[c] + 0.5)) / (1 / prior_var + w0)
        p = information(np.exp(x1))
        resid = x1 + counts[c] * np.exp(-x1) - 1.0 - mu + a[c]
        s = p / (1.0 + d * p)
        Q = np.eye(B.shape[1]) + B.T @ (s[:, None] * B)
        R = np.linalg.cholesky(Q)
        b = np.linalg.solve(Q, B.T @ (s * resid))
        z = b + linalg.solve_triangular(R.T, init["theta_z"][c], lower=False)
        v = d / (1.0 + d * p)
        e = v * p * (resid - B @ z) + np.sqrt(v) * init["theta_e"][c]
        x_obs[c] = mu - a[c] + B @ z + e
    Sigma = W @ W.T + np.diag(d)
    w = np.linalg.solve(Sigma, np.ones(G))
    sd = 1.0 / np.sqrt(1.0 / sigma_M**2 + w.sum())
    m = sd**2 * (a / sigma_M**2 + mu @ w - x_obs @ w)
    eta = stats.truncnorm(-m / sd, np.inf, loc=m, scale=sd).ppf(init["eta_q"])
    return x_obs + eta[:, None], eta


@pytest.mark.parametrize("model", ["pln", "nbln"])
def test_laplace_inits_start_each_chain_at_a_laplace_draw(small, model):
    fit = ss.fit(small, model=model, rank=1, progress=False)
    inits = nuts.laplace_inits(fit, 3, seed=4)
    tree = fit.to_datatree(draws=3, seed=4)
    a = pln.capture_prior_mean(fit.data.log_lib, fit.data.log_M0)
    names = set(stan._declarations(stan._block(stan.program_code(model), "parameters")))
    names.discard("tau")  # zero-size with the default loadings prior
    assert len(inits) == 3
    for c, init in enumerate(inits):
        assert set(init) == names
        assert init["theta_e"].shape == (15, 4) and init["theta_z"].shape == (15, 2)
        assert np.all((init["eta_q"] > 0) & (init["eta_q"] < 1))
        x, eta = _forward(init, fit.data.counts, a, fit.data.sigma_M)
        np.testing.assert_allclose(x, tree["posterior"]["x"].values[0, c], atol=1e-6)
        np.testing.assert_allclose(eta, tree["posterior"]["eta"].values[0, c], atol=1e-6)
        np.testing.assert_allclose(init["mu_level"] + init["mu_dev"], fit.mu, rtol=1e-12)
        assert abs(init["mu_dev"].sum()) < 1e-12
        if model == "nbln":
            np.testing.assert_allclose(init["log_r"], fit.log_r)
    # chains start at different cell draws
    assert not np.allclose(inits[0]["theta_e"], inits[1]["theta_e"])


def test_laplace_inits_refuses_other_models(small):
    fit = ss.fit(small, model="nbvcp", progress=False)
    with pytest.raises(ValueError, match="pln and nbln"):
        nuts.laplace_inits(fit, 2)


def _hmc_tree(shift=0.0, sigma_shift=0.0):
    rng = np.random.default_rng(0)
    lp = rng.standard_normal((4, 400)) * 5.0 - 100.0
    lp[1] += shift
    Sigma = rng.standard_normal((4, 400, 2, 2))
    Sigma[2] += sigma_shift
    W = rng.standard_normal((4, 400, 2, 1))
    W[3] *= -1.0  # a sign flip of the loadings: not identified, never judged
    W[3] += 50.0
    return azb.from_dict({"posterior": {"Sigma": Sigma, "W": W},
                          "sample_stats": {"lp": lp}},
                         dims={"Sigma": ["gene", "gene_2"], "W": ["gene", "factor"]})


def test_chain_split_flags_a_chain_apart_on_lp_or_sigma_not_on_w():
    ok = nuts.chain_split(_hmc_tree())
    assert not ok["split"] and ok["stuck_chains"] == [] and ok["max_split_sds"] < 0.5
    lp = nuts.chain_split(_hmc_tree(shift=-40.0))  # 8 within-chain sds lower
    assert lp["split"] and lp["stuck_chains"] == [1]
    assert lp["lp_split_sds"][1] == pytest.approx(8.0, rel=0.1)
    sig = nuts.chain_split(_hmc_tree(sigma_shift=5.0))
    assert sig["split"] and sig["stuck_chains"] == [] and sig["worst_split"] == "Sigma"
    assert sig["max_split_sds"] == pytest.approx(5.0, rel=0.1)


def test_dense_metric_needs_cmdstan():
    data = pln.stan_data(np.ones((3, 2), int), 1)
    with pytest.raises(ValueError, match="diag_e"):
        stan.sample("pln", data, backend="pystan", metric="dense_e")
    with pytest.raises(ValueError, match="unknown metric"):
        stan.sample("pln", data, backend="pystan", metric="unit")


@pytest.mark.slow
def test_laplace_inits_are_accepted_by_stan_at_the_laplace_draw(small, backend):
    # the program's log density at the init equals the NumPy joint density of the
    # Laplace draw it came from, plus the coordinates' log offset
    fit = ss.fit(small, model="pln", rank=1, progress=False)
    init = nuts.laplace_inits(fit, 1, seed=2)[0]
    draw = fit.to_datatree(draws=1, seed=2)["posterior"]
    x, eta = draw["x"].values[0, 0], draw["eta"].values[0, 0]
    data = pln.stan_data(fit.data.counts, 1, log_M0=fit.data.log_M0,
                         sigma_M=fit.data.sigma_M, log_lib=fit.data.log_lib)
    a = pln.capture_prior_mean(fit.data.log_lib, fit.data.log_M0)
    offset = pln.observed_capture_coordinates(fit.data.counts, x, eta, fit.mu, fit.W,
                                              fit.d, a, fit.data.sigma_M)["log_offset"]
    ref = pln.log_joint(fit.data.counts, fit.mu, fit.W, fit.d, x, eta,
                        log_M0=fit.data.log_M0, sigma_M=fit.data.sigma_M)
    lp = stan.log_prob("pln", data, init, backend=backend)
    assert lp == pytest.approx(ref + offset, rel=1e-9)


@pytest.mark.slow
@pytest.mark.cmdstan
def test_dense_metric_runs_on_cmdstan(cmdstan_dir, monkeypatch):
    monkeypatch.setenv("CMDSTAN", cmdstan_dir)
    sim = pln.simulate(6, 3, 1, seed=9, lib_target=80.0, sigma_M=0.5)
    data = pln.stan_data(sim["counts"], 1, log_M0=sim["log_M0"], sigma_M=sim["sigma_M"])
    # warmup >= 150: with fewer iterations CmdStan adapts no metric (unit either way)
    run = {m: stan.sample("pln", data, backend="cmdstanpy", chains=1, draws=20,
                          warmup=150, seed=3, metric=m) for m in stan.METRICS}
    assert run["dense_e"].config["metric"] == "dense_e"
    assert np.isfinite(run["dense_e"].posterior["mu"]).all()
    # same seed and starts, another adapted metric: another trajectory
    assert not np.array_equal(run["dense_e"].posterior["mu"], run["diag_e"].posterior["mu"])


@pytest.mark.parametrize("model", ["pln", "nbln"])
def test_unconstrained_layout_is_stans(small, model):
    # nuts.unconstrained (the layout laplace_metric's variances follow) against Stan's
    # own unconstrain_pars of the same constrained values
    fit = ss.fit(small, model=model, rank=2, progress=False)
    init = nuts.laplace_inits(fit, 1, seed=5)[0]
    data = (pln if model == "pln" else nbln).stan_data(
        fit.data.counts, 2, log_M0=fit.data.log_M0, sigma_M=fit.data.sigma_M,
        log_lib=fit.data.log_lib)
    model_ = stan._pystan_model(model, data, 0)
    ref = np.asarray(model_.unconstrain_pars(stan._json_data(init)))
    np.testing.assert_allclose(nuts.unconstrained(init), ref, rtol=1e-9, atol=1e-9)


def test_laplace_metric_variances(small):
    fit = ss.fit(small, model="pln", rank=2, progress=False)
    var = nuts.laplace_metric(fit, draws=300, seed=1)
    init = nuts.laplace_inits(fit, 1)[0]
    G, K, N = 4, 2, 15
    assert var.shape == nuts.unconstrained(init).shape and np.all(var > 0)
    # the block of W (after mu_level and mu_dev) carries the rotation orbit's spread
    W_block = var[G:G + G * K].reshape(K, G).T  # column-major
    assert np.all(W_block >= (fit.W**2).sum(axis=1, keepdims=True) / K)
    # whitened per-cell coordinates: variance near 1 over the nested draws
    theta = var[2 * G + G * K:2 * G + G * K + N * (K + 1) + N * G]
    assert 0.6 < np.median(theta) < 1.6
    # eta_q's posterior is uniform: its logit has variance pi^2 / 3
    assert np.median(var[-N:]) == pytest.approx(np.pi**2 / 3, rel=0.35)
    with pytest.raises(ValueError, match="draws >= 2"):
        nuts.laplace_metric(fit, draws=1)


def test_initial_metric_needs_cmdstan_and_a_laplace_start(small):
    data = pln.stan_data(np.ones((3, 2), int), 1)
    with pytest.raises(ValueError, match="inv_metric needs backend='cmdstanpy'"):
        stan.sample("pln", data, backend="pystan", inv_metric=np.ones(20))
    with pytest.raises(ValueError, match="init_metric='laplace' takes the metric"):
        ss.fit(small, model="pln", rank=1, method="hmc", init_metric="laplace",
               progress=False)
    lap = ss.fit(small, model="pln", rank=1, progress=False)
    with pytest.raises(ValueError, match="needs backend='cmdstanpy'"):
        ss.fit(small, model="pln", rank=1, method="hmc", init_from=lap,
               init_metric="laplace", backend="pystan", progress=False)


@pytest.mark.slow
@pytest.mark.cmdstan
def test_laplace_metric_starts_cmdstan_warmup(small, cmdstan_dir, monkeypatch):
    monkeypatch.setenv("CMDSTAN", cmdstan_dir)
    lap = ss.fit(small, model="pln", rank=1, progress=False)
    run = {m: ss.fit(small, model="pln", rank=1, method="hmc", init_from=lap,
                     init_metric=m, backend="cmdstanpy", chains=2, draws=100, warmup=150,
                     seed=3, progress=False) for m in ("unit", "laplace")}
    hmc = run["laplace"]
    assert hmc.settings["init_metric"] == "laplace"
    assert hmc.draws.config["initial_metric"] == "given"
    assert run["unit"].draws.config["initial_metric"] == "unit"
    assert np.isfinite(hmc.draws.posterior["mu"]).all()
    # same seed and starts, another initial metric: another trajectory
    assert not np.array_equal(hmc.draws.posterior["mu"], run["unit"].draws.posterior["mu"])
