"""Model specifications: one module per model, named as its Stan program."""

from scribe_stan.models import lnm, nbln, nbvcp, pln

MODELS = {"pln": pln, "lnm": lnm, "lnmvcp": lnm, "nbvcp": nbvcp, "nbln": nbln}
