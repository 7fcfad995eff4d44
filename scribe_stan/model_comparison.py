"""PSIS-LOO of Laplace and HMC fits and :func:`compare_models`, the ranking of models.

What is left out. A cell's count vector ``u_c`` is one observation; leaving it out
removes it together with its own latents (log-rates, ALR coordinates, capture loss),
which then revert to their population prior. The pointwise predictive density is
therefore the *integrated* (marginal) likelihood ``log p(u_c | theta)`` of
:mod:`scribe_stan.log_predictive`, with the latents integrated out (Vehtari, Mononen,
Tolvanen, Sivula & Winther 2016, "Bayesian leave-one-out cross-validation
approximations for Gaussian latent variable models", JMLR 17(103); Merkle, Furr &
Rabe-Hesketh 2019, Psychometrika 84:802, doi:10.1007/s11336-019-09679-0).

* Laplace fits: the globals are plug-in MAP estimates, so the predictive of a cell is
  ``log p(u_c | theta_hat)``, estimated per cell by importance sampling from the cell's
  Laplace Gaussian; the Pareto k-hat of those weights is the per-cell diagnostic (is
  the Gaussian good enough for this cell?). The globals are not refitted without the
  cell; instead the plug-in's optimism is removed to leading order, as in AIC (Akaike
  1974, IEEE TAC 19:716, doi:10.1109/TAC.1974.1100705): the number of global parameters
  ``p`` (:func:`n_globals`) is subtracted, shared evenly by the cells
  (``elpd_i = log p(u_c | theta_hat) - p / N``), and reported as ``p``. It matters when
  models differ in size (nbln has G more globals than pln; nbvcp has no loadings),
  and it is what brings the Laplace number onto the integrated NUTS LOO of the same data
  (tests/test_model_comparison.py). Weakly identified globals shrunk by their priors
  make it slightly conservative. Why not :func:`arviz_stats.loo_approximate_posterior`
  with the tree's ``lp``/``lp_approx``: it reweights whole draws, one weight per draw
  for the latents of all N cells at once, so the weights degenerate as N grows, and
  with the conditional ``log_lik`` it still has to carry a left-out cell's latent from
  its posterior back to its prior. The latents of different cells are independent
  given the globals, so the correction factorizes into the per-cell importance sampling
  used here.
* HMC fits, ``latents="integrated"`` (default, pln/nbln/nbvcp): at each retained
  posterior draw of the globals the cell's latents are integrated as for Laplace (Laplace
  proposal, importance sampling), and ArviZ's PSIS-LOO runs over the global draws
  (:func:`arviz_stats.loo`): the Bayesian counterpart of the Laplace number.
* Laplace fits, ``globals="laplace"`` (every model): the same integrated likelihood at
  draws of the globals from their Laplace Gaussian (the fit's ``globals_posterior()``),
  and PSIS-LOO over those draws corrected towards the Laplace posterior of the globals
  (:func:`arviz_stats.loo_approximate_posterior`): the integrated HMC number without
  NUTS.
* HMC fits, ``latents="conditional"``: the usual PSIS-LOO of the Stan program's
  ``log_lik``, which conditions on the draw's own latents. Its target is the same
  ``log p(u_c | ...)`` only through a harmonic-mean identity, and the importance ratios
  (posterior over prior of a G-dimensional latent) are heavy-tailed: expect large
  k-hat. It is not comparable with the integrated numbers and :func:`compare_models`
  refuses to mix the two.

References: Vehtari, Gelman & Gabry 2017, "Practical Bayesian model evaluation using
leave-one-out cross-validation and WAIC", Stat. Comput. 27:1413,
doi:10.1007/s11222-016-9696-4; Vehtari, Simpson, Gelman, Yao & Gabry 2024, "Pareto
smoothed importance sampling", JMLR 25(72).
"""

from __future__ import annotations

import copy
import time
import warnings

import arviz_stats
import numpy as np
import pandas as pd
import xarray as xr
from arviz_stats.utils import ELPDDataLOO

from scribe_stan import _validate, log_predictive, specs
from scribe_stan.fits.base import Fit
from scribe_stan.fits.lognormal import GLOBALS

