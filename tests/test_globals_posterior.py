"""Nested Laplace: the globals' Gaussian at the Laplace MAP and draws that integrate over it.

Small simulated pln problems (tens of globals), so the dense Hessian, the Lanczos
low-rank form and an importance-sampling reference on the exact Laplace objective are
all cheap.
"""

import dataclasses

import anndata
import numpy as np
import pytest

import scribe_stan as ss
from scribe_stan.laplace import globals_posterior as gp
from scribe_stan.laplace.nested import MAP_CURVATURE_MIN_CELLS, nested_draws
from scribe_stan.laplace.solver import fit_laplace, objective
from scribe_stan.models import pln

N_CELLS, N_GENES, RANK = 120, 4, 2


@pytest.fixture(scope="module")
def sol():
    sim = pln.simulate(N_CELLS, N_GENES, RANK, seed=3, lib_target=150.0, sigma_M=0.5)
    return fit_laplace(sim["counts"], RANK, sigma_M=0.5, log_lib=sim["log_lib"], tol=1e-12,
                       newton_tol=1e-12)


@pytest.fixture(scope="module")
def dense(sol):
    return gp.laplace_globals(sol, method="dense")


def _value(sol, theta):
    sol.problem.restore_modes()
    return objective(sol.problem, theta, sol.layout)[0]


def test_hessian_matches_second_differences_of_the_objective(sol, dense):
    """The FD-of-exact-gradient Hessian against second differences of the exact value."""
    theta = dense.theta_hat
    sol.problem.keep_modes()
    h = 2e-3
    rng = np.random.default_rng(0)
    pairs = [(i, i) for i in range(theta.size)] + [tuple(rng.choice(theta.size, 2, False))
                                                   for _ in range(12)]
    got, want = [], []
    for i, j in pairs:
        ei, ej = np.eye(theta.size)[i] * h, np.eye(theta.size)[j] * h
        f = [_value(sol, theta + si * ei + sj * ej) for si in (1, -1) for sj in (1, -1)]
        want.append(-(f[0] - f[1] - f[2] + f[3]) / (4 * h * h))
        got.append(dense.precision_apply(np.eye(theta.size)[j])[i])
    got, want = np.array(got), np.array(want)
    assert np.max(np.abs(got - want)) < 2e-3 * np.max(np.abs(want))
    assert dense.n_floored == 0 and dense.n_unconverged == 0


def test_rotation_is_flat_and_projected_out(sol, dense):
    """g(theta + h q) = g(theta - h q) along the rotation generator; the Gaussian has no
    variance along it."""
    q = gp.rotation_generators(sol.W @ dense.rotation, sol.layout)[:, 0]
    q /= np.linalg.norm(q)
    sol.problem.keep_modes()
    grads = []
    for s in (1, -1):
        sol.problem.restore_modes()
        grads.append(objective(sol.problem, dense.theta_hat + s * 1e-3 * q, sol.layout)[1])
    hq = (grads[0] - grads[1]) / 2e-3
    col = np.array([dense.precision_apply(e) for e in np.eye(q.size)])
    assert np.linalg.norm(hq) < 1e-4 * np.linalg.norm(col)
    assert np.linalg.norm(dense.precision_apply(q)) < 1e-8 * np.linalg.norm(col)


def test_sigma_draws_invariant_to_rotation_of_W(sol, dense):
    R = np.linalg.qr(np.random.default_rng(1).standard_normal((RANK, RANK)))[0]
    rotated = gp.laplace_globals(dataclasses.replace(sol, W=sol.W @ R), method="dense")
    sigma = []
    for post in (dense, rotated):
        theta, _ = post.draw(200, np.random.default_rng(7))
        draws = [post.unpack(t) for t in theta]
        sigma.append(np.array([W @ W.T + np.diag(d) for _, W, d, _ in draws]))
    np.testing.assert_allclose(sigma[1], sigma[0], rtol=1e-5, atol=1e-7)
    # and the draws of W come back in each fit's own rotation
    np.testing.assert_allclose(rotated.unpack(rotated.theta_hat)[1], sol.W @ R, atol=1e-10)


