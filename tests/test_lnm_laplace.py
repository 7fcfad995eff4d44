"""Laplace solver of lnm / lnmvcp against independent references.

* per-cell modes and Laplace values vs a dense NumPy Newton with the full (G-1) x (G-1)
  Hessian (no Woodbury, no Sherman-Morrison) and the reference log densities of
  :mod:`scribe_stan.models.lnm` (themselves held to Stan in test_lnm_stan.py):
  1e-9 relative on values, 1e-7 absolute on modes;
* outer gradients (composition in both modes; totals of lnm and lnmvcp) vs central
  finite differences: 1e-5 relative to the gradient's scale;
* the capture (eta) block's Laplace value vs a 1-D reference (bounded scalar
  optimizer + finite-difference curvature): 1e-6 relative;
* the near-singular guard: at a huge total with a rare reference (s ~ 4e-6) the
  cancellation-free Sherman-Morrison factor matches det(-H) / det(A) from dense algebra
  to 1e-6 and the kernel's value matches the dense Laplace value;
* recovery of simulated globals, CLR invariance to the reference, and bad inputs.
"""

from __future__ import annotations

import anndata
import numpy as np
import pytest
from scipy import optimize, special, stats

import scribe_stan as ss
from scribe_stan.laplace import lnm_solver
from scribe_stan.models import dispersion, lnm, pln

REF = 2


def _sim(N=12, G=6, K=2, seed=1, **kw):
    return lnm.simulate(N, G, K, ref=REF, seed=seed, **kw)


def _dense_cell(u_all, ref, mu, Sigma):
    """Dense damped Newton on y; returns (Laplace value with all constants, mode)."""
    u_all = np.asarray(u_all, float)
    u, uT, D = np.delete(u_all, ref), u_all.sum(), u_all.size - 1
    P = np.linalg.inv(Sigma)
    _, logdet_S = np.linalg.slogdet(2 * np.pi * Sigma)

    def f(y):
        return (lnm.log_multinomial_cells(u_all[None], y[None], ref)[0]
                - 0.5 * (y - mu) @ P @ (y - mu) - 0.5 * logdet_S)

    def parts(y):
        lg = lnm.logits(y, ref)
        p = np.delete(np.exp(lg - special.logsumexp(lg)), ref)
        return p, uT * (np.diag(p) - np.outer(p, p)) + P

    y = np.log(u + 0.5) - np.log(u_all[ref] + 0.5)
    for _ in range(200):
        p, H = parts(y)
        step = np.linalg.solve(H, u - uT * p - P @ (y - mu))
        t = 1.0
        while f(y + t * step) < f(y) - 1e-13 * abs(f(y)) and t > 1e-10:
            t /= 2
        y = y + t * step
        if np.max(np.abs(t * step)) < 1e-14:
            break
    _, H = parts(y)
    return f(y) + 0.5 * D * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(H)[1], y


def _fd_grad(fun, x, eps=1e-6):
    x = np.asarray(x, float)
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = eps
        out[i] = (fun(x + e) - fun(x - e)) / (2 * eps)
    return out


# --------------------------------------------------------------------------------------
# Composition block
# --------------------------------------------------------------------------------------


def test_full_mode_values_and_modes_match_dense_reference():
    sim = _sim(total_mean=300.0)
    mu, W, d = sim["mu"], sim["W"], sim["d"]
    prob = lnm_solver.CompositionProblem(sim["counts"], REF)
    value = prob.log_marginal(mu, W, d)
    assert prob.converged.all()
    Sigma = W @ W.T + np.diag(d)
    ref = [_dense_cell(u, REF, mu, Sigma) for u in sim["counts"]]
    np.testing.assert_allclose(value, [r[0] for r in ref], rtol=1e-9)
    np.testing.assert_allclose(prob.y, np.array([r[1] for r in ref]), atol=1e-7)