LATENTS = ("integrated", "conditional")
_INTEGRATED_HMC = ("lognormal", "nbvcp")  # model families with integrated HMC LOO


def _is_laplace(fit):
    return isinstance(fit, Fit) and fit.method == "laplace"


def _is_hmc(fit):
    return isinstance(fit, Fit) and fit.method == "hmc"


def n_globals(fit):
    """Number of identified global parameters of a fit (the plug-in correction ``p``).

    pln ``G (K + 2)``, nbln ``G (K + 3)`` (mu, W, d, log r), nbvcp ``2 G`` (m, log r),
    lnm/lnmvcp ``(G - 1)(K + 2) + 2`` (``K + 1`` per ALR coordinate in ``low_rank``
    mode; plus m_T, r_T), less the ``K (K - 1) / 2`` rotations ``W -> W R`` that leave
    the likelihood unchanged (each model's spec, :attr:`ModelSpec.n_globals`). Globals
    held by a cascade were still estimated from the same data and are counted.
    """
    K = fit.settings.get("rank") or 0
    return specs.get(fit.model).n_globals(len(fit.var_names), K, fit.settings)


def _elpd_data(elpd_i, pareto_k, p, draws, cells):
    """ELPDDataLOO from pointwise values (cells on dim ``cell``), ``p`` parameters."""
    n = elpd_i.size
    good = log_predictive.good_k(draws)
    return ELPDDataLOO(elpd=float(elpd_i.sum()), se=float(np.sqrt(n * np.var(elpd_i))),
                       p=float(p), n_samples=int(draws), n_data_points=int(n), scale="log",
                       warning=bool(np.any(pareto_k > good)), good_k=good,
                       elpd_i=xr.DataArray(elpd_i, dims="cell", coords={"cell": cells}),
                       pareto_k=xr.DataArray(pareto_k, dims="cell", coords={"cell": cells}),
                       approx_posterior=True)


def _laplace_loo(fit, draws, seed):
    """(ELPDDataLOO, cell_log_predictive Dataset) of a Laplace fit."""
    ds = log_predictive.cell_log_predictive(fit, draws=draws, seed=seed)
    p = n_globals(fit)
    return _elpd_data(ds["elpd"].values - p / ds.sizes["cell"], ds["pareto_k"].values, p,
                      draws, ds["cell"].values), ds


def _hmc_globals(fit, max_draws):
    """Thinned posterior draws of the globals of an HMC fit: dict of (chain, draw, ...)."""
    post = fit.draws.posterior
    n_draw = post["lp__"].shape[1] if "lp__" in post else next(iter(post.values())).shape[1]
    step = max(1, int(np.ceil(n_draw * next(iter(post.values())).shape[0] / max_draws)))
    if specs.get(fit.model).family == "nbvcp":
        keys = ("m", "log_r")
    else:  # log-normal: mu, W, d and, for an NB likelihood, log_r
        keys = ("mu", "W", "d") + (("log_r",) if "log_r" in post else ())
    return {k: np.asarray(post[k])[:, ::step] for k in keys}


def _integrated_log_lik(fit, draws, max_draws, rng):
    """(chain, draw, N) ``log p(u_c | theta_s)`` with latents integrated by Laplace-IS."""
    glob = _hmc_globals(fit, max_draws)
    C, S = next(iter(glob.values())).shape[:2]
    N = len(fit.obs_names)
    out = np.empty((C, S, N))
    start = None
    nb_problem = None
    nbvcp = specs.get(fit.model).family == "nbvcp"
    if nbvcp:
        from scribe_stan.laplace.nbvcp import NbvcpProblem

        nb_problem = NbvcpProblem(fit.data.counts, log_M0=fit.data.log_M0,
                                  sigma_M=fit.data.sigma_M, log_lib=fit.data.log_lib)
    for c in range(C):
        for s in range(S):
            if nbvcp:
                w = log_predictive.nbvcp_weights(nb_problem, glob["m"][c, s],
                                                 glob["log_r"][c, s], draws, rng)
            else:
                log_r = glob["log_r"][c, s] if "log_r" in glob else None
                w, problem = log_predictive.lognormal_weights(
                    fit.data, glob["mu"][c, s], glob["W"][c, s], glob["d"][c, s], log_r,
                    draws, rng, start=start)
                start = (problem.x, problem.eta)
            out[c, s] = log_predictive.is_estimate(w.log_weights)[0]
    return out


