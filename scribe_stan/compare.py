"""Compare a Laplace posterior with an HMC (ground-truth) posterior.

Both inputs are trees produced by :func:`scribe_stan.convert.build_datatree` (or any
``DataTree``/``Dataset`` with a ``posterior`` whose variables carry ``chain, draw``
sample dims and named, labelled element dims). Elements are matched by coordinate
labels, never by position, and the two trees may have different numbers of chains
and draws.

Per element ``i`` of a quantity, with Laplace draws ``a`` and HMC draws ``b``:

* ``smd = (mean(a) - mean(b)) / sd(b)``: standardized mean difference;
* ``sd_ratio = sd(a) / sd(b)``;
* ``coverage``: fraction of HMC draws inside the Laplace central ``prob`` interval
  (ideal value ``prob``).

When the Laplace quantity is a point estimate (its draws are all equal, as for the
globals of the Laplace solver), ``sd_ratio`` is NaN and ``coverage`` is 1.0 or 0.0:
whether the point lies inside the HMC central ``prob`` interval. Those rows have
``point_estimate = True``.

Only rotation-invariant quantities are compared: the loadings ``W`` (and ``W_perp``,
``W_alr``) are identified only up to an orthogonal rotation ``W -> W R`` and are refused
(:data:`NOT_IDENTIFIED`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from .convert import NOT_IDENTIFIED, SAMPLE_DIMS

__all__ = ["compare", "plot_comparison", "DEFAULT_VAR_NAMES", "DETAIL_COLUMNS", "SUMMARY_COLUMNS"]

#: Quantities compared by default, when present in both posteriors.
DEFAULT_VAR_NAMES = ("Sigma", "corr", "x", "eta", "mu")

#: Columns of ``compare(..., detail=True)``.
DETAIL_COLUMNS = [
    "laplace_mean",
    "laplace_sd",
    "hmc_mean",
    "hmc_sd",
    "smd",
    "sd_ratio",
    "coverage",
    "point_estimate",
]

#: Columns of ``compare(..., detail=False)``.
SUMMARY_COLUMNS = [
    "n",
    "mean_abs_smd",
    "max_abs_smd",
    "median_sd_ratio",
    "min_sd_ratio",
    "max_sd_ratio",
    "mean_coverage",
    "point_estimate",
]

_SAMPLE = "__sample__"


def _posterior(tree, which: str) -> xr.Dataset:
    """The posterior group of a DataTree (or a Dataset used as-is)."""
    if isinstance(tree, xr.Dataset):
        return tree
    try:
        node = tree["posterior"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"the {which} tree has no 'posterior' group") from err
    return node.to_dataset() if hasattr(node, "to_dataset") else node


def _triangle(name: str) -> int | None:
    """Offset of the upper triangle kept for symmetric matrices (None: keep all)."""
    return {"Sigma": 0, "corr": 1}.get(name)


def _stack_samples(da: xr.DataArray, which: str, name: str) -> xr.DataArray:
    missing = [d for d in SAMPLE_DIMS if d not in da.dims]
    if missing:
        raise ValueError(f"{which} posterior variable {name!r} lacks sample dim(s) {missing}")
    return da.stack({_SAMPLE: list(SAMPLE_DIMS)})


def _align(lap: xr.DataArray, hmc: xr.DataArray, name: str) -> xr.DataArray:
    """Reorder ``hmc`` onto ``lap``'s element coordinates; raise on any mismatch."""
    lap_dims = [d for d in lap.dims if d != _SAMPLE]
    hmc_dims = [d for d in hmc.dims if d != _SAMPLE]
    if sorted(lap_dims) != sorted(hmc_dims):
        raise ValueError(
            f"{name}: dims differ between Laplace {tuple(lap_dims)} and HMC {tuple(hmc_dims)}"
        )
    indexers = {}
    for dim in lap_dims:
        a = np.asarray(lap[dim].values)
        b = np.asarray(hmc[dim].values)
        if a.tolist() == b.tolist():
            continue
        sa, sb = set(a.tolist()), set(b.tolist())
        if sa != sb or len(sa) != a.size or len(sb) != b.size:
            only_l = sorted(map(str, sa - sb))
            only_h = sorted(map(str, sb - sa))

            def _fmt(items):
                head = ", ".join(items[:5])
                return f"[{head}{', ...' if len(items) > 5 else ''}] ({len(items)})"

            raise ValueError(
                f"{name}: coordinate {dim!r} differs between the trees: "
                f"only in Laplace {_fmt(only_l)}, only in HMC {_fmt(only_h)}"
                + ("" if (only_l or only_h) else "; duplicated labels")
            )
        indexers[dim] = a
    if indexers:
        hmc = hmc.sel(indexers)
    return hmc.transpose(_SAMPLE, *lap_dims)


