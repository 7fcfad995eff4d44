"""NUTS starts from a Laplace fit, and a check for chains stuck apart.

:func:`laplace_inits` turns a pln or nbln :class:`~scribe_stan.api.LaplaceFit` into
initial values for the full-joint Stan programs (``stan/pln.stan``, ``stan/nbln.stan``),
one per chain: the globals (MAP, or a draw from their Laplace Gaussian) and each cell's
latents drawn from its Laplace Gaussian, mapped to the coordinates those programs sample
(:func:`scribe_stan.models.pln.observed_capture_coordinates`). Pass them as
``scribe_stan.stan.sample(..., inits=...)``. :func:`laplace_metric` gives, from the same
fit, the variance of each of those programs' unconstrained coordinates over nested
Laplace draws: an initial diagonal metric, so that warmup starts where the adapted
metric will end up (``scribe_stan.stan.sample(..., inv_metric=...)``, CmdStan only).

:func:`chain_split` compares the chains' means of the log density and of the identified
quantities (never the loadings ``W``, identified only up to rotation): a chain whose
mean ``lp`` lies many within-chain sds from the others sits in another mode or has not
left the region where it started, which R-hat reports only as one large number.
"""

from __future__ import annotations

import numpy as np
from scipy import special

from scribe_stan.models import pln

#: Per-chain means of ``lp`` that differ from the median chain by more than this many
#: within-chain sds (pooled over the chains) flag a chain as stuck apart.
LP_SPLIT_SDS = 3.0
#: Rotation-invariant or per-cell quantities whose chain means :func:`chain_split` checks.
SPLIT_QUANTITIES = ("mu", "d", "r", "Sigma", "x", "eta", "m", "m_T", "r_T", "y",
                    "mu_clr", "Sigma_clr")


def laplace_inits(fit, chains, *, seed=0, globals="point"):
    """Initial values of a pln/nbln full-joint Stan program from a Laplace fit.

    Parameters
    ----------
    fit : scribe_stan.api.LaplaceFit
        pln or nbln fit (default ``loadings_prior="normal"``) of the same cells and genes
        the Stan program gets.
    chains : int
        One mapping per chain.
    seed : int
        Seed of the per-cell (and, with ``globals="laplace"``, global) draws.
    globals : {"point", "laplace"}
        Every chain starts at the Laplace MAP of the globals, or each at its own draw
        from their Laplace Gaussian (:meth:`LaplaceFit.to_datatree`).

    Returns
    -------
    list of dict
        Constrained values of every parameter of the program: ``W, d`` (and ``log_r``
        for nbln) and :data:`scribe_stan.models.pln.SAMPLED_COORDINATES`
        (``mu_level, mu_dev, theta_z, theta_e, eta_q``). Each chain's cells are one
        draw of their Laplace Gaussians (``eta`` clipped to >= 1e-6, ``eta_q`` to
        [1e-9, 1 - 1e-9]).

    Raises
    ------
    ValueError
        Not a pln/nbln fit, or a shrinkage loadings prior (its scales ``tau`` are not
        mapped).
    """
    if fit.model not in ("pln", "nbln"):
        raise ValueError(f"laplace_inits maps pln and nbln fits; got model={fit.model!r}")
    if fit.settings.get("loadings_prior", "normal") != "normal":
        raise ValueError("laplace_inits supports loadings_prior='normal' only")
    tree = fit.to_datatree(draws=chains, seed=seed, globals=globals)
    post = tree["posterior"]
    data = fit.data
    a = pln.capture_prior_mean(data.log_lib, data.log_M0)
    out = []
    for c in range(chains):
        mu, W, d = (np.asarray(post[v].values[0, c], float) for v in ("mu", "W", "d"))
        x = np.asarray(post["x"].values[0, c], float)
        eta = np.maximum(np.asarray(post["eta"].values[0, c], float), 1e-6)
        r = None if fit.model == "pln" else np.asarray(post["r"].values[0, c], float)
        coords = pln.observed_capture_coordinates(data.counts, x, eta, mu, W, d, a,
                                                  data.sigma_M, r=r)
        init = {"W": W, "d": d} | {k: coords[k] for k in pln.SAMPLED_COORDINATES}
        init["eta_q"] = np.clip(init["eta_q"], 1e-9, 1 - 1e-9)
        if r is not None:
            init["log_r"] = np.log(r)
        out.append(init)
    return out


def _sum_to_zero_free(z):
    """Stan's unconstrained coordinates of a ``sum_to_zero_vector`` (size G - 1).

    The isometric transform of Stan 2.36+ (stan/math ``sum_to_zero_free``): the
    coordinates of ``z`` in an orthonormal basis of the sum-zero subspace.
    """
    z = np.asarray(z, float)
    n_free = z.size - 1
    y = np.zeros(n_free)
    if n_free == 0:
        return y
    y[-1] = -z[-1] * np.sqrt(n_free * (n_free + 1)) / n_free
    sum_w = 0.0
    for i in range(n_free - 2, -1, -1):
        n = i + 1.0
        sum_w += y[i + 1] / np.sqrt((n + 1) * (n + 2))
        y[i] = (sum_w - z[i + 1]) * np.sqrt(n * (n + 1)) / n
    return y


#: Parameters of stan/pln.stan and stan/nbln.stan in their declaration order (Stan's
#: unconstrained layout), with the map to their unconstrained scale; ``log_r`` is nbln's.
_UNCONSTRAINED = (
    ("mu_level", np.asarray),
    ("mu_dev", _sum_to_zero_free),
    ("W", np.asarray),
    ("d", np.log),
    ("log_r", np.asarray),
    ("theta_z", np.asarray),
    ("theta_e", np.asarray),
    ("eta_q", special.logit),
)


