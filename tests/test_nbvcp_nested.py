"""Nested Laplace for nbvcp: the Gaussian of the globals (m, log_r) at the Laplace MAP,
and per-cell eta draws that integrate over it (``NbvcpFit.to_datatree(globals=
"laplace")``).

One small simulation (24 cells x 4 genes, library 200), so the globals are uncertain,
the dense finite-difference Hessian costs 16 gradients, and importance sampling of the
exact Laplace-marginal posterior of the globals is a cheap, independent reference.
"""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pytest
from scipy import stats

import scribe_stan as ss
from scribe_stan.laplace import nbvcp as lap
from scribe_stan.laplace import nbvcp_nested as nn
from scribe_stan.models import nbvcp, pln

N_CELLS, N_GENES = 24, 4


@pytest.fixture(scope="module")
def sim():
    return nbvcp.simulate(N_CELLS, N_GENES, seed=8, lib_target=200.0, sigma_M=0.5)


@pytest.fixture(scope="module")
def fit(sim):
    adata = ad.AnnData(sim["counts"].astype(np.float32))
    adata.obs_names = [f"c{i}" for i in range(N_CELLS)]
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    return ss.fit(adata, model="nbvcp", method="laplace", sigma_M=0.5, progress=False,
                  tol=1e-13)


@pytest.fixture(scope="module")
def dense(fit):
    return fit.globals_posterior(method="dense")


def _value(fit, theta):
    """Exact Laplace objective F(theta), from the MAP modes."""
    problem = fit.solution.problem
    problem.eta[:] = fit.eta_hat
    return lap.objective(problem, theta)[0]


def test_hessian_matches_second_differences_of_the_objective(fit, dense):
    """The precision (FD of the exact gradient, Schur-whitened) against second
    differences of the exact objective's *value*, diagonal and off-diagonal entries;
    and it differs from the Schur complement of gaussian_moments (which lacks the
    -1/2 log H_c terms)."""
    theta = dense.theta_hat
    P = theta.size
    eta_map = fit.eta_hat.copy()
    # building the Gaussian left the MAP modes in the problem
    np.testing.assert_array_equal(fit.solution.problem.eta, eta_map)
    h = 2e-3
    rng = np.random.default_rng(0)
    pairs = [(i, i) for i in range(P)] + [tuple(rng.choice(P, 2, False)) for _ in range(8)]
    got, want = [], []
    for i, j in pairs:
        ei, ej = np.eye(P)[i] * h, np.eye(P)[j] * h
        f = [_value(fit, theta + si * ei + sj * ej) for si in (1, -1) for sj in (1, -1)]
        want.append(-(f[0] - f[1] - f[2] + f[3]) / (4 * h * h))
        got.append(dense.precision_apply(np.eye(P)[j])[i])
    got, want = np.array(got), np.array(want)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"max |A - A_fd2| / max |A| = {err:.1e}")
    assert err < 2e-3
    assert dense.n_floored == 0 and dense.n_unconverged == 0
    assert dense.whitening == "schur" and dense.n_gradients == 2 * P
    fit.solution.problem.log_marginal(fit.m, fit.log_r)  # back to the MAP modes
    # the log-curvature terms matter for log_r at this size
    mom = fit.posterior_moments()
    ratio = dense.sd()[N_GENES:] / mom["log_r"][1]
    print(f"log_r sd exact-Hessian / Schur: {np.round(ratio, 3)}")
    assert np.max(np.abs(ratio - 1)) > 0.02


def test_lowrank_matches_dense(fit, dense):
    """Lanczos with 2G - 1 eigenpairs (the bottom 6 and the top one of 8) gives the
    dense Gaussian with the one eigenpair it leaves out set to 1."""
    full = nn.nbvcp_globals(fit.solution, method="lowrank", rank=2 * N_GENES - 1, tol=1e-10)
    keep = np.r_[0:6, 7]
    np.testing.assert_allclose(np.sort(full.lam), dense.lam[keep], rtol=1e-4)
    C = dataclasses.replace(dense, U=dense.U[:, keep], lam=dense.lam[keep]).covariance()
    assert np.max(np.abs(full.covariance() - C)) < 1e-3 * np.max(np.abs(C))
    C = dense.covariance()
    # log density of the draws is the Gaussian's (normalized)
    theta, log_q = dense.draw(5, np.random.default_rng(1))
    ref = stats.multivariate_normal(dense.mean, C).logpdf(theta)
    np.testing.assert_allclose(log_q, ref, rtol=1e-8)
    np.testing.assert_allclose(dense.log_density(theta), ref, rtol=1e-8)
    with pytest.raises(ValueError, match="allowed"):
        fit.globals_posterior(method="exact")


@pytest.fixture(scope="module")
def importance(fit, dense):
    """Self-normalized importance sampling of exp F(theta) q_c(eta | theta): proposal
    the Gaussian 1.5 times wider; returns weights and the proposal's draws."""
    S = 1500
    wide = dataclasses.replace(dense, lam=dense.lam / 1.5**2)
    out = nn.nested_draws(fit.solution, wide, S, np.random.default_rng(2))
    log_w = out["laplace"].sum(axis=1) + out["log_prior"] - out["log_q"]
    w = np.exp(log_w - log_w.max())
    return w / w.sum(), out