def loo(fit, *, draws=200, seed=0, latents="integrated", max_draws=200, globals="point"):
    """PSIS-LOO of a fit, one observation per cell (its whole count vector).

    Parameters
    ----------
    fit : a fit of :func:`scribe_stan.fit` (Laplace or HMC)
    draws : int >= 25
        Importance-sampling draws per cell (Laplace; per global draw for integrated
        HMC and for ``globals="laplace"``).
    seed : int
    latents : {"integrated", "conditional"}
        HMC only (see the module docs); integrated is available for pln, nbln, nbvcp.
    max_draws : int
        Integrated HMC: posterior draws of the globals used (thinned evenly); Laplace
        with ``globals="laplace"``: draws of the globals from their Gaussian (>= 25).
    globals : {"point", "laplace"}
        Laplace fits: the globals at their MAP with the plug-in correction ``p``
        (default), or drawn from their Laplace Gaussian (the fit's
        ``globals_posterior()``; every Laplace model: pln, nbln, nbvcp, lnm, lnmvcp):
        each cell's integrated likelihood ``log p(u_c | theta_s)`` at every draw
        ``theta_s`` as for HMC (importance sampling from the cell's Laplace Gaussian at
        ``theta_s``, its Newton warm-started from the MAP modes, which the fit keeps),
        and PSIS-LOO over the draws with the Gaussian's correction to the Laplace
        posterior of the globals (:func:`arviz_stats.loo_approximate_posterior`; log
        target ``sum_c log p(u_c | theta_s)`` plus the globals' log prior as a density
        in the Gaussian's coordinates: ``+ sum log d`` for the log-normal and lnm
        compositions, none for nbvcp's ``(m, log r)`` and lnm's ``(log m_T, log
        r_T)``; lnm's two blocks are independent Gaussians). Costs ``max_draws``
        integrated evaluations of the data (lnm: composition and totals, each cell's
        Newton to convergence), plus the globals' Gaussian once per fit.

    Returns
    -------
    arviz_stats.utils.ELPDDataLOO
        ``elpd`` (nats, summed over cells), ``se``, ``p`` (Laplace point: :func:`n_globals`,
        the plug-in correction; otherwise ArviZ's effective number of parameters),
        ``elpd_i`` and ``pareto_k`` per cell (dim ``cell``), ``n_samples``. For
        Laplace fits with ``globals="point"`` ``pareto_k`` is the k-hat of each cell's
        importance weights and ``n_samples`` is ``draws``; with ``globals="laplace"``
        and for integrated HMC it is the k-hat of PSIS over the draws of the globals.

    Raises
    ------
    ValueError
        Unknown ``latents`` or ``globals``; integrated HMC LOO for lnm/lnmvcp;
        ``draws`` (or, with ``globals="laplace"``, ``max_draws``) not an integer
        >= 25; ``globals="laplace"`` for an HMC fit (its globals are already posterior
        draws) or for a pln/nbln fit holding eta (a cascade).
    TypeError
        Not a fit object.
    """
    _validate.check_choice("latents", latents, LATENTS)
    _validate.check_choice("globals", globals, GLOBALS)
    if globals == "laplace":
        return _nested_laplace_loo(fit, draws, seed, max_draws)
    if _is_laplace(fit):
        return _laplace_loo(fit, draws, seed)[0]
    if not _is_hmc(fit):
        raise TypeError(f"loo takes a fit from scribe_stan.fit (Laplace or HMC); got "
                        f"{type(fit).__name__}")
    tree = fit.to_datatree()
    if latents == "conditional":
        return arviz_stats.loo(tree, pointwise=True, var_name="counts")
    if specs.get(fit.model).family not in _INTEGRATED_HMC or fit.program != fit.model:
        integrated = [n for n in specs.names() if specs.get(n).family in _INTEGRATED_HMC]
        raise ValueError(f"latents='integrated' is available for full-joint HMC fits of "
                         f"{', '.join(integrated)}; got model={fit.model!r}, program="
                         f"{fit.program!r}. Use latents='conditional'.")
    draws = log_predictive.check_draws(draws)
    ll = _integrated_log_lik(fit, draws, int(max_draws), np.random.default_rng(seed))
    cells = np.asarray(fit.obs_names, dtype=str)
    ll_tree = xr.DataTree.from_dict({
        "posterior": xr.Dataset({"lp": (("chain", "draw"), ll.sum(-1))}),
        "log_likelihood": xr.Dataset({"counts": (("chain", "draw", "cell"), ll)},
                                     coords={"cell": cells})})
    return arviz_stats.loo(ll_tree, pointwise=True, var_name="counts")


