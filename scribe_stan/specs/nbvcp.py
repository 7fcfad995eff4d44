"""Spec of ``nbvcp``: independent negative-binomial genes given a per-cell capture.

Laplace: :func:`scribe_stan.laplace.nbvcp.fit_nbvcp` into a
:class:`scribe_stan.fits.NbvcpFit`; HMC: ``nbvcp.stan``. No latent factors (a ``rank``
is ignored with a warning), no conditional program, no model-specific options.
"""

from __future__ import annotations

from scribe_stan.fits import HmcFit, NbvcpFit
from scribe_stan.laplace.nbvcp import fit_nbvcp
from scribe_stan.models import nbvcp
from scribe_stan.specs.registry import ModelSpec, register
from scribe_stan.specs.shared import laplace_settings, progress_bar, sample_nuts


def _fit(data, method, common, options, settings):
    if common.conditional_on is not None:
        raise ValueError("conditional_on is not available for model='nbvcp' (it has no "
                         "per-cell latents besides eta); allowed: None")
    settings = {**settings, "rank": None}
    capture = {"log_M0": data.log_M0, "sigma_M": data.sigma_M, "log_lib": data.log_lib}
    if method == "laplace":
        with progress_bar("nbvcp", common) as bar:
            sol = fit_nbvcp(data.counts, tol=common.tol, max_iter=common.max_iter,
                            progress=bar, **capture)
        return NbvcpFit(model="nbvcp", solution=sol, data=data,
                        settings=laplace_settings(settings, common))
    draws, settings = sample_nuts("nbvcp", nbvcp.stan_data(data.counts, **capture), common,
                                  settings)
    return HmcFit(model="nbvcp", program="nbvcp", draws=draws, data=data, settings=settings)


NBVCP = register(ModelSpec(
    name="nbvcp", family="nbvcp", fit=_fit, stan_program="nbvcp",
    description="independent NB genes with variable capture: u ~ NB(exp(m - eta), r)",
    latent_rank=False, globals={"m": ("gene",), "r": ("gene",)},
    per_cell={"eta": ("cell",)},
    anndata_keys=("obs/{key}_eta", "obs/{key}_capture_efficiency", "obs/{key}_converged",
                  "var/{key}_m", "var/{key}_r", "uns/{key}"),
    compare_full=("m", "r", "eta"), compare_plot=("eta", "m"),
    n_globals=lambda G, K, settings: 2 * G))