def test_low_rank_mode_matches_dense_reference_in_factor_scores():
    sim = _sim(total_mean=300.0)
    mu, W = sim["mu"], sim["W"]
    K = W.shape[1]
    prob = lnm_solver.CompositionProblem(sim["counts"], REF, mode="low_rank")
    value = prob.log_marginal(mu, W)
    assert prob.converged.all()
    for c, u_all in enumerate(sim["counts"]):
        def negf(z):
            y = mu + W @ z
            return -(lnm.log_multinomial_cells(u_all[None], y[None], REF)[0] - 0.5 * z @ z
                     - 0.5 * K * np.log(2 * np.pi))
        def grad_hess(z):
            lg = lnm.logits(mu + W @ z, REF)
            p = np.delete(np.exp(lg - special.logsumexp(lg)), REF)
            uT = u_all.sum()
            g = W.T @ (np.delete(u_all, REF) - uT * p) - z
            return g, W.T @ (uT * (np.diag(p) - np.outer(p, p))) @ W + np.eye(K)

        # BFGS to the basin, then dense Newton steps to machine precision
        z = optimize.minimize(negf, np.zeros(K), method="BFGS").x
        for _ in range(10):
            g, H = grad_hess(z)
            z = z + np.linalg.solve(H, g)
        _, H = grad_hess(z)
        dense = -negf(z) + 0.5 * K * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(H)[1]
        np.testing.assert_allclose(prob.z[c], z, atol=1e-7)
        np.testing.assert_allclose(value[c], dense, rtol=1e-9)


@pytest.mark.parametrize("mode", ["full", "low_rank"])
def test_composition_gradient_matches_finite_differences(mode):
    sim = _sim(N=8, G=5, total_mean=200.0, seed=3)
    mu, W, d = sim["mu"], sim["W"], sim["d"]
    prob = lnm_solver.CompositionProblem(sim["counts"], REF, mode=mode, newton_tol=1e-14)
    dd = d if mode == "full" else None
    _, g_mu, g_W, g_d = prob.log_marginal(mu, W, dd, grad=True)
    total = lambda m, w, dv: prob.log_marginal(m, w, dv).sum()  # noqa: E731
    checks = [(g_mu, _fd_grad(lambda x: total(x, W, dd), mu)),
              (g_W, _fd_grad(lambda x: total(mu, x, dd), W))]
    if mode == "full":
        checks.append((g_d, _fd_grad(lambda x: total(mu, W, x), d)))
    for analytic, numeric in checks:
        np.testing.assert_allclose(analytic, numeric, rtol=0,
                                   atol=1e-5 * max(1.0, np.abs(numeric).max()))
        assert np.abs(analytic).max() > 1e-2  # a real gradient, not ~0


@pytest.mark.parametrize("mode", ["full", "low_rank"])
def test_outer_objective_gradient_in_log_mean_coordinates(mode):
    # The optimizer moves m = mu + diag(Sigma)/2 (not mu), W and log d; its gradient goes
    # through that change of variables and the prior.
    sim = _sim(N=8, G=5, total_mean=200.0, seed=3)
    K = sim["W"].shape[1]
    prob = lnm_solver.CompositionProblem(sim["counts"], REF, mode=mode, newton_tol=1e-14)
    d = sim["d"] if mode == "full" else None
    theta = lnm_solver._pack(sim["mu"], sim["W"], d)
    mu, W, d_back = lnm_solver._unpack(theta, sim["mu"].size, K, mode)
    np.testing.assert_allclose(mu, sim["mu"], atol=1e-12)  # _pack inverts _unpack
    _, analytic = lnm_solver.composition_objective(prob, theta, K)
    numeric = _fd_grad(lambda t: lnm_solver.composition_objective(prob, t, K)[0], theta)
    np.testing.assert_allclose(analytic, numeric, rtol=0,
                               atol=1e-5 * max(1.0, np.abs(numeric).max()))
    assert np.abs(analytic).max() > 1e-2


def test_renewing_the_scale_at_restarts_reaches_the_same_optimum(monkeypatch):
    sim = lnm.simulate(200, 8, 2, ref=REF, seed=4, total_mean=300.0)
    monkeypatch.setattr(lnm_solver, "RESCALE_FIRST", 10**6)  # one scale throughout
    one_scale = lnm_solver.fit_composition(sim["counts"], REF, 2)
    monkeypatch.setattr(lnm_solver, "RESCALE_FIRST", 3)  # restarts after 3, 9, 21, ...
    renewed = lnm_solver.fit_composition(sim["counts"], REF, 2)
    assert one_scale.success and renewed.success
    assert one_scale.n_iter < 1000 and renewed.n_iter == len(renewed.history)
    assert renewed.n_iter > 9  # it did restart (twice)
    assert abs(renewed.objective - one_scale.objective) < 1e-3
    Sigma = [f.W @ f.W.T + np.diag(f.d) for f in (one_scale, renewed)]
    np.testing.assert_allclose(Sigma[1], Sigma[0], atol=2e-2 * np.abs(Sigma[0]).max())


