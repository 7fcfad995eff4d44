"""Public entry point :func:`fit` and its result objects (Laplace and HMC).

Both results turn into one ArviZ DataTree shape (:mod:`scribe_stan.convert`), so they
can be compared with :func:`scribe_stan.compare`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scribe_stan import _validate, cascade, convert, stan
from scribe_stan.laplace.device import resolve_device
from scribe_stan.laplace.solver import LaplaceSolution, fit_laplace
from scribe_stan.models import MODELS, loadings, pln

METHODS = ("laplace", "hmc")
GLOBALS = ("point", "laplace")  # where draws are made: globals at the MAP or drawn
DEVICES = ("cpu", "cuda", "auto")
_CUDA_MODELS = ("pln", "nbln")  # models with CUDA Laplace kernels
_MAX_TREE_ELEMENTS = 2 * 10**8  # per-cell draw elements in one tree (1.6 GB of float64)
DEFAULT_RANK = 10  # latent rank K when ``rank`` is not given (pln, nbln, lnm, lnmvcp)


def _gene_columns(genes, var_names, counts, *, minimum, what):
    """Column indices for a ``genes`` argument: None (all), a count or a list of names.

    Parameters
    ----------
    genes : None, int or sequence of str
        All genes, the ``n`` highest-mean ones (returned in column order) or those names
        (in the order given).
    var_names : pandas.Index
        Names of the columns of ``counts``.
    counts : (N, G) array
        Counts whose column means rank the genes for an integer ``genes``.
    minimum : int
        Fewest genes allowed.
    what : str
        The genes chosen from, used in messages (e.g. "non-zero genes").

    Returns
    -------
    numpy.ndarray of int

    Raises
    ------
    TypeError
        ``genes`` is a string, a float, a bool or another non-sequence.
    ValueError
        A count outside ``[minimum, G]``; fewer than ``minimum`` names, duplicated
        names, or names not among ``var_names``.
    """
    G = len(var_names)
    allowed = f"allowed: None (all), an integer from {minimum} to {G}, or a list of gene names"
    if genes is None:
        return np.arange(G)
    if _validate._is_int(genes):
        if not minimum <= genes <= G:
            raise ValueError(f"genes={genes} is out of range for {G} {what}; {allowed}")
        order = np.argsort(-counts.mean(axis=0), kind="stable")[:int(genes)]
        return np.sort(order)
    if isinstance(genes, (str, bytes, numbers.Number, np.bool_)) or not np.iterable(genes):
        hint = f" (for one gene pass [{genes!r}])" if isinstance(genes, str) else ""
        raise TypeError(f"genes must be None, an integer or a list of gene names; got "
                        f"{genes!r} of type {type(genes).__name__}{hint}; {allowed}")
    names = pd.Index(list(genes))
    if len(names) < minimum:
        raise ValueError(f"genes lists {len(names)} gene names; need at least {minimum}; "
                         f"{allowed}")
    if not names.is_unique:
        raise ValueError(f"genes lists a name twice: {list(names[names.duplicated()][:5])}")
    idx = var_names.get_indexer(names)
    if (idx < 0).any():
        missing = list(names[idx < 0])
        raise ValueError(f"genes not found among the {what}: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return idx


def _select_genes(ci, genes):
    """Column indices into ``ci.counts`` for the ``genes`` argument of :func:`fit`."""
    return _gene_columns(genes, ci.var_names, ci.counts, minimum=2,
                         what="non-zero genes (all-zero genes are dropped)")


def fitted_gene_index(fit, genes):
    """Indices into a fit's genes for a ``genes`` argument (trees, predictive checks).

    Parameters
    ----------
    fit : LaplaceFit, NbvcpFit or HmcFit
    genes : None, int or sequence of str
        All fitted genes, the ``n`` highest-mean ones (``n >= 1``) or those names.

    Returns
    -------
    numpy.ndarray of int

    Raises
    ------
    TypeError, ValueError
        As for the ``genes`` argument of :func:`fit` (at least one gene here).
    """
    return _gene_columns(genes, fit.var_names, fit.data.counts, minimum=1,
                         what="fitted genes")


def check_tree_size(draws, n_cells, n_genes):
    """Check a tree's ``draws`` argument and the size of its per-cell draws.

    Parameters
    ----------
    draws : int
        Draws requested (>= 1).
    n_cells, n_genes : int
        Cells and genes whose per-cell values the tree stores per draw.

    Returns
    -------
    int
        ``draws``.

    Raises
    ------
    TypeError, ValueError
        ``draws`` is not an integer >= 1, or ``draws * cells * genes`` exceeds
        2e8 elements (1.6 GB of float64 per variable).
    """
    draws = _validate.check_positive_int("draws", draws)
    if draws * n_cells * n_genes > _MAX_TREE_ELEMENTS:
        raise ValueError(f"draws*cells*genes = {draws}*{n_cells}*{n_genes} exceeds "
                         f"{_MAX_TREE_ELEMENTS:.0e}; allowed: draws <= "
                         f"{_MAX_TREE_ELEMENTS // (n_cells * n_genes)} for these cells and "
                         "genes, or fewer cells or genes")
    return draws


def check_device(device, model, method="laplace"):
    """Check that the Laplace kernels of ``model`` can run on ``device`` here.

    Parameters
    ----------
    device : {"cpu", "cuda", "auto"}
    model : str
    method : {"laplace", "hmc"}
        HMC runs in Stan on the CPU; ``device`` is then not used.

    Raises
    ------
    ValueError
        Unknown ``device``, or ``"cuda"`` for a model whose kernels run on the CPU only
        (nbvcp, lnm, lnmvcp; ``"auto"`` runs them on the CPU).
    RuntimeError
        ``"cuda"`` where numba-cuda or a GPU is missing
        (:func:`scribe_stan.laplace.device.resolve_device`).
    """
    _validate.check_choice("device", device, DEVICES)
    if method != "laplace" or device != "cuda":
        return
    if model not in _CUDA_MODELS:
        raise ValueError(f"device='cuda' is not available for {model}: its Laplace kernels "
                         "run on the CPU only; allowed: 'cpu', 'auto'")
    resolve_device(device)


def result_target(adata, obs_names, var_names):
    """In-memory copy of ``adata`` to hold a fit's results, and the fitted genes' rows.

    Parameters
    ----------
    adata : anndata.AnnData
        In memory or backed (its data are read into memory; the file is not changed).
    obs_names, var_names : pandas.Index
        The fit's cells and genes.

    Returns
    -------
    out : anndata.AnnData
        The copy.
    pos : numpy.ndarray of int
        Row of each fitted gene in ``out.var_names``.

    Raises
    ------
    TypeError
        ``adata`` is not an AnnData.
    ValueError
        ``adata`` does not hold the fitted cells in the fitted order, lacks fitted genes,
        or has duplicated names.
    """
    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an anndata.AnnData; got {type(adata).__name__}")
    obs = _validate.check_unique_names(adata.obs_names, "adata.obs_names")
    var = _validate.check_unique_names(adata.var_names, "adata.var_names")
    if not obs.equals(obs_names):
        raise ValueError(f"adata holds other cells than the fit ({len(obs)} cells vs "
                         f"{len(obs_names)} fitted, or in another order); pass the AnnData "
                         "that was fitted")
    pos = var.get_indexer(var_names)
    if (pos < 0).any():
        missing = list(var_names[pos < 0])
        raise ValueError(f"adata lacks {len(missing)} of the {len(var_names)} fitted genes "
                         f"(e.g. {missing[:5]}); pass the AnnData that was fitted")
    out = adata.to_memory() if adata.isbacked else adata.copy()
    return out, pos


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

    def globals_posterior(self, *, method="auto", rank=None, step=1e-3):
        """Gaussian approximation of the globals' posterior at the Laplace MAP (cached).

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
            Lowrank: eigenpairs kept (default 60).
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

        key = (method, rank, step)
        if key not in self._globals_cache:
            self._globals_cache[key] = laplace_globals(self.solution, method=method,
                                                       rank=rank, step=step,
                                                       seed=self.settings["seed"])
        return self._globals_cache[key]

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


