"""scribe-stan: Bayesian models of single-cell RNA-seq counts.

Stan programs are the reference specification (full HMC on small gene sets); Numba
Newton-Woodbury Laplace solvers fit the same models at genome scale; ArviZ holds both.
"""

__version__ = "0.1.0"
