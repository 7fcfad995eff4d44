"""The one outer optimizer of every Laplace model: L-BFGS-B on the exact Laplace objective.

A model's Laplace problem supplies the objective (value and exact gradient in the
optimizer's natural coordinates, summed over its chunks of cells), a preconditioner (a
diagonal scale, or a :class:`BlockScale`), and the warm-start protocol below;
:func:`maximize` does the rest, identically for pln, nbln, nbvcp and the lnm
composition and total blocks:

- L-BFGS-B (SciPy) in the coordinates ``z = T theta`` of the preconditioner, so that the
  start is near-isotropic; optionally restarted with a renewed preconditioner after
  ``rescale_first`` iterations, then after twice as many each time (for problems whose
  natural scales drift far from the start's);
- a guard on warm starts: an evaluation whose value is not finite, or where more than
  ``max_unconverged`` of the cells failed their Newton step (a line-search trial far
  from the data), does not keep its modes; the next evaluation starts from the last
  good ones;
- history, progress and the counts of iterations and evaluations.

Warm-start protocol of a problem: ``converged`` (N,) bool after each evaluation (or,
for a problem whose cells live elsewhere, e.g. on a Dask cluster, a method
``unconverged_fraction()`` in its place), ``keep_modes()`` (remember the current modes)
and ``restore_modes()`` (go back to them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

#: L-BFGS correction pairs: tens of thousands of globals make each pair cheap to keep.
MEMORY = 20


@dataclass
class BlockScale:
    """A block-diagonal linear change of variables ``z = T theta`` for L-BFGS.

    ``T`` scales the coordinates outside the blocks by ``diag`` and maps each block
    ``theta[index[b]]`` to ``L_b' theta[index[b]]``, where ``L_b L_b'`` is an
    approximation of the objective's curvature in that block (e.g. one gene's mean and
    loadings), so the optimizer sees that block near-isotropic: a diagonal scale cannot
    undo the correlation between coordinates within a block.

    Attributes
    ----------
    diag : (P,) > 0, scale of each coordinate (entries of block coordinates unused).
    index : (n_blocks, b) int, the coordinates of each block (no coordinate twice).
    chol : (n_blocks, b, b) lower-triangular Cholesky factors ``L_b``.
    """

    diag: np.ndarray
    index: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    chol: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))

    def __post_init__(self):
        # L_b^{-1} once: the maps below are then batched matrix-vector products.
        self._inv = np.linalg.inv(self.chol) if len(self.chol) else self.chol

    def forward(self, theta):
        """``z = T theta``."""
        z = theta * self.diag
        z[self.index] = np.einsum("bji,bj->bi", self.chol, theta[self.index])
        return z

    def backward(self, z):
        """``theta = T^{-1} z``."""
        theta = z / self.diag
        theta[self.index] = np.einsum("bji,bj->bi", self._inv, z[self.index])
        return theta

    def gradient(self, grad):
        """Gradient in ``z`` from the gradient in ``theta``: ``T^{-T} grad``."""
        gz = grad / self.diag
        gz[self.index] = np.einsum("bij,bj->bi", self._inv, grad[self.index])
        return gz


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
             rescale_first=None, memory=None, callback=None):
    """Maximize ``value_grad`` by L-BFGS-B within the box ``[lower, upper]``.

    Parameters
    ----------
    value_grad : callable ``theta -> (value, grad)``, the objective to maximize and its
        gradient (P,).
    theta0 : (P,) start (clipped into the box).
    lower, upper : (P,) bounds (``-inf``/``inf`` allowed).
    problem : object with the warm-start protocol (module docstring), optional.
    scaling : callable ``theta -> scale``, optional (default: ones). ``scale`` is a
        (P,) array > 0 (``z = theta * scale``) or a :class:`BlockScale`, whose block
        coordinates must be unbounded (a box does not map into block coordinates; a
        problem guards such coordinates by returning a non-finite value instead).
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
    callback : callable ``(theta, value, n_iter) -> None``, optional
        Called after each iteration with the iterate in natural coordinates (P,), its
        objective value and the number of iterations done so far (e.g. to checkpoint).

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
    scale = None  # BlockScale, set at each (re)start

    def fun(z):
        nonlocal n_eval
        n_eval += 1
        value, grad = value_grad(scale.backward(z))
        if problem is not None:
            if not np.isfinite(value) or _unconverged(problem) > max_unconverged:
                problem.restore_modes()
            else:
                problem.keep_modes()
        if not np.isfinite(value):
            return np.inf, np.zeros_like(z)
        return -value, -scale.gradient(grad)

    def on_iteration(intermediate_result):
        history.append(-float(intermediate_result.fun))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(objective=f"{history[-1]:.6g}")
        if callback is not None:
            callback(scale.backward(intermediate_result.x), history[-1], n_iter + len(history)
                     - n_hist0)

    n_iter, segment = 0, rescale_first or max_iter
    while True:
        scale = _block_scale(np.ones_like(theta) if scaling is None else scaling(theta),
                             lower, upper)
        if problem is not None:
            problem.keep_modes()
        budget = max(1, min(segment, max_iter - n_iter))
        n_hist0 = len(history)
        res = optimize.minimize(fun, scale.forward(theta), jac=True, method="L-BFGS-B",
                                bounds=list(zip(lower * scale.diag, upper * scale.diag)),
                                callback=on_iteration,
                                options={"maxiter": budget, "ftol": tol, "gtol": gtol,
                                         "maxcor": memory, "maxls": 40})
        theta = scale.backward(res.x)
        n_iter += int(res.nit)
        if res.success or res.nit < budget or n_iter >= max_iter:
            break
        segment *= 2
    return OuterResult(theta=theta, n_iter=n_iter, n_eval=n_eval, success=bool(res.success),
                       message=str(res.message), history=history)


def _unconverged(problem):
    """Fraction of the problem's cells whose last Newton solve failed."""
    if hasattr(problem, "unconverged_fraction"):
        return problem.unconverged_fraction()
    return np.mean(~problem.converged)


def _block_scale(scale, lower, upper):
    """The preconditioner as a :class:`BlockScale`; checks block coordinates are free."""
    if not isinstance(scale, BlockScale):
        return BlockScale(np.asarray(scale, dtype=np.float64))
    if not (np.all(lower[scale.index] == -np.inf) and np.all(upper[scale.index] == np.inf)):
        raise ValueError("coordinates in the blocks of a BlockScale must be unbounded "
                         "(lower -inf, upper inf)")
    # Unbounded block coordinates: their diag entries only need to keep the scaled
    # box at (-inf, inf).
    scale.diag[scale.index] = 1.0
    return scale
