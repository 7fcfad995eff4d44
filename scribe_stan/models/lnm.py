"""Logistic-normal multinomial models ``lnm`` and ``lnmvcp``: priors, data, NumPy reference.

Model (``stan/lnm.stan`` and ``stan/lnmvcp.stan`` are the reference specification)::

    u_T,c ~ NegBinomial2(m_T, r_T)                      (lnm)
    u_T,c ~ NegBinomial2(m_T exp(-eta_c), r_T)          (lnmvcp; eta_c with pln's capture prior)
    y_c   ~ MultiNormal(mu, Sigma),  Sigma = W W' + diag(d)      in R^{G-1}
    rho_c = softmax([y_c, 0])  (0 at the reference gene)
    u_c | u_T,c ~ Multinomial(u_T,c, rho_c)

``u_T,c = sum_g u[c, g]`` is the total count of the modelled genes. ``y_c`` are the
additive log-ratio (ALR) coordinates ``y_j = log(rho_j / rho_ref)`` of the composition
against a reference gene (Aitchison 1986, *The Statistical Analysis of Compositional
Data*, Chapman & Hall, doi:10.1007/978-94-009-4109-0); the composition model is the
logistic-normal multinomial of Billheimer, Guttorp & Fagan (2001), JASA 96:1205,
doi:10.1198/016214501753381850. Arrays in ALR coordinates keep the other genes in their
original order (the reference's column removed).

Priors (identical in the Stan programs): ``mu, W, d`` get pln's default priors
(:func:`scribe_stan.models.pln.log_prior_globals` with iid normal loadings; the
loadings-shrinkage options of pln are not offered for lnm); ``log m_T ~ Normal(pln.MU_LOC,
pln.MU_SCALE)``, pln's weakly informative log-mean prior; ``log r_T`` gets the shared NB
dispersion prior (:mod:`scribe_stan.models.dispersion`).

Reference gene (default, :func:`default_reference`): among the genes in the top decile
of mean proportion, the one whose proportion ``u_g / u_T`` varies least across cells
(smallest coefficient of variation). A high proportion keeps ``rho_ref`` away from 0,
which bounds the Laplace Hessian's near-singular direction (see
:mod:`scribe_stan.laplace.lnm_cpu`); a stable proportion makes ALR coordinates read
like log-ratios to a housekeeping gene.

What the reference changes and what not. For a covariance Sigma of *any* form, the
logistic-normal family is closed under a change of reference (a linear bijection
``P`` of ALR coordinates, ``Sigma -> P Sigma P'``), and the CLR covariance
``F Sigma F'`` (:func:`clr_covariance`) is the same whichever reference was used. The
*factor-analytic* form ``W W' + diag(d)`` is not closed under ``P``: in G logits it
gives the reference gene no gene-specific variance, and re-referencing turns the old
reference's ``d`` into a shared rank-one term. So the full-``d`` model (and the priors
on mu and W) depend mildly on the reference, while ALR-coordinate quantities (mu, W,
Sigma in ALR) change completely. With ``d = 0`` (the Laplace ``low_rank`` mode) the
likelihood is reference-invariant: the CLR mean and ``F W W' F'`` are the same
subspace for every reference, only the priors differ.
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

from scribe_stan.models import dispersion, pln

NAMES = ("lnm", "lnmvcp")
STAN_FILES = {"lnm": "lnm.stan", "lnmvcp": "lnmvcp.stan"}
CONDITIONAL_STAN_FILES = {"lnm": "lnm_conditional.stan", "lnmvcp": "lnmvcp_conditional.stan"}

LOG_M_T_LOC = pln.MU_LOC
LOG_M_T_SCALE = pln.MU_SCALE
#: Fraction of genes (by mean proportion) among which the default reference is chosen.
REFERENCE_TOP_FRACTION = 0.1


# --------------------------------------------------------------------------------------
# Reference gene and coordinates
# --------------------------------------------------------------------------------------


def default_reference(counts):
    """Index of the default ALR reference gene.

    Among the ``max(1, ceil(0.1 G))`` genes with the highest mean proportion
    ``u[c, g] / u_T,c`` (cells with ``u_T,c = 0`` ignored), the one with the smallest
    coefficient of variation of its proportion across cells.

    Parameters
    ----------
    counts : (N, G) array of non-negative counts.

    Returns
    -------
    int
        0-based gene index.
    """
    counts = np.asarray(counts, dtype=float)
    total = counts.sum(axis=1)
    prop = counts[total > 0] / total[total > 0, None]
    mean = prop.mean(axis=0)
    n_top = max(1, int(np.ceil(REFERENCE_TOP_FRACTION * counts.shape[1])))
    top = np.argsort(-mean, kind="stable")[:n_top]
    cv = prop[:, top].std(axis=0) / mean[top]
    return int(top[np.argmin(cv)])


def resolve_reference(reference_gene, var_names, counts):
    """0-based index of the reference gene from the user's choice.

    Parameters
    ----------
    reference_gene : None, str or int
        ``None``: :func:`default_reference`; a gene name in ``var_names``; or a 0-based
        column index.
    var_names : sequence of str, length G
    counts : (N, G) counts (used by the default only).

    Returns
    -------
    int

    Raises
    ------
    ValueError
        Unknown gene name or index out of range; the message lists allowed values.
    """
    names = [str(v) for v in var_names]
    if reference_gene is None:
        return default_reference(counts)
    if isinstance(reference_gene, (int, np.integer)) and not isinstance(reference_gene, bool):
        if not 0 <= int(reference_gene) < len(names):
            raise ValueError(f"reference_gene index {reference_gene} is out of range; allowed: "
                             f"0 .. {len(names) - 1}, a gene name, or None (default)")
        return int(reference_gene)
    if isinstance(reference_gene, str):
        if reference_gene not in names:
            shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
            raise ValueError(f"unknown reference gene {reference_gene!r}: not among the "
                             f"modelled genes ({shown}); pass one of them, an index, or None")
        return names.index(reference_gene)
    raise TypeError(f"reference_gene must be None, a gene name or an int index; got "
                    f"{reference_gene!r} of type {type(reference_gene).__name__}")


def logits(y, ref):
    """Logits of all G genes from ALR coordinates: insert 0 at ``ref``.

    Parameters
    ----------
    y : (..., G-1) ALR coordinates;  ref : int, 0-based reference index.

    Returns
    -------
    ndarray (..., G)
    """
    y = np.asarray(y, dtype=float)
    return np.insert(y, ref, 0.0, axis=-1)


def alr_to_clr_map(G, ref):
    """Linear map ``F`` (G x (G-1)) from ALR to centred log-ratio (CLR) coordinates.

    ``clr(rho) = F alr(rho)``: insert a zero at the reference, then subtract the mean
    over the G genes, ``F = E - (1/G) 1 1'`` with ``E`` the zero-inserting embedding
    (Aitchison 1986, section 5.1).
    """
    E = np.insert(np.eye(G - 1), ref, 0.0, axis=0)
    return E - 1.0 / G


def clr_mean(mu_alr, ref):
    """CLR coordinates of the ALR mean, ``F mu`` (shape (..., G))."""
    lg = logits(mu_alr, ref)
    return lg - lg.mean(axis=-1, keepdims=True)


def clr_covariance(Sigma_alr, ref):
    """CLR covariance ``F Sigma F'`` (G x G, singular: rows sum to 0) from an ALR one.

    Reference-invariant: the same for the same distribution whichever reference its
    ALR covariance was written in. Accepts leading dims ``(..., G-1, G-1)``.
    """
    Sigma_alr = np.asarray(Sigma_alr, dtype=float)
    F = alr_to_clr_map(Sigma_alr.shape[-1] + 1, ref)
    return F @ Sigma_alr @ F.T


def reference_change_map(G, ref, new_ref):
    """Linear map ``T`` ((G-1) x (G-1)) taking ALR coordinates against ``ref`` to ALR
    coordinates against ``new_ref``: ``y' = T y``, ``Sigma' = T Sigma T'``."""
    E = np.insert(np.eye(G - 1), ref, 0.0, axis=0)  # ALR -> logits with 0 at ref
    P = np.delete(np.eye(G), new_ref, axis=0) - np.eye(G)[new_ref]  # logits -> ALR(new_ref)
    return P @ E


