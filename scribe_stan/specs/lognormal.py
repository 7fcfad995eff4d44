"""Specs of the log-normal models ``pln`` (Poisson) and ``nbln`` (negative binomial).

Laplace: :func:`scribe_stan.laplace.solver.fit_laplace` into a
:class:`scribe_stan.fits.LaplaceFit`; HMC: the Stan programs ``pln.stan`` /
``nbln.stan`` and their conditional programs. Options: ``loadings_prior`` (both) and,
for nbln's Laplace fit, the nbvcp -> nbln cascade (``informative_priors_from``,
``tau``, ``freeze``; :mod:`scribe_stan.cascade`).
"""

from __future__ import annotations

from scribe_stan import _validate, cascade, nuts, stan
from scribe_stan.fits import HmcFit, LaplaceFit
from scribe_stan.fits.nbvcp import posterior_moments
from scribe_stan.laplace.solver import fit_laplace
from scribe_stan.models import MODELS, loadings
from scribe_stan.specs.registry import ModelSpec, Option, register
from scribe_stan.specs.shared import (check_same_cells, laplace_settings, progress_bar,
                                      sample_nuts)


def _check_source(source):
    if getattr(source, "model", None) != "nbvcp":
        raise ValueError("informative_priors_from must be an nbvcp fit (ss.fit(..., "
                         "model='nbvcp'), Laplace or HMC); got "
                         f"{type(source).__name__} of model {getattr(source, 'model', None)!r}")
    return source


def _check_init_source(fit):
    if not (getattr(fit, "method", None) == "laplace"
            and getattr(fit, "model", None) in ("pln", "nbln")):
        raise ValueError("init_from must be a pln or nbln Laplace fit of the same cells and "
                         f"genes; got {type(fit).__name__} of model "
                         f"{getattr(fit, 'model', None)!r}")
    return fit


def _check_tau(tau):
    return _validate.check_positive("tau", tau)


def _fit(data, method, common, options, settings, *, model):
    K = common.rank
    if common.conditional_on is not None:
        K = common.conditional_on.W.shape[1]  # the globals fix the rank
    K = _validate.check_rank(K, data.counts.shape[1])
    prior = options["loadings_prior"]
    settings = {**settings, "rank": K, "loadings_prior": prior}
    source = options.get("informative_priors_from")
    if source is not None:
        settings.update(cascade_tau=float(options["tau"]),
                        cascade_freeze=list(cascade.resolve_freeze(options["freeze"])))
    capture = {"log_M0": data.log_M0, "sigma_M": data.sigma_M, "log_lib": data.log_lib}
    if method == "laplace":
        informed = {} if source is None else cascade.cascade_arguments(
            posterior_moments(source), data.var_names, data.obs_names, tau=options["tau"],
            freeze=options["freeze"])
        with progress_bar(model, common) as bar:
            sol = fit_laplace(data.counts, K, model=model, tol=common.tol,
                              max_iter=common.max_iter, seed=common.seed, progress=bar,
                              loadings_prior=prior, device=common.device, **capture,
                              **informed)
        return LaplaceFit(model=model, solution=sol, data=data,
                          settings=laplace_settings(settings, common, common.device))
    cond = common.conditional_on
    if cond is not None:
        check_same_cells(cond, data)
        program = MODELS[model].CONDITIONAL_STAN_FILE.removesuffix(".stan")
        fixed = (cond.mu, cond.W, cond.d) + ((cond.log_r,) if model == "nbln" else ())
        stan_data = MODELS[model].conditional_stan_data(data.counts, *fixed, **capture)
    else:
        program = model
        stan_data = MODELS[model].stan_data(data.counts, K, loadings_prior=prior, **capture)
    inits = inv_metric = None
    start = options.get("init_from")
    if options.get("init_metric", "unit") == "laplace":
        if start is None:
            raise ValueError("init_metric='laplace' takes the metric from init_from; give "
                             "init_from=<Laplace fit> or init_metric='unit'")
        if stan.resolve_backend(common.backend) != "cmdstanpy" or common.metric != "diag_e":
            raise ValueError("init_metric='laplace' needs backend='cmdstanpy' and "
                             "metric='diag_e' (httpstan's sampler takes no initial "
                             "metric); allowed with pystan: init_metric='unit'")
    if start is not None:
        if cond is not None:
            raise ValueError("init_from starts the full-joint program; not with conditional_on")
        check_same_cells(start, data)
        if start.model != model or start.W.shape[1] != K:
            raise ValueError(f"init_from is a {start.model} fit of rank {start.W.shape[1]}; "
                             f"this fit is {model} of rank {K}")
        inits = nuts.laplace_inits(start, common.chains, seed=common.seed)
        settings["init"] = "laplace"
        if options.get("init_metric", "unit") == "laplace":
            inv_metric = nuts.laplace_metric(start, seed=common.seed)
            settings["init_metric"] = "laplace"
    draws, settings = sample_nuts(program, stan_data, common, settings, inits=inits,
                                  inv_metric=inv_metric)
    return HmcFit(model=model, program=program, draws=draws, data=data, settings=settings)


