"""Laplace-EM start for the pln / nbln outer problem: closed-form factor-analysis M-steps.

Each cell's Laplace posterior ``q(x_c) = N(x_hat_c, V_c)`` (the x block of
``(-H_c)^{-1}``, eta integrated out) stands in for the exact posterior of its latent
log-rates. With the factor form ``x_c = mu + W z_c + e_c``, ``z_c ~ N(0, I_K)``,
``e_c ~ N(0, diag(d))``, and ``z_c | x_c`` from the current globals, the expected
complete-data log likelihood

    Q(mu, W, d) = sum_c E_q[log N(x_c | mu + W z_c, diag(d))] + const

is maximized in closed form (the EM algorithm for factor analysis, Rubin & Thayer 1982,
Psychometrika 47:69, doi:10.1007/BF02293851, here with uncertain x as in the Laplace-EM
of e.g. Chiquet, Mariadassou & Robin 2018, Ann. Appl. Stat. 12:2677,
doi:10.1214/18-AOAS1177): with ``z~ = [1, z]`` and ``Lambda = [mu, W]``,

    Lambda_g = (sum_c E[x_cg z~_c'])(sum_c E[z~_c z~_c'])^{-1}
    d_g = (sum_c E[x_cg^2] - Lambda_g sum_c E[z~_c x_cg]) / N.

The statistics are sums over chunks of cells
(:meth:`scribe_stan.laplace.batched.CellChunk.em_statistics`). The priors on the globals
are left out of this M-step (N cells outweigh them); the exact L-BFGS on the full Laplace
objective that follows restores them, so the fit is still the exact Laplace MAP.
"""

from __future__ import annotations

import numpy as np

#: Floor on the residual variances d after an M-step (the outer box's lower bound).
D_FLOOR = 1e-6


def reduce_statistics(parts):
    """Sum the per-chunk statistics dicts of ``em_statistics``."""
    total = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            total[key] = total[key] + value
    return total


def m_step(stats, mu):
    """Closed-form maximizer of the expected complete-data log likelihood.

    Parameters
    ----------
    stats : dict from :func:`reduce_statistics`: ``n`` cells, sums of ``E[x]`` (G,),
        ``E[r^2]`` (G,), ``E[r z']`` (G, K), ``E[z]`` (K,), ``E[z z']`` (K, K), with
        ``r = x - mu`` at the globals the statistics were computed at.
    mu : (G,) those globals' mu (the centring of ``r``).

    Returns
    -------
    mu, W, d : (G,), (G, K), (G,) the new globals (d floored at :data:`D_FLOOR`).
    """
    n = float(stats["n"])
    K = stats["zz"].shape[0]
    S_zz = np.empty((K + 1, K + 1))
    S_zz[0, 0] = n
    S_zz[0, 1:] = S_zz[1:, 0] = stats["z"]
    S_zz[1:, 1:] = stats["zz"]
    # E[x z~'] from the centred sums: x = r + mu
    S_xz = np.column_stack([stats["x"], stats["rz"] + np.outer(mu, stats["z"])])
    Lam = np.linalg.solve(S_zz, S_xz.T).T
    S_xx = stats["rr"] + 2.0 * mu * (stats["x"] - n * mu) + n * mu**2
    d = (S_xx - np.einsum("gk,gk->g", Lam, S_xz)) / n
    return Lam[:, 0].copy(), np.ascontiguousarray(Lam[:, 1:]), np.maximum(d, D_FLOOR)
