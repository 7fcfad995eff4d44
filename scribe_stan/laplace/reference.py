"""Dense NumPy reference of the per-cell pln / nbln Laplace approximation (small G only).

It shares no linear algebra with the Numba kernels: the full (G+1) x (G+1) Hessian is
formed and factorized densely, so tests can hold the Woodbury kernels to it. Every
function takes ``log_r`` (G,), the nbln log dispersions; ``None`` is Poisson (pln).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg, special, stats

from scribe_stan.models import dispersion, pln


def _log_lik(u, v, log_r):
    if log_r is None:
        return float(np.sum(u * v - np.exp(v) - special.gammaln(u + 1.0)))
    return float(np.sum(dispersion.nb_logpmf(u, v, np.exp(log_r))))


def _score_curvature(u, v, log_r):
    """dl/dv and -d2l/dv2 of the per-gene log likelihood at log mean v."""
    m = np.exp(v)
    if log_r is None:
        return u - m, m
    phi = np.exp(-np.asarray(log_r, float))
    q = 1.0 + phi * m
    return (u - m) / q, m * (1.0 + phi * u) / q**2


def _log_joint_cell(u, x, eta, mu, Sigma, a, sigma_M, fix_eta, log_r):
    lik = _log_lik(u, x - eta, log_r)
    prior = float(stats.multivariate_normal(mean=mu, cov=Sigma).logpdf(x))
    if fix_eta:
        return lik + prior
    return lik + prior + float(pln.log_capture_prior(np.array([eta]), a, sigma_M)[0])


def _neg_hessian(u, x, eta, Sigma_inv, sigma_M, fix_eta, log_r):
    _, lam = _score_curvature(u, x - eta, log_r)
    if fix_eta:
        return np.diag(lam) + Sigma_inv
    G = x.size
    H = np.zeros((G + 1, G + 1))
    H[:G, :G] = np.diag(lam) + Sigma_inv
    H[:G, G] = H[G, :G] = -lam
    H[G, G] = lam.sum() + 1.0 / sigma_M**2
    return H


def cell_mode(u, mu, Sigma, a, sigma_M, *, eta=None, log_r=None, tol=1e-13, max_iter=200):
    """Mode of one cell's latent posterior by dense damped Newton.

    Parameters
    ----------
    u : (G,) counts;  mu : (G,);  Sigma : (G, G);  a, sigma_M : eta prior.
    eta : float, optional
        If given, eta is held fixed and only x is optimized.
    log_r : (G,), optional
        NegBinomial2 log dispersions; None is Poisson.

    Returns
    -------
    x_hat : (G,), eta_hat : float
    """
    u = np.asarray(u, float)
    fix_eta = eta is not None
    Sigma_inv = np.linalg.inv(Sigma)
    x = np.log(u + 0.5) + (eta if fix_eta else max(a, 0.0))
    e = float(eta) if fix_eta else max(a, 0.0)
    args = (mu, Sigma, a, sigma_M, fix_eta, log_r)
    for _ in range(max_iter):
        score, _ = _score_curvature(u, x - e, log_r)
        gx = score - Sigma_inv @ (x - mu)
        H = _neg_hessian(u, x, e, Sigma_inv, sigma_M, fix_eta, log_r)
        if fix_eta:
            step_x, step_e = np.linalg.solve(H, gx), 0.0
        else:
            g = np.append(gx, -score.sum() - (e - a) / sigma_M**2)
            step = np.linalg.solve(H, g)
            step_x, step_e = step[:-1], step[-1]
        f0 = _log_joint_cell(u, x, e, *args)
        t = 1.0
        while t > 1e-10:
            xn, en = x + t * step_x, e + t * step_e
            if en >= 0 and _log_joint_cell(u, xn, en, *args) >= f0 - 1e-12:
                break
            t /= 2
        x, e = xn, en
        if np.max(np.abs(t * step_x)) < tol and abs(t * step_e) < tol:
            break
    return x, e


def cell_laplace(u, mu, Sigma, a, sigma_M, *, eta=None, log_r=None):
    """Laplace log marginal of one cell, all constants included.

    With ``eta`` given: ``log p(u | mu, Sigma, eta[, log_r])`` marginalizing x only (the
    quantity Stan's ``laplace_marginal_poisson_log_lpmf`` /
    ``laplace_marginal_neg_binomial_2_log_lpmf`` approximates). Otherwise x and eta
    are marginalized jointly under the truncated-normal eta prior.
    """
    u = np.asarray(u, float)
    fix_eta = eta is not None
    x, e = cell_mode(u, mu, Sigma, a, sigma_M, eta=eta, log_r=log_r)
    H = _neg_hessian(u, x, e, np.linalg.inv(Sigma), sigma_M, fix_eta, log_r)
    dim = H.shape[0]
    logdet = 2.0 * np.sum(np.log(np.diag(linalg.cholesky(H, lower=True))))
    return (_log_joint_cell(u, x, e, mu, Sigma, a, sigma_M, fix_eta, log_r)
            + 0.5 * dim * np.log(2 * np.pi) - 0.5 * logdet)


def cell_covariance(u, mu, Sigma, a, sigma_M, *, eta=None, log_r=None):
    """Dense Laplace posterior covariance ``(-H)^{-1}`` of one cell at its mode."""
    u = np.asarray(u, float)
    x, e = cell_mode(u, mu, Sigma, a, sigma_M, eta=eta, log_r=log_r)
    return np.linalg.inv(_neg_hessian(u, x, e, np.linalg.inv(Sigma), sigma_M, eta is not None,
                                      log_r))