def _lognormal_cells(fit, draws, rng):
    """pln/nbln: one draw's globals -> (S, N) log IS weights of every cell."""
    if fit.globals_posterior().layout.eta is not None:
        raise ValueError("globals='laplace' LOO needs eta marginalized; this fit holds "
                         "each cell's capture loss (a cascade with freeze including eta)")
    start = (fit.x_hat, fit.eta_hat)  # every draw starts from the MAP modes

    def weights(g):
        w, _ = log_predictive.lognormal_weights(fit.data, g["mu"], g["W"], g["d"],
                                                g["log_r"], draws, rng, start=start)
        return w.log_weights

    return weights


def _nbvcp_cells(fit, draws, rng):
    """nbvcp: one draw's globals -> (S, N) log IS weights (a copy of the fit's problem)."""
    problem, eta_map = copy.deepcopy(fit.solution.problem), fit.eta_hat.copy()

    def weights(g):
        problem.eta[:] = eta_map  # every draw starts from the MAP modes
        return log_predictive.nbvcp_weights(problem, g["m"], g["log_r"], draws,
                                            rng).log_weights

    return weights


def _lnm_cells(fit, draws, rng):
    """lnm/lnmvcp: one draw's globals -> (S, N) log IS weights (copies of the problems)."""
    comp, totals = copy.deepcopy(fit.composition.problem), copy.deepcopy(fit.totals.problem)
    comp.modes(fit.mu_alr, fit.W_alr, fit.composition.d)
    comp.keep_modes()
    eta_map = totals.eta.copy()

    def weights(g):
        comp.restore_modes()  # every draw starts from the MAP modes
        totals.eta = eta_map.copy()
        return log_predictive.lnm_weights(comp, totals, g["mu"], g["W"], g["d"],
                                          g["log_m_T"], g["log_r_T"], draws,
                                          rng).log_weights

    return weights


_CELLS = {"lognormal": _lognormal_cells, "nbvcp": _nbvcp_cells, "lnm": _lnm_cells}


def _nested_log_lik(fit, draws, n_globals_draws, rng):
    """Integrated log likelihoods at draws of a Laplace fit's globals from their Gaussian.

    Returns
    -------
    dict
        ``ll`` (S, N) each cell's IS estimate of ``log p(u_c | theta_s)``; ``log_p`` (S,)
        ``sum_c ll`` plus the globals' log prior as a density in the Gaussian's
        coordinates (the ``log d`` Jacobian included; lnm: composition and totals);
        ``log_q`` (S,) the Gaussian's log density (lnm: both blocks); ``globals`` the
        drawn globals (the fit's ``_draw_globals`` dict).
    """
    family = specs.get(fit.model).family
    weights = _CELLS[family](fit, draws, rng)
    glob = fit._draw_globals(n_globals_draws, rng)
    S = glob["log_q"].size
    ll = np.empty((S, len(fit.obs_names)))
    for s in range(S):
        one = {k: None if v is None else v[s] for k, v in glob.items()}
        ll[s] = log_predictive.is_estimate(weights(one))[0]
    return {"ll": ll,
            "log_p": ll.sum(axis=1) + glob["log_prior"] + glob.get("totals_log_prior", 0.0),
            "log_q": glob["log_q"] + glob.get("totals_log_q", 0.0), "globals": glob}