def _pln(data, method, common, options, settings):
    return _fit(data, method, common, options, settings, model="pln")


def _nbln(data, method, common, options, settings):
    return _fit(data, method, common, options, settings, model="nbln")


_LOADINGS = Option(default="normal", check=loadings.check_prior,
                   doc="prior on the loadings: iid normal or a columnwise shrinkage prior")
_INIT_FROM = Option(check=_check_init_source, methods=("hmc",),
                    doc="a Laplace fit whose MAP and per-cell draws start the NUTS chains "
                        "(scribe_stan.nuts.laplace_inits)")
_INIT_METRIC = Option(
    default="unit", methods=("hmc",),
    check=lambda v: _validate.check_choice("init_metric", v, ("unit", "laplace")),
    doc="initial diagonal metric of warmup: 'unit' (Stan's) or 'laplace', the variances "
        "of the init_from fit's nested draws (scribe_stan.nuts.laplace_metric; CmdStan)")
_GLOBALS = {"mu": ("gene",), "W": ("gene", "factor"), "d": ("gene",),
            "Sigma": ("gene", "gene2")}
_PER_CELL = {"x": ("cell", "gene"), "eta": ("cell",)}
_KEYS = ("obs/{key}_eta", "obs/{key}_capture_efficiency", "obs/{key}_converged",
         "obsm/{key}_x", "var/{key}_mu", "var/{key}_d", "varm/{key}_W", "varm/{key}_W_perp",
         "uns/{key}")

PLN = register(ModelSpec(
    name="pln", family="lognormal", fit=_pln, stan_program="pln",
    description="Poisson log-normal with capture: u ~ Poisson(exp(x - eta)), "
                "x ~ N(mu, W W' + diag(d))",
    conditional_program="pln_conditional", devices=("cuda",),
    options={"loadings_prior": _LOADINGS, "init_from": _INIT_FROM,
             "init_metric": _INIT_METRIC}, globals=_GLOBALS,
    per_cell=_PER_CELL,
    anndata_keys=_KEYS, compare_full=("Sigma", "corr"), compare_conditional=("x", "eta"),
    compare_plot=("eta", "x"),
    n_globals=lambda G, K, settings: G * (K + 2) - K * (K - 1) // 2))

NBLN = register(ModelSpec(
    name="nbln", family="lognormal", fit=_nbln, stan_program="nbln",
    description="negative-binomial log-normal: pln with a per-gene NB dispersion r",
    conditional_program="nbln_conditional", devices=("cuda",),
    options={"loadings_prior": _LOADINGS, "init_from": _INIT_FROM,
             "init_metric": _INIT_METRIC,
             "informative_priors_from": Option(check=_check_source, methods=("laplace",),
                                               doc="an nbvcp fit whose posterior becomes "
                                                   "priors (the cascade)"),
             "tau": Option(default=1.0, check=_check_tau, methods=("laplace",),
                           doc="widening of the cascade's prior sds"),
             "freeze": Option(default=cascade.DEFAULT_FREEZE, methods=("laplace",),
                              doc="cascade parameters held at the nbvcp posterior means")},
    globals={**_GLOBALS, "r": ("gene",)}, per_cell=_PER_CELL,
    anndata_keys=_KEYS + ("var/{key}_r",), compare_full=("Sigma", "corr", "r"),
    compare_conditional=("x", "eta"), compare_plot=("eta", "x"),
    n_globals=lambda G, K, settings: G * (K + 3) - K * (K - 1) // 2))
