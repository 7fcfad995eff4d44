"""The model registry: a model is one declarative :class:`ModelSpec`, registered by name.

:func:`scribe_stan.fit` validates the arguments every model shares, looks the model up
here, lets its spec check the model's own options (:meth:`ModelSpec.check_options`) and
calls the spec's ``fit``. Adding a model is a spec module (its options, the Stan
programs, the Laplace solver and result class it uses, its quantities) plus its Stan
files and kernels; nothing else dispatches on model names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

_REGISTRY: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class Option:
    """A model-specific argument of :func:`scribe_stan.fit`.

    Attributes
    ----------
    default : the value used when the caller does not give one.
    check : callable ``value -> value`` raising ``ValueError``/``TypeError`` with the
        allowed values (default: accept as given).
    methods : the methods it applies to.
    doc : one line for error messages and docs.
    """

    default: Any = None
    check: Callable[[Any], Any] | None = None
    methods: tuple[str, ...] = ("laplace", "hmc")
    doc: str = ""


@dataclass(frozen=True)
class Common:
    """The arguments of :func:`scribe_stan.fit` every model takes, validated."""

    rank: int | None
    seed: int
    device: str
    tol: float
    max_iter: int
    progress: bool
    backend: str
    chains: int
    draws: int
    warmup: int
    adapt_delta: float
    conditional_on: Any
    metric: str = "diag_e"


@dataclass(frozen=True)
class ModelSpec:
    """Everything :func:`scribe_stan.fit` and the code above it need to know of a model.

    Attributes
    ----------
    name : the model's name (``fit(model=name)``).
    family : the shared machinery its posterior predictive checks and LOO use:
        ``"lognormal"`` (per-cell log-rates x and capture eta; globals mu, W, d[, r]),
        ``"nbvcp"`` (capture eta only) or ``"lnm"`` (ALR composition and NB total).
    description : one line.
    fit : callable ``(data, method, common, options, settings) -> Fit``: fits prepared
        :class:`scribe_stan.fit_data.FitData`; ``options`` are checked, with defaults.
    stan_program : name of the full-joint Stan program (None: no HMC reference).
    conditional_program : Stan program of the per-cell latents given the globals
        (``fit(method="hmc", conditional_on=laplace_fit)``), or None.
    methods : the methods it can be fitted with.
    devices : Laplace devices beyond ``"cpu"`` and ``"auto"`` it has kernels for.
    latent_rank : it has latent factors (``rank``); if not, a ``rank`` is ignored with a
        warning (loops over models pass one).
    options : model-specific arguments of :func:`scribe_stan.fit` (name -> Option).
    globals, per_cell : the model's global and per-cell quantities (name -> dims), as
        they appear in its trees.
    anndata_keys : keys its Laplace ``to_anndata`` writes (``{key}`` is the prefix).
    n_globals : callable ``(G, K, settings) -> int``, identified global parameters
        (the plug-in LOO correction, :func:`scribe_stan.loo`).
    compare_full, compare_conditional, compare_plot : what ``scribe-stan validate``
        compares: rotation-invariant quantities against the full-joint NUTS, per-cell
        latents against NUTS conditional on the Laplace globals (None: no conditional
        program), and the quantities it plots.
    tree_all_genes : its trees hold every fitted gene (the composition couples them),
        so a tree cannot be restricted to a gene subset.
    """

    name: str
    family: str
    description: str
    fit: Callable
    stan_program: str | None
    n_globals: Callable[[int, int, dict], int]
    conditional_program: str | None = None
    methods: tuple[str, ...] = ("laplace", "hmc")
    devices: tuple[str, ...] = ()
    latent_rank: bool = True
    options: Mapping[str, Option] = field(default_factory=dict)
    globals: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    per_cell: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    anndata_keys: tuple[str, ...] = ()
    compare_full: tuple[str, ...] = ()
    compare_conditional: tuple[str, ...] | None = None
    compare_plot: tuple[str, ...] = ()
    tree_all_genes: bool = False

    def check_options(self, given, method):
        """The model's options with defaults filled in, after checking ``given``.

        Parameters
        ----------
        given : dict of option name to value (what the caller passed; None = not given).
        method : {"laplace", "hmc"}

        Returns
        -------
        dict of every option of the model.

        Raises
        ------
        TypeError
            An option no registered model knows (the model's own options are listed).
        ValueError
            An option of other models (they are named), one given for a method it does
            not apply to, or a value its check rejects.
        """
        out = {}
        for name, value in given.items():
            if value is None:
                continue
            if name not in self.options:
                users = [s.name for s in _REGISTRY.values() if name in s.options]
                own = ", ".join(self.options) or "none"
                if not users:
                    raise TypeError(f"fit() got an unexpected keyword argument {name!r}; "
                                    f"options of model {self.name!r}: {own}")
                raise ValueError(f"{name}= does not apply to model={self.name!r}; it applies "
                                 f"to: {', '.join(users)} (options of {self.name!r}: {own})")
            opt = self.options[name]
            if method not in opt.methods:
                raise ValueError(f"{name}= applies to method="
                                 f"{' or '.join(repr(m) for m in opt.methods)} of model "
                                 f"{self.name!r}; got method={method!r}")
            out[name] = opt.check(value) if opt.check is not None else value
        for name, opt in self.options.items():
            out.setdefault(name, opt.default)
        return out


def register(spec):
    """Register ``spec`` under ``spec.name`` (replacing none: names are unique).

    Raises
    ------
    ValueError
        A model of that name is registered already.
    """
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is registered already")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name):
    """Remove a registered model (e.g. one a test registered)."""
    _REGISTRY.pop(name, None)


def get(name):
    """The spec of model ``name``.

    Raises
    ------
    ValueError
        Unknown model (the registered ones are listed).
    """
    from scribe_stan._validate import check_choice

    check_choice("model", name, tuple(_REGISTRY))
    return _REGISTRY[name]


def names():
    """Names of the registered models, in registration order."""
    return tuple(_REGISTRY)