def _nested_laplace_loo(fit, draws, seed, n_globals_draws):
    """PSIS-LOO of a Laplace fit over draws of its globals' Gaussian."""
    if not _is_laplace(fit):
        raise ValueError("globals='laplace' applies to Laplace fits (method='laplace'), "
                         "whose globals have a Gaussian approximation; got "
                         f"{getattr(fit, 'method', type(fit).__name__)} fit of "
                         f"{getattr(fit, 'model', None)!r}. An HMC fit's globals are "
                         "already posterior draws: use globals='point'")
    res = _nested_log_lik(fit, log_predictive.check_draws(draws),
                          log_predictive.check_draws(n_globals_draws, "max_draws"),
                          np.random.default_rng(seed))
    ll, log_p, log_q = res["ll"], res["log_p"], res["log_q"]
    cells = np.asarray(fit.obs_names, dtype=str)
    tree = xr.DataTree.from_dict({
        "posterior": xr.Dataset({"lp": (("chain", "draw"), log_p[None])}),
        "log_likelihood": xr.Dataset({"counts": (("chain", "draw", "cell"), ll[None])},
                                     coords={"cell": cells})})
    return arviz_stats.loo_approximate_posterior(
        tree, xr.DataArray(log_p[None], dims=("chain", "draw")),
        xr.DataArray(log_q[None], dims=("chain", "draw")), pointwise=True,
        var_name="counts")


def _names(obj):
    """(obs_names, var_names, kind) of a fit or an HMC DataTree."""
    if _is_laplace(obj):
        return pd.Index(obj.obs_names), pd.Index(obj.var_names), "integrated"
    if _is_hmc(obj):
        return pd.Index(obj.obs_names), pd.Index(obj.var_names), None
    if isinstance(obj, xr.DataTree):
        if obj.attrs.get("solver") != "hmc":
            raise ValueError("a Laplace DataTree has no integrated per-cell likelihood; pass "
                             "the fit object itself (ss.fit(...)) to compare_models")
        obs = obj["observed_data"]
        return pd.Index(obs["cell"].values), pd.Index(obs["gene"].values), "conditional"
    raise TypeError(f"compare_models takes fits from scribe_stan.fit or HMC DataTrees; got "
                    f"{type(obj).__name__}")


def _check_same_data(fits):
    """ValueError naming the first model whose cells or genes differ from the first's."""
    items = list(fits.items())
    ref_name, ref = items[0]
    ref_obs, ref_var, _ = _names(ref)
    for name, obj in items[1:]:
        obs, var, _ = _names(obj)
        for what, a, b in (("cells (obs_names)", ref_obs, obs), ("genes (var_names)",
                                                                  ref_var, var)):
            if not a.equals(b):
                only_ref = a.difference(b)[:3].tolist()
                only_new = b.difference(a)[:3].tolist()
                order = " (same names, other order)" if not (only_ref or only_new) else ""
                raise ValueError(
                    f"models {ref_name!r} and {name!r} were fitted on different {what}"
                    f"{order}: {len(a)} vs {len(b)}; only in {ref_name!r}: {only_ref}, only "
                    f"in {name!r}: {only_new}. Fit every model on the same cells and genes.")


def stacking_weights(elpds):
    """Stacking weights of :func:`arviz_stats.compare`, safe for whole-cell log densities.

    ArviZ exponentiates each pointwise ``elpd_i``; a cell's whole count vector has
    ``elpd_i`` of hundreds of nats, so every term underflows to 0 and the optimizer
    returns its uniform start. Stacking maximizes ``sum_i log sum_k w_k exp(elpd_ik)``
    (Yao et al. 2018, Bayesian Analysis 13:917, doi:10.1214/17-BA1091), whose argmax is
    unchanged when each ``elpd_ik`` is shifted by a per-cell constant; the shift by the
    per-cell maximum over models keeps the largest term at ``exp(0) = 1``.

    Parameters
    ----------
    elpds : dict of {str: arviz_stats.utils.ELPDData}
        Pointwise results on the same cells.

    Returns
    -------
    pandas.Series
        Weights (sum 1), indexed by model name.
    """
    shift = np.max([np.asarray(e.elpd_i) for e in elpds.values()], axis=0)
    shifted = {}
    for name, e in elpds.items():
        e = copy.deepcopy(e)
        e.elpd_i = e.elpd_i - shift
        e.elpd = float(np.sum(e.elpd_i))
        shifted[name] = e
    return arviz_stats.compare(shifted, method="stacking", round_to="none")["weight"]


