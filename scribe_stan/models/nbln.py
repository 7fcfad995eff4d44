"""Negative-binomial log-normal (``nbln``) model: Stan data builders, NumPy reference.

Model (``stan/nbln.stan`` is the reference specification)::

    eta_c ~ Normal(log M0 - log L_c, sigma_M) truncated to eta_c >= 0
    x_c   ~ MultiNormal(mu, Sigma),  Sigma = W W' + diag(d)
    u[c, g] ~ NegBinomial2(mean exp(x[c, g] - eta_c), dispersion r_g)

NegBinomial2(m, r) has variance ``m + m^2 / r``; ``r -> inf`` is the Poisson ``pln``
model. The parameter is ``log_r`` (per gene).

Priors: mu, W (with the loadings-shrinkage options), d and the capture prior are
``pln``'s (:mod:`scribe_stan.models.pln`, same Stan functions in
``stan/functions/pln.stanfunctions``); ``log_r`` has the shared dispersion prior
``Normal(log 10, 3)`` (:mod:`scribe_stan.models.dispersion`).

The x-level overdispersion (log-normal, d) and the count-level one (gamma mixing, 1/r)
both scale as ``m^2``; they are told apart by the shape of the count distribution and
by the gene-gene covariance W W', which only the log-normal part carries.
"""

from __future__ import annotations

import numpy as np

from scribe_stan.models import dispersion, pln

NAME = "nbln"
STAN_FILE = "nbln.stan"
CONDITIONAL_STAN_FILE = "nbln_conditional.stan"
LAPLACE_STAN_FILE = "nbln_laplace.stan"


def stan_data(counts, K, **capture):
    """Data dict for ``stan/nbln.stan`` (full joint posterior): the pln contract.

    Keyword arguments (``log_M0, sigma_M, log_lib, loadings_prior``) are those of
    :func:`scribe_stan.models.pln.stan_data`; ``log_r`` is a parameter here.
    """
    return pln.stan_data(counts, K, **capture)


def conditional_stan_data(counts, mu, W, d, log_r, **capture):
    """Data dict for ``stan/nbln_conditional.stan``: pln's conditional data plus ``log_r``.

    Parameters
    ----------
    counts : (N, G) int;  mu : (G,);  W : (G, K);  d : (G,) > 0
    log_r : (G,) log dispersions
    **capture : ``log_M0, sigma_M, log_lib`` as in :func:`scribe_stan.models.pln.stan_data`
    """
    data = pln.conditional_stan_data(counts, mu, W, d, **capture)
    data["log_r"] = np.asarray(log_r, dtype=float)
    return data


def laplace_stan_data(counts, mu, W, d, log_r, eta, **capture):
    """Data dict for ``stan/nbln_laplace.stan``: conditional data plus ``eta`` (N,)."""
    data = conditional_stan_data(counts, mu, W, d, log_r, **capture)
    data["eta"] = np.asarray(eta, dtype=float)
    return data


# --------------------------------------------------------------------------------------
# NumPy reference log densities (dense; small G only). They mirror the Stan program.
# --------------------------------------------------------------------------------------


def log_prior_globals(mu, W, d, log_r, *, tau=None, loadings_prior="normal"):
    """Log prior density of the globals (normalized): pln's plus the dispersion prior."""
    return (pln.log_prior_globals(mu, W, d, tau=tau, loadings_prior=loadings_prior)
            + dispersion.log_prior(log_r))


def log_lik_cells(counts, x, eta, log_r):
    """NegBinomial2 log likelihood per cell, ``sum_g log NB2(u | exp(x - eta), r)``, (N,).

    Parameters
    ----------
    counts : (N, G) int;  x : (N, G) log-rates;  eta : (N,) capture losses
    log_r : (G,) log dispersions
    """
    v = np.asarray(x, float) - np.asarray(eta, float)[:, None]
    return dispersion.nb_logpmf(counts, v, np.exp(np.asarray(log_r, float))).sum(axis=1)


def log_joint(counts, mu, W, d, log_r, x, eta, *, log_M0=np.log(pln.M0_DEFAULT),
              sigma_M=pln.SIGMA_M_DEFAULT, log_lib=None, tau=None, loadings_prior="normal"):
    """Exact joint log density ``log p(u, x, eta, mu, W, d, log_r[, tau])`` (all constants).

    Parameters
    ----------
    counts : (N, G) int;  mu : (G,);  W : (G, K);  d : (G,) > 0;  log_r : (G,)
    x : (N, G);  eta : (N,)
    log_M0, sigma_M : capture prior;  log_lib : (N,) log library sizes (default from counts)
    tau : (K,) loadings column scales, for a shrinkage ``loadings_prior`` only.

    Returns
    -------
    float
    """
    counts = np.asarray(counts)
    if log_lib is None:
        log_lib = np.log(counts.sum(axis=1))
    a = pln.capture_prior_mean(log_lib, log_M0)
    return float(
        log_prior_globals(mu, W, d, log_r, tau=tau, loadings_prior=loadings_prior)
        + log_lik_cells(counts, x, eta, log_r).sum()
        + pln.log_latent_prior_cells(x, mu, W, d).sum()
        + pln.log_capture_prior(eta, a, sigma_M).sum()
    )


def simulate(N, G, K, *, seed=0, r_range=(1.0, 50.0), **pln_args):
    """Simulate counts from the nbln model with known truth.

    The latents (mu, W, d, x, eta) are drawn exactly as :func:`pln.simulate` with the
    same ``seed`` and keyword arguments (``lib_target``, ``mu_spread``,
    ``loading_scale``, ``d_value``, ``log_M0``, ``sigma_M``); dispersions are
    log-uniform on ``r_range``, and counts are NegBinomial2 draws (gamma-Poisson,
    :meth:`numpy.random.Generator.negative_binomial` with ``p = r / (r + m)``).
    Fit with the returned ``log_lib`` to fit the generating model (see pln.simulate).

    Returns
    -------
    dict
        pln.simulate's keys (``counts`` replaced by the NB draws) plus ``log_r`` (G,).
    """
    sim = pln.simulate(N, G, K, seed=seed, **pln_args)
    rng = np.random.default_rng([seed, 1])
    log_r = rng.uniform(np.log(r_range[0]), np.log(r_range[1]), G)
    r = np.exp(log_r)
    m = np.exp(sim["x"] - sim["eta"][:, None])
    sim["counts"] = rng.negative_binomial(r, r / (r + m)).astype(np.int64)
    sim["log_r"] = log_r
    return sim
