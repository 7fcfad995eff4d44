"""Fits of the logistic-normal multinomial models ``lnm`` and ``lnmvcp`` and their results.

Results are reported in ALR coordinates against the reference gene (``mu_alr``, ``W_alr``,
``d_alr``, ``Sigma_alr``, per-cell ``y``) and in centred log-ratio (CLR) coordinates
(``mu_clr``, ``Sigma_clr = F Sigma_alr F'``, ``corr_clr``; see
:func:`scribe_stan.models.lnm.alr_to_clr_map`). The CLR quantities and ``W_alr W_alr'``
are invariant to rotations ``W -> W R``; the CLR ones do not depend on the coordinates
the reference defines (what the reference does change in the model is described in
:mod:`scribe_stan.models.lnm`). Correlations of CLR coordinates of a G-part composition
are biased negative by ``-1/(G-1)`` on average (their covariance rows sum to 0), so
compare them across fits with the same genes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import special

from scribe_stan import _validate, convert
from scribe_stan.fit_data import FitData
from scribe_stan.fits.base import LaplaceResult, check_tree_size, result_target
from scribe_stan.fits.hmc import HmcFit
from scribe_stan.fits.store import stan_hash
from scribe_stan.laplace import lnm_solver
from scribe_stan.models import lnm

__all__ = ["LnmHmcFit", "LnmLaplaceFit"]

GLOBALS = ("point", "laplace")  # where draws are made: globals at the MAP or drawn


def _clr_summaries(mu_alr, Sigma_alr, ref):
    Sigma_clr = lnm.clr_covariance(Sigma_alr, ref)
    return {"mu_clr": lnm.clr_mean(mu_alr, ref), "Sigma_clr": Sigma_clr,
            "corr_clr": convert.corr_from_cov(Sigma_clr)}


@dataclass
class LnmLaplaceFit(LaplaceResult):
    """Laplace fit of lnm / lnmvcp.

    Attributes
    ----------
    model : {"lnm", "lnmvcp"};  mode : {"full", "low_rank"}
    reference_gene : str, the ALR reference (``var_names[ref]``);  ref : int.
    mu_alr : (G-1,);  W_alr : (G-1, K) loadings;  d_alr : (G-1,) (zeros in ``low_rank``).
    Sigma_alr : (G-1, G-1) dense ALR covariance (for moderate G).
    mu_clr : (G,);  Sigma_clr, corr_clr : (G, G) CLR covariance and correlations.
    m_T, r_T : mean total (before capture for lnmvcp) and its NB dispersion.
    y_hat : (N, G-1) per-cell ALR modes;  eta_hat : (N,) capture-loss modes (lnmvcp).
    converged : (N,) bool, the cell's Newton steps (composition and, for lnmvcp,
        capture) converged at the final globals.
    n_newton : (N,) composition Newton iterations of the last evaluation.
    objective : float, Laplace objective of both blocks with priors (nats).
    n_iter : int, outer (L-BFGS-B) iterations of the composition block.
    success : bool, both outer optimizers met their tolerance.
    """

    model: str
    composition: lnm_solver.CompositionSolution = field(repr=False)
    totals: lnm_solver.TotalSolution = field(repr=False)
    data: FitData = field(repr=False)
    ref: int
    settings: dict
    _globals_cache: dict = field(default_factory=dict, repr=False, compare=False)

    global_names = ("mu_alr", "W_alr", "d_alr", "m_T", "r_T")
    _problem_state = {"composition": ("y", "z", "n_iter", "converged"),
                      "totals": ("eta", "converged", "at_bound", "n_iter")}

    mode = property(lambda self: self.composition.problem.mode)
    mu_alr = property(lambda self: self.composition.mu)
    W_alr = property(lambda self: self.composition.W)
    y_hat = property(lambda self: self.composition.modes.y)
    n_newton = property(lambda self: self.composition.modes.n_iter)
    m_T = property(lambda self: math.exp(self.totals.log_m_T))
    r_T = property(lambda self: math.exp(self.totals.log_r_T))
    objective = property(lambda self: self.composition.objective + self.totals.objective)
    n_iter = property(lambda self: self.composition.n_iter)
    success = property(lambda self: self.composition.success and self.totals.success)
    reference_gene = property(lambda self: str(self.data.var_names[self.ref]))

    @property
    def d_alr(self):
        d = self.composition.d
        return np.zeros_like(self.mu_alr) if d is None else d

    @property
    def eta_hat(self):
        return self.totals.problem.eta if self.model == "lnmvcp" else None

    @property
    def converged(self):
        ok = self.composition.modes.converged.copy()
        if self.model == "lnmvcp":
            ok &= self.totals.problem.converged
        return ok

    @property
    def Sigma_alr(self):
        return self.W_alr @ self.W_alr.T + np.diag(self.d_alr)

    mu_clr = property(lambda self: lnm.clr_mean(self.mu_alr, self.ref))
    Sigma_clr = property(lambda self: lnm.clr_covariance(self.Sigma_alr, self.ref))
    corr_clr = property(lambda self: convert.corr_from_cov(self.Sigma_clr))

    def globals_posterior(self, *, method="auto", rank=None, step=1e-3):
        """Gaussian approximation of the globals' posterior at the Laplace MAP (cached;
        called without arguments, the one built most recently, whatever its settings).

        The outer step of a nested Laplace approximation (Rue, Martino & Chopin 2009,
        doi:10.1111/j.1467-9868.2008.00700.x): the composition globals in the
        optimizer's coordinates ``(m, W_alr, log d_alr)`` from the Hessian of the exact
        composition objective, W's rotations projected out, and independently the
        totals' ``(log m_T, log r_T)``; see :mod:`scribe_stan.laplace.lnm_globals`.

        Cost: dense, ``2 P`` composition gradient evaluations (``P = (G - 1) (K + 2)``;
        ``(G - 1) (K + 1)`` in the low-rank mode), each one converged Newton solve per
        cell from the MAP modes; lowrank, 2 per Lanczos product. The totals take 8
        gradients of the totals block.

        Parameters
        ----------
        method : {"auto", "dense", "lowrank"}
            "auto": dense up to
            :data:`scribe_stan.laplace.globals_posterior.DENSE_MAX` globals.
        rank : int, optional
            Lowrank: eigenpairs kept.
        step : float
            Finite-difference step in the whitened coordinates.

        Returns
        -------
        scribe_stan.laplace.lnm_globals.LnmGlobalsPosterior

        Raises
        ------
        ValueError
            Unknown ``method`` (the allowed values are named); ``rank < 1``;
            ``step <= 0``.
        """
        from scribe_stan.laplace.lnm_globals import laplace_globals

        return self._cached_globals(laplace_globals, self.composition, self.totals,
                                    method=method, rank=rank, step=step)

    def _draw_globals(self, draws, rng):
        """Draws of the globals from :meth:`globals_posterior` (no latents),
        with their log prior and log density
        (:func:`scribe_stan.laplace.lnm_globals.draw_globals`)."""
        from scribe_stan.laplace.lnm_globals import draw_globals

        return draw_globals(self.globals_posterior(), draws, rng)

    def to_datatree(self, draws=500, *, seed=None, globals="point"):
        """ArviZ DataTree of the Laplace posterior (one chain of independent draws).

        Per-cell ``y`` (and ``eta`` for lnmvcp) are drawn from each cell's Gaussian
        (:meth:`scribe_stan.laplace.lnm_solver.CompositionProblem.sample`; eta from its
        Gaussian truncated to eta >= 0). With ``globals="point"`` the globals are point
        estimates repeated over draws. With ``globals="laplace"`` each draw first draws
        the globals from their Gaussian approximation (:meth:`globals_posterior`, built
        once per fit and cached), takes one Newton step of every cell's y from its MAP
        mode there, and draws y at those globals; for lnmvcp each cell's eta mode is
        re-solved at the drawn ``(m_T, r_T)`` and eta drawn there
        (:func:`scribe_stan.laplace.lnm_globals.nested_draws`): the per-cell draws
        carry the globals' uncertainty, and the posterior group holds the drawn globals
        (``mu_alr``, ``W_alr``, ``d_alr``, ``Sigma_alr``, the CLR summaries, ``m_T``,
        ``r_T``). ``log_likelihood`` is the per-cell NB total plus multinomial
        composition; ``posterior_predictive`` draws a total from the NB and allocates
        it by the multinomial; ``sample_stats`` carries ``lp`` (exact log density of the
        draw summed over cells: given the globals for "point"; joint with the globals,
        their prior and the ``log d`` Jacobian for "laplace") and ``lp_approx`` (the
        Gaussians' log density, of the globals too for "laplace", up to a constant).

        The tree holds every fitted gene: the composition couples them all.

        Cost: "laplace" adds :meth:`globals_posterior` once per fit (dense: 2 gradient
        evaluations per composition global) and one Newton step per cell per draw.

        Parameters
        ----------
        draws : int, >= 1
        seed : int, optional (default: the fit's seed)
        globals : {"point", "laplace"}
            Globals at their MAP (default) or drawn from their Laplace Gaussian.

        Returns
        -------
        xarray.DataTree

        Raises
        ------
        TypeError, ValueError
            ``draws`` not an integer >= 1, or ``draws * cells * genes`` above 2e8 (fit
            fewer cells or genes, or use fewer draws; :func:`scribe_stan.fits.base.check_tree_size`);
            ``globals`` not one of ``("point", "laplace")``.
        """
        _validate.check_choice("globals", globals, GLOBALS)
        N, G = self.data.counts.shape
        draws = check_tree_size(draws, N, G)
        rng = np.random.default_rng(self.settings["seed"] if seed is None else seed)
        if globals == "point":
            comp = self.composition.problem.sample(self.mu_alr, self.W_alr,
                                                   self.composition.d, draws, rng)
            eta, nb, lp_tot, lpa_tot = self.totals.problem.sample(
                self.totals.log_m_T, self.totals.log_r_T, draws, rng)
            log_mean = self.totals.log_m_T - (0.0 if eta is None else eta)
            totals = rng.negative_binomial(self.r_T, self.r_T / (self.r_T + np.exp(
                np.minimum(np.broadcast_to(log_mean, (draws, N)), 20.7))))
            lp = (comp["lp"] + lp_tot).sum(axis=1)
            lp_approx = (comp["lp_approx"] + lpa_tot).sum(axis=1)
        else:
            from scribe_stan.laplace.lnm_globals import nested_draws

            comp = nested_draws(self.composition, self.totals, self.globals_posterior(),
                                draws, rng)
            eta, nb = comp["eta"], comp["nb"]
            r = np.exp(comp["log_r_T"])[:, None]
            log_mean = comp["log_m_T"][:, None] - (0.0 if eta is None else eta)
            totals = rng.negative_binomial(r, r / (r + np.exp(
                np.minimum(np.broadcast_to(log_mean, (draws, N)), 20.7))))
            lp = ((comp["lp"] + comp["totals_lp"]).sum(axis=1) + comp["log_prior"]
                  + comp["totals_log_prior"])
            lp_approx = ((comp["lp_approx"] + comp["totals_lp_approx"]).sum(axis=1)
                         + comp["log_q"] + comp["totals_log_q"])
        lg = lnm.logits(comp["y"], self.ref)
        rho = np.exp(lg - special.logsumexp(lg, axis=-1, keepdims=True))
        y_rep = rng.multinomial(totals, rho / rho.sum(-1, keepdims=True))
        if globals == "point":
            rep = lambda a: np.broadcast_to(a, (1, draws) + np.shape(a))  # noqa: E731
            posterior = {"mu_alr": rep(self.mu_alr), "W_alr": rep(self.W_alr),
                         "Sigma_alr": rep(self.Sigma_alr), "y": comp["y"][None],
                         "m_T": rep(self.m_T), "r_T": rep(self.r_T),
                         **{k: rep(v) for k, v in _clr_summaries(self.mu_alr, self.Sigma_alr,
                                                                 self.ref).items()}}
            if self.mode == "full":
                posterior["d_alr"] = rep(self.d_alr)
        else:
            W = comp["W"]
            d = np.zeros_like(comp["mu"]) if comp["d"] is None else comp["d"]
            Sigma = W @ np.swapaxes(W, 1, 2) + d[:, :, None] * np.eye(d.shape[1])
            posterior = {"mu_alr": comp["mu"][None], "W_alr": W[None],
                         "Sigma_alr": Sigma[None], "y": comp["y"][None],
                         "m_T": np.exp(comp["log_m_T"])[None],
                         "r_T": np.exp(comp["log_r_T"])[None],
                         **{k: v[None] for k, v in _clr_summaries(comp["mu"], Sigma,
                                                                   self.ref).items()}}
            if self.mode == "full":
                posterior["d_alr"] = d[None]
        if eta is not None:
            posterior["eta"] = eta[None]
        return convert.build_datatree(
            posterior=posterior,
            sample_stats={"lp": lp[None], "lp_approx": lp_approx[None]},
            log_likelihood={"counts": (comp["log_lik"] + nb)[None]},
            posterior_predictive={"counts": y_rep[None]},
            observed_data={"counts": self.data.counts},
            cell_names=self.obs_names, gene_names=self.var_names,
            n_factors=self.W_alr.shape[1], reference_gene=self.reference_gene,
            attrs={"solver": "laplace", "backend": "numba-cpu", "model": self.model,
                   "mode": self.mode, "reference_gene": self.reference_gene,
                   "seed": self.settings["seed"], "draws": draws, "globals": globals,
                   "stan_hash": stan_hash(self), "objective": self.objective,
                   "cells_converged": int(self.converged.sum())})

    def to_anndata(self, adata, *, key_added=None):
        """Copy of ``adata`` with the fit's results under new keys (``key`` = model name).

        ``obsm[f"{key}_y"]`` (N, G_fit - 1) ALR modes; ``obsm[f"{key}_clr"]`` (N, G_fit)
        CLR modes; for lnmvcp ``obs[f"{key}_eta"]`` and
        ``obs[f"{key}_capture_efficiency"]``; ``obs[f"{key}_converged"]``;
        ``var[f"{key}_mu_clr"]`` and ``varm[f"{key}_W_clr"]`` (``F W_alr``, NaN for
        genes not fitted); ``uns[key]`` settings, reference gene, ``m_T``, ``r_T``,
        objective, fitted gene names, ``Sigma_clr``. The input is not modified; a backed
        ``adata`` gives an in-memory result.

        Raises
        ------
        TypeError, ValueError
            ``adata`` is not an AnnData, or does not hold the fitted cells and genes
            (:func:`scribe_stan.fits.base.result_target`).
        """
        key = key_added or self.model
        out, pos = result_target(adata, self.obs_names, self.var_names)
        G, K = len(out.var_names), self.W_alr.shape[1]
        F = lnm.alr_to_clr_map(len(self.var_names), self.ref)
        mu, W = np.full(G, np.nan), np.full((G, K), np.nan)
        mu[pos], W[pos] = self.mu_clr, F @ self.W_alr
        out.obsm[f"{key}_y"] = self.y_hat.copy()
        out.obsm[f"{key}_clr"] = lnm.clr_mean(self.y_hat, self.ref)
        if self.model == "lnmvcp":
            out.obs[f"{key}_eta"] = self.eta_hat
            out.obs[f"{key}_capture_efficiency"] = np.exp(-self.eta_hat)
        out.obs[f"{key}_converged"] = self.converged
        out.var[f"{key}_mu_clr"] = mu
        out.varm[f"{key}_W_clr"] = W
        out.uns[key] = self._uns(reference_gene=self.reference_gene, m_T=self.m_T,
                                 r_T=self.r_T, Sigma_clr=self.Sigma_clr)
        return out

    def _model_summary(self):
        return {"rank": int(self.W_alr.shape[1]), "mode": self.mode,
                "reference_gene": self.reference_gene, "m_T": float(self.m_T),
                "r_T": float(self.r_T)}

    def _problems(self, data, mode):
        comp = lnm_solver.CompositionProblem(data.counts, self.ref, mode=mode)
        totals = lnm_solver.TotalProblem(data.counts.sum(axis=1), capture=self.model == "lnmvcp",
                                         log_lib=data.log_lib, log_M0=data.log_M0,
                                         sigma_M=data.sigma_M)
        return comp, totals

    @classmethod
    def _build_problem(cls, component, data, settings, fields, state):
        """The solver problems of a saved fit (their modes are set from ``state``)."""
        if component == "composition":
            ref = data.var_names.get_loc(settings["reference_gene"])
            return lnm_solver.CompositionProblem(data.counts, ref, mode=settings["mode"])
        return lnm_solver.TotalProblem(data.counts.sum(axis=1), capture=settings["model"]
                                       == "lnmvcp", log_lib=data.log_lib,
                                       log_M0=data.log_M0, sigma_M=data.sigma_M)

    def _at_globals(self, data):
        comp_p, tot_p = self._problems(data, self.mode)
        c = self.composition
        value = comp_p.log_marginal(c.mu, c.W, c.d)
        modes = lnm_solver.CompositionModes(comp_p.y.copy(),
                                            None if comp_p.z is None else comp_p.z.copy(),
                                            comp_p.n_iter.copy(), comp_p.converged.copy())
        composition = dataclasses.replace(c, problem=comp_p, modes=modes,
                                          objective=float(np.sum(value)), n_iter=0,
                                          n_eval=1, history=[])
        t = self.totals
        totals = dataclasses.replace(t, problem=tot_p, objective=float(np.sum(
            tot_p.log_marginal(t.log_m_T, t.log_r_T))))
        return LnmLaplaceFit(model=self.model, composition=composition, totals=totals,
                             data=data, ref=self.ref, settings=self._transform_settings())


@dataclass
class LnmHmcFit(HmcFit):
    """Stan NUTS fit of lnm / lnmvcp (full joint or conditional program); ``ref`` is the
    ALR reference gene's column."""

    ref: int = 0

    reference_gene = property(lambda self: str(self.data.var_names[self.ref]))

    def to_datatree(self):
        """ArviZ DataTree of the NUTS draws (same variables as the Laplace tree)."""
        post = self.draws.posterior
        keep = ("mu_alr", "W_alr", "d_alr", "Sigma_alr", "y", "eta", "m_T", "r_T")
        posterior = {k: post[k] for k in keep if k in post}
        if "Sigma_alr" in post:
            posterior.update(_clr_summaries(post["mu_alr"], post["Sigma_alr"], self.ref))
        stats_ = {k: v for k, v in self.draws.sample_stats.items()
                  if k in convert.VARIABLE_DIMS["sample_stats"]}
        K = self.settings["rank"]
        return convert.build_datatree(
            posterior=posterior, sample_stats=stats_,
            log_likelihood={"counts": post["log_lik"]},
            posterior_predictive={"counts": post["y_rep"]},
            observed_data={"counts": self.data.counts},
            cell_names=self.obs_names, gene_names=self.var_names, n_factors=K,
            reference_gene=self.reference_gene,
            attrs={"solver": "hmc", "model": self.model, "program": self.program,
                   "backend": self.draws.backend, "stan_hash": self.draws.stan_hash,
                   "seed": self.draws.seed, "reference_gene": self.reference_gene})