def unconstrained(init):
    """One :func:`laplace_inits` mapping as Stan's unconstrained parameter vector.

    Parameters
    ----------
    init : mapping
        Constrained values of every parameter of ``stan/pln.stan`` or ``stan/nbln.stan``
        (default loadings prior: no ``tau``).

    Returns
    -------
    ndarray
        The unconstrained coordinates in Stan's order: parameters as declared, each
        matrix column-major; ``d`` on the log scale, ``eta_q`` on the logit scale,
        ``mu_dev`` as Stan's ``sum_to_zero_free``.
    """
    parts = [np.ravel(free(np.asarray(init[name], float)), order="F")
             for name, free in _UNCONSTRAINED if name in init]
    return np.concatenate(parts)


def laplace_metric(fit, *, draws=200, seed=0):
    """Diagonal inverse metric for the pln/nbln full-joint programs from a Laplace fit.

    The variance of each unconstrained coordinate (:func:`unconstrained`) over
    ``draws`` nested Laplace draws (:func:`laplace_inits` with ``globals="laplace"``:
    globals from their Gaussian, each cell's latents from its Laplace Gaussian at those
    globals). The loadings get, besides, the spread of W's rotation when K >= 2: the
    posterior is flat along ``W -> W R`` and NUTS roams that orbit, on which each
    ``W[g, k]`` has variance ``|W_g|^2 / K`` (``W_g . r`` with ``r`` uniform on the
    unit sphere); the Laplace draws fix the rotation. With K = 1 the orbit is W's
    sign, two modes a chain does not cross.

    Parameters
    ----------
    fit : scribe_stan.api.LaplaceFit
        pln or nbln fit, as for :func:`laplace_inits`.
    draws : int
        Number of nested draws (>= 2).
    seed : int
        Seed of the draws.

    Returns
    -------
    ndarray
        Positive variances in Stan's unconstrained order, for
        ``scribe_stan.stan.sample(..., inv_metric=...)``.

    Raises
    ------
    ValueError
        ``draws < 2``, or a fit :func:`laplace_inits` refuses.
    """
    if draws < 2:
        raise ValueError(f"laplace_metric needs draws >= 2, got {draws}")
    inits = laplace_inits(fit, draws, seed=seed, globals="laplace")
    var = np.var([unconstrained(init) for init in inits], axis=0)
    W = np.asarray(fit.W, float)
    G, K = W.shape
    if K >= 2:
        start = 1 + (G - 1)  # after mu_level and mu_dev
        var[start:start + G * K] += np.tile((W**2).sum(axis=1) / K, K)
    # a coordinate the draws leave fixed keeps the unit metric
    return np.where(var > 0, var, 1.0)


def chain_split(tree, *, threshold=LP_SPLIT_SDS, quantities=SPLIT_QUANTITIES):
    """Chains whose mean log density or identified quantities sit apart from the rest.

    Parameters
    ----------
    tree : xarray.DataTree
        HMC tree with a ``posterior`` group and (for the ``lp`` check)
        ``sample_stats.lp``.
    threshold : float
        Flag a chain whose mean ``lp`` is more than ``threshold`` pooled within-chain
        sds from the median of the chain means.
    quantities : sequence of str
        Posterior variables (those present) whose chain means are compared: for each
        element, the largest distance of a chain mean from the median chain mean in
        pooled within-chain sds.

    Returns
    -------
    dict
        ``lp_chain_mean`` (list), ``lp_within_sd``, ``lp_split_sds`` (per chain:
        distance of its mean from the median chain mean, in within-chain sds),
        ``stuck_chains`` (indices flagged on ``lp``), ``max_split_sds`` (largest such
        distance over the elements of ``quantities``) and ``worst_split`` (its
        variable), ``split`` (bool: any chain flagged on ``lp`` or on a quantity).
        Without ``sample_stats.lp`` the ``lp`` entries are None and no chain is
        flagged on it.
    """
    out = {"lp_chain_mean": None, "lp_within_sd": None, "lp_split_sds": None,
           "stuck_chains": []}
    stats = tree["sample_stats"] if "sample_stats" in tree.children else None
    if stats is not None and "lp" in stats.data_vars:
        lp = np.asarray(stats["lp"].values, float)  # (chain, draw)
        means = lp.mean(axis=1)
        within = float(np.sqrt(lp.var(axis=1, ddof=1).mean()))
        dist = np.abs(means - np.median(means)) / within
        out = {"lp_chain_mean": means.tolist(), "lp_within_sd": within,
               "lp_split_sds": dist.tolist(),
               "stuck_chains": [int(i) for i in np.flatnonzero(dist > threshold)]}
    worst, worst_name = 0.0, None
    post = tree["posterior"]
    for name in quantities:
        if name not in post.data_vars:
            continue
        v = np.asarray(post[name].values, float)
        v = v.reshape(v.shape[0], v.shape[1], -1)
        m = v.mean(axis=1)  # (chain, element)
        sd = np.sqrt(v.var(axis=1, ddof=1).mean(axis=0))
        ok = sd > 0
        if not ok.any():
            continue
        z = np.abs(m[:, ok] - np.median(m[:, ok], axis=0)) / sd[ok]
        if z.max() > worst:
            worst, worst_name = float(z.max()), name
    out.update(max_split_sds=worst, worst_split=worst_name,
               split=bool(out["stuck_chains"]) or worst > threshold)
    return out
