"""Independent-gene negative binomial with variable capture (``nbvcp``): priors, Stan
data builder, NumPy reference log density and a simulator.

Model (``stan/nbvcp.stan`` is the reference specification)::

    eta_c   ~ Normal(log M0 - log L_c, sigma_M) truncated to eta_c >= 0
    u[c, g] ~ NegBinomial2(mean exp(m_g - eta_c), dispersion r_g),  r_g = exp(log_r_g)

genes independent given eta_c. ``exp(-eta_c)`` is the capture efficiency of cell ``c``,
``L_c`` its library size, ``M0`` the prior median total mRNA per cell and ``m_g`` the
log mean expression of gene ``g`` before capture. It is the ``Sigma -> 0`` limit of
``nbln`` and the source of its informative priors.

Priors (identical in the Stan program and the Numba solver):

* capture: pln's truncated normal (defaults ``pln.M0_DEFAULT``, ``pln.SIGMA_M_DEFAULT``
  and their sources in :mod:`scribe_stan.models.pln`);
* ``m_g ~ Normal(pln.MU_LOC, pln.MU_SCALE)``, the same weakly informative prior as pln's
  ``mu``;
* ``log_r_g ~ Normal(log 10, 3)`` from :mod:`scribe_stan.models.dispersion`.

The fitting coordinates are ``(m, log_r, eta)``; ``log_r`` is a parameter of the Stan
program, so Stan's MAP, the Laplace solver and the densities below agree without any
change-of-variables term for ``r``.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from scribe_stan.models import dispersion, pln

NAME = "nbvcp"
STAN_FILE = "nbvcp.stan"

M0_DEFAULT = pln.M0_DEFAULT
SIGMA_M_DEFAULT = pln.SIGMA_M_DEFAULT
M_LOC = pln.MU_LOC
M_SCALE = pln.MU_SCALE


def stan_data(counts, *, log_M0=np.log(M0_DEFAULT), sigma_M=SIGMA_M_DEFAULT, log_lib=None):
    """Data dict for ``stan/nbvcp.stan``.

    Parameters
    ----------
    counts : ndarray of int, shape (N, G)
    log_M0, sigma_M : float
        Capture prior (log prior median total mRNA, log-scale sd).
    log_lib : (N,) array, optional
        Log library sizes; default ``log(counts.sum(axis=1))``. Pass the library size
        over all genes of the cell when ``counts`` holds a gene subset.

    Returns
    -------
    dict
        Keys ``N, G, counts, log_lib, log_M0, sigma_M``: the data-block contract.
    """
    counts = np.asarray(counts)
    N, G = counts.shape
    return {
        "N": int(N),
        "G": int(G),
        "counts": counts.astype(np.int64),
        "log_lib": (np.log(counts.sum(axis=1).astype(float)) if log_lib is None
                    else np.asarray(log_lib, dtype=float)),
        "log_M0": float(log_M0),
        "sigma_M": float(sigma_M),
    }


# --------------------------------------------------------------------------------------
# NumPy reference log densities. They mirror the Stan program term by term.
# --------------------------------------------------------------------------------------


def log_prior_globals(m, log_r):
    """Normalized log prior of ``m`` (G,) and ``log_r`` (G,), summed to a float."""
    return float(stats.norm.logpdf(m, M_LOC, M_SCALE).sum() + dispersion.log_prior(log_r))


def log_lik_cells(counts, m, log_r, eta):
    """NB log likelihood per cell, ``sum_g log NB2(u | exp(m - eta), exp(log_r))``.

    Parameters
    ----------
    counts : (N, G) int;  m : (G,);  log_r : (G,);  eta : (N,)

    Returns
    -------
    ndarray, shape (N,)
    """
    log_mean = np.asarray(m, float)[None, :] - np.asarray(eta, float)[:, None]
    r = np.exp(np.asarray(log_r, float))[None, :]
    return dispersion.nb_logpmf(counts, log_mean, r).sum(axis=1)


def log_joint(counts, m, log_r, eta, *, log_M0=np.log(M0_DEFAULT), sigma_M=SIGMA_M_DEFAULT,
              log_lib=None):
    """Exact joint log density ``log p(u, eta, m, log_r)`` (all constants included).

    Densities are in ``(m, log_r, eta)``; eta outside ``[0, inf)`` gives ``-inf``.

    Parameters
    ----------
    counts : (N, G) int;  m : (G,);  log_r : (G,);  eta : (N,)
    log_M0, sigma_M, log_lib : capture prior, as in :func:`stan_data`.

    Returns
    -------
    float
    """
    counts = np.asarray(counts)
    if log_lib is None:
        log_lib = np.log(counts.sum(axis=1))
    a = pln.capture_prior_mean(log_lib, log_M0)
    return float(log_prior_globals(m, log_r) + log_lik_cells(counts, m, log_r, eta).sum()
                 + pln.log_capture_prior(eta, a, sigma_M).sum())


def simulate(N, G, *, seed=0, lib_target=2000.0, m_spread=1.0, log_r_mean=np.log(5.0),
             log_r_sd=0.7, log_M0=np.log(M0_DEFAULT), sigma_M=0.3):
    """Simulate counts from the nbvcp model with known truth.

    Gene shares ``exp(m_g) / sum exp(m)`` are log-normal with spread ``m_spread``;
    ``m`` is placed so that the expected library size is ``lib_target`` at the prior
    centre of eta, and ``eta_c`` is drawn from ``Normal(log M0 - log lib_target,
    sigma_M)`` truncated at 0: exactly the model's capture prior with the data input
    ``log_lib = log(lib_target)`` for every cell (returned as ``log_lib``), the input to
    fit with (see :func:`scribe_stan.models.pln.simulate` for why).

    Parameters
    ----------
    N, G : int
        Cells and genes.
    seed : int
    lib_target : float
        Expected library size (UMIs per cell).
    m_spread : float
        Sd of the log gene shares.
    log_r_mean, log_r_sd : float
        The log dispersions are ``Normal(log_r_mean, log_r_sd)``.
    log_M0, sigma_M : float
        Capture prior.

    Returns
    -------
    dict
        ``counts`` (N, G) int64, ``m`` (G,), ``log_r`` (G,), ``r`` (G,), ``eta`` (N,),
        ``log_lib`` (N,), ``log_M0``, ``sigma_M``.
    """
    rng = np.random.default_rng(seed)
    eta_center = log_M0 - np.log(lib_target)
    eta = stats.truncnorm.rvs(-eta_center / sigma_M, np.inf, loc=eta_center, scale=sigma_M,
                              size=N, random_state=rng)
    log_share = m_spread * rng.standard_normal(G)
    log_share -= np.log(np.sum(np.exp(log_share)))
    m = log_M0 + log_share
    log_r = log_r_mean + log_r_sd * rng.standard_normal(G)
    r = np.exp(log_r)
    mean = np.exp(m[None, :] - eta[:, None])
    counts = rng.poisson(rng.gamma(r[None, :], mean / r[None, :])).astype(np.int64)
    return {"counts": counts, "m": m, "log_r": log_r, "r": r, "eta": eta,
            "log_lib": np.full(N, np.log(lib_target)), "log_M0": log_M0, "sigma_M": sigma_M}
