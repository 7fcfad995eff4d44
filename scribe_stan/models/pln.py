"""Poisson log-normal (``pln``) model: priors, Stan data builders and a NumPy reference.

Model (``stan/pln.stan`` is the reference specification)::

    eta_c ~ Normal(log M0 - log L_c, sigma_M) truncated to eta_c >= 0
    x_c   ~ MultiNormal(mu, Sigma),  Sigma = W W' + diag(d)
    u[c, g] ~ Poisson(exp(x[c, g] - eta_c))

``exp(-eta_c)`` is the capture efficiency of cell ``c``, ``L_c`` its library size and
``M0`` the prior median total mRNA per cell.

Priors on the globals (identical in ``stan/functions/pln.stanfunctions``):

* ``mu_g ~ Normal(MU_LOC, MU_SCALE)``: log-rate before capture; weakly informative.
* ``W[g, k] ~ Normal(0, W_SCALE)``: loadings (default), or a columnwise shrinkage prior
  on the gauge-invariant loadings for adaptive rank (:mod:`scribe_stan.models.loadings`).
* ``d_g ~ Gamma(D_SHAPE, D_RATE)`` (shape, rate): residual log-rate variance. Shape 2
  makes the density vanish at 0, so MAP estimates of variances stay off the boundary
  (Chung et al. 2013, Psychometrika 78:685, doi:10.1007/s11336-013-9328-2).

The ``eta >= 0`` boundary: both sides use the normalized truncated normal density on
``[0, inf)``. The full-joint Stan programs sample eta through coordinates that keep
eta >= 0 (pln, nbln: its quantile given the captured log-rates,
:func:`observed_capture_coordinates`; nbvcp: a softplus, :func:`capture_coordinates`);
the Laplace solver runs a projected Newton that keeps ``eta >= 0`` and flags cells whose
mode sits on the bound (their Laplace value uses the untruncated Gaussian in eta).

Default capture prior: ``M0 = 1e5`` mRNA molecules per cell (mammalian cells hold about
5e4 - 3e5 mRNAs; Marinov et al. 2014, Genome Research 24:496, doi:10.1101/gr.161034.113)
and ``sigma_M = 1`` (a factor e either way). Both are overridable.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

from scribe_stan.models import loadings

NAME = "pln"
STAN_FILE = "pln.stan"
CONDITIONAL_STAN_FILE = "pln_conditional.stan"
LAPLACE_STAN_FILE = "pln_laplace.stan"
#: What :func:`observed_capture_coordinates` gives for the ``parameters`` block of
#: ``stan/pln.stan`` and ``stan/nbln.stan`` (besides the other globals).
SAMPLED_COORDINATES = ("mu_level", "mu_dev", "theta_z", "theta_e", "eta_q")

M0_DEFAULT = 1.0e5
SIGMA_M_DEFAULT = 1.0
MU_LOC = 0.0
MU_SCALE = 10.0
W_SCALE = loadings.W_SCALE
D_SHAPE = 2.0
D_RATE = 4.0


def capture_prior_mean(log_lib, log_M0):
    """Prior location ``a_c = log M0 - log L_c`` of eta_c (shape ``(N,)``)."""
    return log_M0 - np.asarray(log_lib, dtype=float)


def stan_data(counts, K, *, log_M0=np.log(M0_DEFAULT), sigma_M=SIGMA_M_DEFAULT, log_lib=None,
              loadings_prior="normal"):
    """Data dict for ``stan/pln.stan`` (full joint posterior).

    Parameters
    ----------
    counts : ndarray of int, shape (N, G)
    K : int
        Latent rank, ``1 <= K < G``.
    log_M0, sigma_M : float
        Capture prior (see module docstring).
    log_lib : (N,) array, optional
        Log library sizes; default ``log(counts.sum(axis=1))``. Pass the library size
        over all genes of the cell when ``counts`` holds a gene subset.
    loadings_prior : str
        One of :data:`scribe_stan.models.loadings.PRIORS`.

    Returns
    -------
    dict
        Keys ``N, G, K, counts, log_lib, log_M0, sigma_M, loadings_prior`` (an int
        code): the data-block contract.

    Raises
    ------
    ValueError
        Unknown ``loadings_prior``.
    """
    data = _capture_data(counts, K, log_M0=log_M0, sigma_M=sigma_M, log_lib=log_lib)
    data["loadings_prior"] = loadings.STAN_CODES[loadings.check_prior(loadings_prior)]
    return data


def _capture_data(counts, K, *, log_M0=np.log(M0_DEFAULT), sigma_M=SIGMA_M_DEFAULT,
                  log_lib=None):
    """Sizes, counts and capture-prior inputs shared by every pln program."""
    counts = np.asarray(counts)
    N, G = counts.shape
    return {
        "N": int(N),
        "G": int(G),
        "K": int(K),
        "counts": counts.astype(np.int64),
        "log_lib": (np.log(counts.sum(axis=1).astype(float)) if log_lib is None
                    else np.asarray(log_lib, dtype=float)),
        "log_M0": float(log_M0),
        "sigma_M": float(sigma_M),
    }


def conditional_stan_data(counts, mu, W, d, **capture):
    """Data dict for ``stan/pln_conditional.stan``: :func:`stan_data` plus ``mu, W, d``."""
    W = np.asarray(W, dtype=float)
    data = _capture_data(counts, W.shape[1], **capture)
    data.update(mu=np.asarray(mu, float), W=W, d=np.asarray(d, float))
    return data


def laplace_stan_data(counts, mu, W, d, eta, **capture):
    """Data dict for ``stan/pln_laplace.stan``: conditional data plus ``eta`` (N,)."""
    data = conditional_stan_data(counts, mu, W, d, **capture)
    data["eta"] = np.asarray(eta, float)
    return data


# --------------------------------------------------------------------------------------
# NumPy reference log densities (dense; small G only). They mirror the Stan program.
# --------------------------------------------------------------------------------------


def log_prior_globals(mu, W, d, *, tau=None, loadings_prior="normal"):
    """Log prior density of the globals (normalized), summed to a float.

    ``tau`` (K,) are the loadings column scales of a shrinkage ``loadings_prior``
    (see :mod:`scribe_stan.models.loadings`); unused for "normal".
    """
    log_tau = np.zeros(0) if tau is None else np.log(np.asarray(tau, dtype=float))
    return (
        stats.norm.logpdf(mu, MU_LOC, MU_SCALE).sum()
        + loadings.log_prior_and_grad(W, log_tau, loadings_prior)[0]
        + stats.gamma.logpdf(d, D_SHAPE, scale=1.0 / D_RATE).sum()
    )


def log_capture_prior(eta, a, sigma_M):
    """Normalized truncated-normal log density of eta on ``[0, inf)``, shape ``(N,)``."""
    eta = np.asarray(eta, float)
    lp = stats.norm.logpdf(eta, a, sigma_M) - stats.norm.logsf(0.0, a, sigma_M)
    return np.where(eta >= 0, lp, -np.inf)


def capture_coordinates(eta):
    """Sampled coordinates of eta in ``stan/nbvcp.stan`` (``nbvcp_capture_jacobian``).

    ``eta = log1p(exp(eta_level + eta_dev))`` with ``eta_dev`` summing to zero: the scalar
    ``eta_level`` carries the capture gauge, the common shift of all eta_c.

    Parameters
    ----------
    eta : (N,) array, eta > 0

    Returns
    -------
    eta_level : float
    eta_dev : (N,) ndarray, sums to zero
    """
    eta = np.asarray(eta, float)
    t = eta + np.log(-np.expm1(-eta))  # inverse softplus, log(exp(eta) - 1), stable
    level = float(t.mean())
    return level, t - level


def working_point(counts, mu, W, d, a, sigma_M, r=None):
    """Working weight and response with which ``stan/pln.stan`` and ``stan/nbln.stan`` whiten.

    The Gaussian in the log rate that those programs whiten the captured log-rates with
    (``stan/functions/capture.stanfunctions``): the working response and weight of
    iteratively reweighted least squares (McCullagh & Nelder 1989, Generalized Linear
    Models, sect. 2.5) at the log rate ``x1``, the precision-weighted mean of the
    marginal prior of ``x_obs[c, g]``, ``Normal(mu_g - a_c, V_g)`` with
    ``V_g = d_g + |W_g|^2 + sigma_M^2``, and of the count's own Gaussian,
    ``Normal(log(u + 1/2), 1 / w0)`` with ``w0`` the Fisher information at
    ``log(u + 1/2)``. A near-silent gene's zero count thus gets about its tiny prior
    rate as weight, not 1/2.

    Parameters
    ----------
    counts : (N, G) array of int
    mu, W, d : arrays (G,), (G, K), (G,)
        Globals.
    a : (N,) array
        Capture prior location, :func:`capture_prior_mean`.
    sigma_M : float
        Capture prior scale.
    r : (G,) array, optional
        Negative-binomial dispersions (nbln); None for Poisson (pln).

    Returns
    -------
    weight : (N, G) ndarray
        Fisher information of the log rate at ``x1``: ``lambda = exp(x1)`` (Poisson),
        or ``lambda r / (lambda + r)`` (negative binomial).
    response : (N, G) ndarray
        ``x1 + u / lambda - 1``.
    """
    u = np.asarray(counts, float)
    W = np.asarray(W, float)

    def information(lam):
        return lam if r is None else lam * r / (lam + np.asarray(r, float))

    prior_precision = 1.0 / (np.asarray(d, float) + (W**2).sum(axis=1) + sigma_M**2)
    count_weight = information(u + 0.5)
    prior_mean = np.asarray(mu, float) - np.asarray(a, float)[:, None]
    log_rate = ((prior_precision * prior_mean + count_weight * np.log(u + 0.5))
                / (prior_precision + count_weight))
    lam = np.exp(log_rate)
    return information(lam), log_rate + u / lam - 1.0


def observed_capture_coordinates(counts, x, eta, mu, W, d, a, sigma_M, *, r=None):
    """Coordinates of ``mu`` and of the per-cell latents in ``stan/pln.stan`` and ``stan/nbln.stan``.

    Those programs sample the captured log-rates ``x_obs_c = x_c - eta_c`` under their
    marginal prior ``MultiNormal(mu - a_c, Sigma + sigma_M^2 1 1')`` (times the
    truncation factor), augmented as ``x_obs_c = mu - a_c + B z_c + e_c`` with
    ``B = [W, sigma_M 1]``, ``z_c ~ N(0, I)`` and ``e_c ~ N(0, diag(d))``, and whitened
    by the exact posterior of ``(z_c, e_c)`` under a Gaussian stand-in for the counts
    (:func:`working_point`): ``z_c = b_c + R_c'^-1 theta_z_c`` and
    ``e_c = m_c + sqrt(v_c) theta_e_c``; and the quantile ``eta_q_c`` of eta_c in its
    conditional prior given ``x_obs_c``, ``Normal(m_c, s)`` truncated to ``eta_c >= 0``
    with ``1/s^2 = 1/sigma_M^2 + 1' Sigma^-1 1`` and
    ``m_c = s^2 (a_c/sigma_M^2 + 1' Sigma^-1 (mu - x_obs_c))``
    (``stan/functions/capture.stanfunctions`` gives the formulas and says why). Of the
    ``(z_c, e_c)`` that give ``x_obs_c``, the one returned has ``z_c`` at its conditional
    mean given ``x_obs_c``. The programs sample ``mu`` as its level and its deviations
    from it, ``mu = mu_level + mu_dev`` (``mu_dev`` sums to zero).

    Parameters
    ----------
    counts : (N, G) array of int
        The counts the program is given (they set the whitening).
    x : (N, G) array
        Latent log-rates.
    eta : (N,) array, eta >= 0
        Capture losses.
    mu, W, d : arrays (G,), (G, K), (G,)
        Globals.
    a : (N,) array
        Capture prior location, :func:`capture_prior_mean`.
    sigma_M : float
        Capture prior scale.
    r : (G,) array, optional
        nbln's dispersions (its working weight); None for pln.

    Returns
    -------
    dict
        ``mu_level`` (float), ``mu_dev (G,)``, ``theta_z (N, K + 1)``,
        ``theta_e (N, G)``, ``eta_q (N,)`` in [0, 1], and
        ``log_offset`` (float): the programs' log density at these coordinates minus
        :func:`log_joint` at ``(x, eta)``, i.e. the log Jacobian of the whitening map
        ``sum_c (sum_g log v_cg / 2 - log det R_c)``, plus the log density of the
        augmentation ``z_c`` given ``x_obs_c`` at its mean, minus
        ``sum_c log p(eta_c | x_obs_c)`` (the quantile map).
    """
    x, eta, mu = np.asarray(x, float), np.asarray(eta, float), np.asarray(mu, float)
    W, d, a = np.asarray(W, float), np.asarray(d, float), np.asarray(a, float)
    G = x.shape[1]
    B = np.column_stack([W, np.full(G, float(sigma_M))])
    J = B.shape[1]
    x_obs = x - eta[:, None]
    # z_c at its conditional mean given x_obs_c: covariance C = (I + B' D^-1 B)^-1
    C = np.linalg.inv(np.eye(J) + (B.T / d) @ B)
    z = (x_obs - mu + a[:, None]) / d @ B @ C
    e = x_obs - mu + a[:, None] - z @ B.T
    log_aug = -0.5 * (J * np.log(2 * np.pi) + np.linalg.slogdet(C)[1])
    # whitening by the Gaussian posterior under the working point
    weight, response = working_point(counts, mu, W, d, a, sigma_M, r)
    resid = response - mu + a[:, None]
    dp = weight * d
    s = weight / (1.0 + dp)
    Q = np.eye(J) + np.einsum("gi,cg,gj->cij", B, s, B)
    R = np.linalg.cholesky(Q)
    b = np.linalg.solve(Q, ((s * resid) @ B)[..., None])[..., 0]
    theta_z = np.einsum("cji,cj->ci", R, z - b)  # R_c' (z_c - b_c)
    v = d / (1.0 + dp)
    theta_e = (e - dp / (1.0 + dp) * (resid - z @ B.T)) / np.sqrt(v)
    log_jac = 0.5 * np.log(v).sum() - np.log(np.diagonal(R, axis1=1, axis2=2)).sum()
    # eta given x_obs
    Sigma = covariance(W, d)
    w = np.linalg.solve(Sigma, np.ones(G))
    scale = 1.0 / np.sqrt(1.0 / sigma_M**2 + w.sum())
    loc = scale**2 * (a / sigma_M**2 + (mu - x_obs) @ w)
    conditional = stats.truncnorm(-loc / scale, np.inf, loc=loc, scale=scale)
    log_offset = log_jac + x.shape[0] * log_aug - conditional.logpdf(eta).sum()
    return {"mu_level": float(mu.mean()), "mu_dev": mu - mu.mean(), "theta_z": theta_z,
            "theta_e": theta_e, "eta_q": conditional.cdf(eta), "log_offset": float(log_offset)}


def log_lik_cells(counts, x, eta):
    """Poisson log likelihood per cell, ``sum_g log Poisson(u | exp(x - eta))``, (N,)."""
    counts = np.asarray(counts, float)
    v = np.asarray(x, float) - np.asarray(eta, float)[:, None]
    return (counts * v - np.exp(v) - special.gammaln(counts + 1.0)).sum(axis=1)


def covariance(W, d):
    """Dense ``Sigma = W W' + diag(d)`` (G x G). For small G and for reporting only."""
    W = np.asarray(W, float)
    return W @ W.T + np.diag(np.asarray(d, float))


def log_latent_prior_cells(x, mu, W, d):
    """``log MultiNormal(x_c | mu, Sigma)`` per cell with a dense Cholesky, (N,)."""
    Sigma = covariance(W, d)
    return stats.multivariate_normal(mean=mu, cov=Sigma).logpdf(np.atleast_2d(x)).reshape(-1)


def log_joint(counts, mu, W, d, x, eta, *, log_M0=np.log(M0_DEFAULT), sigma_M=SIGMA_M_DEFAULT,
              tau=None, loadings_prior="normal"):
    """Exact joint log density ``log p(u, x, eta, mu, W, d[, tau])`` (all constants).

    Parameters
    ----------
    counts : (N, G) int;  mu : (G,);  W : (G, K);  d : (G,) > 0;  x : (N, G);  eta : (N,)
    tau : (K,) loadings column scales, for a shrinkage ``loadings_prior`` only.

    Returns
    -------
    float
    """
    counts = np.asarray(counts)
    a = capture_prior_mean(np.log(counts.sum(axis=1)), log_M0)
    return float(
        log_prior_globals(mu, W, d, tau=tau, loadings_prior=loadings_prior)
        + log_lik_cells(counts, x, eta).sum()
        + log_latent_prior_cells(x, mu, W, d).sum()
        + log_capture_prior(eta, a, sigma_M).sum()
    )


def benchmark_globals(G, K, rng, *, lib_target=1900.0, mu_spread=1.1,
                      log_M0=np.log(M0_DEFAULT)):
    """PBMC-like globals for the scale benchmarks (``validation/bench_scale.py``,
    ``validation/bench_dask.py``): loadings of RMS ``0.4 sqrt(10 / K)`` per factor,
    ``d = 0.2``, gene shares log-normal with sd ``mu_spread``, and ``mu`` placed so
    that cells with the capture prior's median loss have about ``lib_target`` counts.

    Parameters
    ----------
    G, K : int;  rng : numpy Generator (draws W, then the shares);  lib_target,
    mu_spread : float;  log_M0 : float, log median total mRNA (capture prior).

    Returns
    -------
    mu (G,), W (G, K), d (G,), eta_center : float, ``log M0 - log lib_target``.
    """
    eta_center = log_M0 - np.log(lib_target)
    W = 0.4 * rng.standard_normal((G, K)) / np.sqrt(K / 10)
    d = np.full(G, 0.2)
    log_share = mu_spread * rng.standard_normal(G)
    log_share -= np.log(np.sum(np.exp(log_share + 0.5 * (np.sum(W**2, axis=1) + d))))
    return eta_center + np.log(lib_target) + log_share, W, d, eta_center


def simulate(N, G, K, *, seed=0, lib_target=2000.0, mu_spread=0.8, loading_scale=0.4,
             d_value=0.2, log_M0=np.log(M0_DEFAULT), sigma_M=0.3):
    """Simulate counts from the pln model with known truth.

    ``mu`` is placed so that library sizes are near ``lib_target`` and eta_c is drawn
    from ``Normal(log M0 - log lib_target, sigma_M)`` truncated at 0. That is exactly
    the model's capture prior with the data input ``log_lib = log(lib_target)`` for
    every cell (returned as ``log_lib``): fit with it to fit the generating model.
    (With observed library sizes in place of ``lib_target`` the prior would centre on
    data that eta itself produced, which no generative simulation can reproduce.)

    Returns
    -------
    dict
        ``counts`` (N, G) int64, ``mu`` (G,), ``W`` (G, K), ``d`` (G,), ``x`` (N, G),
        ``eta`` (N,), ``log_lib`` (N,), ``log_M0``, ``sigma_M``.
    """
    rng = np.random.default_rng(seed)
    eta_center = log_M0 - np.log(lib_target)
    eta = stats.truncnorm.rvs(-eta_center / sigma_M, np.inf, loc=eta_center, scale=sigma_M,
                              size=N, random_state=rng)
    W = loading_scale * rng.standard_normal((G, K))
    d = np.full(G, d_value)
    log_share = mu_spread * rng.standard_normal(G)
    log_share -= np.log(np.sum(np.exp(log_share + 0.5 * (np.sum(W**2, axis=1) + d))))
    mu = eta_center + np.log(lib_target) + log_share
    x = mu + rng.standard_normal((N, K)) @ W.T + np.sqrt(d) * rng.standard_normal((N, G))
    counts = rng.poisson(np.exp(x - eta[:, None])).astype(np.int64)
    return {"counts": counts, "mu": mu, "W": W, "d": d, "x": x, "eta": eta,
            "log_lib": np.full(N, np.log(lib_target)), "log_M0": log_M0, "sigma_M": sigma_M}
