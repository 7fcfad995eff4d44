"""Loadings priors, gauge-invariant loadings ``W_perp`` and the effective rank.

Gauge. The likelihood sees ``x_c - eta_c``, so a shift of every gene's log-rate in a
cell is confounded with its capture, and ``W`` is identified only up to rotation
``W -> W R``. Split each column ``W[:, k] = W_perp[:, k] + 1 m_k`` with
``m_k = mean_g W[g, k]``: the parallel part ``1 m_k`` moves all genes of a cell together
(the capture direction); ``W_perp`` (column means removed) is the gauge-invariant part.

Priors on ``W`` (identical in ``stan/functions/loadings.stanfunctions``):

``"normal"`` (default)
    ``W[g, k] ~ Normal(0, 1)`` independently; no adaptive rank.
``"gaussian"``, ``"horseshoe"``, ``"neg"`` (columnwise shrinkage, for adaptive rank)
    Per column a scale ``tau_k`` with ``W_perp[:, k] ~ Normal(0, tau_k^2)`` on the
    (G-1)-dimensional subspace orthogonal to ``1``, and the parallel coordinate
    ``sqrt(G) m_k ~ Normal(0, 1)`` (what the iid prior implies for it). With
    ``tau_k = 1`` this is exactly the iid prior. The scale priors (densities in tau):

    * ``"gaussian"`` (automatic relevance determination, Bishop 1999, NIPS 11:382):
      precision ``tau_k^-2 ~ Gamma(1e-3, 1e-3)`` (shape, rate), near scale-free.
    * ``"horseshoe"`` (Carvalho, Polson & Scott 2010, Biometrika 97:465,
      doi:10.1093/biomet/asq017): ``tau_k ~ Cauchy+(0, 1)``.
    * ``"neg"`` normal-exponential-gamma (Griffin & Brown 2011, Bayesian Analysis
      6:1, doi:10.1214/11-BA601): ``tau_k^2 | gamma_k ~ Exponential(gamma_k^2 / 2)``,
      ``gamma_k^2 ~ Gamma(0.5, 0.5)``, whose marginal is the Lomax (Pareto II)
      density ``tau_k^2 ~ Lomax(shape 0.5, scale 1)``.

    Every scale prior is truncated to ``tau_k >= TAU_MIN`` and renormalized. Without
    the floor the joint density of (W_perp[:, k], tau_k) grows without bound as a
    column collapses, so no MAP would exist; with it, unsupported columns settle at
    the floor (loadings about ``TAU_MIN``) and are the pruned ones.

Both solvers use the same density of ``(W, tau)``: the Laplace outer problem maximizes
it jointly with the other globals (tau in log coordinates, the density in tau as for
the other globals, no Jacobian), and Stan samples tau. Both leave ``W`` unconstrained
(every G x K entry free), so they put the same prior on ``Sigma = W W' + diag(d)``; a
pinned (lower-triangular, positive-diagonal) W would change the implied prior of
``W W'`` and, when a pivot gene's loading is near zero, trap NUTS chains in separate
sign configurations (the identification problem of positive lower-triangular factor
loadings; Frühwirth-Schnatter, Hosszejni & Lopes, Bayesian Analysis, "Sparse Bayesian
factor analysis when the number of factors is unknown"). ``W`` is therefore identified
only up to rotation; compare ``Sigma``, correlations or the singular values of
``W_perp``.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

PRIORS = ("normal", "gaussian", "horseshoe", "neg")
STAN_CODES = {name: i for i, name in enumerate(PRIORS)}  # the `loadings_prior` data item

W_SCALE = 1.0  # "normal": W[g, k] ~ Normal(0, W_SCALE)
TAU_MIN = 1.0e-3
ARD_SHAPE = 1.0e-3  # "gaussian": tau^-2 ~ Gamma(ARD_SHAPE, ARD_RATE)
ARD_RATE = 1.0e-3
HORSESHOE_SCALE = 1.0  # "horseshoe": tau ~ Cauchy+(0, HORSESHOE_SCALE)
NEG_SHAPE = 0.5  # "neg": tau^2 ~ Lomax(NEG_SHAPE, NEG_SCALE)
NEG_SCALE = 1.0
EFFECTIVE_RANK_THRESHOLD = 0.05

_LOG_2PI = float(np.log(2.0 * np.pi))


def check_prior(prior):
    """Return ``prior`` if it names a loadings prior, else raise ``ValueError``."""
    if prior not in PRIORS:
        raise ValueError(f"unknown loadings_prior {prior!r}; allowed: {', '.join(PRIORS)}")
    return prior


def n_scales(prior, K):
    """Number of column scales tau the prior carries: 0 for "normal", else K."""
    return 0 if check_prior(prior) == "normal" else int(K)


def w_perp(W):
    """Gauge-invariant loadings: ``W`` with its column means over genes removed, (G, K)."""
    W = np.asarray(W, dtype=float)
    return W - W.mean(axis=0, keepdims=True)


def gauge_diagnostics(W):
    """Sizes of the parallel (capture-like) and perpendicular parts of the loadings.

    Parameters
    ----------
    W : (G, K) loadings.

    Returns
    -------
    dict
        ``norm_parallel`` = ||1 m'||_F = sqrt(G) ||m||, ``norm_perp`` = ||W_perp||_F,
        ``ratio`` = norm_parallel / norm_perp (a large ratio means the factors mostly
        move whole cells, the direction confounded with capture), and the same three
        per column as arrays (``*_by_factor``).
    """
    W = np.asarray(W, dtype=float)
    G = W.shape[0]
    par = np.sqrt(G) * np.abs(W.mean(axis=0))
    perp = np.linalg.norm(w_perp(W), axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio_k = par / perp
    norm_par, norm_perp = float(np.linalg.norm(par)), float(np.linalg.norm(perp))
    return {"norm_parallel": norm_par, "norm_perp": norm_perp,
            "ratio": norm_par / norm_perp if norm_perp > 0 else float("inf"),
            "norm_parallel_by_factor": par, "norm_perp_by_factor": perp,
            "ratio_by_factor": ratio_k}


def effective_rank(W, threshold=EFFECTIVE_RANK_THRESHOLD):
    """Number of latent directions that move log-rates by a non-negligible amount.

    Counts the singular values ``s_k`` of ``W_perp`` with root-mean-square loading
    ``s_k / sqrt(G - 1)`` at least ``threshold`` (default 0.05: a factor whose one-sd
    change moves a typical gene's log-rate by less than 5% is treated as absent).
    Singular values make the count rotation-invariant.

    Parameters
    ----------
    W : (G, K) loadings;  threshold : float > 0, in log-rate units.

    Returns
    -------
    int
    """
    Wp = w_perp(W)
    s = np.linalg.svd(Wp, compute_uv=False)
    return int(np.sum(s / np.sqrt(max(Wp.shape[0] - 1, 1)) >= threshold))


# ------------------------------------------------------------------ densities


def log_scale_prior(tau, prior):
    """Normalized log density of the column scales on ``[TAU_MIN, inf)`` and d/d log tau.

    Parameters
    ----------
    tau : (K,) column scales ``>= TAU_MIN``;  prior : one of the shrinkage priors.

    Returns
    -------
    value : float (summed over columns);  grad_log_tau : (K,)
    """
    tau = np.asarray(tau, dtype=float)
    psi, t2min = tau**2, TAU_MIN**2
    if prior == "gaussian":
        # psi ~ InvGamma(ARD_SHAPE, ARD_RATE); p(tau) = p_psi(tau^2) 2 tau
        lp = (stats.invgamma.logpdf(psi, ARD_SHAPE, scale=ARD_RATE) + np.log(2 * tau)
              - stats.invgamma.logsf(t2min, ARD_SHAPE, scale=ARD_RATE))
        dlp = -2.0 * (ARD_SHAPE + 1.0) + 2.0 * ARD_RATE / psi + 1.0
    elif prior == "horseshoe":
        lp = (stats.cauchy.logpdf(tau, 0.0, HORSESHOE_SCALE)
              - stats.cauchy.logsf(TAU_MIN, 0.0, HORSESHOE_SCALE))
        dlp = -2.0 * psi / (HORSESHOE_SCALE**2 + psi)
    elif prior == "neg":
        lp = (stats.lomax.logpdf(psi, NEG_SHAPE, scale=NEG_SCALE) + np.log(2 * tau)
              - stats.lomax.logsf(t2min, NEG_SHAPE, scale=NEG_SCALE))
        dlp = -(NEG_SHAPE + 1.0) * 2.0 * psi / (NEG_SCALE + psi) + 1.0
    else:
        raise ValueError(f"{prior!r} has no column scales; shrinkage priors: "
                         f"{', '.join(PRIORS[1:])}")
    return float(np.sum(lp)), dlp


def log_prior_and_grad(W, log_tau, prior):
    """Log prior density of the loadings (and scales) with its gradient.

    Parameters
    ----------
    W : (G, K) loadings.
    log_tau : (n_scales(prior, K),) log column scales (empty for "normal").
    prior : str, one of :data:`PRIORS`.

    Returns
    -------
    value : float, normalized log density of ``(W, tau)`` (density in tau).
    grad_W : (G, K);  grad_log_tau : (K,) or (0,)
    """
    W = np.asarray(W, dtype=float)
    G, K = W.shape
    if check_prior(prior) == "normal":
        value = float(np.sum(stats.norm.logpdf(W, 0.0, W_SCALE)))
        return value, -W / W_SCALE**2, np.zeros(0)
    log_tau = np.asarray(log_tau, dtype=float)
    if log_tau.shape != (K,):
        raise ValueError(f"log_tau must have shape ({K},) for loadings_prior={prior!r}; "
                         f"got {log_tau.shape}")
    tau = np.exp(log_tau)
    m = W.mean(axis=0)
    Wp = W - m
    ss = np.sum(Wp**2, axis=0)
    value = float(np.sum(-(G - 1) * (0.5 * _LOG_2PI + log_tau) - ss / (2 * tau**2)
                         - 0.5 * _LOG_2PI - 0.5 * G * m**2))
    # d/dW of -||W_perp||^2/(2 tau^2) is -W_perp/tau^2 (the projection is symmetric and
    # idempotent); of -G m^2/2 it is -m for every gene.
    grad_W = -Wp / tau**2 - m
    grad_log_tau = -(G - 1) + ss / tau**2
    lp_tau, dlp_tau = log_scale_prior(tau, prior)
    return value + lp_tau, grad_W, grad_log_tau + dlp_tau


def initial_log_tau(W, prior):
    """Starting log column scales: the RMS of each W_perp column, floored at TAU_MIN."""
    if n_scales(prior, np.shape(W)[1]) == 0:
        return np.zeros(0)
    Wp = w_perp(W)
    rms = np.sqrt(np.mean(Wp**2, axis=0) * Wp.shape[0] / max(Wp.shape[0] - 1, 1))
    return np.log(np.maximum(rms, 2 * TAU_MIN))
