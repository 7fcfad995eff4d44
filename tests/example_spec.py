"""A model added as a spec alone: the negative-binomial log-normal model with a known,
shared dispersion (``nbln_known_r``), Laplace only.

This module is the whole change a new model needs when its solver and result class
exist (here: the nbln Laplace solver with the dispersions held, and
:class:`scribe_stan.fits.LaplaceFit`): no edit of ``api.py``, the CLI or the comparison
code. ``tests/test_fit_protocol.py`` registers it and drives it through ``ss.fit``,
save/load and transform.
"""

import numpy as np

from scribe_stan import _validate
from scribe_stan.fits import LaplaceFit
from scribe_stan.laplace.solver import fit_laplace
from scribe_stan.specs import ModelSpec, Option
from scribe_stan.specs.shared import laplace_settings, progress_bar


def _fit(data, method, common, options, settings):
    K = _validate.check_rank(common.rank, data.counts.shape[1])
    G = data.counts.shape[1]
    log_r = np.full(G, np.log(options["dispersion"]))
    with progress_bar("nbln_known_r", common) as bar:
        sol = fit_laplace(data.counts, K, model="nbln", log_r=log_r, tol=common.tol,
                          max_iter=common.max_iter, seed=common.seed, progress=bar,
                          log_M0=data.log_M0, sigma_M=data.sigma_M, log_lib=data.log_lib)
    settings = laplace_settings({**settings, "rank": K, "program": None}, common,
                                dispersion=options["dispersion"])
    return LaplaceFit(model="nbln_known_r", solution=sol, data=data, settings=settings)


SPEC = ModelSpec(
    name="nbln_known_r", family="lognormal", fit=_fit, stan_program=None,
    description="NB log-normal with one known dispersion r for every gene",
    methods=("laplace",),
    options={"dispersion": Option(default=10.0, methods=("laplace",),
                                  check=lambda r: _validate.check_positive("dispersion", r),
                                  doc="the known NB dispersion r > 0")},
    globals={"mu": ("gene",), "W": ("gene", "factor"), "d": ("gene",)},
    per_cell={"x": ("cell", "gene"), "eta": ("cell",)},
    n_globals=lambda G, K, settings: G * (K + 2) - K * (K - 1) // 2)
