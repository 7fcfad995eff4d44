"""Newton-Woodbury Laplace solvers (CPU: Numba ``prange`` over cells)."""

from scribe_stan.laplace.solver import LaplaceProblem, fit_laplace

__all__ = ["LaplaceProblem", "fit_laplace"]
