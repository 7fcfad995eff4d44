"""Laplace fits of the ``nbvcp`` model (:class:`NbvcpFit`) and
:func:`posterior_moments`, the Gaussian summaries (of a Laplace or HMC nbvcp fit) that
seed nbln's informative priors (:mod:`scribe_stan.cascade`).

Draws (:meth:`NbvcpFit.to_datatree`) take the globals ``(m, r)`` at their MAP
(``globals="point"``) or from their own Laplace Gaussian (``globals="laplace"``, nested
Laplace: :mod:`scribe_stan.laplace.nbvcp_nested`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from scribe_stan import _validate, convert
from scribe_stan.fit_data import FitData
from scribe_stan.fits.base import (Fit, LaplaceResult, check_tree_size, fitted_gene_index,
                                   result_target)
from scribe_stan.fits.store import stan_hash
from scribe_stan.laplace.nbvcp import (NbvcpProblem, NbvcpSolution, gamma_tables,
                                       gaussian_moments, log_lik_draws)
from scribe_stan.models import pln

__all__ = ["NbvcpFit", "posterior_moments"]

GLOBALS = ("point", "laplace")  # where draws are made: globals at the MAP or drawn


@dataclass
class NbvcpFit(LaplaceResult):
    """Laplace fit of the nbvcp model: MAP of the Laplace marginal over ``(m, log_r)``,
    a 1-D Gaussian per cell for the capture loss eta.

    Attributes
    ----------
    model : str, ``"nbvcp"``.
    m : (G,) log mean expression before capture;  r : (G,) NB dispersions;
    log_r : (G,) their logs (the fitting coordinate).
    eta_hat : (N,) per-cell mode of the capture loss (capture efficiency ``exp(-eta)``).
    eta_sd : (N,) 1-D Laplace posterior sd of eta at the fitted globals.
    converged : (N,) bool, the per-cell Newton step converged at the final globals.
    eta_at_bound : (N,) bool, eta's mode sits on its bound 0.
    objective : float, final Laplace objective (nats);  n_iter : outer iterations;
    success : bool and message : str from the optimizer.
    obs_names, var_names : pandas.Index;  settings : dict of the arguments used.
    """

    model: str
    solution: NbvcpSolution = field(repr=False)
    data: FitData = field(repr=False)
    settings: dict
    _globals_cache: dict = field(default_factory=dict, repr=False, compare=False)

    m = property(lambda self: self.solution.m)
    log_r = property(lambda self: self.solution.log_r)
    r = property(lambda self: np.exp(self.solution.log_r))
    eta_hat = property(lambda self: self.solution.modes.eta)
    eta_sd = property(lambda self: 1.0 / np.sqrt(self.solution.modes.curvature))
    converged = property(lambda self: self.solution.modes.converged)
    eta_at_bound = property(lambda self: self.solution.modes.at_bound)
    objective = property(lambda self: self.solution.objective)
    n_iter = property(lambda self: self.solution.n_iter)
    success = property(lambda self: self.solution.success)
    message = property(lambda self: self.solution.message)
    global_names = ("m", "r")
    _problem_state = {"solution": ("eta", "curvature", "n_iter", "converged", "at_bound")}

    def posterior_moments(self):
        """Shortcut for :func:`posterior_moments` ``(self)``."""
        return posterior_moments(self)

    def globals_posterior(self, *, method="auto", rank=None, step=1e-3):
        """Gaussian approximation of the globals' posterior at the Laplace MAP (cached;
        called without arguments, the one built most recently, whatever its settings).

        The outer step of a nested Laplace approximation: ``(m, log_r) ~ N(theta_hat,
        A^{-1})`` with ``A`` the negative Hessian of the exact Laplace objective (log
        marginal + log prior), by central finite differences of its exact gradient in
        coordinates whitened by the Schur-complement precision of
        :func:`~scribe_stan.laplace.nbvcp.gaussian_moments`; see
        :mod:`scribe_stan.laplace.nbvcp_nested` (methods, costs).

        Parameters
        ----------
        method : {"auto", "dense", "lowrank"}
            Dense Hessian (``4G`` gradient evaluations) or Lanczos low-rank correction
            of the whitening (2 gradients per product); "auto": dense up to 400 globals
            (200 genes).
        rank : int, optional
            Lowrank: eigenpairs kept (default 20).
        step : float
            Finite-difference step in the whitened coordinates.

        Returns
        -------
        scribe_stan.laplace.nbvcp_nested.NbvcpGlobalsPosterior

        Raises
        ------
        ValueError
            Unknown ``method`` (the allowed values are named); ``rank < 1``.
        """
        from scribe_stan.laplace.nbvcp_nested import nbvcp_globals

        return self._cached_globals(nbvcp_globals, self.solution, method=method, rank=rank,
                                    step=step)

    def _draw_globals(self, draws, rng):
        """Draws of the globals from :meth:`globals_posterior` (no latents),
        with their log prior and log density
        (:func:`scribe_stan.laplace.nbvcp_nested.draw_globals`)."""
        from scribe_stan.laplace.nbvcp_nested import draw_globals

        return draw_globals(self.globals_posterior(), draws, rng)

    def to_datatree(self, draws=500, *, genes=None, seed=None, globals="point"):
        """ArviZ DataTree of the Laplace posterior (one chain of independent draws).

        eta is drawn per cell from its 1-D Laplace Gaussian ``N(eta_hat, eta_sd^2)``
        truncated to ``eta >= 0`` (the support). With ``globals="point"`` ``m`` and
        ``r`` are point estimates repeated over draws; with ``globals="laplace"`` each
        draw first draws ``(m, log_r)`` from their Gaussian approximation
        (:meth:`globals_posterior`, built once per fit and cached), re-solves every
        cell's eta mode there (1-D Newton warm-started from the MAP modes, which are
        left in place afterwards) and draws eta from the cell's truncated Gaussian at
        those globals, so the per-cell draws carry the globals' uncertainty
        (:mod:`scribe_stan.laplace.nbvcp_nested`). ``sample_stats`` carries ``lp``
        (exact log density of the draw: ``log p(u, eta | m, r)`` summed over cells for
        "point"; joint with the globals, plus their prior, for "laplace") and
        ``lp_approx`` (the truncated Gaussian's log density, plus the globals'
        Gaussian log density for "laplace"), so
        :func:`arviz_stats.loo_approximate_posterior` applies. ``log_likelihood`` is the
        NB log likelihood per cell over all fitted genes; ``posterior_predictive`` holds
        NB replicated counts ``NegBinomial2(exp(m - eta), r)`` (at each draw's globals).

        Cost: "laplace" adds the globals' Gaussian once per fit (dense, up to 200
        genes: ``4G`` gradient evaluations of the Laplace objective; lowrank: 2 per
        Lanczos product, about ``2 * (a few times 20)``; plus an O(N G^2) Schur
        precision) and, per draw, one converged per-cell 1-D Newton solve and one
        Laplace value pass (each O(nnz + N G), like one gradient evaluation).

        Parameters
        ----------
        draws : int, >= 1
        genes : None, int or list of str
            Genes whose ``m``, ``r``, observed and replicated counts are stored: all
            (default), the ``n`` highest-mean ones, or those names.
            ``draws * cells * genes`` above 2e8 raises ``ValueError``.
        seed : int, optional (default: the fit's seed)
        globals : {"point", "laplace"}
            Globals at their MAP (default) or drawn from their Laplace Gaussian.

        Returns
        -------
        xarray.DataTree

        Raises
        ------
        TypeError, ValueError
            ``draws`` not an integer >= 1, invalid or unknown ``genes``, too many
            elements (:func:`scribe_stan.fits.base.check_tree_size`), or ``globals``
            not one of ``("point", "laplace")``.
        """
        _validate.check_choice("globals", globals, GLOBALS)
        idx = fitted_gene_index(self, genes)
        N = len(self.obs_names)
        draws = check_tree_size(draws, N, idx.size)
        rng = np.random.default_rng(self.settings["seed"] if seed is None else seed)
        problem = self.solution.problem
        if globals == "point":
            mean, sd = self.eta_hat, self.eta_sd
            lower = (0.0 - mean) / sd
            eta = stats.truncnorm.rvs(lower, np.inf, loc=mean, scale=sd, size=(draws, N),
                                      random_state=rng)
            lp_approx = stats.truncnorm.logpdf(eta, lower, np.inf, loc=mean, scale=sd)
            r = self.r
            lg, _ = gamma_tables(r, problem.offsets)
            log_lik = log_lik_draws(problem.indptr, problem.indices, problem.vals, lg,
                                    problem.offsets, problem.lgam_u, self.m, r, eta)
            lp = log_lik + pln.log_capture_prior(eta, problem.a, problem.sigma_M)
            mean_counts = np.exp(self.m[idx][None, None, :] - eta[..., None])
            rep_r = r[idx][None, None, :]
            y_rep = rng.negative_binomial(rep_r, rep_r / (rep_r + mean_counts))
            rep = lambda a: np.broadcast_to(a, (1, draws) + a.shape)  # noqa: E731
            m_post, r_post = rep(self.m[idx]), rep(r[idx])
            lp, lp_approx = lp.sum(axis=1), lp_approx.sum(axis=1)
        else:
            from scribe_stan.laplace.nbvcp_nested import nested_draws

            smp = nested_draws(self.solution, self.globals_posterior(), draws, rng)
            eta, log_lik = smp["eta"], smp["log_lik"]
            m_s, r_s = smp["m"][:, idx], np.exp(smp["log_r"][:, idx])
            mean_counts = np.exp(m_s[:, None, :] - eta[..., None])
            rep_r = r_s[:, None, :]
            y_rep = rng.negative_binomial(rep_r, rep_r / (rep_r + mean_counts))
            m_post, r_post = m_s[None], r_s[None]
            lp = smp["lp"].sum(axis=1) + smp["log_prior"]
            lp_approx = smp["lp_approx"].sum(axis=1) + smp["log_q"]
        return convert.build_datatree(
            posterior={"m": m_post, "r": r_post, "eta": eta[None]},
            sample_stats={"lp": lp[None], "lp_approx": lp_approx[None]},
            log_likelihood={"counts": log_lik[None]},
            posterior_predictive={"counts": y_rep[None]},
            observed_data={"counts": self.data.counts[:, idx]},
            cell_names=self.obs_names, gene_names=self.var_names[idx], n_factors=0,
            attrs={"solver": "laplace", "backend": "numba-cpu", "model": self.model,
                   "seed": self.settings["seed"], "draws": draws, "globals": globals,
                   "stan_hash": stan_hash(self),
                   "objective": self.objective, "outer_iterations": self.n_iter,
                   "cells_converged": int(self.converged.sum())})

    def to_anndata(self, adata, *, key_added=None):
        """Copy of ``adata`` with the fit's results under new keys.

        ``obs[f"{key}_eta"]`` capture-loss mode, ``obs[f"{key}_capture_efficiency"]``
        ``exp(-eta)``, ``obs[f"{key}_converged"]``; ``var[f"{key}_m"]`` and
        ``var[f"{key}_r"]`` (NaN for genes not fitted); ``uns[key]`` the settings,
        objective, iteration counts and fitted gene names. ``key`` defaults to
        ``"nbvcp"``. The input ``adata`` is not modified; a backed ``adata`` gives an
        in-memory result.

        Raises
        ------
        TypeError, ValueError
            ``adata`` is not an AnnData, or does not hold the fitted cells and genes
            (:func:`scribe_stan.fits.base.result_target`).
        """
        key = key_added or self.model
        out, pos = result_target(adata, self.obs_names, self.var_names)
        G = len(out.var_names)
        m, r = np.full(G, np.nan), np.full(G, np.nan)
        m[pos], r[pos] = self.m, self.r
        out.obs[f"{key}_eta"] = self.eta_hat
        out.obs[f"{key}_capture_efficiency"] = np.exp(-self.eta_hat)
        out.obs[f"{key}_converged"] = self.converged
        out.var[f"{key}_m"], out.var[f"{key}_r"] = m, r
        out.uns[key] = self._uns()
        return out

    def _model_summary(self):
        return {"median_dispersion_r": float(np.median(self.r))}

    @staticmethod
    def _problem(data):
        return NbvcpProblem(data.counts, log_M0=data.log_M0, sigma_M=data.sigma_M,
                            log_lib=data.log_lib)

    @classmethod
    def _build_problem(cls, component, data, settings, fields, state):
        """The solver problem of a saved fit (its modes are set from ``state``)."""
        return cls._problem(data)

    def _at_globals(self, data):
        t0 = time.perf_counter()
        problem = self._problem(data)
        value = problem.log_marginal(self.m, self.log_r)
        solution = dataclasses.replace(self.solution, problem=problem,
                                       modes=problem.cell_modes(),
                                       objective=float(np.sum(value)), n_iter=0, n_eval=1,
                                       history=[], wall_time_s=time.perf_counter() - t0)
        return NbvcpFit(model=self.model, solution=solution, data=data,
                        settings=self._transform_settings())


def _draw_moments(arr):
    flat = np.asarray(arr, dtype=float).reshape(-1, *np.shape(arr)[2:])
    return flat.mean(axis=0), flat.std(axis=0, ddof=1)


def posterior_moments(fit):
    """Posterior means and sds of the nbvcp quantities, in the fitting coordinates.

    Parameters
    ----------
    fit : an nbvcp fit, Laplace (:class:`NbvcpFit`) or HMC
        For the Laplace fit the moments are those of a joint Gaussian approximation at
        the fitted globals and per-cell modes (:func:`scribe_stan.laplace.nbvcp.
        gaussian_moments`): means are ``(m, log_r)`` and ``eta_hat``; sds come from the
        observed information of the Laplace objective, which couples all genes through
        the shared eta_c (the second derivatives of its log-curvature terms are
        ignored). For HMC they are the means and sds (ddof 1) over all chains and draws;
        ``log_r`` is the parameter's draws (``log(r)`` when only ``r`` is stored).

    Returns
    -------
    dict
        ``"m"``, ``"log_r"``: (mean (G,), sd (G,)); ``"eta"``: (mean (N,), sd (N,)),
        the marginal posterior of eta (for Laplace: the 1-D Laplace variance plus the
        propagated uncertainty of the globals); ``"var_names"``, ``"obs_names"``:
        pandas.Index of the genes and cells. Laplace fits add ``"eta_given_globals"``:
        (eta_hat, 1-D Laplace sd at the fitted globals) and ``"m_log_r_corr"`` (G,).

    Raises
    ------
    TypeError
        ``fit`` is not a fit of :func:`scribe_stan.fit`.
    ValueError
        A fit of another model.
    """
    if not isinstance(fit, Fit):
        raise TypeError(f"posterior_moments takes an nbvcp fit of scribe_stan.fit; got "
                        f"{type(fit).__name__}")
    if fit.model != "nbvcp":
        raise ValueError(f"posterior_moments needs an nbvcp fit; got model={fit.model!r}")
    if fit.method == "laplace":
        mom = gaussian_moments(fit.solution.problem, fit.m, fit.log_r)
        return {"m": (fit.m.copy(), mom["m_sd"]), "log_r": (fit.log_r.copy(), mom["log_r_sd"]),
                "eta": (fit.eta_hat.copy(), mom["eta_sd"]),
                "eta_given_globals": (fit.eta_hat.copy(), mom["eta_sd_given_globals"]),
                "m_log_r_corr": mom["m_log_r_corr"],
                "var_names": fit.var_names, "obs_names": fit.obs_names}
    post = fit.draws.posterior
    log_r = post["log_r"] if "log_r" in post else np.log(post["r"])
    return {"m": _draw_moments(post["m"]), "log_r": _draw_moments(log_r),
            "eta": _draw_moments(post["eta"]),
            "var_names": fit.var_names, "obs_names": fit.obs_names}