def fit(adata, *, model="pln", method="laplace", rank=None, layer=None, genes=None,
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
    rank : int, optional
        Latent rank K, ``1 <= K < G`` (lnm, lnmvcp: ``K < G - 1``); default 10
        (:data:`DEFAULT_RANK`). nbvcp has no latent factors: a rank given for it is
        ignored with a ``UserWarning``.
    layer : str, optional
    genes : None, int or list of str
        Genes to model: all (default), the ``n`` highest-mean ones (``n >= 2``), or those
        names (at least 2, no repeats; a single string is rejected, not split into
        characters). Library sizes (capture prior) always use all genes of the cell.
    library_size : (N,) array of positive floats, optional
        Library sizes L_c for the capture prior, e.g. totals over a larger gene set than
        ``adata`` holds, or the design value of a simulation. Default: the counts of
        ``adata`` summed over all its genes.
    M0, sigma_M : float
        Capture prior: median total mRNA per cell and log-scale sd
        (defaults and sources in :mod:`scribe_stan.models.pln`).
    seed : int, >= 0
    device : {"cpu", "cuda", "auto"}
        Laplace kernels: CPU, CUDA (needs numba-cuda and a GPU), or CUDA when available
        (:func:`scribe_stan.laplace.device.resolve_device`).
    tol, max_iter : outer-optimizer tolerance (> 0) and iterations (>= 1) (Laplace).
    progress : bool
        Show a tqdm bar (Laplace) or the sampler's progress (HMC). With
        ``progress=False`` Stan's build and sampling messages are kept in
        ``fit.draws.messages`` instead of being printed.
    backend : {"auto", "cmdstanpy", "pystan"}
        Stan interface (HMC only: another value with ``method="laplace"`` is an error).
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
        Unknown model, method, device or backend; a backend other than "auto" for the
        Laplace method; invalid counts or duplicated
        names (see :func:`scribe_stan._validate.counts_from_anndata`); rank, genes,
        tol, max_iter or seed out of range. All are checked before any fitting.
    TypeError
        ``adata`` is not an AnnData; ``rank``, ``genes``, ``max_iter`` or ``seed`` of
        the wrong type.
    RuntimeError
        ``device="cuda"`` without a usable GPU, or ``backend="cmdstanpy"`` without
        CmdStan.
    """
    _validate.check_choice("model", model, tuple(MODELS))
    _validate.check_choice("method", method, METHODS)
    _validate.check_choice("backend", backend, stan.BACKENDS)
    _validate.check_positive_int("seed", seed, 0)
    if method == "hmc":
        stan.resolve_backend(backend)
    else:
        if backend != "auto":
            raise ValueError(f"backend={backend!r} applies to method='hmc' (the Stan "
                             "interface); method='laplace' runs the Numba solvers; allowed "
                             "with method='laplace': 'auto'")
        _validate.check_positive("tol", tol)
        _validate.check_positive_int("max_iter", max_iter)
    check_device(device, model, method)
    if model == "nbvcp" and rank is not None:  # warn, not refuse: loops over models pass one
        warnings.warn(f"rank={rank!r} is ignored for model='nbvcp' (genes are independent "
                      "given the capture: no latent factors)", UserWarning, stacklevel=2)
        rank = None
    rank = DEFAULT_RANK if rank is None else rank
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
                       mode=mode)
    data = _prepare(adata, layer, genes, M0, sigma_M, library_size)
    if model == "nbvcp":
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
