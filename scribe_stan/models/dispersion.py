"""Negative-binomial observation channel shared by ``nbln`` and ``nbvcp``.

NegBinomial2(mean m, dispersion r): ``Var = m + m^2 / r``; ``r -> inf`` is Poisson.
Stan's ``neg_binomial_2_log(u | log_mean, r)`` has the same parametrisation.

Dispersion prior (identical in ``stan/functions/dispersion.stanfunctions``): the
parameter is ``log_r`` (per gene), ``log_r ~ Normal(LOG_R_LOC, LOG_R_SCALE)``. The
fitting coordinate is ``log_r`` itself, so the Laplace MAP and Stan agree whether or not
a Jacobian is counted. The location ``log 10`` puts the prior median at moderate
over-dispersion (Var = m + m^2/10, typical of UMI counts of highly expressed genes;
Svensson 2020, Nat Biotechnol 38:147, doi:10.1038/s41587-019-0379-5, reports UMI data
close to NB with large r); the scale 3 spans r from about 0.02 to 4000 (two sd), so
near-Poisson genes are allowed.
"""

from __future__ import annotations

import numpy as np
from scipy import special

LOG_R_LOC = float(np.log(10.0))
LOG_R_SCALE = 3.0


def log_prior(log_r):
    """Normalized log density of the dispersion prior, summed over genes.

    Parameters
    ----------
    log_r : (G,) array of log dispersions.

    Returns
    -------
    float
    """
    z = (np.asarray(log_r, dtype=float) - LOG_R_LOC) / LOG_R_SCALE
    return float(np.sum(-0.5 * z * z - np.log(LOG_R_SCALE) - 0.5 * np.log(2 * np.pi)))


def log_prior_grad(log_r):
    """Gradient of :func:`log_prior` with respect to ``log_r``, shape (G,)."""
    return -(np.asarray(log_r, dtype=float) - LOG_R_LOC) / LOG_R_SCALE**2


def nb_logpmf(u, log_mean, r):
    """Log pmf of NegBinomial2(exp(log_mean), r), elementwise (broadcasting).

    Written in the log-mean so large log-means stay finite, as Stan's
    ``neg_binomial_2_log_lpmf``.

    Parameters
    ----------
    u : array of non-negative integers.
    log_mean : array of log means.
    r : array of positive dispersions.

    Returns
    -------
    ndarray of float
    """
    u = np.asarray(u, dtype=float)
    log_mean = np.asarray(log_mean, dtype=float)
    r = np.asarray(r, dtype=float)
    log_r = np.log(r)
    log_sum = np.logaddexp(log_mean, log_r)  # log(m + r)
    return (special.gammaln(u + r) - special.gammaln(r) - special.gammaln(u + 1)
            + r * (log_r - log_sum) + u * (log_mean - log_sum))
