"""scribe-stan: Bayesian models of single-cell RNA-seq counts.

Stan programs are the reference specification (full HMC on small gene sets); Numba
Newton-Woodbury Laplace solvers fit the same models at genome scale; ArviZ holds both.

>>> import scribe_stan as ss
>>> adata = ss.datasets.pbmc_donor_a()
>>> fit = ss.fit(adata, model="pln", method="laplace", rank=10)   # doctest: +SKIP
>>> tree = fit.to_datatree(draws=100, genes=20)                   # doctest: +SKIP
"""

__version__ = "0.1.0"

from scribe_stan import datasets, specs
from scribe_stan.api import fit
from scribe_stan.compare import compare, plot_comparison
from scribe_stan.grn_infer import GrnResult, infer_grn
from scribe_stan.grn_prior import combine_priors, read_prior
from scribe_stan.fits import (Fit, HmcFit, LaplaceFit, LnmHmcFit, LnmLaplaceFit, NbvcpFit,
                              load_fit)
from scribe_stan.log_predictive import cell_log_predictive
from scribe_stan.model_comparison import compare_models, loo
from scribe_stan.ppc import posterior_predictive
from scribe_stan.ppc_plots import plot_ppc

__all__ = ["fit", "load_fit", "compare", "plot_comparison", "datasets", "specs", "Fit",
           "LaplaceFit", "HmcFit", "NbvcpFit", "LnmLaplaceFit", "LnmHmcFit", "posterior_predictive", "plot_ppc", "loo", "compare_models",
           "cell_log_predictive", "infer_grn", "GrnResult", "read_prior", "combine_priors",
           "__version__"]
