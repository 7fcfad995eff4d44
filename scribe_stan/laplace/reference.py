"""Dense NumPy reference of the per-cell pln Laplace approximation (small G only).

It shares no linear algebra with the Numba kernels: the full (G+1) x (G+1) Hessian is
formed and factorized densely, so tests can hold the Woodbury kernels to it.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg, special, stats

from scribe_stan.models import pln


def _log_joint_cell(u, x, eta, mu, Sigma, a, sigma_M, fix_eta):
    lik = float(np.sum(u * (x - eta) - np.exp(x - eta) - special.gammaln(u + 1.0)))
    prior = float(stats.multivariate_normal(mean=mu, cov=Sigma).logpdf(x))
    if fix_eta:
        return lik + prior
    return lik + prior + float(pln.log_capture_prior(np.array([eta]), a, sigma_M)[0])


def _neg_hessian(x, eta, Sigma_inv, sigma_M, fix_eta):
    lam = np.exp(x - eta)
    if fix_eta:
        return np.diag(lam) + Sigma_inv
    G = x.size
    H = np.zeros((G + 1, G + 1))
    H[:G, :G] = np.diag(lam) + Sigma_inv
    H[:G, G] = H[G, :G] = -lam
    H[G, G] = lam.sum() + 1.0 / sigma_M**2
    return H


def cell_mode(u, mu, Sigma, a, sigma_M, *, eta=None, tol=1e-13, max_iter=200):
    """Mode of one cell's latent posterior by dense damped Newton.

    Parameters
    ----------
    u : (G,) counts;  mu : (G,);  Sigma : (G, G);  a, sigma_M : capture prior.
    eta : float, optional
        If given, eta is held fixed and only x is optimized.

    Returns
    -------
    x_hat : (G,), eta_hat : float
    """
    u = np.asarray(u, float)
    fix_eta = eta is not None
    Sigma_inv = np.linalg.inv(Sigma)
    x = np.log(u + 0.5) + (eta if fix_eta else max(a, 0.0))
    e = float(eta) if fix_eta else max(a, 0.0)
    for _ in range(max_iter):
        lam = np.exp(x - e)
        gx = u - lam - Sigma_inv @ (x - mu)
        H = _neg_hessian(x, e, Sigma_inv, sigma_M, fix_eta)
        if fix_eta:
            step_x, step_e = np.linalg.solve(H, gx), 0.0
        else:
            g = np.append(gx, -(u - lam).sum() - (e - a) / sigma_M**2)
            step = np.linalg.solve(H, g)
            step_x, step_e = step[:-1], step[-1]
        f0 = _log_joint_cell(u, x, e, mu, Sigma, a, sigma_M, fix_eta)
        t = 1.0
        while t > 1e-10:
            xn, en = x + t * step_x, e + t * step_e
            if en >= 0 and _log_joint_cell(u, xn, en, mu, Sigma, a, sigma_M, fix_eta) >= f0 - 1e-12:
                break
            t /= 2
        x, e = xn, en
        if np.max(np.abs(t * step_x)) < tol and abs(t * step_e) < tol:
            break
    return x, e


def cell_laplace(u, mu, Sigma, a, sigma_M, *, eta=None):
    """Laplace log marginal of one cell, all constants included.

    With ``eta`` given: ``log p(u | mu, Sigma, eta)`` marginalizing x only (the quantity
    Stan's ``laplace_marginal_poisson_log_lpmf`` approximates). Otherwise x and eta are
    marginalized jointly under the truncated-normal capture prior.
    """
    u = np.asarray(u, float)
    fix_eta = eta is not None
    x, e = cell_mode(u, mu, Sigma, a, sigma_M, eta=eta)
    H = _neg_hessian(x, e, np.linalg.inv(Sigma), sigma_M, fix_eta)
    dim = H.shape[0]
    logdet = 2.0 * np.sum(np.log(np.diag(linalg.cholesky(H, lower=True))))
    return (_log_joint_cell(u, x, e, mu, Sigma, a, sigma_M, fix_eta)
            + 0.5 * dim * np.log(2 * np.pi) - 0.5 * logdet)


def cell_covariance(u, mu, Sigma, a, sigma_M, *, eta=None):
    """Dense Laplace posterior covariance ``(-H)^{-1}`` of one cell at its mode."""
    x, e = cell_mode(u, mu, Sigma, a, sigma_M, eta=eta)
    return np.linalg.inv(_neg_hessian(x, e, np.linalg.inv(Sigma), sigma_M, eta is not None))
