"""Model specifications: one module per model, named as its Stan program."""

from scribe_stan.models import pln

MODELS = {"pln": pln}