def test_sherman_morrison_factor_in_the_near_singular_regime():
    # Huge total, nearly flat prior: -H ~ u_T (diag p - p p'), the softmax gauge ridge.
    G, K = 6, 1
    rng = np.random.default_rng(0)
    D = G - 1
    W = 30.0 * rng.standard_normal((D, K))
    d = np.full(D, 400.0)
    mu = np.zeros(D)
    counts = np.array([[2_000_000, 3_000_000, 50, 1_000_000, 4_000_000, 2_500_000]])
    ref = 2  # a rare reference: rho_ref ~ 4e-6, the regime the guard is for
    prob = lnm_solver.CompositionProblem(counts, ref, newton_tol=1e-12)
    value = prob.log_marginal(mu, W, d)
    assert prob.converged.all()
    Sigma = W @ W.T + np.diag(d)
    dense_value, y = _dense_cell(counts[0], ref, mu, Sigma)
    np.testing.assert_allclose(value[0], dense_value, rtol=1e-9)
    lg = lnm.logits(y, ref)
    p = np.delete(np.exp(lg - special.logsumexp(lg)), ref)
    A = np.diag(counts.sum() * p) + np.linalg.inv(Sigma)
    naive = 1.0 - counts.sum() * p @ np.linalg.solve(A, p)
    guarded = np.exp(lg[ref] - special.logsumexp(lg)) + p @ np.linalg.solve(
        A, np.linalg.solve(Sigma, np.ones(D)))
    exact = np.exp(np.linalg.slogdet(A - counts.sum() * np.outer(p, p))[1]
                   - np.linalg.slogdet(A)[1])
    assert guarded > 0
    np.testing.assert_allclose(guarded, exact, rtol=1e-6)
    assert exact < 1e-5  # the near-singular regime: s = det(-H)/det(A) is tiny
    # the naive difference keeps only its absolute (not relative) accuracy
    assert abs(naive - exact) <= 1e-14 * max(1.0, counts.sum() * p @ np.linalg.solve(A, p))


# --------------------------------------------------------------------------------------
# Total-count block
# --------------------------------------------------------------------------------------


def _totals_problem(capture):
    sim = _sim(N=40, capture=capture, total_mean=150.0, seed=5)
    log_lib = np.log(sim["counts"].sum(axis=1)) + 0.2
    return lnm_solver.TotalProblem(sim["counts"].sum(axis=1), capture=capture, log_lib=log_lib,
                                   log_M0=float(log_lib.mean()) + 0.4, sigma_M=0.6)


@pytest.mark.parametrize("capture", [False, True])
def test_totals_gradient_matches_finite_differences(capture):
    prob = _totals_problem(capture)
    theta = np.array([np.log(120.0) + (0.5 if capture else 0.0), np.log(6.0)])
    _, grad = prob.log_marginal(*theta, grad=True)
    numeric = _fd_grad(lambda t: prob.log_marginal(*t).sum(), theta)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


def test_capture_laplace_value_matches_scalar_reference():
    prob = _totals_problem(True)
    log_m, log_r = np.log(120.0) + 0.5, np.log(6.0)
    value = prob.log_marginal(log_m, log_r)
    r = np.exp(log_r)
    interior = np.flatnonzero(prob.eta > 0.05)  # the curvature needs both sides of the mode
    assert interior.size >= 5
    for c in interior[::3]:
        def f(e):
            return (dispersion.nb_logpmf(prob.uT[c], log_m - e, r)
                    + pln.log_capture_prior(np.array([e]), prob.a[c], prob.sigma_M)[0])
        res = optimize.minimize_scalar(lambda e: -f(e), bounds=(0.0, 20.0), method="bounded",
                                       options={"xatol": 1e-12})
        e, h = res.x, 1e-4
        curv = -(f(e + h) - 2 * f(e) + f(e - h)) / h**2
        ref = f(e) + 0.5 * np.log(2 * np.pi) - 0.5 * np.log(curv)
        np.testing.assert_allclose(prob.eta[c], e, atol=1e-6)
        np.testing.assert_allclose(value[c], ref, rtol=1e-6)


