"""Fits of the logistic-normal multinomial models ``lnm`` and ``lnmvcp`` and their results.

:func:`fit_lnm` is what :func:`scribe_stan.fit` calls for these models. Results are
reported in ALR coordinates against the reference gene (``mu_alr``, ``W_alr``,
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

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import special, stats

from scribe_stan import _validate, convert, stan
from scribe_stan.api import _Data, _prepare, check_tree_size, result_target
from scribe_stan.laplace import lnm_solver
from scribe_stan.models import dispersion, lnm, pln

__all__ = ["LnmLaplaceFit", "LnmHmcFit", "fit_lnm"]


def _clr_summaries(mu_alr, Sigma_alr, ref):
    Sigma_clr = lnm.clr_covariance(Sigma_alr, ref)
    return {"mu_clr": lnm.clr_mean(mu_alr, ref), "Sigma_clr": Sigma_clr,
            "corr_clr": convert.corr_from_cov(Sigma_clr)}


@dataclass
class LnmLaplaceFit:
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
    data: _Data = field(repr=False)
    ref: int
    settings: dict

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
    obs_names = property(lambda self: self.data.obs_names)
    var_names = property(lambda self: self.data.var_names)
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

    def _totals_draws(self, draws, rng):
        """eta draws (lnmvcp: truncated Gaussian at the mode) and NB total log terms."""
        tp = self.totals.problem
        N = tp.uT.size
        log_m, r = self.totals.log_m_T, self.r_T
        if self.model == "lnm":
            nb = dispersion.nb_logpmf(tp.uT, np.full(N, log_m), r)
            return None, np.broadcast_to(nb, (draws, N)), np.broadcast_to(nb, (draws, N)), 0.0
        eta_hat = tp.eta
        _, _, L2, *_ = lnm_solver._nb_parts(tp.uT, log_m - eta_hat, r)
        sd = 1.0 / np.sqrt(L2 + 1.0 / tp.sigma_M**2)
        lower = -eta_hat / sd
        eta = stats.truncnorm.rvs(lower, np.inf, loc=eta_hat, scale=sd, size=(draws, N),
                                  random_state=rng)
        nb = dispersion.nb_logpmf(tp.uT, log_m - eta, r)
        lp = nb + pln.log_capture_prior(eta, tp.a, tp.sigma_M)
        lp_approx = stats.truncnorm.logpdf(eta, lower, np.inf, loc=eta_hat, scale=sd)
        return eta, nb, lp, lp_approx

    def to_datatree(self, draws=500, *, seed=None):
        """ArviZ DataTree of the Laplace posterior (one chain of independent draws).

        Per-cell ``y`` (and ``eta`` for lnmvcp) are drawn from each cell's Gaussian
        (:meth:`scribe_stan.laplace.lnm_solver.CompositionProblem.sample`; eta from its
        Gaussian truncated to eta >= 0); globals are point estimates repeated over
        draws. ``log_likelihood`` is the per-cell NB total plus multinomial composition;
        ``posterior_predictive`` draws a total from the NB and allocates it by the
        multinomial; ``sample_stats`` carries ``lp`` and ``lp_approx`` summed over cells.

        The tree holds every fitted gene: the composition couples them all.

        Raises
        ------
        TypeError, ValueError
            ``draws`` not an integer >= 1, or ``draws * cells * genes`` above 2e8 (fit
            fewer cells or genes, or use fewer draws; :func:`scribe_stan.api.check_tree_size`).
        """
        N, G = self.data.counts.shape
        draws = check_tree_size(draws, N, G)
        rng = np.random.default_rng(self.settings["seed"] if seed is None else seed)
        comp = self.composition.problem.sample(self.mu_alr, self.W_alr, self.composition.d,
                                               draws, rng)
        eta, nb, lp_tot, lpa_tot = self._totals_draws(draws, rng)
        log_mean = self.totals.log_m_T - (0.0 if eta is None else eta)
        totals = rng.negative_binomial(self.r_T, self.r_T / (self.r_T + np.exp(
            np.minimum(np.broadcast_to(log_mean, (draws, N)), 20.7))))
        lg = lnm.logits(comp["y"], self.ref)
        rho = np.exp(lg - special.logsumexp(lg, axis=-1, keepdims=True))
        y_rep = rng.multinomial(totals, rho / rho.sum(-1, keepdims=True))
        rep = lambda a: np.broadcast_to(a, (1, draws) + np.shape(a))  # noqa: E731
        posterior = {"mu_alr": rep(self.mu_alr), "W_alr": rep(self.W_alr),
                     "Sigma_alr": rep(self.Sigma_alr), "y": comp["y"][None],
                     "m_T": rep(self.m_T), "r_T": rep(self.r_T),
                     **{k: rep(v) for k, v in _clr_summaries(self.mu_alr, self.Sigma_alr,
                                                             self.ref).items()}}
        if self.mode == "full":
            posterior["d_alr"] = rep(self.d_alr)
        if eta is not None:
            posterior["eta"] = eta[None]
        return convert.build_datatree(
            posterior=posterior,
            sample_stats={"lp": (comp["lp"] + lp_tot).sum(axis=1)[None],
                          "lp_approx": (comp["lp_approx"] + lpa_tot).sum(axis=1)[None]},
            log_likelihood={"counts": (comp["log_lik"] + nb)[None]},
            posterior_predictive={"counts": y_rep[None]},
            observed_data={"counts": self.data.counts},
            cell_names=self.obs_names, gene_names=self.var_names,
            n_factors=self.W_alr.shape[1], reference_gene=self.reference_gene,
            attrs={"solver": "laplace", "backend": "numba-cpu", "model": self.model,
                   "mode": self.mode, "reference_gene": self.reference_gene,
                   "seed": self.settings["seed"], "draws": draws,
                   "stan_hash": stan.program_hash(self.model), "objective": self.objective,
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
            (:func:`scribe_stan.api.result_target`).
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
        out.uns[key] = {**{k: v for k, v in self.settings.items() if v is not None},
                        "reference_gene": self.reference_gene, "m_T": self.m_T,
                        "r_T": self.r_T, "objective": self.objective,
                        "optimizer_success": self.success,
                        "cells_converged": int(self.converged.sum()),
                        "genes": np.asarray(self.var_names, dtype=str),
                        "Sigma_clr": self.Sigma_clr}
        return out


@dataclass
class LnmHmcFit:
    """Stan NUTS fit of lnm / lnmvcp (full joint or conditional program)."""

    model: str
    program: str
    draws: stan.StanDraws = field(repr=False)
    data: _Data = field(repr=False)
    ref: int
    settings: dict

    obs_names = property(lambda self: self.data.obs_names)
    var_names = property(lambda self: self.data.var_names)
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


def fit_lnm(adata, *, model="lnm", method="laplace", rank=10, layer=None, genes=None,
            library_size=None, M0=pln.M0_DEFAULT, sigma_M=pln.SIGMA_M_DEFAULT, seed=0,
            tol=1e-8, max_iter=1000, progress=True, backend="auto", chains=4, draws=1000,
            warmup=1000, adapt_delta=0.9, conditional_on=None, reference_gene=None,
            mode="full"):
    """Fit lnm or lnmvcp (called by :func:`scribe_stan.fit`; same arguments).

    Extra parameters
    ----------------
    reference_gene : None, str or int
        ALR reference: default :func:`scribe_stan.models.lnm.default_reference`.
    mode : {"full", "low_rank"}
        Laplace latent: ALR coordinates y_c (default) or factor scores with d = 0.

    Raises
    ------
    ValueError
        Unknown reference gene or mode; rank outside ``1 <= K < G - 1`` (and, for the
        Laplace method, above the number of cells); invalid data.
    """
    _validate.check_choice("mode", mode, lnm_solver.MODES)
    data = _prepare(adata, layer, genes, M0, sigma_M, library_size)
    G = data.counts.shape[1]
    if conditional_on is not None:
        rank = conditional_on.W_alr.shape[1]
    if G < 3:
        raise ValueError(f"{model} needs at least 3 genes (ALR dimension G - 1 >= 2); got {G}")
    if _validate._is_int(rank) and not 1 <= rank < G - 1:
        raise ValueError(f"rank K={rank} is out of range for {model} with G={G} genes; "
                         f"allowed: 1 <= K < G - 1 = {G - 1} (the ALR dimension)")
    K = _validate.check_rank(rank, G - 1)
    N = data.counts.shape[0]
    if method == "laplace" and K > N:  # the solver starts from K principal axes of the cells
        raise ValueError(f"rank K={K} exceeds the number of cells N={N} for the {model} "
                         "Laplace fit (its start takes K principal axes of the cells' "
                         f"log-ratios); allowed: 1 <= K <= {min(N, G - 2)}")
    ref = lnm.resolve_reference(reference_gene, data.var_names, data.counts)
    settings = {"model": model, "method": method, "rank": K, "layer": layer, "M0": float(M0),
                "sigma_M": float(sigma_M), "seed": int(seed),
                "reference_gene": str(data.var_names[ref])}
    capture = {"log_M0": data.log_M0, "sigma_M": data.sigma_M, "log_lib": data.log_lib}
    if method == "laplace":
        from tqdm.auto import tqdm

        with tqdm(total=max_iter, desc=f"{model} Laplace", unit="it", disable=not progress,
                  leave=False) as bar:
            comp, totals, wall = lnm_solver.fit_laplace(
                data.counts, ref, K, capture=model == "lnmvcp", mode=mode, tol=tol,
                max_iter=max_iter, seed=seed, progress=bar, **capture)
        settings.update(device="cpu", tol=tol, max_iter=max_iter, mode=mode, wall_time_s=wall)
        return LnmLaplaceFit(model=model, composition=comp, totals=totals, data=data, ref=ref,
                             settings=settings)
    if conditional_on is not None:
        if not (conditional_on.var_names.equals(data.var_names)
                and conditional_on.obs_names.equals(data.obs_names)):
            raise ValueError("conditional_on was fitted on other cells or genes; pass the "
                             "same adata/genes to both fits.")
        if conditional_on.mode != "full":
            raise ValueError("conditional HMC needs a Laplace fit with mode='full' (the "
                             "Stan programs have d > 0); got mode='low_rank'")
        if conditional_on.model != model:
            raise ValueError(f"conditional_on is a {conditional_on.model} fit; model={model!r}")
        ref = conditional_on.ref
        settings["reference_gene"] = conditional_on.reference_gene
        program = lnm.CONDITIONAL_STAN_FILES[model].removesuffix(".stan")
        stan_data = lnm.conditional_stan_data(
            data.counts, ref, conditional_on.mu_alr, conditional_on.W_alr,
            conditional_on.d_alr, conditional_on.totals.log_m_T,
            conditional_on.totals.log_r_T, **capture)
    else:
        program = model
        stan_data = lnm.stan_data(data.counts, K, ref, **capture)
    settings.update(backend=stan.resolve_backend(backend), chains=chains, draws=draws,
                    warmup=warmup, adapt_delta=adapt_delta, program=program)
    draws_ = stan.sample(program, stan_data, backend=backend, chains=chains, draws=draws,
                         warmup=warmup, seed=seed, adapt_delta=adapt_delta, progress=progress)
    n_div = int(np.sum(draws_.sample_stats["diverging"]))
    if n_div:
        warnings.warn(f"{n_div} divergent transitions in {program}; see the tree's "
                      "sample_stats.diverging.", RuntimeWarning, stacklevel=2)
    return LnmHmcFit(model=model, program=program, draws=draws_, data=data, ref=ref,
                     settings=settings)
