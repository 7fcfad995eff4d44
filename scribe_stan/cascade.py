"""The nbvcp -> nbln cascade: informative priors for nbln from an nbvcp fit.

An nbvcp fit (independent genes, cheap at any scale) pins down what nbln's extra
structure does not change much: each gene's dispersion r_g and mean expression, and
each cell's capture loss eta_c. Its posterior, summarized as Gaussians in the fitting
coordinates (``log_r``, ``m``, ``eta``), becomes nbln's prior, with the scales widened by
``tau``; parameters named in ``freeze`` are instead held at the posterior means.

Matching nbvcp's ``m_g`` to nbln. nbvcp's ``m_g`` is the log of the mean rate before
capture; in nbln that is ``mu_g + Sigma_gg / 2`` (the log-normal mean), not ``mu_g``.
The prior therefore acts on ``mu_g + Sigma_gg / 2``, and freezing the expression holds
``mu_g = m_g - Sigma_gg / 2`` while W and d move. Putting ``m_g`` on ``mu_g`` directly
would pull every gene's log-normal mean up by ``Sigma_gg / 2``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Parameters the cascade informs: NB dispersion, mean expression, capture loss.
CASCADE_PARAMETERS = ("r", "mu", "eta")
#: Accepted synonyms in ``freeze``.
ALIASES = {"dispersion": "r", "expression": "mu", "mean_expression": "mu",
           "capture_efficiency": "eta"}
DEFAULT_FREEZE = ("r", "eta")


def resolve_freeze(freeze):
    """Canonical names (subset of ``("r", "mu", "eta")``) of the parameters to hold.

    Parameters
    ----------
    freeze : iterable of str
        Names or aliases (``dispersion``; ``expression``, ``mean_expression``;
        ``capture_efficiency``); a single string is one name.

    Returns
    -------
    tuple of str

    Raises
    ------
    ValueError
        An unknown name, or one parameter named twice (e.g. ``"r"`` and
        ``"dispersion"``).
    """
    if freeze is None:
        return ()
    names = (freeze,) if isinstance(freeze, str) else tuple(freeze)
    allowed = CASCADE_PARAMETERS + tuple(ALIASES)
    out = []
    for name in names:
        if name not in allowed:
            raise ValueError(f"cannot freeze {name!r}; allowed: {', '.join(allowed)}")
        canon = ALIASES.get(name, name)
        if canon in out:
            raise ValueError(f"freeze names {canon!r} twice ({name!r} is {canon!r}); "
                             "give each parameter once")
        out.append(canon)
    return tuple(out)


def _reorder(source_names, target_names, what):
    """Positions of ``target_names`` in ``source_names``; the two sets must be equal."""
    source, target = pd.Index(source_names), pd.Index(target_names)
    if len(source) != len(target) or not source.isin(target).all() or not target.isin(source).all():
        missing = target.difference(source)[:5].tolist()
        extra = source.difference(target)[:5].tolist()
        raise ValueError(f"the nbvcp fit has other {what} than this fit (matched by name): "
                         f"missing from it {missing}, only in it {extra}; fit both on the "
                         f"same {what}")
    return source.get_indexer(target)


def cascade_arguments(moments, var_names, obs_names, *, tau=1.0, freeze=DEFAULT_FREEZE):
    """Keyword arguments of :func:`scribe_stan.laplace.solver.fit_laplace` for nbln.

    Parameters
    ----------
    moments : dict
        nbvcp posterior summaries in the fitting coordinates, as returned by
        :func:`scribe_stan.models.nbvcp.posterior_moments`: ``"m"``, ``"log_r"`` ->
        (mean (G,), sd (G,)); ``"eta"`` -> (mean (N,), sd (N,)); ``"var_names"``,
        ``"obs_names"``.
    var_names, obs_names : sequence of str
        Genes and cells of the nbln fit; both must equal the nbvcp fit's as sets.
    tau : float > 0
        Prior scales are ``tau * sd`` (``tau > 1`` widens them).
    freeze : iterable of str
        Parameters held at the nbvcp posterior means (see :func:`resolve_freeze`).

    Returns
    -------
    dict
        ``log_r`` or ``log_r_prior``; ``log_mean`` or ``log_mean_prior``; ``eta`` or
        ``eta_loc``/``eta_scale``.

    Raises
    ------
    ValueError
        Mismatched genes or cells, ``tau <= 0``, bad ``freeze``.
    """
    if not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite number (prior widening); got {tau}")
    held = resolve_freeze(freeze)
    g = _reorder(moments["var_names"], var_names, "genes")
    c = _reorder(moments["obs_names"], obs_names, "cells")
    m_mean, m_sd = (np.asarray(a, float)[g] for a in moments["m"])
    r_mean, r_sd = (np.asarray(a, float)[g] for a in moments["log_r"])
    e_mean, e_sd = (np.asarray(a, float)[c] for a in moments["eta"])
    args = {}
    if "r" in held:
        args["log_r"] = r_mean
    else:
        args["log_r_prior"] = (r_mean, tau * r_sd)
    if "mu" in held:
        args["log_mean"] = m_mean
    else:
        args["log_mean_prior"] = (m_mean, tau * m_sd)
    if "eta" in held:
        args["eta"] = np.maximum(e_mean, 0.0)
    else:
        args["eta_loc"], args["eta_scale"] = e_mean, tau * e_sd
    return args
