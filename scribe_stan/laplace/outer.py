"""L-BFGS-B for the outer (globals) problem with a diagonal preconditioner that is renewed.

The outer objectives are badly scaled: the information of a gene's coordinates spans
orders of magnitude between rare and abundant genes, so L-BFGS-B runs in coordinates
``theta * scale`` with ``scale`` the square root of a diagonal information estimate.
That estimate depends on the point: as a residual variance d_j shrinks, the
information in ``log d_j`` shrinks with d_j^2, and a scale taken at the start becomes
wrong by orders of magnitude. :func:`minimize_rescaled` therefore restarts L-BFGS-B
every ``rescale_every`` iterations with the scale recomputed at the current point (the
curvature pairs of the old coordinates are dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize


@dataclass
class OuterResult:
    """Outcome of :func:`minimize_rescaled`.

    Attributes
    ----------
    x : optimum in the original coordinates;  fun : objective there (as minimized).
    nit : int, L-BFGS-B iterations over all restarts;  nfev : int, evaluations.
    success : bool and message : str of the last L-BFGS-B run;  n_rescale : int.
    """

    x: np.ndarray
    fun: float
    nit: int
    nfev: int
    success: bool
    message: str
    n_rescale: int


def minimize_rescaled(fun, theta0, lower, upper, scale_at, *, max_iter=1000, tol=1e-8,
                      rescale_every=None, callback=None):
    """Minimize ``fun`` by L-BFGS-B in coordinates ``theta * scale_at(theta)``.

    Parameters
    ----------
    fun : callable ``theta -> (value, grad)`` in the original coordinates; may return
        ``(inf, zeros)`` at a point it rejects.
    theta0, lower, upper : (P,) start and box bounds (original coordinates; +-inf allowed).
    scale_at : callable ``theta -> (P,)`` positive scales (e.g. sqrt of a diagonal
        information estimate).
    max_iter : int, iterations over all restarts.
    tol : float, L-BFGS-B's relative objective tolerance ``ftol``.
    rescale_every : int, optional
        Renew the scale after this many iterations (None: never).
    callback : callable ``(value) -> None`` after each iteration, optional.

    Returns
    -------
    OuterResult
    """
    theta = np.clip(np.asarray(theta0, dtype=float), lower, upper)
    nit = nfev = n_rescale = 0
    while True:
        scale = scale_at(theta)
        chunk = max_iter - nit if rescale_every is None else min(rescale_every, max_iter - nit)

        def scaled(ts, scale=scale):
            value, grad = fun(ts / scale)
            return value, grad / scale

        def report(intermediate_result):  # SciPy passes the result object by this name
            callback(float(intermediate_result.fun))

        res = optimize.minimize(
            scaled, theta * scale, jac=True, method="L-BFGS-B",
            bounds=list(zip(lower * scale, upper * scale)),
            callback=None if callback is None else report,
            options={"maxiter": chunk, "ftol": tol, "gtol": 1e-6, "maxcor": 20, "maxls": 40})
        theta = res.x / scale
        nit += res.nit
        nfev += res.nfev
        # A run that stopped before its iteration budget converged (or failed): done.
        if res.nit < chunk or nit >= max_iter:
            return OuterResult(theta, float(res.fun), nit, nfev, bool(res.success),
                               str(res.message), n_rescale)
        n_rescale += 1
