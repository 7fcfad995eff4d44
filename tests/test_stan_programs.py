"""Stan programs of the pln model against the NumPy reference, and the Stan boundary.

Sizes are tiny (N <= 10 cells, G <= 5 genes) so each build + run is quick; compiled
models are cached across runs. Tests taking ``backend`` run under pystan and cmdstanpy
(see conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import linalg, special, stats

from scribe_stan import stan as ss
from scribe_stan.models import pln

LOG_2PI = np.log(2.0 * np.pi)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _sim(N=6, G=4, K=2, seed=3):
    return pln.simulate(N, G, K, seed=seed, lib_target=60.0, sigma_M=0.5)


def _capture(sim):
    """Capture prior centred on the data so the eta >= 0 truncation matters."""
    log_lib = np.log(sim["counts"].sum(axis=1))
    return {"log_M0": float(log_lib.mean()), "sigma_M": 0.7}


def _random_point(rng, N, G, K):
    """Random (mu, W, d, x, eta); W dense with entries of either sign."""
    mu = 1.0 + 0.6 * rng.standard_normal(G)
    W = 0.7 * rng.standard_normal((G, K))
    d = rng.uniform(0.1, 0.6, G)
    x = mu + 0.8 * rng.standard_normal((N, G))
    eta = rng.uniform(0.05, 2.0, N)
    return mu, W, d, x, eta


def _noncentred(data, mu, W, d, x, eta):
    """Stan's raw per-cell parameters (z, eta_std) for given x, eta; and log det L."""
    L = np.linalg.cholesky(pln.covariance(W, d))
    z = linalg.solve_triangular(L, (x - mu).T, lower=True).T
    a = pln.capture_prior_mean(data["log_lib"], data["log_M0"])
    eta_std = (eta - a) / data["sigma_M"]
    return z, eta_std, np.log(np.diag(L)).sum()


def _stan_coordinates(data, mu, W, d, x, eta):
    """pln.stan's per-cell parameters for given x, eta, and its log-density offset."""
    a = pln.capture_prior_mean(data["log_lib"], data["log_M0"])
    return pln.observed_capture_coordinates(data["counts"], x, eta, mu, W, d, a,
                                            data["sigma_M"])


def _sampled(coords):
    return {k: coords[k] for k in pln.SAMPLED_COORDINATES}


def _eval_dims(dims, data):
    return tuple(int(eval(expr, {}, {k: data[k] for k in ("N", "G", "K")})) for expr in dims)


# --------------------------------------------------------------------------------------
# Programs and the data contract
# --------------------------------------------------------------------------------------

PROGRAMS = ["pln", "pln_conditional", "pln_laplace"]
CONTRACT = ["N", "G", "K", "counts", "log_lib", "log_M0", "sigma_M"]


def _builders(sim):
    counts, cap = sim["counts"], _capture(sim)
    return {
        "pln": pln.stan_data(counts, sim["W"].shape[1], **cap),
        "pln_conditional": pln.conditional_stan_data(counts, sim["mu"], sim["W"], sim["d"], **cap),
        "pln_laplace": pln.laplace_stan_data(
            counts, sim["mu"], sim["W"], sim["d"], sim["eta"], **cap),
    }


@pytest.mark.parametrize("name", PROGRAMS)
def test_program_code_resolves_includes(name):
    code = ss.program_code(name)
    assert "#include" not in code
    assert "pln_covariance" in code  # pulled in from functions/pln.stanfunctions
    h = ss.program_hash(name)
    assert len(h) == 64 and h == ss.program_hash(f"{name}.stan")


def test_unknown_program_name():
    with pytest.raises(ValueError, match="pln_conditional"):
        ss.program_code("no_such_model")


@pytest.mark.parametrize("name", PROGRAMS)
def test_data_contract(name):
    sim = _sim()
    data = _builders(sim)[name]
    declared = ss.data_variables(name)
    assert list(declared)[: len(CONTRACT)] == CONTRACT
    assert set(data) == set(declared), (sorted(data), sorted(declared))
    for key, dims in declared.items():
        assert np.shape(data[key]) == _eval_dims(dims, data), key
    for key in ("N", "G", "K"):
        assert isinstance(data[key], int)
    assert np.issubdtype(np.asarray(data["counts"]).dtype, np.integer)
    # the conversion handed to both backends: plain Python values
    js = ss._json_data(data)
    assert isinstance(js["counts"][0][0], int) and isinstance(js["log_lib"][0], float)


