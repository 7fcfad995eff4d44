"""Stan NUTS fits: :class:`HmcFit` (pln, nbln, nbvcp; lnm and lnmvcp extend it) and the
sampler diagnostics every HMC fit reports (:func:`hmc_diagnostics`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scribe_stan import convert, stan
from scribe_stan.fit_data import FitData
from scribe_stan.fits.base import Fit, result_target


def hmc_diagnostics(tree) -> dict:
    """R-hat, ESS and divergences of an HMC tree (posterior group).

    R-hat and ESS are taken over the identified quantities only. The loadings ``W``,
    ``W_perp`` and ``W_alr`` are sampled unconstrained and identified only up to rotation
    (``W -> W R``), so chains may sit at different rotations of the same ``Sigma``:
    their R-hat and ESS say nothing about convergence and are left out
    (:data:`scribe_stan.convert.NOT_IDENTIFIED`). ``Sigma``, ``corr``, ``mu``, ``d``,
    ``r`` and the per-cell latents are kept.

    Parameters
    ----------
    tree : xarray.DataTree
        From :meth:`scribe_stan.HmcFit.to_datatree`.

    Returns
    -------
    dict
        ``max_rhat_Sigma`` (rank-normalized split R-hat, Vehtari et al. 2021, Bayesian
        Analysis 16:667, doi:10.1214/20-BA1221; max over the entries of ``Sigma``),
        ``max_rhat`` (over every element of every identified posterior variable),
        ``min_ess_bulk``, ``min_ess_tail`` (over the same elements), ``divergences``
        (count over chains and draws), ``chains``, ``draws``. Constant elements (the
        unit diagonal of ``corr``) have undefined R-hat/ESS and are ignored.
    """
    import arviz_stats

    from scribe_stan.convert import NOT_IDENTIFIED

    def extreme(result, fn):
        ds = result.to_dataset() if hasattr(result, "to_dataset") else result
        vals = [np.asarray(v.values, dtype=float).ravel() for v in ds.data_vars.values()]
        vals = np.concatenate(vals) if vals else np.array([np.nan])
        return float(fn(vals)) if np.isfinite(vals).any() else float("nan")

    post = tree["posterior"]
    names = [v for v in post.data_vars if v not in NOT_IDENTIFIED]
    out = {
        "max_rhat_Sigma": extreme(arviz_stats.rhat(tree, var_names=["Sigma"]), np.nanmax)
        if "Sigma" in post.data_vars else float("nan"),
        "max_rhat": extreme(arviz_stats.rhat(tree, var_names=names), np.nanmax),
        "min_ess_bulk": extreme(arviz_stats.ess(tree, var_names=names, method="bulk"),
                                np.nanmin),
        "min_ess_tail": extreme(arviz_stats.ess(tree, var_names=names, method="tail"),
                                np.nanmin),
        "divergences": int(tree["sample_stats"]["diverging"].values.sum())
        if "sample_stats" in tree.children
        and "diverging" in tree["sample_stats"].data_vars else 0,
        "chains": int(post.sizes["chain"]),
        "draws": int(post.sizes["draw"]),
    }
    return out


@dataclass
class HmcFit(Fit):
    """Stan NUTS fit of a model on (usually) a small gene set.

    Attributes
    ----------
    model : str;  program : str, the Stan program run (full joint or conditional).
    draws : scribe_stan.stan.StanDraws
    obs_names, var_names : pandas.Index;  settings : dict.
    """

    method = "hmc"

    model: str
    program: str
    draws: stan.StanDraws = field(repr=False)
    data: FitData = field(repr=False)
    settings: dict

    def to_datatree(self):
        """ArviZ DataTree of the NUTS draws (same shape as the Laplace tree)."""
        return convert.to_datatree_from_stan(
            self.draws, cell_names=self.obs_names, gene_names=self.var_names,
            observed_counts=self.data.counts,
            attrs={"solver": "hmc", "model": self.model, "program": self.program})

    def to_anndata(self, adata, *, key_added=None):
        """Copy of ``adata`` with the posterior means of the draws under new keys.

        Every posterior variable of the tree (:meth:`to_datatree`) is averaged over
        chains and draws and placed by its dimensions: ``(cell,)`` into
        ``obs[f"{key}_{name}"]``, ``(cell, ...)`` into ``obsm``, ``(gene,)`` into
        ``var`` and ``(gene, ...)`` into ``varm`` (NaN for genes not fitted), anything
        else into ``uns[key]["posterior_mean"]``; ``uns[key]`` also holds the settings
        and the sampler diagnostics (:func:`hmc_diagnostics`). The input is not
        modified; a backed ``adata`` gives an in-memory result.

        Raises
        ------
        TypeError, ValueError
            ``adata`` is not an AnnData, or does not hold the fitted cells and genes.
        """
        key = key_added or self.model
        out, pos = result_target(adata, self.obs_names, self.var_names)
        tree = self.to_datatree()
        means = tree["posterior"].to_dataset().mean(("chain", "draw"))
        other = {}
        for name, da in means.data_vars.items():
            dims, vals = da.dims, np.asarray(da.values)
            if dims == ("cell",):
                out.obs[f"{key}_{name}"] = vals
            elif dims and dims[0] == "cell":
                out.obsm[f"{key}_{name}"] = vals.reshape(vals.shape[0], -1)
            elif dims and dims[0] == "gene" and vals.shape[0] == len(pos):
                full = np.full((len(out.var_names),) + vals.shape[1:], np.nan)
                full[pos] = vals
                if vals.ndim == 1:
                    out.var[f"{key}_{name}"] = full
                else:
                    out.varm[f"{key}_{name}"] = full.reshape(full.shape[0], -1)
            else:
                other[name] = vals
        out.uns[key] = {**{k: v for k, v in self.settings.items() if v is not None},
                        **hmc_diagnostics(tree), "posterior_mean": other,
                        "genes": np.asarray(self.var_names, dtype=str)}
        return out

    def transform(self, adata, **kwargs):
        """Not available: new cells are placed by a Laplace fit's ``transform``.

        Raises
        ------
        TypeError
            Always; fit the model with ``method="laplace"`` (or use
            ``fit(..., method="hmc", conditional_on=laplace_fit)`` on the new cells).
        """
        raise TypeError("transform applies to Laplace fits (method='laplace'): it solves "
                        "each new cell's Laplace posterior at fitted point globals; an HMC "
                        "fit has draws of the globals, not one value")

    def _summary(self):
        return {"program": self.program, **hmc_diagnostics(self.to_datatree())}