# --------------------------------------------------------------------------------------
# Interpretation: ALR vs CLR
# --------------------------------------------------------------------------------------


def test_clr_covariance_is_invariant_to_the_reference_alr_is_not():
    rng = np.random.default_rng(2)
    G = 7
    B = rng.standard_normal((G - 1, G - 1))
    Sigma = B @ B.T + 0.1 * np.eye(G - 1)
    for new_ref in (0, 4, 6):
        T = lnm.reference_change_map(G, REF, new_ref)
        Sigma_new = T @ Sigma @ T.T
        assert np.abs(Sigma_new - Sigma).max() > 0.1
        np.testing.assert_allclose(lnm.clr_covariance(Sigma_new, new_ref),
                                   lnm.clr_covariance(Sigma, REF), atol=1e-12)
    # CLR rows sum to zero and F maps ALR draws to the centred logits
    y = rng.standard_normal((3, G - 1))
    F = lnm.alr_to_clr_map(G, REF)
    lg = lnm.logits(y, REF)
    np.testing.assert_allclose(y @ F.T, lg - lg.mean(axis=1, keepdims=True), atol=1e-12)
    np.testing.assert_allclose(lnm.clr_covariance(Sigma, REF).sum(axis=1), 0.0, atol=1e-12)


def test_low_rank_fit_clr_summaries_do_not_depend_on_the_reference():
    sim = lnm.simulate(300, 6, 1, ref=0, seed=8, total_mean=800.0, d_value=0.0,
                       loading_scale=0.8)
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    fits = [ss.fit(adata, model="lnm", rank=1, mode="low_rank", reference_gene=r,
                   progress=False) for r in (0, 3)]
    assert all(f.converged.all() for f in fits)
    a, b = fits
    assert np.abs(a.Sigma_alr - b.Sigma_alr).max() > 0.1  # ALR coordinates differ
    scale = np.abs(a.Sigma_clr).max()
    # equal up to the (reference-dependent) priors on mu and W: 2% of the scale
    np.testing.assert_allclose(a.Sigma_clr, b.Sigma_clr, atol=0.02 * scale)
    np.testing.assert_allclose(a.mu_clr, b.mu_clr, atol=0.02)


# --------------------------------------------------------------------------------------
# Recovery, API and bad input
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recovery():
    sim = lnm.simulate(400, 8, 2, ref=REF, capture=True, seed=2, total_mean=500.0)
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    fit = ss.fit(adata, model="lnmvcp", rank=2, reference_gene=REF, progress=False,
                 library_size=np.exp(sim["log_lib"]), M0=np.exp(sim["log_M0"]),
                 sigma_M=sim["sigma_M"])
    return sim, adata, fit


def test_recovers_simulated_globals(recovery):
    sim, _, fit = recovery
    assert fit.converged.all() and fit.success
    true = sim["W"] @ sim["W"].T + np.diag(sim["d"])
    scale = np.abs(true).max()
    # 400 cells: sampling error of a covariance entry is about sqrt(2/400) * scale
    assert np.abs(fit.Sigma_alr - true).max() < 0.25 * scale
    assert np.linalg.norm(fit.Sigma_alr - true) < 0.2 * np.linalg.norm(true)
    assert np.abs(fit.mu_alr - sim["mu"]).max() < 0.1
    assert abs(np.log(fit.m_T) - sim["log_m_T"]) < 0.05
    assert np.corrcoef(fit.y_hat.ravel(), sim["y"].ravel())[0, 1] > 0.95


