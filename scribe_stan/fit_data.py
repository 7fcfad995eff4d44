"""Counts in: from an AnnData to the validated arrays every fit starts from.

:func:`prepare` reads and checks the counts once (:mod:`scribe_stan._validate`), picks
the modelled genes and computes the library sizes of the capture prior;
:func:`prepare_matched` does the same for new cells against a fit's genes (matched by
name, for ``fit.transform``). Both return a :class:`FitData`, the input of every model
spec and the ``data`` of every fit.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import pandas as pd

from scribe_stan import _validate


@dataclass
class FitData:
    """The counts a fit models, with what the capture prior needs.

    Attributes
    ----------
    counts : (N, G) int64, the modelled genes.
    log_lib : (N,) log library sizes, over all non-zero genes of the input (or given).
    obs_names, var_names : pandas.Index of the N cells and G genes.
    log_M0 : float, log median total mRNA per cell;  sigma_M : float, its log-scale sd
        (the capture prior, :mod:`scribe_stan.models.pln`).
    """

    counts: np.ndarray
    log_lib: np.ndarray
    obs_names: pd.Index
    var_names: pd.Index
    log_M0: float
    sigma_M: float


def gene_columns(genes, var_names, counts, *, minimum, what):
    """Column indices for a ``genes`` argument: None (all), a count or a list of names.

    Parameters
    ----------
    genes : None, int or sequence of str
        All genes, the ``n`` highest-mean ones (returned in column order) or those names
        (in the order given).
    var_names : pandas.Index
        Names of the columns of ``counts``.
    counts : (N, G) array
        Counts whose column means rank the genes for an integer ``genes``.
    minimum : int
        Fewest genes allowed.
    what : str
        The genes chosen from, used in messages (e.g. "non-zero genes").

    Returns
    -------
    numpy.ndarray of int

    Raises
    ------
    TypeError
        ``genes`` is a string, a float, a bool or another non-sequence.
    ValueError
        A count outside ``[minimum, G]``; fewer than ``minimum`` names, duplicated
        names, or names not among ``var_names``.
    """
    G = len(var_names)
    allowed = f"allowed: None (all), an integer from {minimum} to {G}, or a list of gene names"
    if genes is None:
        return np.arange(G)
    if _validate._is_int(genes):
        if not minimum <= genes <= G:
            raise ValueError(f"genes={genes} is out of range for {G} {what}; {allowed}")
        order = np.argsort(-counts.mean(axis=0), kind="stable")[:int(genes)]
        return np.sort(order)
    if isinstance(genes, (str, bytes, numbers.Number, np.bool_)) or not np.iterable(genes):
        hint = f" (for one gene pass [{genes!r}])" if isinstance(genes, str) else ""
        raise TypeError(f"genes must be None, an integer or a list of gene names; got "
                        f"{genes!r} of type {type(genes).__name__}{hint}; {allowed}")
    names = pd.Index(list(genes))
    if len(names) < minimum:
        raise ValueError(f"genes lists {len(names)} gene names; need at least {minimum}; "
                         f"{allowed}")
    if not names.is_unique:
        raise ValueError(f"genes lists a name twice: {list(names[names.duplicated()][:5])}")
    idx = var_names.get_indexer(names)
    if (idx < 0).any():
        missing = list(names[idx < 0])
        raise ValueError(f"genes not found among the {what}: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    return idx


def _library_size(n_cells, counted, library_size):
    """(N,) library sizes: ``counted`` (the input's totals) or the caller's values."""
    if library_size is None:
        return counted.astype(float)
    lib = np.asarray(library_size, dtype=float).reshape(-1)
    if lib.shape != (n_cells,) or not np.all(np.isfinite(lib) & (lib > 0)):
        raise ValueError(f"library_size must be {n_cells} positive finite values "
                         f"(one per cell); got shape {np.shape(library_size)}")
    return lib


def _capture(M0, sigma_M):
    return (math.log(_validate.check_positive("M0", M0)),
            _validate.check_positive("sigma_M", sigma_M))


def prepare(adata, layer, genes, M0, sigma_M, library_size=None):
    """Validated counts of ``adata`` for a fit (arguments as in :func:`scribe_stan.fit`).

    Raises
    ------
    TypeError, ValueError
        From :func:`scribe_stan._validate.counts_from_anndata`, :func:`gene_columns`,
        a ``library_size`` that is not N positive values, or M0 / sigma_M <= 0.
    """
    ci = _validate.counts_from_anndata(adata, layer=layer)
    cols = gene_columns(genes, ci.var_names, ci.counts, minimum=2,
                        what="non-zero genes (all-zero genes are dropped)")
    log_M0, sigma_M = _capture(M0, sigma_M)
    return FitData(counts=np.ascontiguousarray(ci.counts[:, cols]),
                   log_lib=np.log(_library_size(ci.n_cells, ci.library_size, library_size)),
                   obs_names=ci.obs_names, var_names=ci.var_names[cols],
                   log_M0=log_M0, sigma_M=sigma_M)


def prepare_matched(adata, var_names, *, layer=None, M0, sigma_M, library_size=None):
    """Counts of new cells in ``adata`` for the genes ``var_names`` of a fit.

    Genes are matched by name (a gene with no count among the new cells is kept: it is
    a zero in every cell); library sizes are over all genes of ``adata`` unless given.

    Parameters
    ----------
    adata : anndata.AnnData, the new cells (never modified).
    var_names : pandas.Index, the fit's genes, in the fit's order.
    layer : str, optional;  M0, sigma_M : the capture prior;  library_size : optional.

    Returns
    -------
    FitData

    Raises
    ------
    ValueError
        Fitted genes missing from ``adata`` (the message lists them), invalid counts,
        or a bad ``library_size``.
    """
    ci = _validate.counts_from_anndata(adata, layer=layer, drop_zero_genes=False)
    cols = ci.var_names.get_indexer(var_names)
    if (cols < 0).any():
        missing = list(var_names[cols < 0])
        raise ValueError(f"adata lacks {len(missing)} of the {len(var_names)} fitted genes: "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}; the new "
                         "cells must have every fitted gene (by name)")
    log_M0, sigma_M = _capture(M0, sigma_M)
    return FitData(counts=np.ascontiguousarray(ci.counts[:, cols]),
                   log_lib=np.log(_library_size(ci.n_cells, ci.library_size, library_size)),
                   obs_names=ci.obs_names, var_names=pd.Index(var_names),
                   log_M0=log_M0, sigma_M=sigma_M)