# --------------------------------------------------------------------------------------
# Stan data
# --------------------------------------------------------------------------------------


def stan_data(counts, K, ref, *, log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT,
              log_lib=None):
    """Data dict for ``stan/lnm.stan`` and ``stan/lnmvcp.stan``.

    Parameters
    ----------
    counts : (N, G) int counts in the original gene order.
    K : int, latent rank ``1 <= K < G - 1``.
    ref : int, 0-based reference gene (stored 1-based as Stan's ``ref``).
    log_M0, sigma_M, log_lib : capture prior (see :func:`scribe_stan.models.pln.stan_data`;
        unused by lnm, kept for the shared data contract).

    Returns
    -------
    dict with keys ``N, G, K, counts, log_lib, log_M0, sigma_M, ref``.
    """
    counts = np.asarray(counts)
    N, G = counts.shape
    return {
        "N": int(N), "G": int(G), "K": int(K),
        "counts": counts.astype(np.int64),
        "log_lib": (np.log(counts.sum(axis=1).astype(float)) if log_lib is None
                    else np.asarray(log_lib, dtype=float)),
        "log_M0": float(log_M0),
        "sigma_M": float(sigma_M),
        "ref": int(ref) + 1,
    }


def conditional_stan_data(counts, ref, mu_alr, W_alr, d_alr, log_m_T, log_r_T, **capture):
    """Data dict for the conditional programs: :func:`stan_data` plus the globals."""
    W_alr = np.asarray(W_alr, dtype=float)
    data = stan_data(counts, W_alr.shape[1], ref, **capture)
    data.update(mu_alr=np.asarray(mu_alr, float), W_alr=W_alr, d_alr=np.asarray(d_alr, float),
                log_m_T=float(log_m_T), log_r_T=float(log_r_T))
    return data