def test_json_data_rejects_non_finite():
    with pytest.raises(ValueError, match="log_lib"):
        ss._json_data({"log_lib": np.array([1.0, np.nan])})


# --------------------------------------------------------------------------------------
# Log-density parity with the NumPy reference
# --------------------------------------------------------------------------------------
#
# pln.stan is written in (mu_level, mu_dev, W, d, theta_z, theta_e, eta_q): mu's level
# and deviations from it, the captured log-rates
# x_obs_c = x_c - eta_c, augmented and whitened by the counts' working point, and the
# quantile eta_q of eta_c given x_obs_c. W is unconstrained with the Laplace side's
# prior, so without the constraint Jacobians its target is
#
#   log_joint(u, mu, W, d, x, eta)            (pln.log_joint: density in x, eta)
#   + log_offset                              (pln.observed_capture_coordinates: the
#                                              Jacobians, by NumPy and SciPy's truncnorm)
#
# and nothing else: no term for the loadings.
# The absolute values are compared (so every constant is checked), and the differences
# between points (which move mu, W, d, x and eta: any change of a prior scale, of the
# capture prior or of the likelihood would show).


def test_pln_log_density_matches_numpy(backend):
    sim = _sim(N=5, G=4, K=2)
    data = _builders(sim)["pln"]
    N, G, K = data["N"], data["G"], data["K"]
    rng = np.random.default_rng(11)
    stan_lp, ref_lp = [], []
    for _ in range(3):
        mu, W, d, x, eta = _random_point(rng, N, G, K)
        coords = _stan_coordinates(data, mu, W, d, x, eta)
        params = {"W": W, "d": d} | _sampled(coords)
        stan_lp.append(ss.log_prob("pln", data, params, backend=backend, jacobian=False))
        ref = pln.log_joint(data["counts"], mu, W, d, x, eta,
                            log_M0=data["log_M0"], sigma_M=data["sigma_M"])
        ref_lp.append(ref + coords["log_offset"])
    stan_lp, ref_lp = np.array(stan_lp), np.array(ref_lp)
    np.testing.assert_allclose(stan_lp, ref_lp, rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.diff(stan_lp), np.diff(ref_lp),
                               rtol=1e-8, atol=1e-8 * np.abs(ref_lp).max())
    assert np.abs(np.diff(ref_lp)).min() > 1.0  # the points really differ
    # no parametrization pins W: the joint density of (x, eta) is invariant under
    # W -> W R (R orthogonal, here with a reflection). The whitened coordinates of the
    # same (x, eta) move with W, so they are recomputed; the density in them, less the
    # coordinates' log offset, must not change.
    R = np.linalg.qr(rng.standard_normal((K, K)))[0] @ np.diag([1.0, -1.0])
    turned = _stan_coordinates(data, mu, W @ R, d, x, eta)
    rotated = ss.log_prob("pln", data, {"W": W @ R, "d": d} | _sampled(turned),
                          backend=backend, jacobian=False)
    assert not np.allclose(turned["theta_z"], coords["theta_z"])
    np.testing.assert_allclose(rotated - turned["log_offset"],
                               stan_lp[-1] - coords["log_offset"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("prior", ["gaussian", "horseshoe", "neg"])
def test_pln_shrinkage_prior_log_density_matches_numpy(prior, backend):
    # Same W and tau on both sides (tau enters both as a parameter, density in tau).
    sim = _sim(N=4, G=5, K=2)
    data = pln.stan_data(sim["counts"], 2, loadings_prior=prior, **_capture(sim))
    N, G, K = data["N"], data["G"], data["K"]
    rng = np.random.default_rng(21)
    stan_lp, ref_lp = [], []
    for _ in range(3):
        mu, W, d, x, eta = _random_point(rng, N, G, K)
        tau = rng.uniform(0.05, 2.0, K)
        coords = _stan_coordinates(data, mu, W, d, x, eta)
        params = {"W": W, "d": d, "tau": tau} | _sampled(coords)
        stan_lp.append(ss.log_prob("pln", data, params, backend=backend, jacobian=False))
        ref = pln.log_joint(data["counts"], mu, W, d, x, eta, log_M0=data["log_M0"],
                            sigma_M=data["sigma_M"], tau=tau, loadings_prior=prior)
        ref_lp.append(ref + coords["log_offset"])
    np.testing.assert_allclose(stan_lp, ref_lp, rtol=1e-10, atol=0)
    assert np.abs(np.diff(ref_lp)).min() > 1.0


def test_pln_conditional_log_density_matches_numpy(backend):
    sim = _sim(N=5, G=4, K=2)
    rng = np.random.default_rng(12)
    mu, W, d, _, _ = _random_point(rng, 5, 4, 2)
    cap = _capture(sim)
    data = pln.conditional_stan_data(sim["counts"], mu, W, d, **cap)
    N = data["N"]
    stan_lp, ref_lp = [], []
    for _ in range(3):
        _, _, _, x, eta = _random_point(rng, N, data["G"], data["K"])
        z, eta_std, logdet_L = _noncentred(data, mu, W, d, x, eta)
        stan_lp.append(ss.log_prob("pln_conditional", data, {"z": z, "eta_std": eta_std},
                                   backend=backend, jacobian=False))
        a = pln.capture_prior_mean(data["log_lib"], data["log_M0"])
        ref = (pln.log_lik_cells(data["counts"], x, eta).sum()
               + pln.log_latent_prior_cells(x, mu, W, d).sum()
               + pln.log_capture_prior(eta, a, data["sigma_M"]).sum())
        # same as log_joint minus the prior of the (fixed) globals
        full = pln.log_joint(data["counts"], mu, W, d, x, eta, **cap)
        np.testing.assert_allclose(ref, full - pln.log_prior_globals(mu, W, d), rtol=1e-12)
        ref_lp.append(ref + N * logdet_L + N * np.log(data["sigma_M"]))
    stan_lp, ref_lp = np.array(stan_lp), np.array(ref_lp)
    np.testing.assert_allclose(stan_lp, ref_lp, rtol=1e-10, atol=0)
    np.testing.assert_allclose(np.diff(stan_lp), np.diff(ref_lp),
                               rtol=1e-8, atol=1e-8 * np.abs(ref_lp).max())


# --------------------------------------------------------------------------------------
# Stan's embedded Laplace against a dense NumPy Laplace
# --------------------------------------------------------------------------------------


def dense_laplace_log_marginal(u, mu, Sigma, eta):
    """log p(u) ~= loglik(x^) + log N(x^ | mu, Sigma) + G/2 log 2pi - 1/2 log det(-H).

    Newton on x (dense Hessian H = -diag(exp(x - eta)) - Sigma^-1) to machine precision.
    """
    u = np.asarray(u, float)
    G = u.size
    P = np.linalg.inv(Sigma)
    P = 0.5 * (P + P.T)

    def objective(x):
        v = x - eta
        r = x - mu
        return (u @ v - np.exp(v).sum() - special.gammaln(u + 1.0).sum()
                - 0.5 * r @ P @ r)

    x = mu.copy()
    for _ in range(200):
        lam = np.exp(x - eta)
        grad = u - lam - P @ (x - mu)
        neg_H = np.diag(lam) + P
        step = np.linalg.solve(neg_H, grad)
        t, f0 = 1.0, objective(x)
        while objective(x + t * step) < f0 - 1e-14 * abs(f0) and t > 1e-8:
            t *= 0.5
        x = x + t * step
        if np.max(np.abs(step)) < 1e-14 * (1.0 + np.max(np.abs(x))):
            break
    lam = np.exp(x - eta)
    grad = u - lam - P @ (x - mu)
    assert np.max(np.abs(grad)) < 1e-9
    neg_H = np.diag(lam) + P
    loglik = u @ (x - eta) - lam.sum() - special.gammaln(u + 1.0).sum()
    log_prior = stats.multivariate_normal(mean=mu, cov=Sigma).logpdf(x)
    _, logdet = np.linalg.slogdet(neg_H)
    return loglik + log_prior + 0.5 * G * LOG_2PI - 0.5 * logdet


def test_embedded_laplace_matches_dense_numpy(backend):
    sim = _sim(N=5, G=4, K=2, seed=5)
    data = _builders(sim)["pln_laplace"]
    out = ss.fixed_param("pln_laplace", data, backend=backend)
    assert out["log_marginal"].shape == (data["N"],)
    Sigma = pln.covariance(data["W"], data["d"])
    ref = np.array([
        dense_laplace_log_marginal(data["counts"][c], data["mu"], Sigma, data["eta"][c])
        for c in range(data["N"])
    ])
    np.testing.assert_allclose(out["log_marginal"], ref, rtol=1e-8, atol=0)


# --------------------------------------------------------------------------------------
# NUTS through `sample`
# --------------------------------------------------------------------------------------

STATS_KEYS = {"lp", "diverging", "tree_depth", "energy", "step_size", "acceptance_rate"}


def _check_common(draws, counts, backend, C=2, D=200):
    N, G = np.shape(counts)
    post = draws.posterior
    assert post["x"].shape == (C, D, N, G)
    assert post["eta"].shape == (C, D, N)
    assert post["log_lik"].shape == (C, D, N)
    assert post["y_rep"].shape == (C, D, N, G)
    assert np.issubdtype(post["y_rep"].dtype, np.integer) and post["y_rep"].min() >= 0
    assert np.all(post["eta"] >= 0)
    assert STATS_KEYS <= set(draws.sample_stats)
    for key, arr in draws.sample_stats.items():
        assert arr.shape == (C, D), key
    assert draws.sample_stats["diverging"].dtype == np.bool_
    assert np.all(np.isfinite(draws.sample_stats["lp"]))
    assert draws.backend == backend and len(draws.stan_hash) == 64
    assert draws.wall_time_s > 0 and "stan" in draws.versions
    # generated log_lik agrees with the NumPy likelihood at the same draws
    for c, d_ in [(0, 0), (1, D - 1)]:
        np.testing.assert_allclose(
            post["log_lik"][c, d_],
            pln.log_lik_cells(counts, post["x"][c, d_], post["eta"][c, d_]),
            rtol=1e-10)


def test_nuts_pln_shapes(backend):
    sim = pln.simulate(10, 4, 1, seed=7, lib_target=200.0, sigma_M=0.5)
    data = pln.stan_data(sim["counts"], 1, log_M0=sim["log_M0"], sigma_M=sim["sigma_M"])
    draws = ss.sample("pln", data, backend=backend, chains=2, draws=200, warmup=200, seed=1)
    N, G, K = 10, 4, 1
    post = draws.posterior
    assert post["mu"].shape == (2, 200, G)
    assert post["W"].shape == (2, 200, G, K)
    assert post["d"].shape == (2, 200, G)
    assert post["Sigma"].shape == (2, 200, G, G)
    assert post["tau"].shape == (2, 200, 0)  # no shrinkage prior: no column scales
    _check_common(draws, data["counts"], backend)
    # Sigma = W W' + diag(d) draw by draw (W itself is identified only up to sign)
    W, d = post["W"], post["d"]
    Sigma = np.einsum("cdgk,cdhk->cdgh", W, W) + d[..., None] * np.eye(G)
    np.testing.assert_allclose(post["Sigma"], Sigma, rtol=1e-12, atol=1e-12)
    # chains are separate runs: different draws, distinct chain order
    assert not np.allclose(post["mu"][0], post["mu"][1])


def test_nuts_pln_conditional_shapes(backend):
    sim = pln.simulate(10, 4, 1, seed=8, lib_target=200.0, sigma_M=0.5)
    data = pln.conditional_stan_data(sim["counts"], sim["mu"], sim["W"], sim["d"],
                                     log_M0=sim["log_M0"], sigma_M=sim["sigma_M"])
    draws = ss.sample("pln_conditional", data, backend=backend, chains=2, draws=200,
                      warmup=200, seed=2)
    assert "mu" not in draws.posterior and "Sigma" not in draws.posterior
    _check_common(draws, data["counts"], backend)


def test_nuts_without_warmup(backend):
    """warmup=0: no adaptation (cmdstanpy must not ask CmdStan for it), so the step size
    stays where it started in every draw: CmdStan's 1, pystan's from Stan's step-size
    initialization (its one sampler is the adaptive one)."""
    sim = pln.simulate(10, 4, 1, seed=7, lib_target=200.0, sigma_M=0.5)
    data = pln.stan_data(sim["counts"], 1, log_M0=sim["log_M0"], sigma_M=sim["sigma_M"])
    draws = ss.sample("pln", data, backend=backend, chains=2, draws=30, warmup=0, seed=4)
    assert draws.posterior["x"].shape == (2, 30, 10, 4)
    assert draws.config["warmup"] == 0
    step = draws.sample_stats["step_size"]
    assert np.all(step == step[:, :1]) and np.all(step > 0)
    if backend == "cmdstanpy":
        assert np.all(step == 1.0)
    assert np.all(np.isfinite(draws.sample_stats["lp"]))


def test_pystan_draw_order_matches_fit_internals():
    """(chain, draw) reshaping of pystan output against the Fit's raw draw table."""
    import stan

    code = "parameters { vector[3] v; } model { target += normal_lpdf(v | 0, 1); }"
    fit = stan.build(code, random_seed=1).sample(num_chains=3, num_samples=7, num_warmup=20)
    posterior, stats_ = ss._pystan_posterior(fit, set())
    raw = fit._draws  # (columns, draws, chains)
    offset = len(fit.sample_and_sampler_param_names)
    for c in range(3):
        for dd in range(7):
            np.testing.assert_array_equal(posterior["v"][c, dd], raw[offset:offset + 3, dd, c])
            assert stats_["lp"][c, dd] == raw[0, dd, c]


# --------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------


def test_unknown_backend_raises():
    with pytest.raises(ValueError) as err:
        ss.resolve_backend("stanio")
    msg = str(err.value)
    assert "stanio" in msg and all(b in msg for b in ("auto", "cmdstanpy", "pystan"))
    with pytest.raises(ValueError, match="cmdstanpy"):
        ss.sample("pln", {}, backend="nope")


def test_backend_resolution():
    assert ss.resolve_backend("pystan") == "pystan"
    if ss._cmdstan_available():
        assert ss.resolve_backend("auto") == "cmdstanpy"
    else:
        assert ss.resolve_backend("auto") == "pystan"
        with pytest.raises(RuntimeError, match="CmdStan"):
            ss.resolve_backend("cmdstanpy")


def test_missing_data_key_is_named(backend):
    sim = _sim()
    data = _builders(sim)["pln"]
    del data["sigma_M"]
    with pytest.raises(ValueError, match="sigma_M"):
        ss.sample("pln", data, backend=backend)


FAKE_PROGRAM = """
data { int N; int G; int K; int prior; }
parameters { array[N] vector[G] x; vector[prior > 0 ? K : 0] tau; }
generated quantities { array[N, G] int y_rep; }
"""


def _fake_cmdstanpy_fit(C, D, values):
    """A stand-in for cmdstanpy's CmdStanMCMC: chain-major flat draws of the variables
    in ``values`` (CmdStan's CSV has no column for zero-size ones), (draws, chains)
    diagnostics."""
    lp = np.arange(C * D, dtype=float).reshape(C, D)

    class FakeFit:
        class metadata:
            stan_vars = dict.fromkeys(values)

        def stan_variable(self, name):
            return values[name].reshape(C * D, *values[name].shape[2:])

        def method_variables(self):
            return {"lp__": lp.T, "divergent__": np.zeros((D, C)),
                    "treedepth__": np.full((D, C, 1), 3.0)}

    return FakeFit(), lp


def test_cmdstanpy_conversion_shapes():
    """cmdstanpy output (chain-major flat draws, (draws, chains) diagnostics) is mapped
    to the same (chain, draw, ...) layout as pystan's (no CmdStan needed); a zero-size
    variable, absent from CmdStan's output, comes back in its declared place."""
    C, D, N, G = 3, 5, 2, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((C, D, N, G))
    y_rep = rng.integers(0, 9, (C, D, N, G)).astype(float)
    fit, lp = _fake_cmdstanpy_fit(C, D, {"x": x, "y_rep": y_rep})
    data = {"N": N, "G": G, "K": 2, "prior": 0}
    post, stats_ = ss._cmdstanpy_posterior(fit, C, FAKE_PROGRAM, data, {"y_rep"})
    assert list(post) == ["x", "tau", "y_rep"]  # Stan's order, as pystan gives it
    np.testing.assert_array_equal(post["x"], x)
    assert post["tau"].shape == (C, D, 0)
    assert post["y_rep"].dtype == np.int64 and post["y_rep"].shape == (C, D, N, G)
    np.testing.assert_array_equal(stats_["lp"], lp)
    assert stats_["diverging"].dtype == np.bool_ and stats_["diverging"].shape == (C, D)
    assert stats_["tree_depth"].shape == (C, D)
    # a variable of non-zero size that CmdStan did not report is an error, not zeros
    with pytest.raises(RuntimeError, match=r"no values of 'tau', declared with shape \(2,\)"):
        ss._cmdstanpy_posterior(fit, C, FAKE_PROGRAM, data | {"prior": 1}, {"y_rep"})


@pytest.mark.parametrize("name", sorted(p.stem for p in ss.STAN_DIR.glob("*.stan")))
def test_output_names_match_stanc(name, tmp_path):
    """The variables (and order) cmdstanpy results are built from, against stanc's own
    account of the program (``stanc --info``, the stanc of the httpstan wheel)."""
    import json
    import subprocess

    import httpstan

    path = tmp_path / f"{name}.stan"
    path.write_text(ss.program_code(name))
    stanc = Path(httpstan.__file__).parent / "stanc"
    info = json.loads(subprocess.run([str(stanc), "--info", str(path)], check=True,
                                     capture_output=True, text=True).stdout)
    blocks = ("parameters", "transformed parameters", "generated quantities")
    assert ss._output_names(ss.program_code(name)) == [v for b in blocks for v in info[b]]


@pytest.mark.parametrize("expr, value", [
    ("K", 3), ("12", 12), ("prior > 0 ? K : 0", 0), ("prior == 0 ? K : 0", 3),
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("10 - 4 - 3", 3), ("-7 / 2", -3),
    ("7 %/% 2", 3), ("-7 % 3", -1), ("!prior && K >= 3 || 0", 1), ("K != 3", 0),
    ("prior ? 1 : K > 2 ? 2 : 3", 2),
])
def test_size_expressions(expr, value):
    # Stan's integer arithmetic: C++ precedence, division and modulus truncate to zero
    assert ss._eval_size(expr, {"K": 3, "prior": 0}.__getitem__) == value


@pytest.mark.parametrize("expr", ["size(x)", "K +", "K K", "2.5", "(K"])
def test_size_expressions_outside_the_grammar_are_refused(expr):
    with pytest.raises(ValueError, match="cannot evaluate the Stan size expression"):
        ss._eval_size(expr, {"K": 3, "x": 1}.__getitem__)


def test_declared_shapes_use_data_and_transformed_data():
    code = ss.program_code("lnm")  # D = G - 1 is transformed data
    data = {"N": 7, "G": 5, "K": 2}
    assert ss._declared_shape(code, "z", data) == (7, 4)
    assert ss._declared_shape(code, "W_alr", data) == (4, 2)
    assert ss._declared_shape(code, "m_T", data) == ()
    assert ss._declared_shape(ss.program_code("pln"), "tau",
                              {"K": 2, "loadings_prior": 0}) == (0,)
    with pytest.raises(ValueError, match="'total' of Stan variable 'v' is neither"):
        ss._declared_shape("transformed data { array[2] int total; }\n"
                           "parameters { vector[total] v; }", "v", {})
