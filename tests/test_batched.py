"""The batched (BLAS) Laplace path against the per-cell Numba kernels, and the Laplace-EM
M-step against a dense expected complete-data objective maximized numerically."""

import numpy as np
import pytest
from scipy import optimize, sparse

from scribe_stan.laplace import cpu, em
from scribe_stan.laplace import reference as ref
from scribe_stan.laplace.solver import (LaplaceProblem, inverse_dispersion, pair_products,
                                        shared_factor)
from scribe_stan.models import pln


def _case(seed, N=150, G=30, K=3, nb=False):
    sim = pln.simulate(N, G, K, seed=seed, sigma_M=0.5, lib_target=300.0)
    rng = np.random.default_rng(seed + 7)
    mu = sim["mu"] + 0.3 * rng.standard_normal(G)
    W = sim["W"] + 0.2 * rng.standard_normal((G, K))
    d = sim["d"] * np.exp(0.3 * rng.standard_normal(G))
    log_r = np.log(5.0) + rng.standard_normal(G) if nb else None
    return sim, mu, W, d, log_r


def _per_cell(P, mu, W, d, log_r, eta):
    """Modes, Newton diagnostics and value/gradient of the per-cell reference kernels,
    from the problem's starting point."""
    dense = P.csr.toarray()
    N, G = dense.shape
    fix = eta is not None
    x = P.x.copy()
    e = eta.copy() if fix else P.eta.copy()
    inv_r = inverse_dispersion(log_r, G)
    glob = (mu, W, d, inv_r, pair_products(W), shared_factor(W, d))
    it, ok, bd = cpu.newton_all(dense, P.a, P.sigma, *glob, x, e, fix, P.newton_tol, 100, 4)
    const = P.lik_constants(log_r) + (0.0 if fix else P._const_eta)
    out = cpu.laplace_value_grad(dense, const, P.a, P.sigma, *glob, x, e, fix, True, 2, True)
    if log_r is not None:
        out = (*out[:4], out[4] + P.lik_constants_grad(log_r))
    return x, e, it, ok, bd, out


@pytest.mark.parametrize("nb", [False, True])
@pytest.mark.parametrize("fix_eta", [False, True])
@pytest.mark.parametrize("as_sparse", [False, True])
def test_batched_matches_per_cell_kernels(nb, fix_eta, as_sparse):
    sim, mu, W, d, log_r = _case(1, nb=nb)
    counts = sparse.csr_matrix(sim["counts"]) if as_sparse else sim["counts"]
    # small chunks: several chunks and a ragged last one
    P = LaplaceProblem(counts, sigma_M=0.5, newton_tol=1e-12, log_lib=sim["log_lib"],
                       chunk_cells=40)
    eta = sim["eta"] if fix_eta else None
    x, e, it, ok, bd, ref_out = _per_cell(P, mu, W, d, log_r, eta)
    out = P.log_marginal(mu, W, d, log_r=log_r, eta=eta, grad=True)
    np.testing.assert_allclose(P.x, x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(P.eta, e, rtol=0, atol=1e-10)
    # the same Newton rule from the same start: the same iterations (a decrement at the
    # tolerance may round either way, one iteration more or less)
    assert np.mean(P.n_iter == it) > 0.95 and np.abs(P.n_iter - it).max() <= 1
    assert np.array_equal(P.converged, ok)
    assert np.array_equal(P.at_bound, bd) and ok.all()
    for got, want in zip(out, ref_out):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * np.abs(want).max())


def _dense_q(P, mu, W, d, eta):
    """Per-cell Laplace Gaussians (x block, eta integrated) from the dense reference."""
    Sigma = pln.covariance(W, d)
    dense = P.csr.toarray()
    means, covs = [], []
    for c in range(dense.shape[0]):
        e = None if eta is None else eta[c]
        x, _ = ref.cell_mode(dense[c], mu, Sigma, P.a[c], 0.5, eta=e)
        V = ref.cell_covariance(dense[c], mu, Sigma, P.a[c], 0.5, eta=e)
        means.append(x)
        covs.append(V[: x.size, : x.size])
    return np.array(means), np.array(covs)


@pytest.mark.parametrize("fix_eta", [False, True])
def test_m_step_maximizes_dense_expected_complete_data_loglik(fix_eta):
    sim, mu, W, d, _ = _case(2, N=25, G=6, K=2)
    P = LaplaceProblem(sim["counts"], sigma_M=0.5, newton_tol=1e-13, log_lib=sim["log_lib"],
                       chunk_cells=10)
    eta = sim["eta"] if fix_eta else None
    stats = P.em_statistics(mu, W, d, eta=eta)
    new = em.m_step(stats, mu)
    xs, Vs = _dense_q(P, mu, W, d, eta)
    G, K = W.shape
    # z | x ~ N(beta (x - mu), I - beta W) at the old globals; all moments dense
    Sigma = pln.covariance(W, d)
    beta = W.T @ np.linalg.inv(Sigma)
    Ezz_cond = np.eye(K) - beta @ W

    def neg_q(theta):
        mu1, W1, log_d1 = theta[:G], theta[G:G + G * K].reshape(G, K), theta[G + G * K:]
        d1 = np.exp(log_d1)
        total = 0.0
        for x, V in zip(xs, Vs):
            Ex, Exx = x, V + np.outer(x, x)
            Ez = beta @ (x - mu)
            Ezz = Ezz_cond + beta @ (V + np.outer(x - mu, x - mu)) @ beta.T
            Exz = (V + np.outer(x - mu, x - mu)) @ beta.T + np.outer(mu, Ez)
            # E ||x - mu1 - W1 z||^2_D per gene
            sq = (np.diag(Exx) - 2 * mu1 * Ex - 2 * np.einsum("gk,gk->g", W1, Exz)
                  + mu1**2 + 2 * mu1 * (W1 @ Ez) + np.einsum("gk,kj,gj->g", W1, Ezz, W1))
            total += -0.5 * np.sum(np.log(2 * np.pi * d1) + sq / d1)
        return -total

    theta_em = np.concatenate([new[0], new[1].ravel(), np.log(new[2])])
    best = optimize.minimize(neg_q, np.concatenate([mu, W.ravel(), np.log(d)]),
                             method="BFGS", options={"gtol": 1e-9, "maxiter": 5000})
    # Q is a strictly concave quadratic in (mu, W) for each d: a unique maximizer
    assert neg_q(theta_em) <= best.fun + 1e-8
    np.testing.assert_allclose(theta_em, best.x, atol=1e-4)