def _elements(lap: xr.DataArray, name: str):
    """Element selector (flat indices into the non-sample dims) and labels."""
    dims = [d for d in lap.dims if d != _SAMPLE]
    shape = tuple(lap.sizes[d] for d in dims)
    if not dims:
        return np.zeros(1, dtype=int), [name]
    labels_per_dim = [np.asarray(lap[d].values).astype(str) for d in dims]
    k = _triangle(name)
    if k is not None and len(dims) == 2 and shape[0] == shape[1]:
        rows, cols = np.triu_indices(shape[0], k=k)
        multi = (rows, cols)
    else:
        multi = np.unravel_index(np.arange(int(np.prod(shape))), shape)
    flat = np.ravel_multi_index(multi, shape)
    labels = [
        f"{name}[{', '.join(lab[i] for lab, i in zip(labels_per_dim, idx))}]"
        for idx in zip(*multi)
    ]
    return flat, labels


def _central(draws: np.ndarray, prob: float):
    lo, hi = np.quantile(draws, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    return lo, hi


def _sd(draws: np.ndarray) -> np.ndarray:
    ddof = 1 if draws.shape[0] > 1 else 0
    return draws.std(axis=0, ddof=ddof)


def _detail_one(lap_v: np.ndarray, hmc_v: np.ndarray, prob: float) -> dict:
    """Per-element statistics for draws shaped (samples, elements)."""
    lap_v = lap_v.astype(float, copy=False)
    hmc_v = hmc_v.astype(float, copy=False)
    lap_mean = lap_v.mean(axis=0)
    hmc_mean = hmc_v.mean(axis=0)
    lap_sd = _sd(lap_v)
    hmc_sd = _sd(hmc_v)
    point = np.ptp(lap_v, axis=0) == 0
    lo, hi = _central(lap_v, prob)
    coverage = ((hmc_v >= lo) & (hmc_v <= hi)).mean(axis=0)
    if point.any():
        h_lo, h_hi = _central(hmc_v[:, point], prob)
        p = lap_mean[point]
        coverage[point] = ((p >= h_lo) & (p <= h_hi)).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        smd = (lap_mean - hmc_mean) / hmc_sd
        sd_ratio = np.where(point, np.nan, lap_sd / hmc_sd)
    return {
        "laplace_mean": lap_mean,
        "laplace_sd": lap_sd,
        "hmc_mean": hmc_mean,
        "hmc_sd": hmc_sd,
        "smd": smd,
        "sd_ratio": sd_ratio,
        "coverage": coverage,
        "point_estimate": point,
    }


def _resolve_var_names(var_names, lap: xr.Dataset, hmc: xr.Dataset) -> list[str]:
    if var_names is None:
        names = [v for v in DEFAULT_VAR_NAMES if v in lap.data_vars and v in hmc.data_vars]
        if not names:
            raise ValueError(
                f"no default quantity {list(DEFAULT_VAR_NAMES)} is present in both "
                f"posteriors (Laplace has {sorted(lap.data_vars)}, HMC has "
                f"{sorted(hmc.data_vars)})"
            )
        return names
    if isinstance(var_names, str):
        var_names = [var_names]
    names = list(var_names)
    for v in names:
        if v in NOT_IDENTIFIED:
            raise ValueError(f"cannot compare {v!r}: {NOT_IDENTIFIED[v]}")
    missing = [
        (v, side)
        for v in names
        for side, ds in (("Laplace", lap), ("HMC", hmc))
        if v not in ds.data_vars
    ]
    if missing:
        desc = ", ".join(f"{v!r} missing from {side}" for v, side in missing)
        raise ValueError(
            f"requested quantities not present in both posteriors: {desc}; "
            f"common variables: {sorted(set(lap.data_vars) & set(hmc.data_vars))}"
        )
    return names


def _quantity_arrays(lap_ds, hmc_ds, name):
    """Draws (samples, elements) of both sides for one quantity, aligned, plus labels."""
    lap = _stack_samples(lap_ds[name], "Laplace", name)
    hmc = _align(lap, _stack_samples(hmc_ds[name], "HMC", name), name)
    lap = lap.transpose(_SAMPLE, ...)
    flat, labels = _elements(lap, name)
    lap_v = np.asarray(lap.values).reshape(lap.sizes[_SAMPLE], -1)[:, flat]
    hmc_v = np.asarray(hmc.values).reshape(hmc.sizes[_SAMPLE], -1)[:, flat]
    return lap_v, hmc_v, labels


def compare(
    laplace,
    hmc,
    *,
    var_names: Sequence[str] | str | None = None,
    prob: float = 0.9,
    detail: bool = False,
) -> pd.DataFrame:
    """Element-wise agreement of a Laplace posterior with an HMC posterior.

    Parameters
    ----------
    laplace, hmc : xarray.DataTree or xarray.Dataset
        Trees from :func:`scribe_stan.convert.build_datatree` (their ``posterior``
        group is used; a Dataset is taken as the posterior itself). Variables are
        shaped ``(chain, draw, *dims)``; chain and draw counts may differ between the
        two. Element dims are matched by coordinate labels (e.g. cell and gene
        names), in any order.
    var_names : str or sequence of str, optional
        Quantities to compare. Default: those of ``("Sigma", "corr", "x", "eta",
        "mu")`` present in both posteriors (rotation-invariant quantities). ``"W"``,
        ``"W_perp"`` and ``"W_alr"`` are refused with a ``ValueError`` (identified
        only up to rotation).
    prob : float, default 0.9
        Mass of the central (equal-tailed) interval used for coverage.
    detail : bool, default False
        Return the per-element table instead of the per-quantity summary.

    Returns
    -------
    pandas.DataFrame
        ``detail=False``: index ``quantity``; columns ``n`` (number of elements),
        ``mean_abs_smd``, ``max_abs_smd``, ``median_sd_ratio``, ``min_sd_ratio``,
        ``max_sd_ratio`` (NaN-ignoring; all NaN for point estimates),
        ``mean_coverage`` (ideal ``prob``; for point estimates the fraction of points
        inside the HMC interval) and ``point_estimate`` (True when every Laplace
        element is a point estimate).

        ``detail=True``: MultiIndex ``(quantity, element)``, element labels such as
        ``"x[cell_7, CD3E]"``; columns ``laplace_mean``, ``laplace_sd``,
        ``hmc_mean``, ``hmc_sd``, ``smd = (laplace_mean - hmc_mean) / hmc_sd``,
        ``sd_ratio = laplace_sd / hmc_sd``, ``coverage`` and ``point_estimate``.
        ``Sigma`` contributes its upper triangle including the diagonal, ``corr`` its
        strict upper triangle.

    Raises
    ------
    ValueError
        If ``prob`` is outside (0, 1), a requested quantity is ``W`` or is missing from
        either posterior, or the coordinates of a quantity differ between the trees
        (the message names the dim and the differing labels).
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    lap_ds = _posterior(laplace, "Laplace")
    hmc_ds = _posterior(hmc, "HMC")
    names = _resolve_var_names(var_names, lap_ds, hmc_ds)

    frames = []
    for name in names:
        lap_v, hmc_v, labels = _quantity_arrays(lap_ds, hmc_ds, name)
        stats = _detail_one(lap_v, hmc_v, prob)
        index = pd.MultiIndex.from_arrays(
            [[name] * len(labels), labels], names=["quantity", "element"]
        )
        frames.append(pd.DataFrame(stats, index=index, columns=DETAIL_COLUMNS))
    table = pd.concat(frames)
    table["point_estimate"] = table["point_estimate"].astype(bool)
    if detail:
        return table

    rows = {}
    for name in names:
        sub = table.loc[name]
        abs_smd = sub["smd"].abs()
        ratio = sub["sd_ratio"]
        has_ratio = ratio.notna().any()
        rows[name] = {
            "n": len(sub),
            "mean_abs_smd": abs_smd.mean(),
            "max_abs_smd": abs_smd.max(),
            "median_sd_ratio": ratio.median() if has_ratio else np.nan,
            "min_sd_ratio": ratio.min() if has_ratio else np.nan,
            "max_sd_ratio": ratio.max() if has_ratio else np.nan,
            "mean_coverage": sub["coverage"].mean(),
            "point_estimate": bool(sub["point_estimate"].all()),
        }
    out = pd.DataFrame.from_dict(rows, orient="index", columns=SUMMARY_COLUMNS)
    out.index.name = "quantity"
    out["n"] = out["n"].astype(int)
    out["point_estimate"] = out["point_estimate"].astype(bool)
    return out


def _pick(n: int, k: int) -> np.ndarray:
    """``k`` evenly spread indices out of ``n``."""
    if k >= n:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))


def _equal_draws(v: np.ndarray, n: int) -> np.ndarray:
    """Thin draws (samples, elements) to ``n`` evenly spaced rows."""
    return v[_pick(v.shape[0], n)]


def plot_comparison(
    laplace,
    hmc,
    *,
    var_names: Sequence[str] | str = ("eta", "x"),
    max_panels: int = 12,
    elements: dict[str, Sequence[str]] | None = None,
    prob: float = 0.9,
    kind: str = "kde",
    col_wrap: int = 4,
    figsize: tuple[float, float] | None = None,
):
    """Overlay the Laplace and HMC marginals of a few elements.

    Built on :func:`arviz_plots.plot_dist` with a dict of two trees (model names
    ``"Laplace"`` and ``"HMC"``, colour by model, legend added). Laplace elements that
    are point estimates (zero spread) cannot be drawn as densities; they are shown as
    a vertical dashed line instead of a density.

    Parameters
    ----------
    laplace, hmc : xarray.DataTree or xarray.Dataset
        As in :func:`compare`; elements are matched by coordinate labels.
    var_names : str or sequence of str, default ("eta", "x")
        Quantities to draw (``W`` is refused, as in :func:`compare`).
    max_panels : int, default 12
        Total number of panels. Explicitly requested ``elements`` come first; the
        remaining panels are shared evenly among the other quantities (panels a small
        quantity cannot use pass on to the next), choosing elements evenly spread
        over each quantity's flattened elements (Sigma: upper triangle, corr: strict
        upper triangle).
    elements : dict of {str: sequence of str}, optional
        Explicit element labels per quantity, as in ``compare(..., detail=True)``
        (e.g. ``{"x": ["x[c1, g3]"]}``); overrides the automatic choice for those
        quantities.
    prob : float, default 0.9
        Credible interval mass drawn under each density.
    kind : {"kde", "hist", "ecdf"}, default "kde"
        Density representation passed to ``plot_dist``.
    col_wrap : int, default 4
        Panels per row.
    figsize : (float, float), optional
        Figure size in inches; default scales with the number of rows.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per element, titled ``"<quantity>\\n<labels>"``; the two trees are
        thinned to the same number of draws (evenly spaced) so they can share a plot.
    """
    import arviz_base
    import arviz_plots

    if max_panels < 1:
        raise ValueError(f"max_panels must be >= 1, got {max_panels}")
    lap_ds = _posterior(laplace, "Laplace")
    hmc_ds = _posterior(hmc, "HMC")
    names = _resolve_var_names(var_names, lap_ds, hmc_ds)
    elements = dict(elements or {})

    arrays = {name: _quantity_arrays(lap_ds, hmc_ds, name) for name in names}
    chosen: dict[str, np.ndarray] = {}
    for name in names:
        if name in elements:
            labels = arrays[name][2]
            wanted = list(elements[name])
            unknown = [w for w in wanted if w not in labels]
            if unknown:
                raise ValueError(
                    f"unknown element label(s) {unknown} for {name!r}; e.g. {labels[:3]}"
                )
            chosen[name] = np.array([labels.index(w) for w in wanted], dtype=int)
    # share the remaining panels among the other quantities; what a small quantity
    # cannot use passes on to the next ones
    auto = [n for n in names if n not in chosen]
    left = max_panels - sum(v.size for v in chosen.values())
    for i, name in enumerate(auto):
        share = max(0, int(np.ceil(left / (len(auto) - i))))
        idx = _pick(len(arrays[name][2]), share) if share else np.zeros(0, dtype=int)
        chosen[name] = idx
        left -= idx.size

    lap_vars, hmc_vars, coords, dims, points = {}, {}, {}, {}, []
    n_panels = 0
    for name in names:
        idx = chosen[name]
        if idx.size == 0:
            continue
        lap_v, hmc_v, labels = arrays[name]
        n_panels += idx.size
        short = [labels[i][len(name) + 1 : -1] if labels[i] != name else name for i in idx]
        lap_sel, hmc_sel = lap_v[:, idx], hmc_v[:, idx]
        n_draws = min(lap_sel.shape[0], hmc_sel.shape[0])
        lap_sel = _equal_draws(lap_sel, n_draws)
        hmc_sel = _equal_draws(hmc_sel, n_draws)
        is_point = np.ptp(lap_sel, axis=0) == 0
        if is_point.any():
            # a constant column has no density: mask it for plot_dist, draw a line later
            points.extend((name, short[j], float(lap_sel[0, j])) for j in np.flatnonzero(is_point))
            lap_sel = lap_sel.astype(float, copy=True)
            lap_sel[:, is_point] = np.nan
        dim = f"{name}_element"
        lap_vars[name] = lap_sel[None]
        hmc_vars[name] = hmc_sel[None]
        coords[dim] = np.asarray(short)
        dims[name] = [dim]

    lap_tree = arviz_base.from_dict(
        {"posterior": lap_vars}, coords=coords, dims=dims, sample_dims=list(SAMPLE_DIMS)
    )
    hmc_tree = arviz_base.from_dict(
        {"posterior": hmc_vars}, coords=coords, dims=dims, sample_dims=list(SAMPLE_DIMS)
    )
    n_rows = int(np.ceil(n_panels / col_wrap))
    if figsize is None:
        figsize = (3.2 * min(col_wrap, n_panels), 2.6 * n_rows + 0.6)
    pc = arviz_plots.plot_dist(
        {"Laplace": lap_tree, "HMC": hmc_tree},
        backend="matplotlib",
        kind=kind,
        ci_prob=prob,
        visuals={"point_estimate_text": False},
        col_wrap=col_wrap,
        figure_kwargs={"figsize": figsize, "layout": "constrained"},
    )
    if points:
        for name, label, value in points:
            target = pc.get_target(name, {f"{name}_element": label})
            target.axvline(value, color="C0", linestyle="--", linewidth=1.5)
    pc.add_legend("model")
    fig = pc.viz["figure"]
    fig = fig.item() if hasattr(fig, "item") else fig
    fig.suptitle(f"Laplace vs HMC marginals (central {prob:.0%} intervals)")
    return fig
