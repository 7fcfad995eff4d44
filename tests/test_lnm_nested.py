"""Nested Laplace for lnm / lnmvcp: the globals' Gaussian at the MAP and draws over it.

Small simulated problems (5 genes, K = 1 or 2: 12-16 composition globals), so the dense
Hessian, second differences of the exact objectives and an importance-sampling
reference on the exact Laplace-marginal posterior of the globals are all cheap.
"""

import dataclasses

import anndata
import numpy as np
import pytest

import scribe_stan as ss
from scribe_stan.laplace import globals_posterior as gp
from scribe_stan.laplace import lnm_globals as lg
from scribe_stan.laplace import lnm_solver
from scribe_stan.models import lnm

N_CELLS, N_GENES = 100, 5


def _fit(model, K, seed, N=N_CELLS):
    sim = lnm.simulate(N, N_GENES, K, ref=0, capture=model == "lnmvcp", seed=seed,
                       total_mean=300.0, d_value=0.3, loading_scale=0.7)
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    adata.obs_names = [f"c{i}" for i in range(N)]
    adata.var_names = [f"g{i}" for i in range(N_GENES)]
    kw = {}
    if model == "lnmvcp":
        kw = {"library_size": np.exp(sim["log_lib"]), "M0": np.exp(sim["log_M0"]),
              "sigma_M": sim["sigma_M"]}
    return ss.fit(adata, model=model, rank=K, reference_gene=0, progress=False, **kw)


@pytest.fixture(scope="module")
def fit():
    return _fit("lnmvcp", 1, seed=4)


@pytest.fixture(scope="module")
def post(fit):
    return fit.globals_posterior()


def _comp_value(comp, theta, K):
    comp.problem.restore_modes()
    return lnm_solver.composition_objective(comp.problem, theta, K)[0]


def test_composition_hessian_matches_second_differences(fit, post):
    """The FD-of-exact-gradient Hessian against second differences of the exact
    composition objective (its value, not its gradient)."""
    cp, comp = post.composition, fit.composition
    theta = cp.theta_hat
    P, K = theta.size, comp.W.shape[1]
    comp.problem.keep_modes()
    h = 2e-3
    rng = np.random.default_rng(0)
    pairs = [(i, i) for i in range(P)] + [tuple(rng.choice(P, 2, False)) for _ in range(12)]
    got, want = [], []
    try:
        for i, j in pairs:
            ei, ej = np.eye(P)[i] * h, np.eye(P)[j] * h
            f = [_comp_value(comp, theta + si * ei + sj * ej, K) for si in (1, -1)
                 for sj in (1, -1)]
            want.append(-(f[0] - f[1] - f[2] + f[3]) / (4 * h * h))
            got.append(cp.precision_apply(np.eye(P)[j])[i])
    finally:
        comp.problem.restore_modes()
    got, want = np.array(got), np.array(want)
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"composition Hessian: max error {err:.1e} of the largest entry; "
          f"{cp.n_gradients} gradients")
    assert err < 2e-3
    assert cp.n_floored == 0 and cp.n_unconverged == 0
    assert cp.n_gradients == 2 * P
    # the fit's modes are left at the MAP
    np.testing.assert_allclose(comp.problem.y, fit.y_hat, atol=1e-8)