# --------------------------------------------------------------------------------------
# NumPy reference log densities (dense; small G only). They mirror the Stan programs.
# --------------------------------------------------------------------------------------


def log_prior_totals(log_m_T, log_r_T):
    """Log prior of the total-count globals (normalized), a float."""
    return float(stats.norm.logpdf(log_m_T, LOG_M_T_LOC, LOG_M_T_SCALE)
                 + dispersion.log_prior(np.atleast_1d(log_r_T)))


def log_prior_globals(mu, W, d, log_m_T, log_r_T):
    """Log prior of all globals: pln's prior on (mu, W, d) plus :func:`log_prior_totals`."""
    return float(pln.log_prior_globals(mu, W, d) + log_prior_totals(log_m_T, log_r_T))


def log_multinomial_cells(counts, y, ref):
    """``log Multinomial(u_c | u_T,c, softmax(logits(y_c)))`` per cell, with the coefficient."""
    counts = np.asarray(counts, float)
    lg = logits(y, ref)
    log_rho = lg - special.logsumexp(lg, axis=-1, keepdims=True)
    total = counts.sum(axis=1)
    return (special.gammaln(total + 1.0) - special.gammaln(counts + 1.0).sum(axis=1)
            + (counts * log_rho).sum(axis=1))


def log_lik_cells(counts, y, ref, log_mean_T, r_T):
    """Per-cell log likelihood: NB total plus multinomial composition, shape (N,)."""
    counts = np.asarray(counts)
    total = counts.sum(axis=1)
    return (dispersion.nb_logpmf(total, np.broadcast_to(log_mean_T, total.shape), r_T)
            + log_multinomial_cells(counts, y, ref))


def capture_quantile_coordinates(eta, total, log_m_T, log_r_T, a, sigma_M):
    """Capture coordinates sampled by ``stan/lnmvcp.stan``.

    lnmvcp.stan samples the quantile ``eta_q_c`` of eta_c in a Gaussian approximation
    of its conditional posterior given ``(m_T, r_T)``, truncated to ``eta_c >= 0``:
    the capture prior ``Normal(a_c, sigma_M)`` times the total's likelihood expanded
    to second order in ``log m_T - eta_c`` at ``log total_c``, where its information is
    ``I_c = total_c r_T / (total_c + r_T)`` (``stan/functions/capture.stanfunctions``).

    Parameters
    ----------
    eta : (N,) array, eta >= 0
        Capture losses.
    total : (N,) array of int
        Per-cell totals of the counts.
    log_m_T, log_r_T : float
        Log mean and log dispersion of the total.
    a : (N,) array
        Capture prior location, :func:`scribe_stan.models.pln.capture_prior_mean`.
    sigma_M : float
        Capture prior scale.

    Returns
    -------
    eta_q : (N,) ndarray in [0, 1]
    log_jacobian : float
        ``log |d eta / d eta_q|`` summed over cells, ``-sum_c log q(eta_c)`` with ``q``
        the truncated approximation. The program's log density in ``eta_q`` is the
        density in ``eta`` plus this.
    """
    t = np.asarray(total, float)
    r_T = np.exp(log_r_T)
    information = t * r_T / (t + r_T)
    precision = 1.0 / sigma_M**2 + information
    loc = (np.asarray(a, float) / sigma_M**2
           + information * (log_m_T - np.log(np.maximum(t, 1.0)))) / precision
    scale = 1.0 / np.sqrt(precision)
    approximation = stats.truncnorm(-loc / scale, np.inf, loc=loc, scale=scale)
    return approximation.cdf(eta), float(-approximation.logpdf(eta).sum())