def compare_models(fits, *, draws=200, seed=0, latents="integrated", max_draws=200,
                   method="stacking"):
    """Rank fitted models on the same cells and genes by PSIS-LOO ELPD.

    Each model's pointwise term is the log probability of the cell's whole count vector
    with its latents integrated (see the module docs): pln/nbln/nbvcp score every
    count, and lnm/lnmvcp score NB total x multinomial composition *with* the
    multinomial coefficient, a proper pmf of the same counts, so the ELPDs are
    comparable.

    Parameters
    ----------
    fits : dict of {str: fit or HMC DataTree}
        Two or more models fitted to the same cells and genes (same ``obs_names`` and
        ``var_names`` in the same order). HMC DataTrees give the conditional LOO only.
    draws, seed, latents, max_draws : passed to :func:`loo`.
    method : {"stacking", "bb-pseudo-bma", "pseudo-bma"}
        Weighting method of :func:`arviz_stats.compare`.

    Returns
    -------
    pandas.DataFrame
        :func:`arviz_stats.compare`'s table (index: model names, best first; ``rank``,
        ``elpd``, ``p``, ``elpd_diff``, ``weight``, ``se``, ``dse``, ``warning``; stacking
        weights from :func:`stacking_weights`) plus
        ``n_cells``, ``k_max`` (largest Pareto k-hat), ``frac_k_high`` (share of cells
        with k-hat above ``good_k``), ``n_globals`` (fits only) and ``wall_s`` (seconds
        spent on that model's LOO). ``table.attrs["loo"]`` holds each model's
        :class:`arviz_stats.utils.ELPDDataLOO` (pointwise ``elpd_i``, ``pareto_k``) and
        ``table.attrs["log_predictive"]`` each Laplace fit's
        :func:`~scribe_stan.log_predictive.cell_log_predictive` Dataset (IS estimate and
        Laplace value per cell).

    Raises
    ------
    ValueError
        Fewer than two models; models fitted on different cells or genes (the message
        names them); integrated and conditional LOOs mixed; bad ``latents``.
    TypeError
        An entry that is neither a fit nor a DataTree.

    Examples
    --------
    >>> table = ss.compare_models({"pln": pln_fit, "nbln": nbln_fit})  # doctest: +SKIP
    >>> table[["elpd", "elpd_diff", "dse"]]                           # doctest: +SKIP
    """
    if not isinstance(fits, dict) or len(fits) < 2:
        raise ValueError("fits must be a dict of at least two named models, e.g. "
                         "{'pln': pln_fit, 'nbln': nbln_fit}")
    _validate.check_choice("latents", latents, LATENTS)
    _check_same_data(fits)
    kinds = {name: _names(obj)[2] or latents for name, obj in fits.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"integrated and conditional LOOs are not on the same footing: "
                         f"{kinds}. Pass fit objects with latents='integrated'.")
    elpds, extra, cells = {}, {}, {}
    for name, obj in fits.items():
        t0 = time.perf_counter()
        if isinstance(obj, xr.DataTree):
            res = arviz_stats.loo(obj, pointwise=True, var_name="counts")
        elif _is_laplace(obj):
            res, cells[name] = _laplace_loo(obj, draws, seed)
        else:
            res = loo(obj, draws=draws, seed=seed, latents=latents, max_draws=max_draws)
        k = np.asarray(res.pareto_k)
        elpds[name] = res
        extra[name] = {"n_cells": res.n_data_points, "k_max": float(np.max(k)),
                       "frac_k_high": float(np.mean(k > res.good_k)),
                       "n_globals": (n_globals(obj) if not isinstance(obj, xr.DataTree)
                                     else np.nan),
                       "wall_s": time.perf_counter() - t0}
    with warnings.catch_warnings():
        if method == "stacking":  # ArviZ's own weights underflow; recomputed below
            warnings.simplefilter("ignore", RuntimeWarning)
        table = arviz_stats.compare(elpds, method=method, round_to="none")
    if method == "stacking":
        table["weight"] = stacking_weights(elpds).reindex(table.index)
    table = table.join(pd.DataFrame(extra).T.astype(float).astype({"n_cells": int}))
    table.attrs["loo"] = elpds
    table.attrs["log_predictive"] = cells
    return table
