"""Laplace fits of the log-normal models pln and nbln: :class:`LaplaceFit`.

Globals ``mu``, ``W``, ``d`` (and nbln's dispersions ``r``) at the MAP of the exact
Laplace objective (:func:`scribe_stan.laplace.solver.fit_laplace`); per cell, the mode
of ``(x, eta)`` and its Gaussian. Draws, with the globals at their MAP or drawn from
their own Laplace Gaussian, go into an ArviZ DataTree (:mod:`scribe_stan.convert`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from scribe_stan import _validate, convert
from scribe_stan.fit_data import FitData
from scribe_stan.fits.base import (LaplaceResult, check_tree_size, fitted_gene_index,
                                   result_target)
from scribe_stan.fits.store import stan_hash
from scribe_stan.laplace.solver import CellModes, LaplaceProblem, LaplaceSolution
from scribe_stan.models import loadings, pln

GLOBALS = ("point", "laplace")  # where draws are made: globals at the MAP or drawn


@dataclass
class LaplaceFit(LaplaceResult):
    """Laplace fit of a model: global MAP of the Laplace marginal, per-cell Gaussians.

    Attributes
    ----------
    model : str
    mu : (G,) log-rate means (before capture);  W : (G, K) loadings;
    d : (G,) residual log-rate variances.
    x_hat : (N, G) per-cell mode of the log-rates;  eta_hat : (N,) mode of the capture
        loss (capture efficiency ``exp(-eta)``).
    converged : (N,) bool, the per-cell Newton step converged at the final globals.
    eta_at_bound : (N,) bool, eta's mode sits on its bound 0.
    n_newton : (N,) Newton iterations of the last E-step.
    W_perp : (G, K) gauge-invariant loadings;  gauge : dict of parallel/perpendicular
        loadings norms;  effective_rank : int (see :mod:`scribe_stan.models.loadings`).
    objective : float, final Laplace objective (nats);  n_iter : outer iterations;
    success : bool and message : str from the outer optimizer.
    obs_names, var_names : pandas.Index;  settings : dict of the arguments used.
    """

    model: str
    solution: LaplaceSolution = field(repr=False)
    data: FitData = field(repr=False)
    settings: dict
    _globals_cache: dict = field(default_factory=dict, repr=False, compare=False)

    mu = property(lambda self: self.solution.mu)
    W = property(lambda self: self.solution.W)
    d = property(lambda self: self.solution.d)
    log_r = property(lambda self: self.solution.log_r)  # nbln log dispersions (None: pln)
    r = property(lambda self: self.solution.r)  # nbln dispersions exp(log_r) (None: pln)
    x_hat = property(lambda self: self.solution.modes.x)
    eta_hat = property(lambda self: self.solution.modes.eta)
    converged = property(lambda self: self.solution.modes.converged)
    eta_at_bound = property(lambda self: self.solution.modes.at_bound)
    n_newton = property(lambda self: self.solution.modes.n_iter)
    objective = property(lambda self: self.solution.objective)
    n_iter = property(lambda self: self.solution.n_iter)
    success = property(lambda self: self.solution.success)
    message = property(lambda self: self.solution.message)
    _problem_state = {"solution": ("a", "sigma", "x", "eta", "n_iter", "converged",
                                   "at_bound")}

    @property
    def global_names(self):
        """``("mu", "W", "d")``, and ``"r"`` for nbln."""
        return ("mu", "W", "d") + (() if self.log_r is None else ("r",))

    @property
    def Sigma(self):
        """Dense covariance ``W W' + diag(d)`` (G x G) of the log-rates."""
        return pln.covariance(self.W, self.d)

    @property
    def W_perp(self):
        """Gauge-invariant loadings (G, K): ``W`` with column means over genes removed."""
        return loadings.w_perp(self.W)

    @property
    def gauge(self):
        """Parallel vs perpendicular loadings norms (:func:`loadings.gauge_diagnostics`)."""
        return loadings.gauge_diagnostics(self.W)

    @property
    def effective_rank(self):
        """Latent directions with RMS loading >= 0.05 (:func:`loadings.effective_rank`)."""
        return loadings.effective_rank(self.W)

    def globals_posterior(self, *, method="auto", rank=None, step=1e-3):
        """Gaussian approximation of the globals' posterior at the Laplace MAP (cached;
        called without arguments, the one built most recently, whatever its settings).

        The outer step of a nested Laplace approximation, from the Hessian of the exact
        Laplace objective in the optimizer's coordinates ``(mu, W, log d[, log r])``,
        with W's rotations projected out; see
        :mod:`scribe_stan.laplace.globals_posterior` (methods, costs, coordinates).

        Parameters
        ----------
        method : {"auto", "dense", "lowrank"}
            Dense finite-difference Hessian (2 gradients per global) or Lanczos
            low-rank-plus-block-diagonal; "auto": dense up to 1500 globals.
        rank : int, optional
            Lowrank: eigenpairs kept (default
            :data:`scribe_stan.laplace.globals_posterior.RANK_DEFAULT`, 20).
        step : float
            Finite-difference step in the whitened coordinates.

        Returns
        -------
        scribe_stan.laplace.globals_posterior.GlobalsPosterior

        Raises
        ------
        ValueError
            Unknown ``method`` (the allowed values are named); ``rank < 1``.
        """
        from scribe_stan.laplace.globals_posterior import laplace_globals

        return self._cached_globals(laplace_globals, self.solution, method=method,
                                    rank=rank, step=step)

    def _draw_globals(self, draws, rng):
        """Draws of the globals from :meth:`globals_posterior` (no latents),
        with their log prior and log density
        (:func:`scribe_stan.laplace.nested.draw_globals`)."""
        from scribe_stan.laplace.nested import draw_globals

        return draw_globals(self.globals_posterior(), draws, rng)

    def to_datatree(self, draws=500, *, genes=None, seed=None, globals="point"):
        """ArviZ DataTree of the Laplace posterior (one chain of independent draws).

        Per-cell latents ``(x, eta)`` are drawn from each cell's Gaussian
        ``N(z_hat, (-H)^{-1})`` through the Woodbury square root. With
        ``globals="point"`` the globals are the MAP repeated over draws; with
        ``globals="laplace"`` each draw first draws the globals from their Gaussian
        approximation (:meth:`globals_posterior`, built once per fit and cached), re-runs
        every cell's Newton step there (warm-started from the MAP modes) and draws the
        cells at those globals, so the per-cell draws carry the globals' uncertainty
        (:mod:`scribe_stan.laplace.nested`). ``sample_stats`` carries ``lp`` (exact log
        density of the draw: given the globals for "point"; joint with the globals,
        their prior and the ``log d`` Jacobian for "laplace") and ``lp_approx`` (the
        Gaussian's log density, of the globals too for "laplace", up to a constant), so
        :func:`arviz_stats.loo_approximate_posterior` applies. ``log_likelihood`` is
        over all fitted genes.

        Cost: "laplace" adds the globals' Gaussian once per fit (dense: 2 gradient
        evaluations per global; lowrank: 2 per Lanczos product) and one per-cell
        Newton solve per draw (README, "Laplace draws with the globals' uncertainty").

        Parameters
        ----------
        draws : int, >= 1
        genes : None, int or list of str
            Genes whose ``x``, ``Sigma`` and replicated counts are stored: all (default),
            the ``n`` highest-mean ones, or those names. At genome scale pass a subset:
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
            elements (:func:`check_tree_size`), or ``globals`` not one of
            ``("point", "laplace")``.
        """
        _validate.check_choice("globals", globals, GLOBALS)
        idx = fitted_gene_index(self, genes)
        draws = check_tree_size(draws, len(self.obs_names), idx.size)
        rng = np.random.default_rng(self.settings["seed"] if seed is None else seed)
        problem = self.solution.problem
        if globals == "point":
            smp = problem.sample(self.mu, self.W, self.d, draws, rng, genes=idx,
                                 log_r=self.log_r)
            rep = lambda a: np.broadcast_to(a, (draws,) + a.shape)  # noqa: E731
            glob = {"mu": rep(self.mu), "W": rep(self.W), "d": rep(self.d),
                    "r": None if self.r is None else rep(self.r)}
            lp, lp_approx = smp["lp"].sum(axis=1), smp["lp_approx"].sum(axis=1)
        else:
            from scribe_stan.laplace.nested import nested_draws

            smp = nested_draws(self.solution, self.globals_posterior(), draws, rng,
                               genes=idx)
            glob = {"mu": smp["mu"], "W": smp["W"], "d": smp["d"],
                    "r": None if smp["log_r"] is None else np.exp(smp["log_r"])}
            lp = smp["lp"].sum(axis=1) + smp["log_prior"]
            lp_approx = smp["lp_approx"].sum(axis=1) + smp["log_q"]
        if globals == "point":  # one value, broadcast over draws (no copies)
            W = self.W[idx]
            one = {"mu": self.mu[idx], "W": W, "W_perp": self.W_perp[idx], "d": self.d[idx],
                   "Sigma": W @ W.T + np.diag(self.d[idx])}
            posterior = {k: np.broadcast_to(v, (1, draws) + v.shape) for k, v in one.items()}
        else:
            W, d = glob["W"][:, idx], glob["d"][:, idx]
            posterior = {"mu": glob["mu"][None, :, idx], "W": W[None],
                         "W_perp": (glob["W"] - glob["W"].mean(axis=1, keepdims=True))[
                             None, :, idx],
                         "d": d[None],
                         "Sigma": (W @ np.swapaxes(W, 1, 2)
                                   + d[:, :, None] * np.eye(idx.size))[None]}
        posterior.update(x=smp["x"][None], eta=smp["eta"][None])
        rate = np.exp(np.minimum(smp["x"] - smp["eta"][..., None], 20.7))
        if glob["r"] is None:
            replicated = rng.poisson(rate)
        else:  # NegBinomial2(rate, r) as a gamma-Poisson draw; p = r / (r + rate)
            r = glob["r"][:, None, idx]
            posterior["r"] = glob["r"][None, :, idx]
            replicated = rng.negative_binomial(r, r / (r + rate))
        return convert.build_datatree(
            posterior=posterior,
            sample_stats={"lp": lp[None], "lp_approx": lp_approx[None]},
            log_likelihood={"counts": smp["log_lik"][None]},
            posterior_predictive={"counts": replicated[None]},
            observed_data={"counts": self.data.counts[:, idx]},
            cell_names=self.obs_names, gene_names=self.var_names[idx],
            n_factors=self.W.shape[1],
            attrs={"solver": "laplace", "backend": "numba-cpu", "model": self.model,
                   "seed": self.settings["seed"], "draws": draws, "globals": globals,
                   "stan_hash": stan_hash(self),
                   "objective": self.objective, "outer_iterations": self.n_iter,
                   "cells_converged": int(self.converged.sum())})

    def to_anndata(self, adata, *, key_added=None):
        """Copy of ``adata`` with the fit's results under new keys.

        ``obs[f"{key}_eta"]`` capture-loss mode, ``obs[f"{key}_capture_efficiency"]``
        ``exp(-eta)``, ``obs[f"{key}_converged"]``; ``obsm[f"{key}_x"]`` (N, G_fit)
        log-rate modes; ``var[f"{key}_mu"]``, ``var[f"{key}_d"]``,
        ``varm[f"{key}_W"]``, ``varm[f"{key}_W_perp"]`` and, for nbln, the dispersions
        ``var[f"{key}_r"]`` (NaN for genes not fitted);
        ``uns[key]`` the settings, objective, iteration counts, effective rank, gauge
        ratio and fitted gene names. ``key`` defaults to the
        model name. The input ``adata`` is not modified; a backed ``adata`` gives an
        in-memory result.

        Raises
        ------
        TypeError, ValueError
            ``adata`` is not an AnnData, or does not hold the fitted cells and genes
            (:func:`result_target`).
        """
        key = key_added or self.model
        out, pos = result_target(adata, self.obs_names, self.var_names)
        G, K = len(out.var_names), self.W.shape[1]
        mu, d, W = np.full(G, np.nan), np.full(G, np.nan), np.full((G, K), np.nan)
        mu[pos], d[pos], W[pos] = self.mu, self.d, self.W
        out.obs[f"{key}_eta"] = self.eta_hat
        out.obs[f"{key}_capture_efficiency"] = np.exp(-self.eta_hat)
        out.obs[f"{key}_converged"] = self.converged
        out.obsm[f"{key}_x"] = self.x_hat.copy()
        out.var[f"{key}_mu"], out.var[f"{key}_d"] = mu, d
        if self.r is not None:  # nbln dispersions
            r = np.full(G, np.nan)
            r[pos] = self.r
            out.var[f"{key}_r"] = r
        out.varm[f"{key}_W"] = W
        W_perp = np.full((G, K), np.nan)
        W_perp[pos] = self.W_perp
        out.varm[f"{key}_W_perp"] = W_perp
        out.uns[key] = self._uns(effective_rank=self.effective_rank,
                                 gauge_ratio=self.gauge["ratio"])
        return out

    def _model_summary(self):
        out = {"rank": int(self.W.shape[1]), "effective_rank": int(self.effective_rank)}
        if self.r is not None:
            out["median_dispersion_r"] = float(np.median(self.r))
        return out

    @classmethod
    def _build_problem(cls, component, data, settings, fields, state):
        """The solver problem of a saved fit, with its per-cell eta prior (``a``, ``sigma``)."""
        return LaplaceProblem(data.counts, eta_loc=state["a"], eta_scale=state["sigma"])

    def _at_globals(self, data):
        t0 = time.perf_counter()
        problem = LaplaceProblem(data.counts, log_M0=data.log_M0, sigma_M=data.sigma_M,
                                 log_lib=data.log_lib)
        problem.x[:] = _shrunk_start(data.counts, problem.eta, self.mu, self.W, self.d)
        value = problem.log_marginal(self.mu, self.W, self.d, log_r=self.log_r)
        modes = CellModes(problem.x.copy(), problem.eta.copy(), problem.n_iter.copy(),
                          problem.converged.copy(), problem.at_bound.copy())
        sol = self.solution
        layout = None if sol.layout is None else dataclasses.replace(sol.layout, eta=None)
        solution = dataclasses.replace(sol, problem=problem, modes=modes,
                                       objective=float(np.sum(value)), n_iter=0, n_eval=1,
                                       history=[], wall_time_s=time.perf_counter() - t0,
                                       layout=layout)
        return LaplaceFit(model=self.model, solution=solution, data=data,
                          settings=self._transform_settings())


def _shrunk_start(counts, eta, mu, W, d):
    """Newton start for new cells at known globals: per gene, the precision-weighted mean
    of the data's log-rate ``log(u + 1/2) + eta`` (precision about ``u + 1/2``, the
    Poisson information on the log scale) and the prior mean ``mu_g`` (precision
    ``1 / Sigma_gg``). Zero counts start near the prior instead of at ``log(1/2)``,
    which saves about one Newton round of the cold start (6.3 -> 5.5 on PBMC-like
    cells, ``validation/bench_transform.py``); the mode reached is the same."""
    prec_prior = 1.0 / (np.sum(W**2, axis=1) + d)
    prec_data = counts + 0.5
    return ((prec_data * (np.log(prec_data) + eta[:, None]) + prec_prior * mu)
            / (prec_data + prec_prior))