def log_joint(counts, ref, mu, W, d, log_m_T, log_r_T, y, eta=None, *,
              log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT, log_lib=None):
    """Exact joint log density of lnm (``eta=None``) or lnmvcp, all constants included.

    Parameters
    ----------
    counts : (N, G) int;  ref : int (0-based);  mu : (G-1,);  W : (G-1, K);  d : (G-1,);
    log_m_T, log_r_T : float;  y : (N, G-1) ALR coordinates;  eta : (N,) or None.
    log_M0, sigma_M, log_lib : capture prior (lnmvcp).

    Returns
    -------
    float
    """
    counts = np.asarray(counts)
    log_mean = np.full(counts.shape[0], float(log_m_T))
    out = log_prior_globals(mu, W, d, log_m_T, log_r_T)
    out += pln.log_latent_prior_cells(y, mu, W, d).sum()
    if eta is not None:
        if log_lib is None:
            log_lib = np.log(counts.sum(axis=1))
        a = pln.capture_prior_mean(log_lib, log_M0)
        out += pln.log_capture_prior(eta, a, sigma_M).sum()
        log_mean = log_mean - np.asarray(eta, float)
    return float(out + log_lik_cells(counts, y, ref, log_mean, np.exp(log_r_T)).sum())


def simulate(N, G, K, *, ref=0, capture=False, seed=0, total_mean=2000.0, r_T=20.0,
             mu_spread=1.0, loading_scale=0.5, d_value=0.1, log_M0=np.log(pln.M0_DEFAULT),
             sigma_M=0.3):
    """Simulate counts from lnm (or lnmvcp with ``capture=True``) with known truth.

    For lnmvcp, eta_c is drawn from the capture prior with the design library size
    ``total_mean`` (returned as ``log_lib``; fit with it to fit the generating model),
    and ``m_T = total_mean exp(a)`` so that totals are near ``total_mean``.

    Returns
    -------
    dict
        ``counts`` (N, G) int64, ``ref``, ``mu`` (G-1,), ``W`` (G-1, K), ``d`` (G-1,),
        ``y`` (N, G-1), ``log_m_T``, ``log_r_T``, ``eta`` (N,) or None, ``log_lib``,
        ``log_M0``, ``sigma_M``.
    """
    rng = np.random.default_rng(seed)
    D = G - 1
    mu = mu_spread * rng.standard_normal(D)
    W = loading_scale * rng.standard_normal((D, K))
    d = np.full(D, d_value)
    y = mu + rng.standard_normal((N, K)) @ W.T + np.sqrt(d) * rng.standard_normal((N, D))
    log_lib = np.full(N, np.log(total_mean))
    eta = None
    log_m_T = np.log(total_mean)
    log_mean = np.full(N, log_m_T)
    if capture:
        a = log_M0 - np.log(total_mean)
        eta = stats.truncnorm.rvs(-a / sigma_M, np.inf, loc=a, scale=sigma_M, size=N,
                                  random_state=rng)
        log_m_T = log_m_T + a
        log_mean = log_m_T - eta
    m = np.exp(log_mean)
    total = rng.poisson(rng.gamma(r_T, m / r_T))
    lg = logits(y, ref)
    rho = np.exp(lg - special.logsumexp(lg, axis=1, keepdims=True))
    counts = np.stack([rng.multinomial(t, p / p.sum()) for t, p in zip(total, rho)])
    return {"counts": counts.astype(np.int64), "ref": int(ref), "mu": mu, "W": W, "d": d,
            "y": y, "log_m_T": float(log_m_T), "log_r_T": float(np.log(r_T)), "eta": eta,
            "log_lib": log_lib, "log_M0": float(log_M0), "sigma_M": float(sigma_M)}
