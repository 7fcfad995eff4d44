"""Model specs and their registry (:mod:`.registry`); importing this package registers the
built-in models: pln, nbln (:mod:`.lognormal`), lnm, lnmvcp (:mod:`.lnm`) and nbvcp
(:mod:`.nbvcp`)."""

from scribe_stan.specs.registry import Common, ModelSpec, Option, get, names, register, unregister
from scribe_stan.specs import lognormal, lnm, nbvcp  # noqa: F401,E402  (registers the models)

__all__ = ["Common", "ModelSpec", "Option", "get", "names", "register", "unregister"]
