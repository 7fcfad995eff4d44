"""Build the single ArviZ ``DataTree`` shape shared by every solver.

Stan HMC and the Laplace solver both hand their draws to :func:`build_datatree`, which
validates shapes against a fixed table of variable dimensions and makes exactly one
:func:`arviz_base.from_dict` call. Both solvers therefore produce trees with the same
groups, dimension names and coordinates:

=======================  ==============================================================
group                    variables (dims after ``chain, draw``)
=======================  ==============================================================
``posterior``            ``mu (gene)``, ``d (gene)``, ``W (gene, factor)``,
                         ``Sigma (gene, gene_2)``, ``corr (gene, gene_2)``,
                         ``x (cell, gene)`` log-rates, ``eta (cell)`` capture,
                         ``r (gene)`` NB dispersion, ``m (gene)`` nbvcp log mean,
                         ``W_perp (gene, factor)`` gauge-invariant loadings
``sample_stats``         ``lp``, ``lp_approx``, ``diverging``, ``tree_depth``,
                         ``n_steps``, ``energy``, ``step_size``, ``acceptance_rate``
                         (no extra dims)
``log_likelihood``       ``counts (cell)``: per-cell log likelihood
``posterior_predictive`` ``counts (cell, gene)``: replicated counts
``observed_data``        ``counts (cell, gene)``: observed counts (no sample dims)
=======================  ==============================================================

Coordinates: ``cell`` = cell names (``obs_names``), ``gene`` and ``gene_2`` = gene names
(``var_names``), ``factor`` = ``0 .. K-1``.

The Laplace solver stores the globals (``mu``, ``W``, ``d``, ``Sigma``) as point
estimates repeated over draws (their standard deviation over draws is 0) and
Gaussian draws of the per-cell latents.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import xarray as xr

__all__ = [
    "SAMPLE_DIMS",
    "VARIABLE_DIMS",
    "GROUPS",
    "build_datatree",
    "to_datatree_from_stan",
    "corr_from_cov",
    "default_attrs",
]

#: Sample dimensions leading every variable outside ``observed_data``.
SAMPLE_DIMS = ("chain", "draw")

#: Group names, in the order they appear in the tree.
GROUPS = (
    "posterior",
    "sample_stats",
    "log_likelihood",
    "posterior_predictive",
    "observed_data",
)

#: Dimension names (after the sample dims) of every known variable, per group.
VARIABLE_DIMS: dict[str, dict[str, tuple[str, ...]]] = {
    "posterior": {
        "mu": ("gene",),
        "d": ("gene",),
        "W": ("gene", "factor"),
        "Sigma": ("gene", "gene_2"),
        "corr": ("gene", "gene_2"),
        "x": ("cell", "gene"),
        "eta": ("cell",),
        "r": ("gene",),
        "m": ("gene",),
        "W_perp": ("gene", "factor"),
        # lnm / lnmvcp: ALR coordinates (reference gene left out), CLR summaries, totals
        "mu_alr": ("gene_alr",),
        "d_alr": ("gene_alr",),
        "W_alr": ("gene_alr", "factor"),
        "Sigma_alr": ("gene_alr", "gene_alr_2"),
        "y": ("cell", "gene_alr"),
        "mu_clr": ("gene",),
        "Sigma_clr": ("gene", "gene_2"),
        "corr_clr": ("gene", "gene_2"),
        "m_T": (),
        "r_T": (),
    },
    "sample_stats": {
        "lp": (),
        "lp_approx": (),
        "diverging": (),
        "tree_depth": (),
        "n_steps": (),
        "energy": (),
        "step_size": (),
        "acceptance_rate": (),
    },
    "log_likelihood": {"counts": ("cell",)},
    "posterior_predictive": {"counts": ("cell", "gene")},
    "observed_data": {"counts": ("cell", "gene")},
}


_ROTATION = (
    "identified only up to rotation (W -> W R for any orthogonal R leaves "
    "Sigma = W W' + diag(d) unchanged), so element-wise comparison is meaningless; "
    "compare Sigma or corr instead"
)
#: Variables identified only up to rotation, with the reason they are not compared.
NOT_IDENTIFIED = {
    "W": f"the loadings W are {_ROTATION}",
    "W_perp": f"the gauge-invariant loadings W_perp = W - column means are {_ROTATION}",
    "W_alr": f"the ALR loadings W_alr are {_ROTATION}",
}


def corr_from_cov(cov):
    """Correlation matrices from covariance matrices.

    Parameters
    ----------
    cov : array_like, shape (..., G, G)
        Covariance matrices (any leading dims, e.g. ``(chain, draw)``).

    Returns
    -------
    ndarray, shape (..., G, G)
        ``cov[i, j] / sqrt(cov[i, i] cov[j, j])``; the diagonal is exactly 1.
    """
    cov = np.asarray(cov, dtype=float)
    sd = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    corr = cov / (sd[..., :, None] * sd[..., None, :])
    idx = np.arange(cov.shape[-1])
    corr[..., idx, idx] = 1.0
    return corr


def default_attrs() -> dict[str, str]:
    """Version strings recorded on every tree (numpy, xarray, arviz, scribe_stan)."""
    import arviz_base
    import arviz_stats

    from . import __version__

    out = {
        "scribe_stan_version": __version__,
        "numpy_version": np.__version__,
        "xarray_version": xr.__version__,
        "arviz_base_version": arviz_base.__version__,
        "arviz_stats_version": arviz_stats.__version__,
    }
    try:
        import arviz

        out["arviz_version"] = arviz.__version__
    except Exception:  # pragma: no cover - meta-package is optional
        pass
    return out


def _clean_attr(value: Any):
    """Make an attribute value netCDF/zarr friendly (str, int, float or their arrays)."""
    if value is None:
        return "None"
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (str, int, float)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def _as_names(names, what: str) -> np.ndarray:
    arr = np.asarray(list(names), dtype=str)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if len(set(arr.tolist())) != arr.size:
        raise ValueError(f"{what} must be unique")
    return arr


def build_datatree(
    *,
    posterior: Mapping[str, Any],
    sample_stats: Mapping[str, Any] | None = None,
    log_likelihood: Mapping[str, Any] | None = None,
    posterior_predictive: Mapping[str, Any] | None = None,
    observed_data: Mapping[str, Any] | None = None,
    cell_names,
    gene_names,
    n_factors: int,
    attrs: Mapping[str, Any] | None = None,
    reference_gene: str | None = None,
) -> xr.DataTree:
    """Assemble draws from any solver into the standard ArviZ ``DataTree``.

    Parameters
    ----------
    posterior : mapping of str to array_like
        Posterior draws, each shaped ``(chain, draw, *dims)`` with ``dims`` from
        :data:`VARIABLE_DIMS` (``mu (G,)``, ``d (G,)``, ``W (G, K)``, ``Sigma (G, G)``,
        ``corr (G, G)``, ``x (N, G)``, ``eta (N,)``). Any subset is allowed. If
        ``Sigma`` is given and ``corr`` is not, ``corr`` is computed from it.
    sample_stats : mapping of str to array_like, optional
        Per-draw statistics shaped ``(chain, draw)``: ``lp``, ``lp_approx``,
        ``diverging``, ``tree_depth``, ``n_steps`` (leapfrog steps), ``energy``,
        ``step_size``, ``acceptance_rate``.
    log_likelihood : mapping, optional
        ``{"counts": (chain, draw, N)}`` per-cell log likelihood.
    posterior_predictive : mapping, optional
        ``{"counts": (chain, draw, N, G)}`` replicated counts.
    observed_data : mapping, optional
        ``{"counts": (N, G)}`` observed counts (no sample dims).
    cell_names : sequence of str, length N
        Coordinate of the ``cell`` dim (e.g. ``adata.obs_names``).
    gene_names : sequence of str, length G
        Coordinate of the ``gene`` and ``gene_2`` dims (e.g. ``adata.var_names``).
    n_factors : int
        Latent rank K; coordinate ``factor = 0 .. K-1``.
    reference_gene : str, optional
        ALR reference gene (lnm, lnmvcp), one of ``gene_names``: the ``gene_alr`` and
        ``gene_alr_2`` dims are ``gene_names`` without it. Needed for ALR variables.
    attrs : mapping, optional
        Provenance (``solver``, ``backend``, ``seed``, ``stan_hash``, ...), stamped on
        the root and on the ``posterior`` group together with version strings from
        :func:`default_attrs` (explicit entries win). ``None`` values become
        ``"None"`` and other non-scalar values their ``str`` so the tree can be saved.

    Returns
    -------
    xarray.DataTree
        Groups present among :data:`GROUPS` (empty/omitted groups are left out), sample
        dims ``(chain, draw)``.

    Raises
    ------
    ValueError
        For unknown variables (the message lists the known ones), arrays whose shape
        does not match ``(chain, draw, *dims)``, or inconsistent chain/draw counts.
    """
    import arviz_base

    cells = _as_names(cell_names, "cell_names")
    genes = _as_names(gene_names, "gene_names")
    n_factors = int(n_factors)
    if n_factors < 0:
        raise ValueError(f"n_factors must be >= 0, got {n_factors}")
    sizes = {
        "cell": cells.size,
        "gene": genes.size,
        "gene_2": genes.size,
        "factor": n_factors,
    }
    coords = {
        "cell": cells,
        "gene": genes,
        "gene_2": genes,
        "factor": np.arange(n_factors),
    }
    if reference_gene is not None:
        if str(reference_gene) not in set(genes.tolist()):
            raise ValueError(f"reference_gene {reference_gene!r} is not among gene_names")
        alr = genes[genes != str(reference_gene)]
        sizes.update(gene_alr=alr.size, gene_alr_2=alr.size)
        coords.update(gene_alr=alr, gene_alr_2=alr)

    inputs = {
        "posterior": posterior,
        "sample_stats": sample_stats,
        "log_likelihood": log_likelihood,
        "posterior_predictive": posterior_predictive,
        "observed_data": observed_data,
    }
    if posterior is None or len(posterior) == 0:
        raise ValueError("posterior must contain at least one variable")

    data: dict[str, dict[str, np.ndarray]] = {}
    n_chain_draw: tuple[int, int] | None = None
    for group in GROUPS:
        group_in = inputs[group]
        if not group_in:
            continue
        known = VARIABLE_DIMS[group]
        unknown = sorted(set(group_in) - set(known))
        if unknown:
            raise ValueError(
                f"unknown variable(s) {unknown} in group {group!r}; "
                f"known variables: {sorted(known)}"
            )
        has_sample = group != "observed_data"
        out = {}
        for name, values in group_in.items():
            arr = np.asarray(values)
            missing = [dim for dim in known[name] if dim not in sizes]
            if missing:
                raise ValueError(f"{group}/{name} has dims {missing}; pass reference_gene "
                                 "to build_datatree for ALR variables")
            event = tuple(sizes[dim] for dim in known[name])
            lead = 2 if has_sample else 0
            expected_desc = (("chain", "draw") if has_sample else ()) + known[name]
            if arr.ndim != lead + len(event) or arr.shape[lead:] != event:
                raise ValueError(
                    f"{group}/{name}: expected shape {expected_desc} = "
                    f"{('C', 'S') if has_sample else ()}+{event}, got {arr.shape}"
                )
            if has_sample:
                if n_chain_draw is None:
                    n_chain_draw = arr.shape[:2]
                elif arr.shape[:2] != n_chain_draw:
                    raise ValueError(
                        f"{group}/{name}: (chain, draw) = {arr.shape[:2]} differs from "
                        f"{n_chain_draw} of the other variables"
                    )
            out[name] = arr
        data[group] = out

    post = data["posterior"]
    if "Sigma" in post and "corr" not in post:
        post["corr"] = corr_from_cov(post["Sigma"])

    stamped = default_attrs()
    for key, value in (attrs or {}).items():
        stamped[str(key)] = value
    stamped = {k: _clean_attr(v) for k, v in stamped.items()}

    dims = {}
    for group in data:
        for name in data[group]:
            dims.setdefault(name, list(VARIABLE_DIMS[group][name]))
    # ``counts`` is (cell,) in log_likelihood but (cell, gene) elsewhere; from_dict
    # uses one dims mapping and trims event dims in log_likelihood, so (cell, gene)
    # serves all three groups.
    if "counts" in dims:
        dims["counts"] = ["cell", "gene"]

    return arviz_base.from_dict(
        data,
        sample_dims=list(SAMPLE_DIMS),
        coords=coords,
        dims=dims,
        attrs={"/": dict(stamped), "posterior": dict(stamped)},
    )


def to_datatree_from_stan(
    draws,
    *,
    cell_names,
    gene_names,
    observed_counts=None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.DataTree:
    """Map a Stan HMC result to :func:`build_datatree`.

    Parameters
    ----------
    draws : object
        Anything with attributes ``posterior`` and ``sample_stats`` (dicts of arrays
        shaped ``(chain, draw, ...)``), e.g. the Stan runner's result dataclass.
        ``posterior`` holds ``mu (G,)``, ``W (G, K)``, ``d (G,)``, ``Sigma (G, G)``,
        ``x (N, G)``, ``eta (N,)`` and the generated quantities ``log_lik (N,)`` and
        ``y_rep (N, G)``. ``log_lik`` goes to ``log_likelihood["counts"]`` and
        ``y_rep`` to ``posterior_predictive["counts"]``. Other posterior entries that
        are not in :data:`VARIABLE_DIMS` (raw sampled coordinates, ``lp__``...)
        are dropped. ``sample_stats`` keys outside the known set are dropped too.
    cell_names, gene_names : sequence of str
        Coordinates for ``cell`` and ``gene``.
    observed_counts : array_like, shape (N, G), optional
        Stored as ``observed_data["counts"]``.
    attrs : mapping, optional
        Provenance. Defaults are taken from ``draws`` where it has them (as
        :class:`scribe_stan.stan.StanDraws` does): ``backend``, ``program``,
        ``stan_hash``, ``seed``, ``wall_time_s`` and each ``versions[k]`` as
        ``"<k>_version"``; ``solver`` defaults to ``"hmc"``. Entries given here win.

    Returns
    -------
    xarray.DataTree
    """
    post_in = dict(getattr(draws, "posterior"))
    stats_in = dict(getattr(draws, "sample_stats", None) or {})
    known_post = VARIABLE_DIMS["posterior"]
    posterior = {k: v for k, v in post_in.items() if k in known_post}
    log_lik = post_in.get("log_lik")
    y_rep = post_in.get("y_rep")
    if "W" in posterior:
        n_factors = np.shape(posterior["W"])[-1]
        # gauge-invariant loadings: column means over genes removed, draw by draw
        W = np.asarray(posterior["W"])
        posterior.setdefault("W_perp", W - W.mean(axis=-2, keepdims=True))
    else:
        n_factors = 0
    sample_stats = {
        k: v for k, v in stats_in.items() if k in VARIABLE_DIMS["sample_stats"]
    }
    stamped: dict[str, Any] = {"solver": "hmc"}
    for key in ("backend", "program", "stan_hash", "seed", "wall_time_s"):
        if hasattr(draws, key):
            stamped[key] = getattr(draws, key)
    for key, value in dict(getattr(draws, "versions", None) or {}).items():
        stamped[key if str(key).endswith("version") else f"{key}_version"] = value
    stamped.update(attrs or {})
    return build_datatree(
        posterior=posterior,
        sample_stats=sample_stats or None,
        log_likelihood=None if log_lik is None else {"counts": log_lik},
        posterior_predictive=None if y_rep is None else {"counts": y_rep},
        observed_data=None if observed_counts is None else {"counts": observed_counts},
        cell_names=cell_names,
        gene_names=gene_names,
        n_factors=n_factors,
        attrs=stamped,
    )
