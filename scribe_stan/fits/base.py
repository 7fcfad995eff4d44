"""What every fit is: the one result protocol, and the helpers fits share.

Every result of :func:`scribe_stan.fit`, Laplace or HMC and whatever the model, is a
:class:`Fit`: it has ``model``, ``method``, ``obs_names``, ``var_names``, ``settings``,
``data`` (the :class:`scribe_stan.fit_data.FitData` it was fitted to),
``to_datatree()``, ``to_anndata(adata)``, ``summary()`` and ``save(path)``. Laplace
fits (:class:`LaplaceResult`) add ``converged``, ``objective``, ``globals()`` (the
model's global parameters under their field names, which are also attributes) and
``transform(new_adata)``. Code that handles "a fit" (comparison, predictive checks,
LOO, the CLI) uses only this protocol and the model's spec
(:mod:`scribe_stan.specs`), never the concrete class.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from scribe_stan import _validate
from scribe_stan.fit_data import gene_columns, prepare_matched

_MAX_TREE_ELEMENTS = 2 * 10**8  # per-cell draw elements in one tree (1.6 GB of float64)


class Fit:
    """Core of every fit (see the module docstring).

    Subclasses are dataclasses with at least the fields ``model`` (str), ``data``
    (FitData) and ``settings`` (dict of the arguments used), and set ``method``.
    """

    method: ClassVar[str]

    obs_names = property(lambda self: self.data.obs_names)
    var_names = property(lambda self: self.data.var_names)

    def summary(self):
        """Headline figures of the fit, JSON-ready.

        Returns
        -------
        dict
            ``model``, ``method``, ``cells``, ``genes`` and the method's own figures:
            Laplace: objective, outer iterations, optimizer success, cells converged and
            the model's scalar summaries; HMC: the sampler diagnostics (R-hat, ESS,
            divergences, E-BFMI; :func:`scribe_stan.fits.hmc.hmc_diagnostics`).
        """
        return {"model": self.model, "method": self.method, "cells": len(self.obs_names),
                "genes": len(self.var_names), **self._summary()}

    def save(self, path):
        """Write the fit to ``path`` (zarr; netCDF for a ``.nc`` suffix).

        Everything needed to use the fit again is stored: the counts and capture inputs
        it was fitted to, its globals and per-cell modes (Laplace) or draws (HMC),
        settings, package versions and the Stan program hash. Reload with
        :func:`scribe_stan.load_fit`.

        Raises
        ------
        ValueError
            ``path`` exists (it is not overwritten).
        """
        from scribe_stan.fits.store import save_fit

        save_fit(self, path)

    def _summary(self):
        raise NotImplementedError


#: ``(method, rank, step)`` of a ``globals_posterior()`` call without arguments.
_DEFAULT_GLOBALS_KEY = ("auto", None, 1e-3)


class LaplaceResult(Fit):
    """A Laplace fit: adds ``converged``, ``objective``, ``globals()`` and ``transform``.

    Subclasses set ``global_names`` (the model's globals, attributes of the fit) and
    implement ``_at_globals(data)``: the fit's globals with per-cell modes solved for the
    cells of ``data``.
    """

    method = "laplace"
    global_names: ClassVar[tuple[str, ...]] = ()

    def _cached_globals(self, build, *solutions, method, rank, step):
        """The globals' Gaussian of nested Laplace, ``build(*solutions, method=, rank=,
        step=, seed=)``, built once per ``(method, rank, step)`` and cached on the fit
        (subclasses hold the ``_globals_cache`` dict). With every setting at its default
        (as the draws with ``globals="laplace"`` ask) the one built most recently is
        returned, whatever its settings: a Gaussian the caller built with another rank
        is the one the draws use."""
        key = (method, rank, step)
        if key == _DEFAULT_GLOBALS_KEY and self._globals_cache:
            return next(reversed(self._globals_cache.values()))
        if key not in self._globals_cache:
            self._globals_cache[key] = build(*solutions, method=method, rank=rank, step=step,
                                             seed=self.settings["seed"])
        return self._globals_cache[key]

    def globals(self):
        """The model's global parameters: dict of name to value (arrays over genes)."""
        return {name: getattr(self, name) for name in self.global_names}

    def transform(self, adata, *, layer=None, library_size=None):
        """Per-cell Laplace posteriors of new cells at this fit's globals.

        The Laplace answer to an amortized encoder: the globals stay as fitted, and each
        new cell's mode and Gaussian come from its own Newton solve (cold start from its
        counts). Genes are matched by name; the capture prior comes from the new cells'
        library sizes (over all genes of ``adata``) with this fit's ``M0`` and
        ``sigma_M``. The result is a fit of the same class and model, with the same
        per-cell outputs, trees and AnnData keys; its ``objective`` is the Laplace log
        marginal of the new cells at the fitted globals (no prior), and
        ``settings["transform_of"]`` records the training fit's cells and objective.

        Parameters
        ----------
        adata : anndata.AnnData
            New cells x genes raw counts (never modified); it must hold every fitted
            gene (by name), in any order and among other genes.
        layer : str, optional
            Counts layer (default: the fit's ``layer`` setting, else ``.X``).
        library_size : (N_new,) positive floats, optional
            Library sizes of the capture prior (default: totals over all genes).

        Returns
        -------
        Fit of the same class.

        Raises
        ------
        TypeError
            ``adata`` is not an AnnData.
        ValueError
            Fitted genes missing from ``adata`` (listed), invalid counts, or bad
            ``library_size``.
        """
        data = prepare_matched(adata, self.var_names,
                               layer=layer if layer is not None else self.settings.get("layer"),
                               M0=np.exp(self.data.log_M0), sigma_M=self.data.sigma_M,
                               library_size=library_size)
        return self._at_globals(data)

    def _uns(self, **extra):
        """What ``to_anndata`` stores in ``uns[key]``: settings, objective, iterations,
        convergence, fitted gene names, and the model's ``extra`` entries."""
        return {**{k: v for k, v in self.settings.items() if v is not None},
                "objective": self.objective, "outer_iterations": self.n_iter,
                "optimizer_success": self.success,
                "cells_converged": int(np.sum(self.converged)),
                "genes": np.asarray(self.var_names, dtype=str), **extra}

    def _transform_settings(self):
        return {**self.settings, "transform_of": {"cells": len(self.obs_names),
                                                  "objective": float(self.objective)}}

    def _summary(self):
        out = {"objective": float(self.objective), "outer_iterations": int(self.n_iter),
               "optimizer_success": bool(self.success),
               "cells_converged": int(np.sum(self.converged)),
               "cells_total": int(np.size(self.converged))}
        eta = getattr(self, "eta_hat", None)
        if eta is not None:
            out["median_capture_efficiency"] = float(np.median(np.exp(-eta)))
        return {**out, **self._model_summary()}

    def _model_summary(self):
        return {}


