"""GRN Lyapunov model (``stan/grn.stan``): Stan data, NumPy reference, NUTS on a network.

Model (the Stan program is the reference specification)::

    J[t, r] = J_edge[e] on the E prior edges, J[g, g] = -exp(log_gamma_g),
    log_gamma = (log_gamma_free, -sum(log_gamma_free))   (scale of (J, D) fixed)
    J Sigma + Sigma J' + 2 diag(D) = 0                    (Sigma PD iff J stable)
    eta_c ~ Normal(log M0 - log L_c, sigma_M) truncated to eta_c >= 0
    x_c = mu + L z_c,  z_c ~ N(0, I),  L L' = Sigma
    u[c, g] ~ Poisson(exp(x[c, g] - eta_c))

Priors: ``mu ~ Normal(0, 10)`` (as pln), ``J_edge[e] ~ Normal(0, edge_scale[e])`` with
``edge_scale = tau (1 + strength c_e) / (1 + strength)`` from the prior confidence
``c_e`` (confidence 1: ``tau``; the same ordering as the fast estimator's weights
``1 / (1 + strength c)``), ``log_gamma_free ~ Normal(0, 1)``,
``log D ~ Normal(LOG_D_LOC, LOG_D_SCALE)``.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg, special, stats

NAME = "grn"
STAN_FILE = "grn.stan"
MU_SCALE = 10.0
LOG_GAMMA_SCALE = 1.0
LOG_D_LOC = -1.0
LOG_D_SCALE = 1.5
#: Largest network the Stan reference is meant for (G^2 x G^2 solve per gradient).
MAX_GENES = 12


def edge_scales(confidence, *, tau=1.0, strength=10.0):
    """Prior sd of each edge's Jacobian entry from its confidence in (0, 1]."""
    c = np.asarray(confidence, float)
    return tau * (1.0 + strength * c) / (1.0 + strength)


def stan_data(counts, edge_target, edge_regulator, edge_scale, *, log_lib=None,
              log_M0=np.log(1e5), sigma_M=1.0):
    """Data dict for ``stan/grn.stan`` (edge indices 0-based here, 1-based in Stan).

    Raises
    ------
    ValueError
        More than :data:`MAX_GENES` genes, no edge, self-edges or duplicated edges,
        indices out of range.
    """
    counts = np.asarray(counts)
    N, G = counts.shape
    t = np.asarray(edge_target, int)
    r = np.asarray(edge_regulator, int)
    if G > MAX_GENES:
        raise ValueError(f"grn.stan is a reference for small networks: {G} genes > "
                         f"{MAX_GENES}; pick genes= or use method='lyapunov'")
    if t.size == 0 or t.shape != r.shape or t.shape != np.shape(edge_scale):
        raise ValueError("need at least one edge and equal-length target, regulator, scale")
    if np.any((t < 0) | (t >= G) | (r < 0) | (r >= G)) or np.any(t == r):
        raise ValueError("edge indices must lie in 0..G-1 with target != regulator")
    if len(set(zip(t, r))) != t.size:
        raise ValueError("duplicated edges")
    return {"N": int(N), "G": int(G), "counts": counts.astype(np.int64),
            "log_lib": (np.log(counts.sum(axis=1).astype(float)) if log_lib is None
                        else np.asarray(log_lib, float)),
            "log_M0": float(log_M0), "sigma_M": float(sigma_M), "E": int(t.size),
            "edge_target": (t + 1).astype(np.int64),
            "edge_regulator": (r + 1).astype(np.int64),
            "edge_scale": np.asarray(edge_scale, float)}


def jacobian(data, J_edge, log_gamma_free):
    """``J`` (G, G) from the edge values and the free log degradation rates."""
    lg = np.append(log_gamma_free, -np.sum(log_gamma_free))
    J = np.diag(-np.exp(lg))
    J[np.asarray(data["edge_target"]) - 1, np.asarray(data["edge_regulator"]) - 1] = J_edge
    return J