def test_lowrank_matches_dense(sol, dense):
    m = dense.size - dense.rotations.shape[1]
    full = gp.laplace_globals(sol, method="lowrank", rank=m - 1, tol=1e-8)
    C, Cl = dense.covariance(), full.covariance()
    # all but the eigenpair nearest the block preconditioner (lam closest to 1)
    assert np.max(np.abs(Cl - C)) < 0.02 * np.max(np.abs(C))
    ratio = np.sqrt(np.diag(gp.laplace_globals(sol, method="lowrank", rank=m // 2)
                            .covariance()) / np.diag(C))
    assert 0.6 < np.median(ratio) <= 1.05


@pytest.mark.xfail(reason="measured: the importance-sampling reference on the exact Laplace "
                   "objective has ESS 5 of 1000 on this problem (log d / Sigma_gg of weakly "
                   "determined genes are far from Gaussian in (W, log d)), so the Gaussian "
                   "does not yet match it in moments; see README", strict=False)
def test_nested_draws_match_the_exact_laplace_posterior(sol, dense):
    """Moments of the Gaussian against importance sampling of the exact Laplace
    objective (proposal: the Gaussian 1.5 times wider), for the well-determined means
    mu and for the per-cell latents drawn over the globals.

    Known gap (README): the variance components (log d, Sigma's diagonal) of weakly
    determined genes are not Gaussian in these coordinates (the ridge ``W_g^2 + d_g``
    is curved), and there the Gaussian is too wide; they are not asserted here.
    """
    S = 1000
    wide = dataclasses.replace(dense, lam=dense.lam / 1.5**2)
    out = nested_draws(sol, wide, S, np.random.default_rng(2), values=True)
    log_w = out["laplace"].sum(axis=1) + out["log_prior"] - out["log_q"]
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    assert np.all(out["converged"] == 1.0)
    ref_mean = w @ out["mu"]
    ref_sd = np.sqrt(w @ (out["mu"] - ref_mean) ** 2)
    gauss = np.array([dense.unpack(t)[0] for t in dense.draw(4000,
                                                             np.random.default_rng(3))[0]])
    ess = 1 / np.sum(w**2)
    smd = (gauss.mean(axis=0) - ref_mean) / ref_sd
    ratio = gauss.std(axis=0) / ref_sd
    print(f"ESS {ess:.0f} of {S}; mu smd {np.round(smd, 2)}; sd ratio {np.round(ratio, 2)}")
    assert np.max(np.abs(smd)) < 0.3
    assert np.all(np.abs(np.log(ratio)) < np.log(1.3))
    # per-cell latents: the importance-weighted spread of x over the globals
    x = out["x"][:, :30].reshape(S, -1)
    x_sd_ref = np.sqrt(w @ (x - w @ x) ** 2)
    nested = nested_draws(sol, dense, S, np.random.default_rng(4))["x"][:, :30]
    x_ratio = nested.reshape(S, -1).std(axis=0) / x_sd_ref
    print(f"x sd ratio median {np.median(x_ratio):.3f}")
    assert 0.85 < np.median(x_ratio) < 1.15
    # and the globals' uncertainty widens the per-cell draws
    sol.problem.modes(sol.mu, sol.W, sol.d)
    point = sol.problem.sample(sol.mu, sol.W, sol.d, S, np.random.default_rng(5))["x"]
    assert np.median(nested.reshape(S, -1).std(axis=0)
                     / point[:, :30].reshape(S, -1).std(axis=0)) > 1.0


def test_one_newton_step_lands_near_each_cells_mode(sol, dense):
    """Nested draws take one Newton step from the MAP modes at each drawn set of
    globals: against the converged modes there, the error is a small fraction of the
    cell's posterior sd (second order in the mode's shift), and two steps shrink it
    quadratically."""
    pr = sol.problem
    pr.modes(sol.mu, sol.W, sol.d)
    pr.keep_modes()
    x_map = pr.x.copy()
    try:
        worst, typical, shift = {1: 0.0, 2: 0.0}, {1: [], 2: []}, []
        for theta in dense.draw(10, np.random.default_rng(7))[0]:
            mu, W, d, _ = dense.unpack(theta)
            pr.restore_modes()
            pr.modes(mu, W, d)
            x_conv = pr.x.copy()
            sd = pr.sample(mu, W, d, 400, np.random.default_rng(8))["x"].std(axis=0)
            shift.append(np.median(np.abs(x_conv - x_map) / sd))
            for steps in worst:
                pr.restore_modes()
                pr.modes(mu, W, d, steps=steps)
                err = np.abs(pr.x - x_conv) / sd
                worst[steps] = max(worst[steps], np.max(err))
                typical[steps].append(np.median(err))
    finally:
        pr.restore_modes()
        pr.sync_modes()
    print(f"median shift {np.median(shift):.3f} sd; error 1 step: median "
          f"{np.median(typical[1]):.1e}, worst {worst[1]:.2e}; 2 steps: worst "
          f"{worst[2]:.2e} sd")
    assert np.median(shift) > 0.05  # the globals' draws do move the modes
    assert np.median(typical[1]) < 0.01 and worst[1] < 0.25
    assert worst[2] < 0.1 * worst[1]


@pytest.fixture(scope="module")
def fit():
    sim = pln.simulate(80, 4, RANK, seed=5, lib_target=150.0)
    adata = anndata.AnnData(sim["counts"].astype(np.float32))
    adata.obs_names = [f"c{i}" for i in range(80)]
    adata.var_names = [f"g{i}" for i in range(4)]
    return ss.fit(adata, model="pln", rank=RANK, progress=False)


def test_to_datatree_point_unchanged_and_laplace_draws_globals(fit):
    tree = fit.to_datatree(draws=6, seed=3)
    smp = fit.solution.problem.sample(fit.mu, fit.W, fit.d, 6, np.random.default_rng(3),
                                      genes=np.arange(4))
    np.testing.assert_array_equal(tree["posterior"]["x"].values[0], smp["x"])
    np.testing.assert_array_equal(tree["posterior"]["mu"].values[0, 5], fit.mu)
    assert tree.attrs["globals"] == "point"
    nested = fit.to_datatree(draws=30, seed=3, globals="laplace")
    post = nested["posterior"]
    assert post["Sigma"].shape == (1, 30, 4, 4) and post["x"].shape == (1, 30, 80, 4)
    assert np.all(post["mu"].std("draw") > 0) and np.all(post["Sigma"].std("draw") > 0)
    assert np.isfinite(nested["sample_stats"]["lp"]).all()
    assert np.isfinite(nested["sample_stats"]["lp_approx"]).all()
    # the fit's modes are left at the MAP
    np.testing.assert_allclose(fit.solution.problem.x, fit.x_hat, atol=1e-8)
    with pytest.raises(ValueError, match="globals.*point.*laplace"):
        fit.to_datatree(draws=2, globals="full")
    with pytest.raises(ValueError, match="allowed"):
        fit.globals_posterior(method="exact")


def test_posterior_predictive_with_laplace_globals(fit):
    for level in ("laplace", "marginal"):
        tree = ss.posterior_predictive(fit, level=level, draws=5, globals="laplace")
        assert tree["posterior_predictive"]["counts"].shape == (1, 5, 80, 4)
        assert tree.attrs["globals"] == "laplace"
    with pytest.raises(ValueError, match="globals='point'"):
        ss.posterior_predictive(fit, level="map", draws=2, globals="laplace")


class _ZeroNormals:
    """An rng whose standard normals are all 0: draws sit at the Gaussians' means."""

    def standard_normal(self, shape):
        return np.zeros(shape)


@pytest.mark.parametrize("model", ["pln", "nbln"])
def test_map_curvature_step_against_dense_linear_algebra(model):
    """``sample_shifted`` (nested draws with the Hessian held at the MAP): with zero
    normals each draw is the shifted mode ``z_hat + (-H)^{-1} grad f_s(z_hat)``, scored
    under the drawn globals; against the dense G+1 system, the exact log joint at the
    drawn globals, and the dense log determinant."""
    sim = pln.simulate(60, 5, RANK, seed=11, lib_target=150.0, sigma_M=0.5)
    sol = fit_laplace(sim["counts"], RANK, model=model, sigma_M=0.5, log_lib=sim["log_lib"],
                      tol=1e-12, newton_tol=1e-12)
    post = gp.laplace_globals(sol, method="dense")
    pr = sol.problem
    pr.modes(sol.mu, sol.W, sol.d, log_r=sol.log_r)
    glob = [post.unpack(t) for t in post.draw(3, np.random.default_rng(1))[0]]
    drawn = {"mu": np.stack([g[0] for g in glob]), "W": np.stack([g[1] for g in glob]),
             "d": np.stack([g[2] for g in glob])}
    if sol.log_r is not None:
        drawn["log_r"] = np.stack([g[3] for g in glob])
    out = pr.sample_shifted(sol.mu, sol.W, sol.d, drawn, _ZeroNormals(), log_r=sol.log_r)
    u, x_hat, eta_hat = np.asarray(sim["counts"], float), pr.x.copy(), pr.eta.copy()
    G = u.shape[1]
    phi_map = 0.0 if sol.log_r is None else np.exp(-sol.log_r)
    checked = 0
    for s, (mu, W, d, log_r) in enumerate(glob):
        phi = 0.0 if log_r is None else np.exp(-log_r)
        prec_map = np.linalg.inv(sol.W @ sol.W.T + np.diag(sol.d))
        prec_s = np.linalg.inv(W @ W.T + np.diag(d))
        for c in range(u.shape[0]):
            m = np.exp(x_hat[c] - eta_hat[c])
            score = (u[c] - m) / (1 + phi * m)
            lam = m * (1 + phi_map * u[c]) / (1 + phi_map * m) ** 2
            grad = np.append(score - prec_s @ (x_hat[c] - mu),
                             -score.sum() - (eta_hat[c] - pr.a[c]) / pr.sigma[c] ** 2)
            H = np.zeros((G + 1, G + 1))
            H[:G, :G] = np.diag(lam) + prec_map
            H[:G, G] = H[G, :G] = -lam
            H[G, G] = lam.sum() + 1 / pr.sigma[c] ** 2
            step = np.linalg.solve(H, grad)
            lpa = -0.5 * (G + 1) * np.log(2 * np.pi) + 0.5 * np.linalg.slogdet(H)[1]
            np.testing.assert_allclose(out["lp_approx"][s, c], lpa, rtol=1e-9, atol=1e-9)
            if eta_hat[c] + step[G] <= 0:  # projected onto eta = 0
                assert out["eta"][s, c] == 0.0
                continue
            checked += 1
            np.testing.assert_allclose(out["x"][s, c], x_hat[c] + step[:G], atol=1e-9)
            np.testing.assert_allclose(out["eta"][s, c], eta_hat[c] + step[G], atol=1e-9)
        np.testing.assert_allclose(out["lp"][s], pr.log_joint(mu, W, d, out["x"][s],
                                                              out["eta"][s], log_r=log_r),
                                   rtol=1e-10)
    assert checked > 100
    assert np.max(np.abs(out["x"] - x_hat)) > 0.01  # the drawn globals move the modes
    np.testing.assert_array_equal(pr.x, x_hat)  # the stored modes are left as they were


def test_map_curvature_draws_match_drawn_curvature_draws():
    """pln at a scale where "auto" takes it: nested draws with the Hessian held at the
    MAP against draws that re-form it at each drawn set of globals give the same
    per-cell moments within Monte Carlo error."""
    n = MAP_CURVATURE_MIN_CELLS
    sim = pln.simulate(n, 8, RANK, seed=4, lib_target=150.0, sigma_M=0.5)
    big = fit_laplace(sim["counts"], RANK, sigma_M=0.5, log_lib=sim["log_lib"], tol=1e-10)
    post = gp.laplace_globals(big, method="dense")
    S = 1000
    a = nested_draws(big, post, S, np.random.default_rng(1))  # "auto" -> "map" here
    b = nested_draws(big, post, S, np.random.default_rng(2), curvature="drawn")
    assert np.all(np.isnan(a["converged"]))  # the "map" path: no iterative step
    for key in ("x", "eta"):
        sa, sb = a[key][:, :200].std(axis=0), b[key][:, :200].std(axis=0)
        smd = (a[key][:, :200].mean(axis=0) - b[key][:, :200].mean(axis=0)) / sb
        print(f"{key}: sd ratio median {np.median(sa / sb):.3f}, |smd| median "
              f"{np.median(np.abs(smd)):.3f}")
        assert 0.96 < np.median(sa / sb) < 1.04
        assert np.median(np.abs(smd)) < 0.05  # Monte Carlo: about 0.03 at S = 1000
    with pytest.raises(ValueError, match="curvature must be one of"):
        nested_draws(big, post, 2, np.random.default_rng(0), curvature="hessian")


def test_globals_posterior_without_arguments_reuses_the_latest_gaussian(fit):
    """The draws ask for ``globals_posterior()``; a Gaussian built with other settings
    before is the one they get, and the draws use it."""
    fit._globals_cache.clear()
    default = fit.globals_posterior()
    assert fit.globals_posterior() is default
    other = fit.globals_posterior(step=2e-3)
    assert other is not default and fit.globals_posterior() is other
    drawn = fit._draw_globals(3, np.random.default_rng(0))["mu"]
    mu = {name: np.array([p.unpack(t)[0] for t in p.draw(3, np.random.default_rng(0))[0]])
          for name, p in (("default", default), ("other", other))}
    np.testing.assert_array_equal(drawn, mu["other"])
    assert not np.array_equal(drawn, mu["default"])
