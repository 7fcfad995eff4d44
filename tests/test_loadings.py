"""Loadings priors, W_perp, gauge diagnostics and effective rank (scribe_stan.models.loadings)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import integrate, stats

from scribe_stan.models import loadings as L

SHRINKAGE = ["gaussian", "horseshoe", "neg"]


def _point(G=7, K=3, seed=1):
    rng = np.random.default_rng(seed)
    return 0.5 * rng.standard_normal((G, K)), np.log(rng.uniform(0.1, 2.0, K))


@pytest.mark.parametrize("prior", L.PRIORS)
def test_gradient_matches_finite_differences(prior):
    W, log_tau = _point()
    if prior == "normal":
        log_tau = np.zeros(0)
    _, g_W, g_t = L.log_prior_and_grad(W, log_tau, prior)
    f = lambda W_, t_: L.log_prior_and_grad(W_, t_, prior)[0]  # noqa: E731
    eps = 1e-6
    num_W = np.zeros_like(W)
    for idx in np.ndindex(W.shape):
        e = np.zeros_like(W)
        e[idx] = eps
        num_W[idx] = (f(W + e, log_tau) - f(W - e, log_tau)) / (2 * eps)
    np.testing.assert_allclose(g_W, num_W, rtol=1e-6, atol=1e-7)
    num_t = np.array([(f(W, log_tau + eps * e) - f(W, log_tau - eps * e)) / (2 * eps)
                      for e in np.eye(log_tau.size)])
    np.testing.assert_allclose(g_t, num_t, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("prior", SHRINKAGE)
def test_unit_scales_give_the_iid_normal_density(prior):
    # With tau_k = 1 the columnwise density of W is exactly the iid Normal(0, 1) one.
    W, _ = _point()
    K = W.shape[1]
    value = L.log_prior_and_grad(W, np.zeros(K), prior)[0]
    scale_part = L.log_scale_prior(np.ones(K), prior)[0]
    np.testing.assert_allclose(value - scale_part, stats.norm.logpdf(W).sum(), rtol=1e-12)


@pytest.mark.parametrize("prior", SHRINKAGE)
def test_scale_prior_is_normalized_on_the_floor(prior):
    f = lambda t: np.exp(L.log_scale_prior(np.array([t]), prior)[0])  # noqa: E731
    edges = [L.TAU_MIN, 1e-2, 1.0, 1e2, np.inf]
    total = sum(integrate.quad(f, a, b, limit=500)[0] for a, b in zip(edges, edges[1:]))
    assert total == pytest.approx(1.0, abs=1e-8)


def test_horseshoe_scale_prior_is_half_cauchy():
    tau = np.array([0.01, 0.5, 3.0])
    ref = stats.halfcauchy.logpdf(tau) - stats.halfcauchy.logsf(L.TAU_MIN)
    np.testing.assert_allclose(L.log_scale_prior(tau, "horseshoe")[0], ref.sum(), rtol=1e-12)


def test_neg_scale_prior_is_the_exponential_gamma_mixture():
    # tau^2 | g ~ Exponential(rate g/2), g ~ Gamma(0.5, rate 0.5): integrate g out
    # numerically and compare with the closed-form Lomax used by the code.
    psi = 0.3
    mix = integrate.quad(lambda g: stats.expon.pdf(psi, scale=2 / g)
                         * stats.gamma.pdf(g, 0.5, scale=2.0), 0, np.inf)[0]
    floor = integrate.quad(lambda p: integrate.quad(
        lambda g: stats.expon.pdf(p, scale=2 / g) * stats.gamma.pdf(g, 0.5, scale=2.0),
        0, np.inf)[0], 0, L.TAU_MIN**2)[0]
    density_tau = mix * 2 * np.sqrt(psi) / (1 - floor)
    assert L.log_scale_prior(np.array([np.sqrt(psi)]), "neg")[0] == pytest.approx(
        np.log(density_tau), rel=1e-6)


def test_w_perp_removes_the_capture_direction():
    W, _ = _point()
    shift = np.array([0.3, -1.0, 2.0])
    np.testing.assert_allclose(L.w_perp(W + shift), L.w_perp(W), atol=1e-14)
    np.testing.assert_allclose(L.w_perp(W).mean(axis=0), 0.0, atol=1e-14)
    diag = L.gauge_diagnostics(W + shift)
    G = W.shape[0]
    np.testing.assert_allclose(diag["norm_parallel_by_factor"],
                               np.sqrt(G) * np.abs(W.mean(axis=0) + shift))
    np.testing.assert_allclose(diag["norm_perp"], np.linalg.norm(L.w_perp(W)))
    assert diag["ratio"] == pytest.approx(diag["norm_parallel"] / diag["norm_perp"])


def test_effective_rank_counts_rotated_directions():
    rng = np.random.default_rng(4)
    G = 200
    strong = 0.4 * rng.standard_normal((G, 3))
    W = np.hstack([strong, 1e-3 * rng.standard_normal((G, 5))])
    R = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    assert L.effective_rank(W) == 3
    assert L.effective_rank(W @ R) == 3  # rotation-invariant
    assert L.effective_rank(W + 5.0) == 3  # gauge-invariant
    assert L.effective_rank(W, threshold=1e-5) == 8


def test_bad_prior_name():
    with pytest.raises(ValueError, match="horseshoe"):
        L.check_prior("laplace")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        L.log_prior_and_grad(np.ones((4, 3)), np.zeros(2), "neg")