def log_joint(data, params):
    """NumPy reference of ``grn.stan``'s ``target`` (no Jacobian terms), all constants.

    ``params``: ``mu`` (G,), ``J_edge`` (E,), ``log_gamma_free`` (G-1,), ``log_D`` (G,),
    ``z`` (N, G), ``eta`` (N,). Returns ``-inf`` when ``J`` is unstable.
    """
    J = jacobian(data, params["J_edge"], params["log_gamma_free"])
    D = np.exp(params["log_D"])
    Sigma = linalg.solve_continuous_lyapunov(J, -2.0 * np.diag(D))
    Sigma = 0.5 * (Sigma + Sigma.T)
    try:
        L = np.linalg.cholesky(Sigma)
    except np.linalg.LinAlgError:
        return -np.inf
    a = data["log_M0"] - np.asarray(data["log_lib"])
    x = params["mu"] + params["z"] @ L.T
    eta = np.asarray(params["eta"])
    v = x - eta[:, None]
    u = np.asarray(data["counts"], float)
    lp = stats.norm.logpdf(params["mu"], 0, MU_SCALE).sum()
    lp += stats.norm.logpdf(params["J_edge"], 0, data["edge_scale"]).sum()
    lp += stats.norm.logpdf(params["log_gamma_free"], 0, LOG_GAMMA_SCALE).sum()
    lp += stats.norm.logpdf(params["log_D"], LOG_D_LOC, LOG_D_SCALE).sum()
    lp += stats.norm.logpdf(params["z"]).sum()
    lp += (stats.norm.logpdf(eta, a, data["sigma_M"])
           - stats.norm.logsf(0.0, a, data["sigma_M"])).sum()
    lp += (u * v - np.exp(v) - special.gammaln(u + 1)).sum()
    return float(lp)


def sample_network(src, idx, cand, conf, *, chains=2, draws=500, warmup=500, backend="auto",
                   tau=1.0, strength=10.0, seed=0, max_cells=500):
    """NUTS on ``grn.stan`` for the genes ``idx`` of a latent source, J on ``cand``.

    Returns a dict of (G, G) arrays ``mean``, ``lower``, ``upper`` (5% / 95%), ``z``
    (posterior mean / sd, the edge score), ``inclusion`` (posterior probability of the
    mean's sign), ``D`` (G,) posterior mean, and ``info`` (divergences, max R-hat of J,
    wall time, backend).
    """
    import arviz_stats  # noqa: F401  (rhat below)

    from scribe_stan import stan

    G = len(idx)
    t, r = np.nonzero(cand)
    if t.size == 0:
        raise ValueError("method='stan' needs at least one candidate edge in the support")
    counts = np.asarray(src.counts)[:max_cells][:, idx]
    log_lib = np.asarray(src.log_lib)[:max_cells]
    data = stan_data(counts, t, r, edge_scales(conf[t, r], tau=tau, strength=strength),
                     log_lib=log_lib, log_M0=float(np.median(src.a[:max_cells] + log_lib))
                     if src.a is not None else np.log(1e5),
                     sigma_M=float(src.sigma[0]) if src.sigma is not None else 1.0)
    init = {"mu": np.log(counts.mean(axis=0) + 0.5) + 0.0, "J_edge": np.zeros(t.size),
            "log_gamma_free": np.zeros(G - 1), "log_D": np.full(G, -1.0),
            "z": np.zeros(counts.shape), "eta": np.full(counts.shape[0], 0.5)}
    if src.a is not None:
        init["mu"] = init["mu"] + np.maximum(np.median(src.a[:max_cells]), 0.5)
        init["eta"] = np.maximum(src.a[:max_cells], 0.5)
    dr = stan.sample("grn", data, backend=backend, chains=chains, draws=draws, warmup=warmup,
                     seed=seed, inits=init)
    Je = dr.posterior["J_edge"].reshape(-1, t.size)
    out = {k: np.zeros((G, G)) for k in ("mean", "lower", "upper", "z", "inclusion")}
    mean = Je.mean(axis=0)
    out["mean"][t, r] = mean
    out["lower"][t, r] = np.quantile(Je, 0.05, axis=0)
    out["upper"][t, r] = np.quantile(Je, 0.95, axis=0)
    out["z"][t, r] = mean / np.maximum(Je.std(axis=0), 1e-12)
    out["inclusion"][t, r] = np.mean(np.sign(Je) == np.sign(mean), axis=0)
    Jm = dr.posterior["J"].reshape(-1, G, G).mean(axis=0)
    out["mean"][np.diag_indices(G)] = np.diag(Jm)
    out["D"] = dr.posterior["D"].reshape(-1, G).mean(axis=0)
    from arviz_stats.base import array_stats

    rhat = float(np.max(array_stats.rhat(dr.posterior["J_edge"], chain_axis=0, draw_axis=1)))
    out["info"] = {"divergences": int(dr.sample_stats["diverging"].sum()), "max_rhat_J": rhat,
                   "stan_wall_time_s": dr.wall_time_s, "backend": dr.backend,
                   "chains": chains, "draws": draws, "cells": int(counts.shape[0])}
    return out