def test_datatree_and_anndata(recovery):
    _, adata, fit = recovery
    before = adata.copy()
    tree = fit.to_datatree(draws=20, seed=1)
    post = tree["posterior"]
    G = adata.n_vars
    assert post["y"].shape == (1, 20, adata.n_obs, G - 1)
    assert list(post["y"].coords["gene_alr"].values) == [
        n for n in adata.var_names if n != fit.reference_gene]
    assert post["Sigma_clr"].shape == (1, 20, G, G)
    assert post["eta"].shape == (1, 20, adata.n_obs)
    assert tree["log_likelihood"]["counts"].shape == (1, 20, adata.n_obs)
    rep = tree["posterior_predictive"]["counts"].values
    assert rep.shape == (1, 20, adata.n_obs, G) and rep.min() >= 0
    assert np.isfinite(tree["sample_stats"]["lp"]).all()
    out = fit.to_anndata(adata)
    assert out.obsm["lnmvcp_clr"].shape == (adata.n_obs, G)
    np.testing.assert_allclose(out.obsm["lnmvcp_clr"].sum(axis=1), 0.0, atol=1e-9)
    assert "lnmvcp" not in adata.uns and np.array_equal(adata.X, before.X)


def test_default_reference_is_a_stable_highly_expressed_gene():
    rng = np.random.default_rng(0)
    counts = rng.poisson([5, 5, 200, 5, 190, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5],
                         size=(100, 20))
    counts[:, 2] = rng.poisson(200 * rng.lognormal(0, 0.8, 100))  # high but unstable
    assert lnm.default_reference(counts) == 4


def test_bad_inputs():
    sim = _sim()
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    with pytest.raises(ValueError, match="unknown reference gene 'nope'"):
        ss.fit(adata, model="lnm", rank=1, reference_gene="nope", progress=False)
    with pytest.raises(ValueError, match="out of range"):
        ss.fit(adata, model="lnm", rank=1, reference_gene=99, progress=False)
    with pytest.raises(ValueError, match="K < G - 1"):
        ss.fit(adata, model="lnm", rank=5, progress=False)
    with pytest.raises(ValueError, match="full, low_rank|'full', 'low_rank'"):
        ss.fit(adata, model="lnm", rank=1, mode="diag", progress=False)
    with pytest.raises(ValueError, match="lnmvcp"):
        ss.fit(adata, model="lnmx", rank=1, progress=False)
    with pytest.raises(ValueError, match="CPU only"):
        ss.fit(adata, model="lnm", rank=1, device="cuda", progress=False)
    with pytest.raises(ValueError, match="at least 3 genes"):
        ss.fit(adata[:, :2].copy(), model="lnm", rank=1, progress=False)


def test_posterior_draws_follow_the_dense_laplace_gaussian():
    sim = _sim(N=3, G=5, total_mean=300.0, seed=9)
    mu, W, d = sim["mu"], sim["W"], sim["d"]
    prob = lnm_solver.CompositionProblem(sim["counts"], REF)
    prob.log_marginal(mu, W, d)
    out = prob.sample(mu, W, d, 4000, np.random.default_rng(0))
    Sigma = W @ W.T + np.diag(d)
    P = np.linalg.inv(Sigma)
    for c, u_all in enumerate(sim["counts"]):
        _, y_hat = _dense_cell(u_all, REF, mu, Sigma)
        lg = lnm.logits(y_hat, REF)
        p = np.delete(np.exp(lg - special.logsumexp(lg)), REF)
        V = np.linalg.inv(u_all.sum() * (np.diag(p) - np.outer(p, p)) + P)
        draws = out["y"][:, c]
        # Monte Carlo: sd of a covariance entry ~ sqrt(2/4000) * scale; allow 5 sd
        tol = 5 * np.sqrt(2 / 4000) * np.abs(V).max()
        np.testing.assert_allclose(np.cov(draws.T), V, atol=tol)
        np.testing.assert_allclose(draws.mean(0), y_hat, atol=5 * np.sqrt(V.diagonal().max() / 4000))
        # densities of the draws: the Gaussian's, and the exact joint given the globals
        np.testing.assert_allclose(out["lp_approx"][:, c],
                                   stats.multivariate_normal(y_hat, V).logpdf(draws), rtol=1e-9)
        exact = (lnm.log_multinomial_cells(np.broadcast_to(u_all, (4000, u_all.size)), draws, REF)
                 + pln.log_latent_prior_cells(draws, mu, W, d))
        np.testing.assert_allclose(out["lp"][:, c], exact, rtol=1e-10)
