"""Figure of a posterior predictive check (a tree from :func:`scribe_stan.posterior_predictive`).

Panels: per-gene count histograms with the replicated data's 5-95% band per bin; the
distribution of per-cell totals (over the replicated genes) with its band; the
mean-variance relation of genes over cells (observed points, replicated 5-95% ranges);
and a compositional corner plot for pairs of genes (observed cells as points over the
predictive density of ``log1p`` counts as contours). ArviZ's own PPC plots apply to the
same tree, e.g. ``arviz_plots.plot_ppc_dist(tree)`` (all cells and genes pooled; pass
``coords={"gene": name}`` for one gene).
"""

from __future__ import annotations

import itertools

import numpy as np

BAND = (5, 95)  # percentiles of the replicated statistic


def _bins(observed, replicated, n_bins):
    """Integer-aligned bins on a log1p-like grid covering observed and replicated counts."""
    top = max(int(observed.max()), int(np.percentile(replicated, 99.5))) + 1
    edges = np.unique(np.round(np.expm1(np.linspace(0, np.log1p(top), n_bins + 1))))
    return np.append(edges, edges[-1] + 1) - 0.5


def _hist_band(ax, observed, replicated, edges, label):
    """Observed histogram (steps) over the replicated histograms' band, per bin."""
    obs, _ = np.histogram(observed, edges)
    rep = np.array([np.histogram(r, edges)[0] for r in replicated])
    lo, hi = np.percentile(rep, BAND, axis=0)
    centers = 0.5 * (edges[1:] + edges[:-1])
    ax.fill_between(centers, lo, hi, step="mid", alpha=0.35, color="C0",
                    label=f"replicated {BAND[0]}-{BAND[1]}%")
    ax.step(centers, obs, where="mid", color="k", lw=1.2, label="observed")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel(label)
    ax.set_ylabel("cells")


def plot_ppc(tree, *, genes=4, pairs=3, n_bins=25, max_draws=100, figsize=None):
    """Posterior predictive check figure for one model and level.

    Parameters
    ----------
    tree : xarray.DataTree
        From :func:`scribe_stan.posterior_predictive` (``posterior_predictive`` and
        ``observed_data`` groups with ``counts`` (chain, draw, cell, gene)).
    genes : int
        Genes (highest observed mean first) shown as histograms.
    pairs : int
        Genes among the highest-mean ones whose pairs form the corner plot
        (``pairs * (pairs - 1) / 2`` panels; 0 or 1 for none).
    n_bins : int
        Histogram bins (log-spaced, integer-aligned).
    max_draws : int
        Replicated data sets used for the bands (the first ones).
    figsize : (float, float), optional

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    TypeError
        ``tree`` is not a DataTree (e.g. a fit: pass ``ss.posterior_predictive(fit)``).
    ValueError
        The tree lacks ``posterior_predictive`` or ``observed_data`` counts, or
        ``genes < 1``.
    """
    import matplotlib.pyplot as plt
    import xarray as xr
    from matplotlib.ticker import NullFormatter

    if not isinstance(tree, xr.DataTree):
        raise TypeError(f"plot_ppc takes a DataTree, got {type(tree).__name__}; for a fit "
                        "pass scribe_stan.posterior_predictive(fit) (or fit.to_datatree())")
    if "posterior_predictive" not in tree.children or "observed_data" not in tree.children:
        raise ValueError("tree needs posterior_predictive and observed_data groups (use "
                         "scribe_stan.posterior_predictive)")
    if genes < 1:
        raise ValueError(f"genes must be >= 1; got {genes}")
    rep_da = tree["posterior_predictive"]["counts"]
    obs_da = tree["observed_data"]["counts"]
    names = [str(g) for g in obs_da["gene"].values]
    observed = np.asarray(obs_da.values, float)  # (N, G)
    rep = np.asarray(rep_da.values, float).reshape((-1,) + observed.shape)[:max_draws]
    order = np.argsort(-observed.mean(0), kind="stable")
    shown = order[:min(genes, len(names))]
    pair_list = list(itertools.combinations(order[:min(pairs, len(names))], 2))
    ncol = max(len(shown), 2 + len(pair_list))
    fig, axes = plt.subplots(2, ncol, figsize=figsize or (3.2 * ncol, 6.4), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, g in zip(axes[0], shown):
        ax.set_visible(True)
        _hist_band(ax, observed[:, g], rep[..., g], _bins(observed[:, g], rep[..., g], n_bins),
                   f"{names[g]} counts")
    axes[0, 0].legend(fontsize=7)
    # totals over the replicated genes
    ax = axes[1, 0]
    ax.set_visible(True)
    tot_obs, tot_rep = observed.sum(1), rep.sum(-1)
    _hist_band(ax, tot_obs, tot_rep, _bins(tot_obs, tot_rep, n_bins),
               f"total over {len(names)} genes")
    # mean-variance relation over cells
    ax = axes[1, 1]
    ax.set_visible(True)
    m_rep, v_rep = rep.mean(1), rep.var(1, ddof=1)  # (draws, G)
    m_lo, m_hi = np.percentile(m_rep, BAND, axis=0)
    v_lo, v_hi = np.percentile(v_rep, BAND, axis=0)
    m_obs, v_obs = observed.mean(0), observed.var(0, ddof=1)
    ax.errorbar(np.median(m_rep, 0), np.median(v_rep, 0),
                xerr=[np.median(m_rep, 0) - m_lo, m_hi - np.median(m_rep, 0)],
                yerr=[np.median(v_rep, 0) - v_lo, v_hi - np.median(v_rep, 0)],
                fmt="none", ecolor="C0", alpha=0.5, label="replicated 5-95%")
    ax.scatter(m_obs, v_obs, s=8, color="k", label="observed", zorder=3)
    lim = np.array([max(min(m_obs.min(), m_lo.min()), 1e-3), max(m_obs.max(), m_hi.max())])
    ax.plot(lim, lim, ls=":", color="grey", label="Poisson")
    ax.set(xscale="log", yscale="log", xlabel="mean over cells", ylabel="variance over cells")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
    # compositional corner plot
    for ax, (g1, g2) in zip(axes[1, 2:], pair_list):
        ax.set_visible(True)
        a, b = np.log1p(rep[..., g1].ravel()), np.log1p(rep[..., g2].ravel())
        dens, xe, ye = np.histogram2d(a, b, bins=30, density=True)
        xc, yc = 0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1])
        levels = np.percentile(dens[dens > 0], [50, 75, 90, 97])
        ax.contour(xc, yc, dens.T, levels=np.unique(levels), colors="C0", linewidths=0.8)
        ax.scatter(np.log1p(observed[:, g1]), np.log1p(observed[:, g2]), s=4, color="k",
                   alpha=0.5)
        ax.set(xlabel=f"log1p {names[g1]}", ylabel=f"log1p {names[g2]}")
    level = tree.attrs.get("level", "?")
    fig.suptitle(f"{tree.attrs.get('model', '?')} ({tree.attrs.get('solver', '?')}), "
                 f"level {level}: {rep.shape[0]} replicated data sets")
    fig.tight_layout()
    return fig