def test_totals_hessian_matches_second_differences(fit, post):
    tp, total = post.totals, fit.totals
    theta = tp.theta_hat
    eta0 = total.problem.eta.copy()

    def value(t):
        total.problem.eta = eta0.copy()
        return lg._totals_value_grad(total.problem, t)[0]

    h = 1e-3
    A = np.empty((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h, np.eye(2)[j] * h
            A[i, j] = -(value(theta + ei + ej) - value(theta + ei - ej)
                        - value(theta - ei + ej) + value(theta - ei - ej)) / (4 * h * h)
    total.problem.eta = eta0
    got = np.linalg.inv(tp.covariance)
    print(f"totals precision {got.ravel()} vs second differences {A.ravel()}")
    np.testing.assert_allclose(got, A, rtol=1e-3, atol=1e-3 * np.abs(A).max())


def test_rotation_is_projected_out_and_sigma_draws_are_invariant():
    """K = 2: the rotation direction W A is flat in the exact objective, the Gaussian has
    no precision (and no variance) along it, and the Sigma_alr draws do not depend on
    the rotation the fit's W happens to be in."""
    fit2 = _fit("lnm", 2, seed=6, N=60)
    comp = fit2.composition
    post = lg.composition_globals(comp, method="dense")
    q = gp.rotation_generators(comp.W @ post.rotation, post.layout)[:, 0]
    q /= np.linalg.norm(q)
    comp.problem.keep_modes()
    g = []
    for s in (1, -1):
        comp.problem.restore_modes()
        g.append(lnm_solver.composition_objective(comp.problem, post.theta_hat + s * 1e-3 * q,
                                                  2)[1])
    comp.problem.restore_modes()
    col = np.array([post.precision_apply(e) for e in np.eye(q.size)])
    assert np.linalg.norm((g[0] - g[1]) / 2e-3) < 1e-4 * np.linalg.norm(col)
    assert np.linalg.norm(post.precision_apply(q)) < 1e-8 * np.linalg.norm(col)
    R = np.linalg.qr(np.random.default_rng(1).standard_normal((2, 2)))[0]
    rotated = lg.composition_globals(dataclasses.replace(comp, W=comp.W @ R), method="dense")
    sigma = []
    for p in (post, rotated):
        theta, _ = p.draw(200, np.random.default_rng(7))
        draws = [p.unpack(t) for t in theta]
        sigma.append(np.array([W @ W.T + np.diag(d) for _, W, d, _ in draws]))
    np.testing.assert_allclose(sigma[1], sigma[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(rotated.unpack(rotated.theta_hat)[1], comp.W @ R, atol=1e-10)


def _weighted(w, x):
    m = w @ x
    return m, np.sqrt(w @ (x - m) ** 2)


def test_nested_draws_match_importance_sampling_of_the_exact_posterior(fit, post):
    """Globals' and per-cell moments of the nested draws against self-normalized
    importance sampling of the exact Laplace-marginal posterior of the composition
    globals (``exp`` of the exact objective plus the ``log d`` Jacobian; proposal: the
    Gaussian 1.2 times wider: for an exactly Gaussian
    target that keeps 1 / 1.05^12 = 55% of the draws as ESS; 1.5 would keep 11%), each cell's y drawn from its Laplace Gaussian at the
    converged mode of each proposed set of globals."""
    S = 300
    wide = dataclasses.replace(post, composition=dataclasses.replace(
        post.composition, lam=post.composition.lam / 1.2**2))
    ref = lg.nested_draws(fit.composition, fit.totals, wide, S, np.random.default_rng(2),
                          values=True)
    assert np.all(ref["converged"] == 1.0)
    log_w = ref["laplace"].sum(axis=1) + ref["log_prior"] - ref["log_q"]
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w**2)
    out = lg.nested_draws(fit.composition, fit.totals, post, S, np.random.default_rng(3))
    # rotation-invariant globals: mu_alr and the diagonal of Sigma_alr
    def glob(o):
        return np.hstack([o["mu"], np.sum(o["W"] ** 2, axis=2) + o["d"]])

    m_ref, sd_ref = _weighted(w, glob(ref))
    g = glob(out)
    smd = (g.mean(axis=0) - m_ref) / sd_ref
    ratio = g.std(axis=0) / sd_ref
    se = np.sqrt(1.0 / S + 1.0 / ess)  # MC error of a standardized mean difference
    print(f"ESS {ess:.0f} of {S} (se {se:.3f}); globals smd {np.round(smd, 3)}; "
          f"sd ratio {np.round(ratio, 3)}")
    assert ess > 0.15 * S
    assert np.max(np.abs(smd)) < 0.1 + 4 * se
    assert np.max(np.abs(np.log(ratio))) < 0.1 + 4 * se
    # per-cell latents over the globals
    y_ref = ref["y"].reshape(S, -1)
    y = out["y"].reshape(S, -1)
    m_ref, sd_ref = _weighted(w, y_ref)
    smd_y = (y.mean(axis=0) - m_ref) / sd_ref
    ratio_y = y.std(axis=0) / sd_ref
    print(f"y: |smd| median {np.median(np.abs(smd_y)):.3f} max {np.max(np.abs(smd_y)):.3f}; "
          f"sd ratio median {np.median(ratio_y):.3f} range {ratio_y.min():.3f}-"
          f"{ratio_y.max():.3f}")
    assert np.median(np.abs(smd_y)) < 0.675 * se + 0.05
    assert abs(np.log(np.median(ratio_y))) < 0.05
    assert np.max(np.abs(smd_y)) < 5 * se + 0.1


def test_totals_gaussian_matches_grid_posterior(fit, post):
    """Mean and sd of (log m_T, log r_T) under the Gaussian against a 41 x 41 grid
    quadrature of the exact (Laplace-in-eta) totals posterior over +-6 Gaussian sds
    (its curvature at the MAP is held to second differences in
    test_totals_hessian_matches_second_differences; this measures the Gaussian's
    error against the posterior's shape)."""
    tp, total = post.totals, fit.totals
    eta0 = total.problem.eta.copy()
    z = np.linspace(-6, 6, 41)
    pts = tp.mean + np.stack(np.meshgrid(z, z, indexing="ij"), -1).reshape(-1, 2) @ tp.chol.T
    logp = []
    for t in pts:
        total.problem.eta = eta0.copy()
        logp.append(lg._totals_value_grad(total.problem, t)[0])
    total.problem.eta = eta0
    w = np.exp(np.array(logp) - max(logp))
    w /= w.sum()
    m_ref, sd_ref = _weighted(w, pts)
    smd = (tp.mean - m_ref) / sd_ref
    ratio = np.sqrt(np.diag(tp.covariance)) / sd_ref
    print(f"totals: smd {np.round(smd, 3)}, sd ratio {np.round(ratio, 3)}")
    # log m_T is close to Gaussian (measured: smd 0.03, sd ratio 1.004). log r_T of 100
    # cells is skewed (measured: the Gaussian's mean 0.28 grid sds high, its sd 0.81 of
    # the grid's): the Laplace approximation's own error, O(1 / sqrt(N)); the grid is
    # deterministic, so these bounds hold that measurement, not Monte Carlo noise.
    assert abs(smd[0]) < 0.1 and abs(np.log(ratio[0])) < 0.05
    assert abs(smd[1]) < 0.35 and 0.75 < ratio[1] < 1.1


def test_one_newton_step_lands_near_each_cells_mode(fit, post):
    """One Newton step from the MAP modes at drawn globals against the converged modes
    there, in units of each cell's posterior sd."""
    comp = fit.composition
    pr, cp = comp.problem, post.composition
    pr.modes(comp.mu, comp.W, comp.d)
    pr.keep_modes()
    y_map = pr.y.copy()
    try:
        err, shift = [], []
        for theta in cp.draw(4, np.random.default_rng(7))[0]:
            mu, W, d, _ = cp.unpack(theta)
            pr.restore_modes()
            pr.modes(mu, W, d)
            y_conv = pr.y.copy()
            sd = pr.sample(mu, W, d, 200, np.random.default_rng(8))["y"].std(axis=0)
            shift.append(np.abs(y_conv - y_map) / sd)
            pr.restore_modes()
            pr.modes(mu, W, d, steps=1)
            err.append(np.abs(pr.y - y_conv) / sd)
    finally:
        pr.restore_modes()
    err, shift = np.array(err), np.array(shift)
    print(f"mode shift median {np.median(shift):.3f} sd; one-step error median "
          f"{np.median(err):.1e}, worst {err.max():.2e} sd")
    assert np.median(shift) > 0.05
    assert np.median(err) < 0.01 and err.max() < 0.1


def test_to_datatree_point_unchanged_laplace_draws_globals(fit):
    tree = fit.to_datatree(draws=5, seed=3)
    rng = np.random.default_rng(3)  # the point path's draws, in its order
    smp = fit.composition.problem.sample(fit.mu_alr, fit.W_alr, fit.composition.d, 5, rng)
    eta, _, lp_tot, _ = fit.totals.problem.sample(fit.totals.log_m_T, fit.totals.log_r_T,
                                                  5, rng)
    post = tree["posterior"]
    np.testing.assert_array_equal(post["y"].values[0], smp["y"])
    np.testing.assert_array_equal(post["eta"].values[0], eta)
    np.testing.assert_array_equal(tree["sample_stats"]["lp"].values[0],
                                  (smp["lp"] + lp_tot).sum(axis=1))
    np.testing.assert_array_equal(post["mu_alr"].values[0, 4], fit.mu_alr)
    np.testing.assert_array_equal(post["r_T"].values[0], np.full(5, fit.r_T))
    assert tree.attrs["globals"] == "point"
    eta_hat = fit.eta_hat.copy()
    nested = fit.to_datatree(draws=20, seed=3, globals="laplace")
    post = nested["posterior"]
    N, G = fit.data.counts.shape
    assert post["y"].shape == (1, 20, N, G - 1) and post["Sigma_clr"].shape == (1, 20, G, G)
    for name in ("mu_alr", "Sigma_alr", "d_alr", "mu_clr", "m_T", "r_T", "eta"):
        assert np.all(post[name].std("draw") > 0), name
    assert np.isfinite(nested["sample_stats"]["lp"]).all()
    assert np.isfinite(nested["sample_stats"]["lp_approx"]).all()
    assert nested.attrs["globals"] == "laplace"
    # the fit's modes are left at the MAP
    np.testing.assert_allclose(fit.composition.problem.y, fit.y_hat, atol=1e-8)
    np.testing.assert_array_equal(fit.totals.problem.eta, eta_hat)
    with pytest.raises(ValueError, match="globals.*point.*laplace"):
        fit.to_datatree(draws=2, globals="full")
    with pytest.raises(ValueError, match="allowed"):
        fit.globals_posterior(method="exact")
