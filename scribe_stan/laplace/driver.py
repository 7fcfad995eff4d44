"""The one outer optimizer of every Laplace model: L-BFGS-B on the exact Laplace objective.

A model's Laplace problem supplies the objective (value and exact gradient in the
optimizer's natural coordinates, summed over its chunks of cells), a diagonal scale, and
the warm-start protocol below; :func:`maximize` does the rest, identically for pln,
nbln, nbvcp and the lnm composition and total blocks:

- L-BFGS-B (SciPy) in coordinates ``theta * scale``, so that the start is near-isotropic;
  optionally restarted with a renewed scale after ``rescale_first`` iterations, then
  after twice as many each time (for problems whose natural scales drift far from the
  start's);
- a guard on warm starts: an evaluation whose value is not finite, or where more than
  ``max_unconverged`` of the cells failed their Newton step (a line-search trial far
  from the data), does not keep its modes; the next evaluation starts from the last
  good ones;
- history, progress and the counts of iterations and evaluations.

Warm-start protocol of a problem: ``converged`` (N,) bool after each evaluation,
``keep_modes()`` (remember the current modes) and ``restore_modes()`` (go back to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

#: L-BFGS correction pairs: tens of thousands of globals make each pair cheap to keep.
MEMORY = 20


@dataclass
class OuterResult:
    """Outcome of :func:`maximize`.

    Attributes
    ----------
    theta : (P,) the maximizer in natural coordinates.
    n_iter : int, L-BFGS iterations;  n_eval : int, objective evaluations.
    success : bool, the optimizer met its tolerance;  message : str.
    history : list of objective values, one per iteration.
    """

    theta: np.ndarray
    n_iter: int
    n_eval: int
    success: bool
    message: str
    history: list = field(default_factory=list)


def maximize(value_grad, theta0, lower, upper, *, problem=None, scaling=None, tol=1e-8,
             gtol=1e-6, max_iter=1000, progress=None, max_unconverged=0.01,
             rescale_first=None, memory=None):
    """Maximize ``value_grad`` by L-BFGS-B within the box ``[lower, upper]``.

    Parameters
    ----------
    value_grad : callable ``theta -> (value, grad)``, the objective to maximize and its
        gradient (P,).
    theta0 : (P,) start (clipped into the box).
    lower, upper : (P,) bounds (``-inf``/``inf`` allowed).
    problem : object with the warm-start protocol (module docstring), optional.
    scaling : callable ``theta -> scale`` (P,) > 0, optional (default: ones).
    tol : float, relative objective tolerance (``ftol``): stop when
        ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= tol``.
    gtol : float, stop when the largest projected gradient entry (scaled coordinates)
        is below this.
    max_iter : int, iterations in all.
    progress : tqdm-like object with ``update``/``set_postfix``, optional.
    max_unconverged : float, fraction of failed cells above which an evaluation's modes
        are not kept.
    rescale_first : int, optional
        Restart with a renewed ``scaling`` after this many iterations, then after twice
        as many each time (default: never).
    memory : int, optional
        Correction pairs L-BFGS keeps (``maxcor``); default :data:`MEMORY`.

    Returns
    -------
    OuterResult
    """
    memory = MEMORY if memory is None else int(memory)
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    theta = np.clip(np.asarray(theta0, dtype=np.float64), lower, upper)
    history = []
    n_eval = 0
    scale = None  # set at each (re)start

    def fun(theta_scaled):
        nonlocal n_eval
        n_eval += 1
        value, grad = value_grad(theta_scaled / scale)
        if problem is not None:
            if not np.isfinite(value) or np.mean(~problem.converged) > max_unconverged:
                problem.restore_modes()
            else:
                problem.keep_modes()
        if not np.isfinite(value):
            return np.inf, np.zeros_like(theta_scaled)
        return -value, -grad / scale

    def callback(intermediate_result):
        history.append(-float(intermediate_result.fun))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(objective=f"{history[-1]:.6g}")

    n_iter, segment = 0, rescale_first or max_iter
    while True:
        scale = np.ones_like(theta) if scaling is None else scaling(theta)
        if problem is not None:
            problem.keep_modes()
        budget = max(1, min(segment, max_iter - n_iter))
        res = optimize.minimize(fun, theta * scale, jac=True, method="L-BFGS-B",
                                bounds=list(zip(lower * scale, upper * scale)),
                                callback=callback,
                                options={"maxiter": budget, "ftol": tol, "gtol": gtol,
                                         "maxcor": memory, "maxls": 40})
        theta = res.x / scale
        n_iter += int(res.nit)
        if res.success or res.nit < budget or n_iter >= max_iter:
            break
        segment *= 2
    return OuterResult(theta=theta, n_iter=n_iter, n_eval=n_eval, success=bool(res.success),
                       message=str(res.message), history=history)
