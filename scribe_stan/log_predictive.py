"""Per-cell log predictive density ``log p(u_c | theta)`` with the cell's latents integrated.

Every model gives the probability of the cell's whole count vector ``u_c`` (all fitted
genes) given the globals ``theta``, with the per-cell latents (log-rates ``x_c``, ALR
coordinates ``y_c``, capture loss ``eta_c``) integrated out under their population
prior:

* ``pln`` / ``nbln``: ``int prod_g Poisson|NB2(u_cg | exp(x_g - eta)) N(x | mu, Sigma)
  TruncNormal(eta | a_c, sigma_M) dx deta``;
* ``nbvcp``: ``int prod_g NB2(u_cg | exp(m_g - eta), r_g) TruncNormal(eta) deta``;
* ``lnm`` / ``lnmvcp``: ``NB2(u_T,c | m_T [exp(-eta)], r_T) x int Multinomial(u_c | u_T,c,
  softmax([y, 0])) N(y | mu, Sigma) dy`` (eta integrated for lnmvcp). Since the total
  ``u_T,c = sum_g u_cg`` is a function of ``u_c``, this product is a proper pmf of
  ``u_c``, on the same footing as pln/nbln/nbvcp, *provided the multinomial coefficient
  ``u_T! / prod_g u_g!`` is included* (it is: :meth:`~scribe_stan.laplace.lnm_solver.
  CompositionProblem._log_mult`). Leaving it out would shift each cell by a
  data-dependent constant and make lnm's numbers incomparable.

The integral is estimated by importance sampling with the Laplace Gaussian of each cell
as proposal ``q_c``: ``log p_hat_IS(u_c) = log mean_s exp(lw_s)``, ``lw_s = log p(u_c,
z_s | theta) - log q_c(z_s)``, ``z_s ~ q_c`` (unbiased on the natural scale; both
densities are normalized, so no self-normalization is needed). The Pareto shape
``k_hat`` of the right tail of the weights (:func:`arviz_stats` PSIS machinery) says
whether the Gaussian is an adequate proposal for the cell: below
``min(1 - 1/log10(S), 0.7)`` the estimate is reliable (Vehtari et al. 2024, Pareto
smoothed importance sampling, JMLR 25(72)). The plain Laplace value (no sampling) is
returned beside it; read k-hat together with the difference of the two. A slightly skewed
posterior makes the Gaussian's tails technically too light, which k-hat reports (nbvcp's
1-D eta posteriors on PBMC: k-hat around 0.5) even where the weights barely vary and
the correction is 1e-3 nats.

Capture prior. Every model is evaluated under its own capture prior of SPEC
(``eta_c ~ Normal(log M0 - log L_c, sigma_M)`` truncated at 0). A nbln fit from the
nbvcp cascade held or informed eta while its globals were fitted; here eta is integrated
under the standard prior at the cascade's globals, so the number is the nbln model's.

The globals are plug-in point estimates (Laplace), posterior draws (HMC) or draws from
the Laplace fit's Gaussian of the globals (``globals="laplace"``); see
:mod:`scribe_stan.model_comparison`. Every ``*_weights`` function takes its globals
explicitly.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass

import arviz_stats  # noqa: F401  (registers the .azstats accessor)
import numpy as np
import xarray as xr
from scipy import special, stats

from scribe_stan.laplace.solver import LaplaceProblem
from scribe_stan.models import pln

#: Cells x genes x draws of Gaussian variates held at once when sampling lnm latents.
_BLOCK_ELEMENTS = 3 * 10**7
#: Fewest draws a Pareto k-hat (and PSIS) takes: its tail is a fifth of them, at least 5.
MIN_DRAWS = 25


def check_draws(draws, name="draws"):
    """``int(draws)``; ValueError unless an integer >= :data:`MIN_DRAWS`."""
    if (not isinstance(draws, (int, np.integer)) or isinstance(draws, bool)
            or draws < MIN_DRAWS):
        raise ValueError(f"{name} must be an integer >= {MIN_DRAWS} (the Pareto tail of "
                         f"PSIS and k-hat is a fifth of the draws, at least 5); got "
                         f"{draws!r}")
    return int(draws)


@dataclass
class CellWeights:
    """Importance-sampling pieces of one fit at one set of globals.

    Attributes
    ----------
    log_weights : (S, N) ``log p(u_c, z_s | theta) - log q_c(z_s)``.
    laplace : (N,) Laplace approximation of ``log p(u_c | theta)``.
    """

    log_weights: np.ndarray
    laplace: np.ndarray


def lognormal_weights(data, mu, W, d, log_r, draws, rng, *, start=None):
    """IS pieces of pln (``log_r=None``) or nbln at globals ``(mu, W, d[, log_r])``.

    Parameters
    ----------
    data : scribe_stan.fit_data.FitData (counts, log_lib, capture prior).
    mu (G,), W (G, K), d (G,), log_r (G,) or None.
    draws : int;  rng : numpy Generator.
    start : (x (N, G), eta (N,)), optional warm start of the per-cell Newton.

    Returns
    -------
    CellWeights, and the LaplaceProblem (holding the modes, for warm starts).
    """
    problem = LaplaceProblem(data.counts, log_M0=data.log_M0, sigma_M=data.sigma_M,
                             log_lib=data.log_lib)
    if start is not None:
        problem.x[:] = start[0]
        problem.eta[:] = np.maximum(start[1], 0.0)
    laplace = problem.log_marginal(mu, W, d, log_r=log_r)
    smp = problem.sample(mu, W, d, draws, rng, log_r=log_r, genes=np.empty(0, np.int64))
    return CellWeights(smp["lp"] - smp["lp_approx"], laplace), problem


def nbvcp_weights(problem, m, log_r, draws, rng):
    """IS pieces of nbvcp at ``(m, log_r)``; ``problem`` an NbvcpProblem (modes updated).

    The proposal for eta is the 1-D Laplace Gaussian truncated to ``eta >= 0``.
    """
    from scribe_stan.laplace.nbvcp import gamma_tables, log_lik_draws

    laplace = problem.log_marginal(m, log_r)
    mean, sd = problem.eta, 1.0 / np.sqrt(problem.curvature)
    lower = -mean / sd
    eta = stats.truncnorm.rvs(lower, np.inf, loc=mean, scale=sd,
                              size=(draws, mean.size), random_state=rng)
    log_q = stats.truncnorm.logpdf(eta, lower, np.inf, loc=mean, scale=sd)
    r = np.exp(log_r)
    lg, _ = gamma_tables(r, problem.offsets)
    log_lik = log_lik_draws(problem.indptr, problem.indices, problem.vals, lg,
                            problem.offsets, problem.lgam_u, m, r, eta)
    log_p = log_lik + pln.log_capture_prior(eta, problem.a, problem.sigma_M)
    return CellWeights(log_p - log_q, laplace)


def lnm_weights(composition, totals, mu, W, d, log_m_T, log_r_T, draws, rng):
    """IS pieces of lnm / lnmvcp at globals ``(mu, W, d)`` and ``(log_m_T, log_r_T)``.

    Composition block: draws of y (or of the factor scores) from each cell's Gaussian;
    total block: exact NB (lnm) or eta from its truncated 1-D Gaussian (lnmvcp).

    Parameters
    ----------
    composition : lnm_solver.CompositionProblem;  totals : lnm_solver.TotalProblem
        Their modes are re-solved at these globals, warm-started from the stored ones,
        and left there (pass copies to keep a fit's modes).
    mu (D,), W (D, K), d (D,) or None (low-rank mode): ALR composition globals.
    log_m_T, log_r_T : float, the totals' globals.
    draws : int;  rng : numpy Generator.

    Returns
    -------
    CellWeights
    """
    N, D = composition.shape
    laplace = (composition.log_marginal(mu, W, d)
               + totals.log_marginal(log_m_T, log_r_T))
    block = max(1, min(draws, _BLOCK_ELEMENTS // max(N * D, 1)))
    lw = np.empty((draws, N))
    for start in range(0, draws, block):
        part = composition.sample(mu, W, d, min(block, draws - start), rng)
        lw[start:start + block] = part["lp"] - part["lp_approx"]
    _, _, lp_tot, lpa_tot = totals.sample(log_m_T, log_r_T, draws, rng)
    return CellWeights(lw + lp_tot - lpa_tot, laplace)


def weights_of_fit(fit, draws, rng):
    """:class:`CellWeights` of a Laplace fit (pln, nbln, nbvcp, lnm, lnmvcp)."""
    from scribe_stan import specs
    from scribe_stan.fits.base import Fit

    if not isinstance(fit, Fit) or fit.method != "laplace":
        raise TypeError(f"expected a Laplace fit of scribe_stan.fit; got "
                        f"{type(fit).__name__}")
    family = specs.get(fit.model).family
    if family == "lognormal":
        weights, _ = lognormal_weights(fit.data, fit.mu, fit.W, fit.d, fit.log_r, draws, rng,
                                       start=(fit.x_hat, fit.eta_hat))
        return weights
    # copies of the problems: the fit's warm-start state is left as it was
    if family == "nbvcp":
        return nbvcp_weights(deepcopy(fit.solution.problem), fit.m, fit.log_r, draws, rng)
    return lnm_weights(deepcopy(fit.composition.problem), deepcopy(fit.totals.problem),
                       fit.mu_alr, fit.W_alr, fit.composition.d, fit.totals.log_m_T,
                       fit.totals.log_r_T, draws, rng)


def is_estimate(log_weights):
    """Importance-sampling estimate and Pareto k-hat per cell.

    Parameters
    ----------
    log_weights : (S, N) log importance weights.

    Returns
    -------
    estimate : (N,) ``log mean_s exp(log_weights)``.
    pareto_k : (N,) Pareto shape of the weights' right tail (ArviZ's k-hat).
    """
    S = log_weights.shape[0]
    estimate = special.logsumexp(log_weights, axis=0) - np.log(S)
    # zero weights (draws with eta < 0, outside the prior's support) stay far below the
    # others without the -inf that the tail fit cannot take
    finite = np.isfinite(log_weights)
    floor = np.min(np.where(finite, log_weights, np.inf), axis=0) - 50.0
    da = xr.DataArray(np.where(finite, log_weights, floor)[None],
                      dims=("chain", "draw", "cell"))
    k = da.azstats.pareto_khat(sample_dims=["chain", "draw"], tail="right", log_weights=True)
    return estimate, np.asarray(k)


def cell_log_predictive(fit, *, draws=200, seed=0):
    """Per-cell log predictive density of a Laplace fit at its fitted globals.

    Parameters
    ----------
    fit : LaplaceFit (pln, nbln), NbvcpFit or LnmLaplaceFit (lnm, lnmvcp).
    draws : int >= 25
        Importance-sampling draws per cell (:data:`MIN_DRAWS`).
    seed : int

    Returns
    -------
    xarray.Dataset with dim ``cell`` (coords ``obs_names``) and variables
    ``elpd`` (IS estimate of ``log p(u_c | theta_hat)``, nats), ``laplace`` (Laplace
    value), ``pareto_k`` (k-hat of the weights), and attrs ``draws``, ``good_k``.

    Raises
    ------
    ValueError
        ``draws`` not an integer >= 25.
    TypeError
        Not a Laplace fit.
    """
    draws = check_draws(draws)
    w = weights_of_fit(fit, draws, np.random.default_rng(seed))
    elpd, k = is_estimate(w.log_weights)
    cells = np.asarray(fit.obs_names, dtype=str)
    return xr.Dataset({"elpd": ("cell", elpd), "laplace": ("cell", w.laplace),
                       "pareto_k": ("cell", k)},
                      coords={"cell": cells},
                      attrs={"draws": int(draws), "good_k": good_k(draws)})


def good_k(draws):
    """ArviZ's threshold on k-hat for ``draws`` samples: ``min(1 - 1/log10(S), 0.7)``."""
    return float(min(1.0 - 1.0 / np.log10(draws), 0.7))
