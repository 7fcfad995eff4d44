"""Results layer: every fit of :func:`scribe_stan.fit`, one protocol (:mod:`.base`).

Laplace fits: :class:`LaplaceFit` (pln, nbln), :class:`NbvcpFit`,
:class:`LnmLaplaceFit` (lnm, lnmvcp); HMC fits: :class:`HmcFit` and
:class:`LnmHmcFit`. :func:`load_fit` reads what ``fit.save(path)`` wrote.
"""

from scribe_stan.fits.base import Fit, LaplaceResult
from scribe_stan.fits.hmc import HmcFit
from scribe_stan.fits.lnm import LnmHmcFit, LnmLaplaceFit
from scribe_stan.fits.lognormal import LaplaceFit
from scribe_stan.fits.nbvcp import NbvcpFit
from scribe_stan.fits.store import load_fit

__all__ = ["Fit", "HmcFit", "LaplaceFit", "LaplaceResult", "LnmHmcFit", "LnmLaplaceFit",
           "NbvcpFit", "load_fit"]