def fitted_gene_index(fit, genes):
    """Indices into a fit's genes for a ``genes`` argument (trees, predictive checks).

    Parameters
    ----------
    fit : Fit
    genes : None, int or sequence of str
        All fitted genes, the ``n`` highest-mean ones (``n >= 1``) or those names.

    Returns
    -------
    numpy.ndarray of int

    Raises
    ------
    TypeError, ValueError
        As for the ``genes`` argument of :func:`scribe_stan.fit` (at least one gene here).
    """
    return gene_columns(genes, fit.var_names, fit.data.counts, minimum=1, what="fitted genes")


def check_tree_size(draws, n_cells, n_genes):
    """Check a tree's ``draws`` argument and the size of its per-cell draws.

    Parameters
    ----------
    draws : int
        Draws requested (>= 1).
    n_cells, n_genes : int
        Cells and genes whose per-cell values the tree stores per draw.

    Returns
    -------
    int
        ``draws``.

    Raises
    ------
    TypeError, ValueError
        ``draws`` is not an integer >= 1, or ``draws * cells * genes`` exceeds
        2e8 elements (1.6 GB of float64 per variable).
    """
    draws = _validate.check_positive_int("draws", draws)
    if draws * n_cells * n_genes > _MAX_TREE_ELEMENTS:
        raise ValueError(f"draws*cells*genes = {draws}*{n_cells}*{n_genes} exceeds "
                         f"{_MAX_TREE_ELEMENTS:.0e}; allowed: draws <= "
                         f"{_MAX_TREE_ELEMENTS // (n_cells * n_genes)} for these cells and "
                         "genes, or fewer cells or genes")
    return draws


def result_target(adata, obs_names, var_names):
    """In-memory copy of ``adata`` to hold a fit's results, and the fitted genes' rows.

    Parameters
    ----------
    adata : anndata.AnnData
        In memory or backed (its data are read into memory; the file is not changed).
    obs_names, var_names : pandas.Index
        The fit's cells and genes.

    Returns
    -------
    out : anndata.AnnData
        The copy.
    pos : numpy.ndarray of int
        Row of each fitted gene in ``out.var_names``.

    Raises
    ------
    TypeError
        ``adata`` is not an AnnData.
    ValueError
        ``adata`` does not hold the fitted cells in the fitted order, lacks fitted genes,
        or has duplicated names.
    """
    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise TypeError(f"adata must be an anndata.AnnData; got {type(adata).__name__}")
    obs = _validate.check_unique_names(adata.obs_names, "adata.obs_names")
    var = _validate.check_unique_names(adata.var_names, "adata.var_names")
    if not obs.equals(obs_names):
        raise ValueError(f"adata holds other cells than the fit ({len(obs)} cells vs "
                         f"{len(obs_names)} fitted, or in another order); pass the AnnData "
                         "that was fitted")
    pos = var.get_indexer(var_names)
    if (pos < 0).any():
        missing = list(var_names[pos < 0])
        raise ValueError(f"adata lacks {len(missing)} of the {len(var_names)} fitted genes "
                         f"(e.g. {missing[:5]}); pass the AnnData that was fitted")
    out = adata.to_memory() if adata.isbacked else adata.copy()
    return out, pos



