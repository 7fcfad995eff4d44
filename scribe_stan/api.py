"""Public entry point :func:`fit` and its result objects (Laplace and HMC).

Both results turn into one ArviZ DataTree shape (:mod:`scribe_stan.convert`), so they
can be compared with :func:`scribe_stan.compare`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scribe_stan import _validate, cascade, convert, stan
from scribe_stan.laplace.solver import LaplaceSolution, fit_laplace
from scribe_stan.models import MODELS, loadings, pln

METHODS = ("laplace", "hmc")
DEVICES = ("cpu", "cuda", "auto")
_MAX_TREE_ELEMENTS = 2 * 10**8  # per-cell draw elements in one tree (1.6 GB of float64)


def _select_genes(ci, genes):
    """Column indices into ``ci.counts`` for the ``genes`` argument of :func:`fit`."""
    G = ci.counts.shape[1]
    if genes is None:
        return np.arange(G)
    if isinstance(genes, (int, np.integer)) and not isinstance(genes, bool):
        if not 2 <= genes <= G:
            raise ValueError(f"genes={genes} must be between 2 and the number of non-zero "
                             f"genes ({G}).")
        order = np.argsort(-ci.counts.mean(axis=0), kind="stable")[:genes]
        return np.sort(order)
    names = pd.Index(list(genes))
    missing = names.difference(ci.var_names)
    if len(missing):
        raise ValueError(f"genes not found (or all-zero and dropped): {list(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return ci.var_names.get_indexer(names)


@dataclass
class _Data:
    counts: np.ndarray  # (N, G) int64 of the modelled genes
    log_lib: np.ndarray  # (N,) over all non-zero genes of the input
    obs_names: pd.Index
    var_names: pd.Index
    log_M0: float
    sigma_M: float


def _library_size(ci, library_size):
    if library_size is None:
        return ci.library_size.astype(float)
    lib = np.asarray(library_size, dtype=float).reshape(-1)
    if lib.shape != (ci.counts.shape[0],) or not np.all(np.isfinite(lib) & (lib > 0)):
        raise ValueError(f"library_size must be {ci.counts.shape[0]} positive finite values "
                         f"(one per cell); got shape {np.shape(library_size)}")
    return lib


def _prepare(adata, layer, genes, M0, sigma_M, library_size=None):
    ci = _validate.counts_from_anndata(adata, layer=layer)
    cols = _select_genes(ci, genes)
    return _Data(counts=np.ascontiguousarray(ci.counts[:, cols]),
                 log_lib=np.log(_library_size(ci, library_size)),
                 obs_names=ci.obs_names, var_names=ci.var_names[cols],
                 log_M0=math.log(_validate.check_positive("M0", M0)),
                 sigma_M=_validate.check_positive("sigma_M", sigma_M))


@dataclass
class LaplaceFit:
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
    data: _Data = field(repr=False)
    settings: dict

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
    obs_names = property(lambda self: self.data.obs_names)
    var_names = property(lambda self: self.data.var_names)

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

    def _gene_index(self, genes):
        if genes is None:
            return np.arange(len(self.var_names))
        if isinstance(genes, (int, np.integer)):
            order = np.argsort(-self.data.counts.mean(axis=0), kind="stable")[:int(genes)]
            return np.sort(order)
        idx = self.var_names.get_indexer(pd.Index(list(genes)))
        if (idx < 0).any():
            raise ValueError("genes not in the fit: "
                             f"{[g for g, i in zip(genes, idx) if i < 0][:5]}")
        return idx

    def to_datatree(self, draws=500, *, genes=None, seed=None):
        """ArviZ DataTree of the Laplace posterior (one chain of independent draws).

        Per-cell latents ``(x, eta)`` are drawn from each cell's Gaussian
        ``N(z_hat, (-H)^{-1})`` through the Woodbury square root; globals are point
        estimates repeated over draws. ``sample_stats`` carries ``lp`` (exact log
        density of the draw given the globals, summed over cells) and ``lp_approx``
        (the Gaussian's log density), so :func:`arviz_stats.loo_approximate_posterior`
        applies. ``log_likelihood`` is over all fitted genes.

        Parameters
        ----------
        draws : int
        genes : None, int or list of str
            Genes whose ``x``, ``Sigma`` and replicated counts are stored: all (default),
            the ``n`` highest-mean ones, or those names. At genome scale pass a subset:
            ``draws * cells * genes`` above 2e8 raises ``ValueError``.
        seed : int, optional (default: the fit's seed)

        Returns
        -------
        xarray.DataTree
        """
        idx = self._gene_index(genes)
        N = len(self.obs_names)
        if draws * N * idx.size > _MAX_TREE_ELEMENTS:
            raise ValueError(f"draws*cells*genes = {draws}*{N}*{idx.size} exceeds "
                             f"{_MAX_TREE_ELEMENTS:.0e}; pass genes=<int or names> or fewer "
                             "draws.")
        rng = np.random.default_rng(self.settings["seed"] if seed is None else seed)
        problem = self.solution.problem
        smp = problem.sample(self.mu, self.W, self.d, draws, rng, genes=idx, log_r=self.log_r)
        W = self.W[idx]
        Sigma = W @ W.T + np.diag(self.d[idx])
        rep = lambda a: np.broadcast_to(a, (1, draws) + a.shape)  # noqa: E731
        rate = np.exp(np.minimum(smp["x"] - smp["eta"][..., None], 20.7))
        posterior = {"mu": rep(self.mu[idx]), "W": rep(W), "W_perp": rep(self.W_perp[idx]),
                     "d": rep(self.d[idx]),
                     "Sigma": rep(Sigma), "x": smp["x"][None], "eta": smp["eta"][None]}
        if self.r is None:
            replicated = rng.poisson(rate)
        else:  # NegBinomial2(rate, r) as a gamma-Poisson draw; p = r / (r + rate)
            posterior["r"] = rep(self.r[idx])
            replicated = rng.negative_binomial(self.r[idx], self.r[idx] / (self.r[idx] + rate))
        return convert.build_datatree(
            posterior=posterior,
            sample_stats={"lp": smp["lp"].sum(axis=1)[None],
                          "lp_approx": smp["lp_approx"].sum(axis=1)[None]},
            log_likelihood={"counts": smp["log_lik"][None]},
            posterior_predictive={"counts": replicated[None]},
            observed_data={"counts": self.data.counts[:, idx]},
            cell_names=self.obs_names, gene_names=self.var_names[idx],
            n_factors=self.W.shape[1],
            attrs={"solver": "laplace", "backend": "numba-cpu", "model": self.model,
                   "seed": self.settings["seed"], "draws": draws,
                   "stan_hash": stan.program_hash(self.model),
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
        model name. The input ``adata`` is not modified.
        """
        key = key_added or self.model
        out = adata.copy()
        pos = out.var_names.get_indexer(self.var_names)
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
        out.uns[key] = {**{k: v for k, v in self.settings.items() if v is not None},
                        "objective": self.objective, "outer_iterations": self.n_iter,
                        "optimizer_success": self.success,
                        "cells_converged": int(self.converged.sum()),
                        "effective_rank": self.effective_rank,
                        "gauge_ratio": self.gauge["ratio"],
                        "genes": np.asarray(self.var_names, dtype=str)}
        return out


@dataclass
class HmcFit:
    """Stan NUTS fit of a model on (usually) a small gene set.

    Attributes
    ----------
    model : str;  program : str, the Stan program run (full joint or conditional).
    draws : scribe_stan.stan.StanDraws
    obs_names, var_names : pandas.Index;  settings : dict.
    """

    model: str
    program: str
    draws: stan.StanDraws = field(repr=False)
    data: _Data = field(repr=False)
    settings: dict

    obs_names = property(lambda self: self.data.obs_names)
    var_names = property(lambda self: self.data.var_names)

    def to_datatree(self):
        """ArviZ DataTree of the NUTS draws (same shape as the Laplace tree)."""
        return convert.to_datatree_from_stan(
            self.draws, cell_names=self.obs_names, gene_names=self.var_names,
            observed_counts=self.data.counts,
            attrs={"solver": "hmc", "model": self.model, "program": self.program})


def _cascade(source, model, data, tau, freeze):
    """fit_laplace arguments from an nbvcp fit (:mod:`scribe_stan.cascade`), or {}."""
    if source is None:
        return {}
    from scribe_stan.nbvcp_fit import posterior_moments

    if model != "nbln":
        raise ValueError(f"informative_priors_from applies to model='nbln' (the nbvcp -> "
                         f"nbln cascade); got model={model!r}")
    if getattr(source, "model", None) != "nbvcp":
        raise ValueError("informative_priors_from must be an nbvcp fit (ss.fit(..., "
                         "model='nbvcp'), Laplace or HMC); got "
                         f"{type(source).__name__} of model {getattr(source, 'model', None)!r}")
    return cascade.cascade_arguments(posterior_moments(source), data.var_names,
                                     data.obs_names, tau=tau, freeze=freeze)


def fit(adata, *, model="pln", method="laplace", rank=10, layer=None, genes=None,
        library_size=None, M0=pln.M0_DEFAULT, sigma_M=pln.SIGMA_M_DEFAULT, seed=0, device="cpu", tol=1e-8,
        max_iter=1000, progress=True, backend="auto", chains=4, draws=1000, warmup=1000,
        adapt_delta=0.9, conditional_on=None, reference_gene=None, mode="full",
        loadings_prior="normal", informative_priors_from=None, tau=1.0,
        freeze=cascade.DEFAULT_FREEZE):
    """Fit a count model to an AnnData with the Laplace solver or Stan HMC.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes raw UMI counts in ``.X`` or ``.layers[layer]`` (dense or sparse).
        Never modified. All-zero genes are dropped with a warning.
    model : {"pln", "nbln", "lnm", "lnmvcp", "nbvcp"}
    method : {"laplace", "hmc"}
    rank : int
        Latent rank K, ``1 <= K < G``.
    layer : str, optional
    genes : None, int or list of str
        Genes to model: all (default), the ``n`` highest-mean ones, or those names.
        Library sizes (capture prior) always use all genes of the cell.
    library_size : (N,) array of positive floats, optional
        Library sizes L_c for the capture prior, e.g. totals over a larger gene set than
        ``adata`` holds, or the design value of a simulation. Default: the counts of
        ``adata`` summed over all its genes.
    M0, sigma_M : float
        Capture prior: median total mRNA per cell and log-scale sd
        (defaults and sources in :mod:`scribe_stan.models.pln`).
    seed : int
    device : {"cpu", "cuda", "auto"}
        Laplace kernels: CPU, CUDA (needs numba-cuda and a GPU), or CUDA when available
        (:func:`scribe_stan.laplace.device.resolve_device`).
    tol, max_iter : outer-optimizer tolerance and iterations (Laplace).
    progress : bool, show a tqdm bar.
    backend : {"auto", "cmdstanpy", "pystan"}
        Stan interface (HMC).
    chains, draws, warmup, adapt_delta : NUTS settings (HMC).
    reference_gene : None, str or int
        lnm/lnmvcp only: the ALR reference gene (name or column index); default
        :func:`scribe_stan.models.lnm.default_reference`.
    mode : {"full", "low_rank"}
        lnm/lnmvcp Laplace only: per-cell latent y in ALR coordinates (default) or
        factor scores with d = 0 (:mod:`scribe_stan.laplace.lnm_solver`).
    conditional_on : LaplaceFit, optional
        HMC only: sample the per-cell latents with the globals fixed at this fit's
        values (``stan/pln_conditional.stan``), the exact target the Laplace step
        approximates. Genes and cells must match; ``rank`` is taken from the fit.
    loadings_prior : {"normal", "gaussian", "horseshoe", "neg"}
        pln/nbln prior on the loadings: iid normal (default) or a columnwise shrinkage
        prior on the gauge-invariant loadings for adaptive rank (fit with a generous
        ``rank``; unsupported columns shrink to ~0 and ``fit.effective_rank`` counts the
        rest). Definitions and sources: :mod:`scribe_stan.models.loadings`.
    informative_priors_from : nbvcp fit, optional
        nbln Laplace only: the cascade (:mod:`scribe_stan.cascade`). The nbvcp fit's
        (Laplace or HMC) posterior for the dispersions ``log r_g``, the log mean
        expression ``m_g`` (prior on nbln's ``mu_g + Sigma_gg / 2``) and the capture
        ``eta_c`` becomes Gaussian priors with sds widened by ``tau``; genes and cells
        are matched by name and must be the same sets.
    tau : float > 0
        Widening of the cascade's prior sds (default 1).
    freeze : iterable of str
        Cascade parameters held at the nbvcp posterior means instead (default
        ``("r", "eta")``); names ``r``, ``mu``, ``eta`` or the aliases ``dispersion``,
        ``expression``/``mean_expression``, ``capture_efficiency``. Naming one
        parameter twice is an error.

    Returns
    -------
    LaplaceFit or HmcFit

    Raises
    ------
    ValueError
        Unknown model, method, device or backend; invalid counts (see
        :func:`scribe_stan._validate.counts_from_anndata`); rank out of range.
    TypeError
        ``adata`` is not an AnnData.
    """
    _validate.check_choice("model", model, tuple(MODELS))
    _validate.check_choice("method", method, METHODS)
    _validate.check_choice("device", device, DEVICES)
    if method == "hmc":
        stan.resolve_backend(backend)
    loadings.check_prior(loadings_prior)
    if loadings_prior != "normal" and model not in ("pln", "nbln"):
        raise ValueError(f"loadings_prior={loadings_prior!r} applies to the pln and nbln "
                         f"models; {model!r} has only the default 'normal'")
    if model in ("lnm", "lnmvcp"):
        from scribe_stan.lnm_fit import fit_lnm

        return fit_lnm(adata, model=model, method=method, rank=rank, layer=layer, genes=genes,
                       library_size=library_size, M0=M0, sigma_M=sigma_M, seed=seed, tol=tol,
                       max_iter=max_iter, progress=progress, backend=backend, chains=chains,
                       draws=draws, warmup=warmup, adapt_delta=adapt_delta,
                       conditional_on=conditional_on, reference_gene=reference_gene,
                       mode=mode, device=device)
    data = _prepare(adata, layer, genes, M0, sigma_M, library_size)
    if model == "nbvcp":  # no latent rank: rank is ignored (scribe_stan.nbvcp_fit)
        from scribe_stan import nbvcp_fit

        return nbvcp_fit.fit(data, method=method, tol=tol, max_iter=max_iter, progress=progress,
                             backend=backend, chains=chains, draws=draws, warmup=warmup,
                             adapt_delta=adapt_delta, seed=seed, conditional_on=conditional_on,
                             settings={"model": model, "method": method, "layer": layer,
                                       "M0": float(M0), "sigma_M": float(sigma_M),
                                       "seed": int(seed)})
    if conditional_on is not None:
        rank = conditional_on.W.shape[1]  # the globals fix the rank
    K = _validate.check_rank(rank, data.counts.shape[1])
    settings = {"model": model, "method": method, "rank": K, "layer": layer, "M0": float(M0),
                "sigma_M": float(sigma_M), "seed": int(seed), "loadings_prior": loadings_prior}
    if informative_priors_from is not None:
        settings.update(cascade_tau=float(tau), cascade_freeze=list(
            cascade.resolve_freeze(freeze)))
    if method == "laplace":
        from tqdm.auto import tqdm

        informed = _cascade(informative_priors_from, model, data, tau, freeze)

        with tqdm(total=max_iter, desc=f"{model} Laplace", unit="it", disable=not progress,
                  leave=False) as bar:
            sol = fit_laplace(data.counts, K, model=model, log_M0=data.log_M0,
                              sigma_M=data.sigma_M,
                              log_lib=data.log_lib, tol=tol, max_iter=max_iter, seed=seed,
                              progress=bar, loadings_prior=loadings_prior, device=device,
                              **informed)
        settings.update(device=device, tol=tol, max_iter=max_iter)
        return LaplaceFit(model=model, solution=sol, data=data, settings=settings)

    capture = {"log_M0": data.log_M0, "sigma_M": data.sigma_M, "log_lib": data.log_lib}
    if conditional_on is not None:
        if not (conditional_on.var_names.equals(data.var_names)
                and conditional_on.obs_names.equals(data.obs_names)):
            raise ValueError("conditional_on was fitted on other cells or genes; pass the "
                             "same adata/genes to both fits.")
        program = MODELS[model].CONDITIONAL_STAN_FILE.removesuffix(".stan")
        fixed = (conditional_on.mu, conditional_on.W, conditional_on.d)
        if model == "nbln":
            fixed += (conditional_on.log_r,)
        stan_data = MODELS[model].conditional_stan_data(data.counts, *fixed, **capture)
    else:
        program = model
        stan_data = MODELS[model].stan_data(data.counts, K, loadings_prior=loadings_prior,
                                            **capture)
    settings.update(backend=stan.resolve_backend(backend), chains=chains, draws=draws,
                    warmup=warmup, adapt_delta=adapt_delta, program=program)
    draws_ = stan.sample(program, stan_data, backend=backend, chains=chains, draws=draws,
                         warmup=warmup, seed=seed, adapt_delta=adapt_delta, progress=progress)
    n_div = int(np.sum(draws_.sample_stats["diverging"]))
    if n_div:
        warnings.warn(f"{n_div} divergent transitions in {program}; see the tree's "
                      "sample_stats.diverging.", RuntimeWarning, stacklevel=2)
    return HmcFit(model=model, program=program, draws=draws_, data=data, settings=settings)
