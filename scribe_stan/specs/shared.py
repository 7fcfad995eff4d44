"""Steps several model specs take the same way: the Laplace progress bar, a NUTS run
with its divergence warning, and the HMC settings recorded on a fit."""

from __future__ import annotations

import warnings

import numpy as np

from scribe_stan import stan


def progress_bar(model, common):
    """tqdm bar over the outer iterations of a Laplace fit (disabled without progress)."""
    from tqdm.auto import tqdm

    return tqdm(total=common.max_iter, desc=f"{model} Laplace", unit="it",
                disable=not common.progress, leave=False)


def laplace_settings(settings, common, device="cpu", **extra):
    """``settings`` with the Laplace method's own arguments added."""
    return {**settings, "device": device, "tol": common.tol, "max_iter": common.max_iter,
            **extra}


def sample_nuts(program, stan_data, common, settings, inits=None, inv_metric=None):
    """NUTS on ``program``: (draws, settings with the sampler's arguments).

    ``inits``: optional per-chain initial values, ``inv_metric`` an optional initial
    diagonal inverse metric (:func:`scribe_stan.stan.sample`).
    Warns (RuntimeWarning) when there are divergent transitions.
    """
    settings = {**settings, "backend": stan.resolve_backend(common.backend),
                "chains": common.chains, "draws": common.draws, "warmup": common.warmup,
                "adapt_delta": common.adapt_delta, "metric": common.metric,
                "program": program}
    draws = stan.sample(program, stan_data, backend=common.backend, chains=common.chains,
                        draws=common.draws, warmup=common.warmup, seed=common.seed,
                        adapt_delta=common.adapt_delta, progress=common.progress,
                        metric=common.metric, inits=inits, inv_metric=inv_metric)
    n_div = int(np.sum(draws.sample_stats["diverging"]))
    if n_div:
        warnings.warn(f"{n_div} divergent transitions in {program}; see the tree's "
                      "sample_stats.diverging.", RuntimeWarning, stacklevel=4)
    return draws, settings


def check_same_cells(fit, data):
    """A ``conditional_on`` fit must have the cells and genes of ``data``."""
    if not (fit.var_names.equals(data.var_names) and fit.obs_names.equals(data.obs_names)):
        raise ValueError("conditional_on was fitted on other cells or genes; pass the "
                         "same adata/genes to both fits.")