def test_nested_globals_match_importance_sampling(fit, importance):
    """Per-global mean and sd of the nested draws (via to_datatree) against the IS
    reference of the exact Laplace-marginal posterior of (m, log_r).

    Monte Carlo error: the IS mean has se ~ sd / sqrt(ESS) and the sd a relative se
    ~ 1 / sqrt(2 ESS); measured ESS 378 of 1500, so se 0.05 sd and 3.6%; the 2000
    nested draws add 1.6% to the sd. Measured: m smd within 0.12, sd ratios 0.89-0.98
    (asserted: 0.2 and 15%, about 4 se). log_r: smd up to 0.25, sd ratios 0.76-1.02:
    beyond MC error, the Gaussian's own error (24 cells: log_r's posterior is skewed;
    the worst gene is the one where the log-curvature terms move the sd most); asserted
    within 0.35 and 35% (ratio >= 0.74).
    """
    w, out = importance
    ess = 1.0 / np.sum(w**2)
    theta = np.hstack([out["m"], out["log_r"]])
    ref_mean = w @ theta
    ref_sd = np.sqrt(w @ (theta - ref_mean) ** 2)
    tree = fit.to_datatree(draws=2000, seed=4, globals="laplace")
    post = tree["posterior"]
    got = np.hstack([post["m"].values[0], np.log(post["r"].values[0])])
    smd = (got.mean(axis=0) - ref_mean) / ref_sd
    ratio = got.std(axis=0) / ref_sd
    print(f"ESS {ess:.0f} of {w.size}; smd {np.round(smd, 3)}; sd ratio {np.round(ratio, 3)}")
    assert ess > 200
    G = N_GENES
    assert np.max(np.abs(smd[:G])) < 0.2 and np.all(np.abs(np.log(ratio[:G])) < np.log(1.15))
    assert np.max(np.abs(smd[G:])) < 0.35 and np.all(np.abs(np.log(ratio[G:])) < np.log(1.35))


def test_nested_eta_matches_importance_sampling_and_widens(fit, importance):
    """Per-cell eta sd of the nested draws against the IS reference, and wider than the
    point draws by the reference's widening (the ratio nested / point tracks
    reference / point).

    MC error per cell: 3.6% (IS sd, ESS 378) and 1.6% (2000 nested draws), ~4% in all;
    measured ratios: median 1.008, range 0.92-1.12 over 24 cells (asserted: median
    within 5%, every cell within 15%, about 3.5 se); widening nested / point median
    1.096 against 1.100 for the reference (asserted within 5%)."""
    w, out = importance
    eta = out["eta"]
    ref_sd = np.sqrt(w @ (eta - w @ eta) ** 2)
    nested = fit.to_datatree(draws=2000, seed=5, globals="laplace")["posterior"]["eta"]
    point = fit.to_datatree(draws=2000, seed=5)["posterior"]["eta"]
    sd_n, sd_p = nested.values[0].std(axis=0), point.values[0].std(axis=0)
    ratio = sd_n / ref_sd
    widen_ref, widen = ref_sd / sd_p, sd_n / sd_p
    print(f"eta sd nested/IS: median {np.median(ratio):.3f}, range "
          f"[{ratio.min():.3f}, {ratio.max():.3f}]; widening nested/point median "
          f"{np.median(widen):.3f}, IS/point {np.median(widen_ref):.3f}")
    assert 0.95 < np.median(ratio) < 1.05
    assert np.all(np.abs(np.log(ratio)) < np.log(1.15))
    assert np.median(widen) > 1.05
    assert np.abs(np.median(widen) / np.median(widen_ref) - 1) < 0.05


def test_point_unchanged_and_laplace_tree(sim, fit):
    """globals="point" is the point draws (the same RNG stream as before); "laplace"
    stores drawn globals, lp/lp_approx with the globals' prior and Gaussian, and leaves
    the fit's modes in place; an unknown globals value is refused."""
    tree = fit.to_datatree(draws=6, seed=3)
    rng = np.random.default_rng(3)
    mean, sd = fit.eta_hat, fit.eta_sd
    eta = stats.truncnorm.rvs(-mean / sd, np.inf, loc=mean, scale=sd, size=(6, N_CELLS),
                              random_state=rng)
    np.testing.assert_array_equal(tree["posterior"]["eta"].values[0], eta)
    np.testing.assert_array_equal(tree["posterior"]["m"].values[0, 5], fit.m)
    assert tree.attrs["globals"] == "point"
    eta_map = fit.solution.problem.eta.copy()
    nested = fit.to_datatree(draws=8, seed=3, globals="laplace")
    assert nested.attrs["globals"] == "laplace"
    post = nested["posterior"]
    assert post["m"].shape == (1, 8, N_GENES) and post["eta"].shape == (1, 8, N_CELLS)
    assert np.all(post["m"].std("draw") > 0) and np.all(post["r"].std("draw") > 0)
    assert np.all(post["eta"].values >= 0)
    np.testing.assert_array_equal(fit.solution.problem.eta, eta_map)
    # lp: exact joint log density of each draw, globals' prior included
    counts = sim["counts"]
    a = pln.capture_prior_mean(np.log(counts.sum(axis=1)), np.log(pln.M0_DEFAULT))
    m, log_r = post["m"].values[0], np.log(post["r"].values[0])
    lp = [nbvcp.log_lik_cells(counts, m[s], log_r[s], post["eta"].values[0, s]).sum()
          + pln.log_capture_prior(post["eta"].values[0, s], a, 0.5).sum()
          + nbvcp.log_prior_globals(m[s], log_r[s]) for s in range(8)]
    np.testing.assert_allclose(nested["sample_stats"]["lp"].values[0], lp, rtol=1e-9)
    ll = [nbvcp.log_lik_cells(counts, m[s], log_r[s], post["eta"].values[0, s])
          for s in range(8)]
    np.testing.assert_allclose(nested["log_likelihood"]["counts"].values[0], ll, rtol=1e-9)
    assert np.isfinite(nested["sample_stats"]["lp_approx"]).all()
    assert nested["posterior_predictive"]["counts"].shape == (1, 8, N_CELLS, N_GENES)
    with pytest.raises(ValueError, match="globals.*point.*laplace"):
        fit.to_datatree(draws=2, globals="full")
