"""Specs of the logistic-normal multinomial models ``lnm`` and ``lnmvcp`` (with capture).

Laplace: :func:`scribe_stan.laplace.lnm_solver.fit_laplace` (composition and total
blocks) into a :class:`scribe_stan.fits.LnmLaplaceFit`; HMC: ``lnm.stan`` /
``lnmvcp.stan`` and their conditional programs, into a :class:`scribe_stan.fits.LnmHmcFit`.
Options: ``reference_gene`` (the ALR reference) and, for the Laplace fit, ``mode``.
"""

from __future__ import annotations

from scribe_stan import _validate
from scribe_stan.fits import LnmHmcFit, LnmLaplaceFit
from scribe_stan.laplace import lnm_solver
from scribe_stan.models import lnm
from scribe_stan.specs.registry import ModelSpec, Option, register
from scribe_stan.specs.shared import (check_same_cells, laplace_settings, progress_bar,
                                      sample_nuts)


def _rank(model, method, rank, data):
    G, N = data.counts.shape[1], data.counts.shape[0]
    if G < 3:
        raise ValueError(f"{model} needs at least 3 genes (ALR dimension G - 1 >= 2); got {G}")
    if _validate._is_int(rank) and not 1 <= rank < G - 1:
        raise ValueError(f"rank K={rank} is out of range for {model} with G={G} genes; "
                         f"allowed: 1 <= K < G - 1 = {G - 1} (the ALR dimension)")
    K = _validate.check_rank(rank, G - 1)
    if method == "laplace" and K > N:  # the solver starts from K principal axes of the cells
        raise ValueError(f"rank K={K} exceeds the number of cells N={N} for the {model} "
                         "Laplace fit (its start takes K principal axes of the cells' "
                         f"log-ratios); allowed: 1 <= K <= {min(N, G - 2)}")
    return K


def _fit(data, method, common, options, settings, *, model):
    cond = common.conditional_on
    K = _rank(model, method, common.rank if cond is None else cond.W_alr.shape[1], data)
    ref = lnm.resolve_reference(options["reference_gene"], data.var_names, data.counts)
    settings = {**settings, "rank": K, "reference_gene": str(data.var_names[ref])}
    capture = {"log_M0": data.log_M0, "sigma_M": data.sigma_M, "log_lib": data.log_lib}
    if method == "laplace":
        with progress_bar(model, common) as bar:
            comp, totals, wall = lnm_solver.fit_laplace(
                data.counts, ref, K, capture=model == "lnmvcp", mode=options["mode"],
                tol=common.tol, max_iter=common.max_iter, seed=common.seed, progress=bar,
                **capture)
        return LnmLaplaceFit(model=model, composition=comp, totals=totals, data=data, ref=ref,
                             settings=laplace_settings(settings, common, mode=options["mode"],
                                                       wall_time_s=wall))
    if cond is not None:
        check_same_cells(cond, data)
        if cond.mode != "full":
            raise ValueError("conditional HMC needs a Laplace fit with mode='full' (the "
                             "Stan programs have d > 0); got mode='low_rank'")
        if cond.model != model:
            raise ValueError(f"conditional_on is a {cond.model} fit; model={model!r}")
        ref = cond.ref
        settings["reference_gene"] = cond.reference_gene
        program = lnm.CONDITIONAL_STAN_FILES[model].removesuffix(".stan")
        stan_data = lnm.conditional_stan_data(
            data.counts, ref, cond.mu_alr, cond.W_alr, cond.d_alr, cond.totals.log_m_T,
            cond.totals.log_r_T, **capture)
    else:
        program = model
        stan_data = lnm.stan_data(data.counts, K, ref, **capture)
    draws, settings = sample_nuts(program, stan_data, common, settings)
    return LnmHmcFit(model=model, program=program, draws=draws, data=data, settings=settings,
                     ref=ref)


def _lnm(data, method, common, options, settings):
    return _fit(data, method, common, options, settings, model="lnm")


def _lnmvcp(data, method, common, options, settings):
    return _fit(data, method, common, options, settings, model="lnmvcp")


def _check_mode(mode):
    return _validate.check_choice("mode", mode, lnm_solver.MODES)


def _n_globals(G, K, settings):
    per_coord = K + (1 if settings.get("mode") == "low_rank" else 2)
    return (G - 1) * per_coord + 2 - K * (K - 1) // 2


_OPTIONS = {"reference_gene": Option(doc="the ALR reference gene (name or column index)"),
            "mode": Option(default="full", check=_check_mode, methods=("laplace",),
                           doc="Laplace latent: ALR coordinates ('full') or factor scores "
                               "with d = 0 ('low_rank')")}
_GLOBALS = {"mu_alr": ("alr",), "W_alr": ("alr", "factor"), "d_alr": ("alr",),
            "Sigma_clr": ("gene", "gene2"), "m_T": (), "r_T": ()}
_KEYS = ("obsm/{key}_y", "obsm/{key}_clr", "obs/{key}_converged", "var/{key}_mu_clr",
         "varm/{key}_W_clr", "uns/{key}")

LNM = register(ModelSpec(
    name="lnm", family="lnm", fit=_lnm, stan_program="lnm",
    description="logistic-normal multinomial: ALR composition y ~ N(mu, W W' + diag(d)), "
                "NB total",
    conditional_program="lnm_conditional", options=_OPTIONS, globals=_GLOBALS,
    per_cell={"y": ("cell", "alr")}, anndata_keys=_KEYS, n_globals=_n_globals,
    compare_full=("Sigma_alr", "corr_clr"), compare_conditional=("y",), compare_plot=("y",),
    tree_all_genes=True))

LNMVCP = register(ModelSpec(
    name="lnmvcp", family="lnm", fit=_lnmvcp, stan_program="lnmvcp",
    description="lnm with a per-cell capture on the total",
    conditional_program="lnmvcp_conditional", options=_OPTIONS, globals=_GLOBALS,
    per_cell={"y": ("cell", "alr"), "eta": ("cell",)},
    anndata_keys=_KEYS + ("obs/{key}_eta", "obs/{key}_capture_efficiency"),
    n_globals=_n_globals, compare_full=("Sigma_alr", "corr_clr"),
    compare_conditional=("y", "eta"), compare_plot=("eta", "y"), tree_all_genes=True))
