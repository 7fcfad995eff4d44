"""Numba CPU kernels of the per-cell Newton-Woodbury Laplace step (pln and nbln).

Per cell c with counts u (G,), eta prior location a_c and scale sigma_c, the latent
``z = (x, eta)`` has the log density (dropping terms constant in z)::

    f(x, eta) = sum_g l_g(v_g) - 1/2 (x - mu)' Sigma^{-1} (x - mu)
                - (eta - a_c)^2 / (2 sigma_c^2),          v = x - eta,

with the NegBinomial2 log likelihood in the log mean ``v`` (``m = exp(v)``, inverse
dispersion ``phi_g = 1/r_g``; ``phi_g = 0`` is exactly the Poisson pln model)::

    l_g(v) = u v - (u + 1/phi) log(1 + phi m)     (Poisson: u v - m)
    l_g'(v) = (u - m) / (1 + phi m)
    lambda_g = -l_g''(v) = m (1 + phi u) / (1 + phi m)^2 > 0

so f is concave in z for every phi >= 0 and Newton keeps a negative definite Hessian.
Its negative Hessian is ``-H = [[A, -lambda], [-lambda', c]]`` with
``A = diag(lambda) + Sigma^{-1}`` and ``c = sum(lambda) + 1/sigma_c^2``.
With ``Sigma = W W' + diag(d)`` all solves with A use the Woodbury identity::

    A^{-1} v = v / B + h * (W M^{-1} W' (h * v)),
    B = lambda + 1/d,   h = 1 / (1 + lambda d),   M = I_K + W' diag(lambda h) W,

and ``log det(Sigma A) = sum_g log(1 + lambda_g d_g) + log det M``; the eta direction is
the Schur complement ``s = c - lambda' A^{-1} lambda``. A Newton step costs
O(G K^2 + K^3) (forming M), memory O(G K); no G x G matrix is ever formed.
``Sigma^{-1} v = v/d - (W/d) C^{-1} W'(v/d)`` with ``C = I_K + W' diag(1/d) W`` shared
by all cells.

Outer gradient (Margossian et al. 2020, "Hamiltonian Monte Carlo using an adjoint-
differentiated Laplace approximation", NeurIPS, arXiv:2004.12550): the Laplace value
``F(theta) = f(z_hat) + consts - 1/2 log det(-H)`` has total derivative
``dF = partial_theta F + w' partial_theta grad_z f`` with the adjoint
``w = -1/2 (-H)^{-1} J' t``, ``t_g = (d lambda_g / d v_g) Var_q(v_g)`` (the derivative
of the log-determinant along the mode) and ``J = [I, -1]`` mapping z to v.

Kernel interface (shared with the CUDA backend): every public kernel takes ``inv_r``
(G,), the inverse dispersions, right after ``d``, and a per-cell eta prior scale
``sigma`` (N,) beside the per-cell location ``a`` (N,); the eta prior is
Normal(a_c, sigma_c) truncated to eta >= 0. z-independent terms of the likelihood
(``lgamma`` terms) are the caller's, passed in per-cell constants.

All kernels assume valid input (checked in scribe_stan._validate).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# Reassociation and contraction let the length-K^2 loops vectorize; NaN/Inf semantics
# are kept (no 'nnan'/'ninf') because the line search tests for non-finite values.
_FAST = {"reassoc", "contract", "nsz", "arcp"}

# ---------------------------------------------------------------- small dense helpers


@njit(cache=True, inline="always", fastmath=_FAST)
def _cholesky_inplace(M, K):
    """Lower Cholesky factor of the SPD K x K matrix M, in place. False if not SPD."""
    for j in range(K):
        s = M[j, j]
        for k in range(j):
            s -= M[j, k] * M[j, k]
        if not s > 0.0:
            return False
        ljj = math.sqrt(s)
        M[j, j] = ljj
        for i in range(j + 1, K):
            t = M[i, j]
            for k in range(j):
                t -= M[i, k] * M[j, k]
            M[i, j] = t / ljj
    for i in range(K):
        for j in range(i + 1, K):
            M[i, j] = 0.0
    return True


@njit(cache=True, inline="always", fastmath=_FAST)
def _chol_solve(L, b, K, out):
    """Solve (L L') out = b for a K-vector b."""
    for i in range(K):
        t = b[i]
        for k in range(i):
            t -= L[i, k] * out[k]
        out[i] = t / L[i, i]
    for i in range(K - 1, -1, -1):
        t = out[i]
        for k in range(i + 1, K):
            t -= L[k, i] * out[k]
        out[i] = t / L[i, i]


@njit(cache=True, inline="always", fastmath=_FAST)
def _chol_logdet(L, K):
    s = 0.0
    for k in range(K):
        s += 2.0 * math.log(L[k, k])
    return s


@njit(cache=True, inline="always", fastmath=_FAST)
def _woodbury_apply(v, Wt, diag, scale, sign, L, G, K, tmpK, tmpK2, out):
    """out = diag * v + sign * scale * (W (L L')^{-1} W' (scale * v)), O(G K + K^2).

    ``Wt = W'`` (K, G), contiguous: both products run along genes (vectorized).
    """
    for g in range(G):
        out[g] = scale[g] * v[g]
    for k in range(K):
        s = 0.0
        for g in range(G):
            s += Wt[k, g] * out[g]
        tmpK[k] = s
    _chol_solve(L, tmpK, K, tmpK2)
    for g in range(G):
        out[g] = 0.0
    for k in range(K):
        t = tmpK2[k]
        for g in range(G):
            out[g] += Wt[k, g] * t
    for g in range(G):
        out[g] = diag[g] * v[g] + sign * scale[g] * out[g]


@njit(cache=True, inline="always", fastmath=_FAST)
def _sigma_inv_apply(v, Wt, inv_d, Lc, G, K, tmpK, tmpK2, out):
    """out = Sigma^{-1} v = v/d - (W/d) C^{-1} W'(v/d), C = Lc Lc' shared by all cells."""
    _woodbury_apply(v, Wt, inv_d, inv_d, -1.0, Lc, G, K, tmpK, tmpK2, out)


@njit(cache=True, inline="always", fastmath=_FAST)
def _a_inv_apply(v, Wt, h, invB, Lm, G, K, tmpK, tmpK2, out):
    """out = A^{-1} v = v/B + h * (W M^{-1} W' (h * v)) with M = Lm Lm'."""
    _woodbury_apply(v, Wt, invB, h, 1.0, Lm, G, K, tmpK, tmpK2, out)


@njit(cache=True, inline="always", fastmath=_FAST)
def _obs_loglik(u, v, m, phi):
    """v-dependent part of the NegBinomial2 log pmf at log mean v, ``m = exp(v)``
    (Poisson at phi = 0)."""
    if phi == 0.0:
        return u * v - m
    return u * v - (u + 1.0 / phi) * math.log1p(phi * m)


@njit(cache=True, inline="always", fastmath=_FAST)
def _obs_score_curv(u, m, phi):
    """(dl/dv, -d2l/dv2) of the NegBinomial2 log pmf at mean ``m = exp(v)`` (phi = 1/r)."""
    if phi == 0.0:
        return u - m, m
    q = 1.0 + phi * m
    return (u - m) / q, m * (1.0 + phi * u) / (q * q)


@njit(cache=True, inline="always", fastmath=_FAST)
def _fill_means(x, eta, G, m):
    """m = exp(x - eta): the means, computed once per point (exp dominates the cost)."""
    for g in range(G):
        m[g] = math.exp(x[g] - eta)


@njit(cache=True, inline="always", fastmath=_FAST)
def _sum_log1p(lam, d, G):
    """``sum_g log(1 + lam_g d_g)`` with one log per four terms (exact unless the product
    of four overflows, where it falls back to one log per term)."""
    total = 0.0
    G4 = G - G % 4
    for g in range(0, G4, 4):
        p = ((1.0 + lam[g] * d[g]) * (1.0 + lam[g + 1] * d[g + 1])
             * (1.0 + lam[g + 2] * d[g + 2]) * (1.0 + lam[g + 3] * d[g + 3]))
        if p < 1e300:
            total += math.log(p)
        else:
            for j in range(g, g + 4):
                total += math.log1p(lam[j] * d[j])
    for g in range(G4, G):
        total += math.log1p(lam[g] * d[g])
    return total


@njit(cache=True, inline="always", fastmath=_FAST)
def _cell_terms(u, m, inv_r, d, G, score, lam, h, invB):
    """Fill the score dl/dv, lambda, h = 1/(1 + lambda d) and 1/B = d h at means m."""
    for g in range(G):
        sg, lg = _obs_score_curv(u[g], m[g], inv_r[g])
        score[g] = sg
        lam[g] = lg
        hg = 1.0 / (1.0 + lg * d[g])
        h[g] = hg
        invB[g] = d[g] * hg  # 1 / (lambda + 1/d)


@njit(cache=True, inline="always", fastmath=_FAST)
def _factor_m(Mf, K, Lm):
    """Lm = Cholesky factor of ``I + Mf`` (Mf the K*K entries of ``W' diag(lambda h) W``)."""
    for k in range(K):
        for j in range(K):
            Lm[k, j] = Mf[k * K + j]
        Lm[k, k] += 1.0
    return _cholesky_inplace(Lm, K)


@njit(cache=True, inline="always", fastmath=_FAST)
def _curvature(u, m, inv_r, W, d, WW, G, K, score, lam, h, invB, Mf, Lm):
    """Fill the score dl/dv, lambda, h, 1/B and the Cholesky factor of M at means m.

    False if the Cholesky factorization of M fails. ``WW[g, k*K + j] = W[g, k] W[g, j]``
    turns the G x K^2 work of forming M into one contiguous (vectorizable) loop per gene.
    """
    _cell_terms(u, m, inv_r, d, G, score, lam, h, invB)
    KK = K * K
    for kj in range(KK):
        Mf[kj] = 0.0
    for g in range(G):
        wg = lam[g] * h[g]
        for kj in range(KK):
            Mf[kj] += wg * WW[g, kj]
    return _factor_m(Mf, K, Lm)


@njit(cache=True, inline="always", fastmath=_FAST)
def _log_density(u, x, eta, m, mu, Wt, inv_d, inv_r, Lc, a, inv_sig2, G, K, r, alpha, tmpK,
                 tmpK2):
    """f(x, eta) without z-independent constants, ``m = exp(x - eta)``; fills
    r = x - mu, alpha = Sigma^{-1} r."""
    lik = 0.0
    for g in range(G):
        lik += _obs_loglik(u[g], x[g] - eta, m[g], inv_r[g])
    q = _residual_alpha(x, mu, Wt, inv_d, Lc, G, K, r, alpha, tmpK, tmpK2)
    return lik - 0.5 * q - 0.5 * (eta - a) ** 2 * inv_sig2, q


@njit(cache=True, inline="always", fastmath=_FAST)
def _residual_alpha(x, mu, Wt, inv_d, Lc, G, K, r, alpha, tmpK, tmpK2):
    """Fill r = x - mu and alpha = Sigma^{-1} r; return the quadratic form r' alpha."""
    for g in range(G):
        r[g] = x[g] - mu[g]
    _sigma_inv_apply(r, Wt, inv_d, Lc, G, K, tmpK, tmpK2, alpha)
    q = 0.0
    for g in range(G):
        q += r[g] * alpha[g]
    return q


# ---------------------------------------------------------------- per-cell Newton


#: Outcomes of one Newton iteration (:func:`_newton_iteration`).
STEP_CONTINUE, STEP_CONVERGED, STEP_STOPPED, STEP_FAILED = 0, 1, 2, 3


@njit(cache=True, inline="always", fastmath=_FAST)
def _newton_iteration(u, a, inv_sig2, mu, Wt, inv_d, inv_r, Lc, x, eta, m, f, fix_eta, tol,
                      ws_G, ws_K, Lm, G, K):
    """One projected damped Newton iteration with Armijo line search; x, m updated in place.

    Expects in ``ws_G`` the score, lambda, h, 1/B at (x, eta) (:func:`_cell_terms`) and
    ``alpha = Sigma^{-1}(x - mu)``; ``m = exp(x - eta)``; ``Lm`` the Cholesky factor of
    M; ``f`` the log density at (x, eta). On return with STEP_CONTINUE, ``f``, ``m`` and
    ``alpha`` are those of the new point. Returns (outcome, eta, f, at_bound): outcome
    STEP_CONVERGED, STEP_CONTINUE, or STEP_STOPPED (no acceptable step at a gain above
    1e3 tol).
    """
    lam, h, invB, gx, r, alpha, dx, phi = (ws_G[0], ws_G[1], ws_G[2], ws_G[3], ws_G[4],
                                           ws_G[5], ws_G[6], ws_G[7])
    xn, score, mn = ws_G[8], ws_G[9], ws_G[10]
    tmpK, tmpK2 = ws_K[0], ws_K[1]
    at_bound = False
    sum_lam = 0.0
    resid = 0.0
    for g in range(G):
        gx[g] = score[g] - alpha[g]
        sum_lam += lam[g]
        resid += score[g]
    g_eta = -resid - (eta - a) * inv_sig2
    _a_inv_apply(gx, Wt, h, invB, Lm, G, K, tmpK, tmpK2, dx)  # psi = A^{-1} gx
    d_eta = 0.0
    if not fix_eta:
        _a_inv_apply(lam, Wt, h, invB, Lm, G, K, tmpK, tmpK2, phi)  # A^{-1} lambda
        s = sum_lam + inv_sig2
        lpsi = 0.0
        for g in range(G):
            s -= lam[g] * phi[g]
            lpsi += lam[g] * dx[g]
        d_eta = (g_eta + lpsi) / s
        if eta <= 0.0 and d_eta < 0.0:
            d_eta = 0.0  # bound active: x-only step
            at_bound = True
        else:
            for g in range(G):
                dx[g] += phi[g] * d_eta
    dec = g_eta * d_eta
    for g in range(G):
        dec += gx[g] * dx[g]
    if 0.5 * dec < tol:
        # Converged (half the Newton decrement is the predicted gain). Tested before
        # the line search: with tiny d, f sums large cancelling terms and its rounding
        # noise can exceed tol, so an Armijo test on f cannot confirm such a step.
        for g in range(G):
            x[g] += dx[g]
        eta = max(eta + d_eta, 0.0)
        return STEP_CONVERGED, eta, f, at_bound and eta == 0.0
    # Backtracking line search (Armijo), eta projected onto [0, inf).
    t = 1.0
    for _ls in range(60):
        for g in range(G):
            xn[g] = x[g] + t * dx[g]
        en = eta + t * d_eta
        if en < 0.0:
            en = 0.0
        _fill_means(xn, en, G, mn)
        fn, _ = _log_density(u, xn, en, mn, mu, Wt, inv_d, inv_r, Lc, a, inv_sig2, G, K, r,
                             alpha, tmpK, tmpK2)
        if math.isfinite(fn) and fn >= f + 1e-4 * t * dec - 1e-12 * abs(f):
            for g in range(G):
                x[g] = xn[g]
                m[g] = mn[g]
            if t < 1.0 and 0.5 * dec < 1e3 * tol:
                # Near the mode Newton's full step always passes Armijo; a backtrack at a
                # predicted gain this small is the rounding noise of f (or its gradient).
                return STEP_CONVERGED, en, fn, at_bound and en == 0.0
            return STEP_CONTINUE, en, fn, at_bound
        t *= 0.5
    # No acceptable step. Restore alpha for x (the line search overwrote it) and stop.
    _log_density(u, x, eta, m, mu, Wt, inv_d, inv_r, Lc, a, inv_sig2, G, K, r, alpha, tmpK,
                 tmpK2)
    return (STEP_CONVERGED if dec < 1e3 * tol else STEP_STOPPED), eta, f, at_bound


@njit(cache=True, fastmath=_FAST)
def _newton_cell(u, a, inv_sig2, mu, Wt, d, inv_r, WW, inv_d, Lc, x, eta0, fix_eta, tol,
                 max_iter, ws_G, ws_K, Mf, Lm):
    """Projected damped Newton on (x, eta) for one cell; x updated in place.

    Returns (eta, n_iter, converged, at_bound). With ``fix_eta`` only x moves.
    """
    K, G = Wt.shape
    eta = eta0
    at_bound = False
    m = ws_G[11]
    _fill_means(x, eta, G, m)
    f, _ = _log_density(u, x, eta, m, mu, Wt, inv_d, inv_r, Lc, a, inv_sig2, G, K, ws_G[4],
                        ws_G[5], ws_K[0], ws_K[1])
    for it in range(max_iter):
        if not _curvature(u, m, inv_r, Wt, d, WW, G, K, ws_G[9], ws_G[0], ws_G[1], ws_G[2], Mf,
                          Lm):
            return eta, it, False, at_bound
        out, eta, f, at_bound = _newton_iteration(u, a, inv_sig2, mu, Wt, inv_d, inv_r, Lc, x,
                                                  eta, m, f, fix_eta, tol, ws_G, ws_K, Lm, G, K)
        if out != STEP_CONTINUE:
            return eta, it + 1, out == STEP_CONVERGED, at_bound
    return eta, max_iter, False, at_bound


@njit(parallel=True, cache=True, fastmath=_FAST)
def newton_all(counts, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta, fix_eta, tol, max_iter,
               n_chunks):
    """Per-cell Newton for all cells in parallel; x (N, G) and eta (N,) updated in place.

    Parameters
    ----------
    counts : (N, G) float64;  a, sigma : (N,) eta prior location and scale per cell
    mu : (G,);  W : (G, K);  d : (G,);  inv_r : (G,) inverse dispersions (0: Poisson)
    WW : (G, K*K) pair products of W;  Lc : (K, K) Cholesky factor of I + W' W / d
    x : (N, G), eta : (N,) starting points, overwritten with the modes
    fix_eta : bool, hold eta at its given values;  tol, max_iter : Newton stopping rule
    n_chunks : work blocks (a few per thread) that balance cells of unequal cost.

    Returns
    -------
    n_iter (N,) int64, converged (N,) bool, at_bound (N,) bool.
    """
    N, G = counts.shape
    K = W.shape[1]
    Wt = np.ascontiguousarray(W.T)
    inv_d = 1.0 / d
    n_iter = np.zeros(N, np.int64)
    converged = np.zeros(N, np.bool_)
    at_bound = np.zeros(N, np.bool_)
    n_chunks = max(1, min(N, n_chunks))
    for ch in prange(n_chunks):
        ws_G = np.empty((12, G))
        ws_K = np.empty((2, K))
        Lm = np.empty((K, K))
        Mf = np.empty(K * K)
        for c in range(ch * N // n_chunks, (ch + 1) * N // n_chunks):
            inv_sig2 = 1.0 / (sigma[c] * sigma[c])
            e, it, ok, bd = _newton_cell(counts[c], a[c], inv_sig2, mu, Wt, d, inv_r, WW, inv_d,
                                         Lc, x[c], eta[c], fix_eta, tol, max_iter, ws_G, ws_K,
                                         Mf, Lm)
            eta[c] = e
            n_iter[c] = it
            converged[c] = ok
            at_bound[c] = bd
    return n_iter, converged, at_bound


# ---------------------------------------------------------------- value and gradient


@njit(cache=True, inline="always", fastmath=_FAST)
def _cell_value_grad(u, xc, e, mc, a, inv_sig2, const, mu, Wt, d, inv_d, inv_r, Lc, Lm,
                     logdet_m, qrow, fix_eta, want_grad, want_grad_r, ws_G, ws_K, acc_mu, acc_W,
                     acc_d, acc_r):
    """Laplace log marginal of one cell at its mode, and its gradient added to the acc_*.

    Expects ``mc = exp(xc - e)``, in ``ws_G`` rows 0-3 the score, lambda, h, 1/B at the
    mode (:func:`_cell_terms`), ``Lm`` the Cholesky factor of M with ``logdet_m = log det M``
    and ``qrow[g] = W_g M^{-1} W_g'``. The explicit ``sum (lambda h) M^{-1}`` term of the
    W gradient is left to the caller. Returns the value.
    """
    K, G = Wt.shape
    lam, h, invB, r, alpha, phi, t = (ws_G[1], ws_G[2], ws_G[3], ws_G[4], ws_G[5], ws_G[6],
                                      ws_G[7])
    var_v, wx, beta, gam = ws_G[8], ws_G[9], ws_G[10], ws_G[11]
    tmpK, tmpK2, ka, kb, kg = ws_K[0], ws_K[1], ws_K[2], ws_K[3], ws_K[4]
    f, q = _log_density(u, xc, e, mc, mu, Wt, inv_d, inv_r, Lc, a, inv_sig2, G, K, r, alpha,
                        tmpK, tmpK2)
    lik_f = f + 0.5 * q + 0.5 * (e - a) ** 2 * inv_sig2
    logdet = logdet_m + _sum_log1p(lam, d, G)
    val = const + lik_f - 0.5 * q - 0.5 * logdet
    s = 1.0
    if not fix_eta:
        _a_inv_apply(lam, Wt, h, invB, Lm, G, K, tmpK, tmpK2, phi)
        s = inv_sig2
        for g in range(G):
            s += lam[g] * (1.0 - phi[g])
        val += -0.5 * (e - a) ** 2 * inv_sig2 - 0.5 * math.log(s)
    if not want_grad:
        return val
    for g in range(G):
        qg = qrow[g]
        vg = invB[g] + h[g] * h[g] * qg
        if not fix_eta:
            vg += (phi[g] - 1.0) ** 2 / s
        var_v[g] = vg
        # t_g = (d lambda_g / d v_g) Var_q(v_g): derivative of log det(-H) along v;
        # d lambda / d v = lambda (1 - phi m) / (1 + phi m) (= lambda for Poisson).
        pg = inv_r[g]
        if pg == 0.0:
            t[g] = lam[g] * vg
        else:
            pm = pg * mc[g]
            t[g] = lam[g] * (1.0 - pm) / (1.0 + pm) * vg
        # Explicit partial of -1/2 log det(Sigma A) w.r.t. d_g.
        wg = lam[g] * h[g]
        acc_d[g] += -0.5 * wg + 0.5 * wg * wg * qg
    # Adjoint w = -1/2 (-H)^{-1} J' t: x part in wx, eta part w_eta.
    _a_inv_apply(t, Wt, h, invB, Lm, G, K, tmpK, tmpK2, wx)
    w_eta = 0.0
    if not fix_eta:
        d_eta = 0.0
        for g in range(G):
            d_eta += lam[g] * wx[g] - t[g]
        d_eta /= s
        for g in range(G):
            wx[g] += phi[g] * d_eta
        w_eta = -0.5 * d_eta
    for g in range(G):
        wx[g] *= -0.5
    # log r_g enters through l_g only: explicit d l / d log r, the curvature in
    # -1/2 log det(-H), and the score in grad_z f (weighted by the adjoint).
    if want_grad_r:
        for g in range(G):
            pg = inv_r[g]
            if pg == 0.0:
                continue
            ug = u[g]
            m = mc[g]
            q1 = 1.0 + pg * m
            dlik = m * (1.0 + pg * ug) / q1 - math.log1p(pg * m) / pg
            dlam = -pg * m * (ug * q1 - 2.0 * m * (1.0 + pg * ug)) / (q1 * q1 * q1)
            dscore = pg * (ug - m) * m / (q1 * q1)
            acc_r[g] += dlik - 0.5 * var_v[g] * dlam + (wx[g] - w_eta) * dscore
    _sigma_inv_apply(wx, Wt, inv_d, Lc, G, K, tmpK, tmpK2, beta)
    if not fix_eta:
        _sigma_inv_apply(phi, Wt, inv_d, Lc, G, K, tmpK, tmpK2, gam)
    for k in range(K):
        ka[k] = 0.0
        kb[k] = 0.0
        kg[k] = 0.0
    for k in range(K):
        for g in range(G):
            ka[k] += Wt[k, g] * alpha[g]
            kb[k] += Wt[k, g] * beta[g]
            if not fix_eta:
                kg[k] += Wt[k, g] * gam[g]
    inv_s = 1.0 / s
    for g in range(G):
        acc_mu[g] += alpha[g] + beta[g]
        ag = alpha[g]
        bg = beta[g]
        dd = 0.5 * ag * ag + ag * bg
        if not fix_eta:
            gg = gam[g]
            dd += 0.5 * gg * gg * inv_s
            for k in range(K):
                acc_W[g, k] += ag * (ka[k] + kb[k]) + bg * ka[k] + gg * kg[k] * inv_s
        else:
            for k in range(K):
                acc_W[g, k] += ag * (ka[k] + kb[k]) + bg * ka[k]
        acc_d[g] += dd
    return val


@njit(cache=True)
def gradient_accumulators(n_blocks, G, K):
    """Zeroed per-block sums of the gradient in mu, d, log r (n_blocks, G) and W
    (n_blocks, G, K): each parallel block adds its cells into its own row."""
    return (np.zeros((n_blocks, G)), np.zeros((n_blocks, G)), np.zeros((n_blocks, G)),
            np.zeros((n_blocks, G, K)))


@njit(parallel=True, cache=True, fastmath=_FAST)
def laplace_value_grad(counts, const, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta, fix_eta,
                       want_grad, n_chunks, want_grad_r=True):
    """Laplace log marginal per cell at the modes (x, eta), and its exact theta-gradient.

    Parameters
    ----------
    counts : (N, G) float64
    const : (N,) float64
        Per-cell z-independent terms: the likelihood's
        ``sum_g [lgamma(u + r) - lgamma(r) - lgamma(u + 1) - u log r]``
        (``-sum_g lgamma(u + 1)`` for Poisson) plus, unless ``fix_eta``, the eta prior's
        ``-1/2 log(2 pi sigma_c^2) - log Phi(a_c / sigma_c)`` and the ``1/2 log(2 pi)``
        of the eta integral.
    a, sigma : (N,) eta prior location and scale per cell.
    mu : (G,);  W : (G, K);  d : (G,);  inv_r : (G,) inverse dispersions (0: Poisson).
    WW : (G, K*K);  Lc : (K, K) as in :func:`newton_all`.
    x, eta : modes from :func:`newton_all` (same ``fix_eta``).
    fix_eta : bool
        True: marginalize x only at the given eta (Stan's embedded Laplace target).
        False: marginalize (x, eta) jointly.
    want_grad : bool;  n_chunks : int, work blocks.
    want_grad_r : bool
        Also the gradient in log r (skipped, left zero, for a held dispersion).

    Returns
    -------
    value : (N,) Laplace log marginal of each cell
    g_mu : (G,), g_W : (G, K), g_d : (G,)
        Gradient of ``sum(value)`` (zeros unless ``want_grad``).
    g_log_r : (G,)
        Gradient of ``sum(value)`` w.r.t. ``log r_g = -log inv_r_g`` through the
        v-dependent likelihood, the curvature in the log-determinant and the mode;
        the gradient of the z-independent terms in ``const``,
        ``sum_c [r (psi(u + r) - psi(r)) - u]``, is the caller's. Zero where
        ``inv_r == 0``. (Output appended beyond the shared kernel contract.)
    """
    N, G = counts.shape
    K = W.shape[1]
    Wt = np.ascontiguousarray(W.T)
    inv_d = 1.0 / d
    value = np.empty(N)
    n_chunks = max(1, min(N, n_chunks))
    acc_mu, acc_d, acc_r, acc_W = gradient_accumulators(n_chunks, G, K)
    # sum_c (lambda h)_g M_c^{-1}, contracted with W at the end (gradient of log det M)
    acc_R = np.zeros((n_chunks, G, K * K)) if want_grad else np.zeros((1, 1, 1))
    for ch in prange(n_chunks):
        ws_G = np.empty((12, G))
        ws_K = np.empty((5, K))
        Minv = np.empty(K * K)
        Mf = np.empty(K * K)
        Lm = np.empty((K, K))
        qrow = np.empty(G)
        mc = np.empty(G)
        for c in range(ch * N // n_chunks, (ch + 1) * N // n_chunks):
            u = counts[c]
            xc = x[c]
            e = eta[c]
            _fill_means(xc, e, G, mc)
            _curvature(u, mc, inv_r, W, d, WW, G, K, ws_G[0], ws_G[1], ws_G[2], ws_G[3], Mf, Lm)
            if want_grad:
                # M^{-1} column by column (K^3), then q_g = W_g M^{-1} W_g' = WW[g] . Minv
                for k in range(K):
                    for j in range(K):
                        ws_K[0, j] = 0.0
                    ws_K[0, k] = 1.0
                    _chol_solve(Lm, ws_K[0], K, ws_K[1])
                    for j in range(K):
                        Minv[k * K + j] = ws_K[1, j]
                for g in range(G):
                    qg = 0.0
                    wg = ws_G[1, g] * ws_G[2, g]
                    for kj in range(K * K):
                        qg += WW[g, kj] * Minv[kj]
                        acc_R[ch, g, kj] += wg * Minv[kj]
                    qrow[g] = qg
            value[c] = _cell_value_grad(u, xc, e, mc, a[c], 1.0 / (sigma[c] * sigma[c]),
                                        const[c], mu, Wt, d, inv_d, inv_r, Lc, Lm,
                                        _chol_logdet(Lm, K),
                                        qrow, fix_eta, want_grad, want_grad_r, ws_G, ws_K,
                                        acc_mu[ch], acc_W[ch], acc_d[ch], acc_r[ch])
    g_mu = np.zeros(G)
    g_d = np.zeros(G)
    g_log_r = np.zeros(G)
    g_W = np.zeros((G, K))
    for ch in range(n_chunks):
        g_mu += acc_mu[ch]
        g_d += acc_d[ch]
        g_log_r += acc_r[ch]
        g_W += acc_W[ch]
        if want_grad:
            for g in range(G):
                for k in range(K):
                    sk = 0.0
                    for j in range(K):
                        sk += W[g, j] * acc_R[ch, g, j * K + k]
                    g_W[g, k] -= sk
    return value, g_mu, g_W, g_d, g_log_r


@njit(cache=True, fastmath=_FAST)
def _prior_terms(W, d, Lc):
    """``(W' contiguous, 1/d, log det Sigma)`` of ``Sigma = W W' + diag(d)``."""
    logdet_sigma = _chol_logdet(Lc, W.shape[1])
    for g in range(d.shape[0]):
        logdet_sigma += math.log(d[g])
    return np.ascontiguousarray(W.T), 1.0 / d, logdet_sigma


@njit(cache=True, fastmath=_FAST)
def _cell_gaussian(u, xc, etac, inv_r, Wt, d, WW, G, K, inv_sig2, logdet_sigma, score, lam,
                   h, invB, phi, Mf, Lm, m, tmpK, tmpK2):
    """The Laplace Gaussian of one cell at ``(xc, etac)``: fills score, lambda, h, 1/B,
    Lm (factor of M) and ``phi = A^{-1} lambda``; returns ``(s, log det(-H), sum lambda)``
    with ``s`` the Schur complement of the eta direction."""
    _fill_means(xc, etac, G, m)
    _curvature(u, m, inv_r, Wt, d, WW, G, K, score, lam, h, invB, Mf, Lm)
    _a_inv_apply(lam, Wt, h, invB, Lm, G, K, tmpK, tmpK2, phi)
    s = inv_sig2
    logdet_h = _chol_logdet(Lm, K) - logdet_sigma
    sum_lam = 0.0
    for g in range(G):
        s += lam[g] * (1.0 - phi[g])
        logdet_h += math.log1p(lam[g] * d[g])
        sum_lam += lam[g]
    return s, logdet_h + math.log(s), sum_lam  # log det(-H) = log det A + log s


@njit(cache=True, fastmath=_FAST)
def _draw_cell(u, xm, em, a, inv_sig2, eps_G, eps_K, eps_eta, W, Wt, inv_d, Lc, lam, h,
               invB, phi, Lm, s, sum_lam, mu_t, Wt_t, inv_d_t, Lc_t, inv_r_t, G, K, dx, xs,
               r, alpha, tmpK, tmpK2):
    """One draw ``z = (xm, em) + dz`` from the cell's Gaussian of precision ``-H`` (from
    :func:`_cell_gaussian`; ``W``, ``Wt``, ``inv_d``, ``Lc`` the globals it was formed
    at), scored under the target globals ``(mu_t, Wt_t, inv_d_t, Lc_t, inv_r_t)``.

    ``A^{-1} = B^{-1} + (h W) M^{-1} (h W)'`` is a sum of two PSD terms, so
    ``eps_G / sqrt(B) + h * (W L_M^{-T} eps_K)`` has covariance A^{-1}; then
    ``eta - em = eps_eta / sqrt(s)`` and x adds ``phi (eta - em)`` (the Schur
    complement). Fills ``xs`` with the drawn x; returns ``(eta, log likelihood,
    log density core, dz' (-H) dz)``: the core is ``lik - 1/2 r' Sigma_t^{-1} r - (eta -
    a)^2 / (2 sigma^2)`` without constants, ``r = x - mu_t``.
    """
    # L_M^{-T} eps_K by back substitution with the lower factor.
    for k in range(K - 1, -1, -1):
        tt = eps_K[k]
        for j in range(k + 1, K):
            tt -= Lm[j, k] * tmpK[j]
        tmpK[k] = tt / Lm[k, k]
    de = eps_eta / math.sqrt(s)
    e = em + de
    lik = 0.0
    quad_lam = 0.0
    lam_dx = 0.0
    for g in range(G):
        sg = 0.0
        for k in range(K):
            sg += W[g, k] * tmpK[k]
        dx[g] = eps_G[g] * math.sqrt(invB[g]) + h[g] * sg + phi[g] * de
        xs[g] = xm[g] + dx[g]
        lik += _obs_loglik(u[g], xs[g] - e, math.exp(xs[g] - e), inv_r_t[g])
        r[g] = xs[g] - mu_t[g]
        quad_lam += lam[g] * dx[g] * dx[g]
        lam_dx += lam[g] * dx[g]
    # log N(x | mu, Sigma) needs r' Sigma_t^{-1} r; the Gaussian needs dx' Sigma^{-1} dx.
    _sigma_inv_apply(r, Wt_t, inv_d_t, Lc_t, G, K, tmpK, tmpK2, alpha)
    q = 0.0
    for g in range(G):
        q += r[g] * alpha[g]
    _sigma_inv_apply(dx, Wt, inv_d, Lc, G, K, tmpK, tmpK2, alpha)
    qd = quad_lam
    for g in range(G):
        qd += dx[g] * alpha[g]
    # dz' (-H) dz = dx' A dx - 2 de lambda'dx + (sum(lambda) + 1/sigma_c^2) de^2
    qd += -2.0 * de * lam_dx + (sum_lam + inv_sig2) * de * de
    return e, lik, lik - 0.5 * q - 0.5 * (e - a) ** 2 * inv_sig2, qd


@njit(parallel=True, cache=True, fastmath=_FAST)
def sample_cells(counts, const, lgam, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta, genes, eps_G,
                 eps_K, eps_eta, out_x, out_eta, out_loglik, out_lp, out_lp_approx):
    """Draws from each cell's Gaussian N(z_hat, (-H)^{-1}) through the Woodbury square root
    (:func:`_draw_cell`).

    Each draw is formed over all G genes, so the per-cell log likelihood, the exact log
    density ``lp`` (all constants) and the Gaussian's log density ``lp_approx`` are
    exact; only the genes in ``genes`` are stored.

    Parameters
    ----------
    counts : (N, G) float64;  const : (N,) joint constants as in laplace_value_grad
    lgam : (N,) the likelihood's z-independent terms (``const`` without the eta prior's),
        completing the per-cell log likelihood
    a, sigma : (N,) eta prior location and scale;  inv_r : (G,) inverse dispersions
    x : (N, G), eta : (N,) modes;  genes : (Gs,) int64 indices of genes to store
    eps_G : (S, N, G), eps_K : (S, N, K), eps_eta : (S, N) standard normal variates.
    out_x : (S, N, Gs), out_eta, out_loglik, out_lp, out_lp_approx : (S, N), filled.
    """
    S, N, G = eps_G.shape
    K = W.shape[1]
    Gs = genes.shape[0]
    Wt, inv_d, logdet_sigma = _prior_terms(W, d, Lc)
    half_log_2pi = 0.5 * math.log(2.0 * math.pi)
    for c in prange(N):
        u = counts[c]
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        ws = np.empty((8, G))
        score, lam, h, invB, phi, dx, xs, r = (ws[0], ws[1], ws[2], ws[3], ws[4], ws[5],
                                               ws[6], ws[7])
        alpha = np.empty(G)
        Lm = np.empty((K, K))
        Mf = np.empty(K * K)
        tmpK = np.empty(K)
        tmpK2 = np.empty(K)
        s, logdet_h, sum_lam = _cell_gaussian(u, x[c], eta[c], inv_r, Wt, d, WW, G, K,
                                              inv_sig2, logdet_sigma, score, lam, h, invB,
                                              phi, Mf, Lm, xs, tmpK, tmpK2)
        # const holds the likelihood's constants, the eta prior normalizer and +1/2 log 2 pi.
        lp_const = const[c] - (G + 1) * half_log_2pi - 0.5 * logdet_sigma
        lpa_const = -(G + 1) * half_log_2pi + 0.5 * logdet_h
        for i in range(S):
            e, lik, core, qd = _draw_cell(u, x[c], eta[c], a[c], inv_sig2, eps_G[i, c],
                                          eps_K[i, c], eps_eta[i, c], W, Wt, inv_d, Lc, lam,
                                          h, invB, phi, Lm, s, sum_lam, mu, Wt, inv_d, Lc,
                                          inv_r, G, K, dx, xs, r, alpha, tmpK, tmpK2)
            _store_draw(out_x, out_eta, out_loglik, out_lp, out_lp_approx, i, c, genes, Gs,
                        xs, e, lik + lgam[c], lp_const + core, lpa_const - 0.5 * qd)


@njit(cache=True)
def _store_draw(out_x, out_eta, out_loglik, out_lp, out_lp_approx, i, c, genes, Gs, xs, e,
                loglik, lp, lp_approx):
    out_eta[i, c] = e
    out_loglik[i, c] = loglik
    for j in range(Gs):
        out_x[i, c, j] = xs[genes[j]]
    out_lp[i, c] = lp if e >= 0.0 else -np.inf  # outside the truncated prior's support
    out_lp_approx[i, c] = lp_approx


@njit(parallel=True, cache=True, fastmath=_FAST)
def nested_sample_cells(counts, const, lgam, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta,
                        fix_eta, genes, mu_s, Wt_s, inv_d_s, inv_r_s, Lc_s, logdet_sigma_s,
                        eps_G, eps_K, eps_eta, out_x, out_eta, out_loglik, out_lp,
                        out_lp_approx):
    """Per-cell draws at drawn globals ``theta_s`` with the Hessian held at the MAP.

    For each cell the negative Hessian ``-H`` at its mode ``z_hat`` under the MAP
    globals ``(mu, W, d, inv_r)`` is factored once. At each draw ``i`` the mode is moved
    by one Newton step with that Hessian, ``z_i = z_hat + (-H)^{-1} grad f_i(z_hat)``
    (``f_i`` the cell's log density at ``theta_i``; eta's step is projected onto
    ``eta >= 0``, and zero with ``fix_eta``), then z is drawn from ``N(z_i, (-H)^{-1})``
    (:func:`_draw_cell`) and scored under ``theta_i``. The mode's error is second order
    in the globals' shift, as for a full Newton step; the Gaussian's covariance is the
    MAP's, exact to first order.

    Parameters
    ----------
    counts, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta, genes : as in :func:`sample_cells`
        (the MAP's globals and modes).
    const, lgam : (S, N) as in :func:`sample_cells` at each draw's dispersions.
    fix_eta : bool, eta held at ``eta`` (a cascade) in the mode step.
    mu_s : (S, G);  Wt_s : (S, K, G) contiguous loadings transposed;  inv_d_s, inv_r_s :
        (S, G);  Lc_s : (S, K, K) factors of ``I + W_s' diag(1/d_s) W_s``;
        logdet_sigma_s : (S,) ``log det Sigma_s``: the drawn globals.
    eps_G, eps_K, eps_eta, out_* : as in :func:`sample_cells`.
    """
    S, N, G = eps_G.shape
    K = W.shape[1]
    Gs = genes.shape[0]
    Wt, inv_d, logdet_sigma = _prior_terms(W, d, Lc)
    half_log_2pi = 0.5 * math.log(2.0 * math.pi)
    for c in prange(N):
        u = counts[c]
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        ws = np.empty((11, G))
        score, lam, h, invB, phi, dx, xs, r, gx, xm, m = (ws[0], ws[1], ws[2], ws[3], ws[4],
                                                          ws[5], ws[6], ws[7], ws[8], ws[9],
                                                          ws[10])
        alpha = np.empty(G)
        Lm = np.empty((K, K))
        Mf = np.empty(K * K)
        tmpK = np.empty(K)
        tmpK2 = np.empty(K)
        s, logdet_h, sum_lam = _cell_gaussian(u, x[c], eta[c], inv_r, Wt, d, WW, G, K,
                                              inv_sig2, logdet_sigma, score, lam, h, invB,
                                              phi, Mf, Lm, m, tmpK, tmpK2)
        lpa_const = -(G + 1) * half_log_2pi + 0.5 * logdet_h
        for i in range(S):
            # gradient of f_i at the MAP mode: likelihood score at theta_i's dispersions
            # minus Sigma_i^{-1} (x - mu_i); eta's is the score's negated sum and prior
            resid = 0.0
            for g in range(G):
                sg, _ = _obs_score_curv(u[g], m[g], inv_r_s[i, g])
                resid += sg
                gx[g] = sg
                r[g] = x[c, g] - mu_s[i, g]
            _sigma_inv_apply(r, Wt_s[i], inv_d_s[i], Lc_s[i], G, K, tmpK, tmpK2, alpha)
            for g in range(G):
                gx[g] -= alpha[g]
            _a_inv_apply(gx, Wt, h, invB, Lm, G, K, tmpK, tmpK2, dx)  # A^{-1} g_x
            d_eta = 0.0
            if not fix_eta:
                lpsi = 0.0
                for g in range(G):
                    lpsi += lam[g] * dx[g]
                d_eta = max((-resid - (eta[c] - a[c]) * inv_sig2 + lpsi) / s, -eta[c])
            for g in range(G):
                xm[g] = x[c, g] + dx[g] + phi[g] * d_eta
            e, lik, core, qd = _draw_cell(u, xm, eta[c] + d_eta, a[c], inv_sig2, eps_G[i, c],
                                          eps_K[i, c], eps_eta[i, c], W, Wt, inv_d, Lc, lam,
                                          h, invB, phi, Lm, s, sum_lam, mu_s[i], Wt_s[i],
                                          inv_d_s[i], Lc_s[i], inv_r_s[i], G, K, dx, xs, r,
                                          alpha, tmpK, tmpK2)
            lp_const = const[i, c] - (G + 1) * half_log_2pi - 0.5 * logdet_sigma_s[i]
            _store_draw(out_x, out_eta, out_loglik, out_lp, out_lp_approx, i, c, genes, Gs,
                        xs, e, lik + lgam[i, c], lp_const + core, lpa_const - 0.5 * qd)


@njit(parallel=True, cache=True, fastmath=_FAST)
def log_density_cells(counts, a, sigma, mu, W, d, inv_r, Lc, x, eta):
    """Per-cell ``sum_g l_g(x_g - eta) - 1/2 r' Sigma^{-1} r - (eta - a)^2 / (2 sigma^2)``.

    The z-dependent part of the joint log density of (x_c, eta_c) given the globals
    (``l_g`` the v-dependent NegBinomial2 / Poisson term, see the module docstring);
    :meth:`scribe_stan.laplace.solver.LaplaceProblem.log_joint` adds the constants.
    """
    N, G = counts.shape
    K = W.shape[1]
    Wt = np.ascontiguousarray(W.T)
    inv_d = 1.0 / d
    out = np.empty(N)
    for c in prange(N):
        r = np.empty(G)
        alpha = np.empty(G)
        tmpK = np.empty(K)
        tmpK2 = np.empty(K)
        m = np.empty(G)
        _fill_means(x[c], eta[c], G, m)
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        out[c], _ = _log_density(counts[c], x[c], eta[c], m, mu, Wt, inv_d, inv_r, Lc, a[c],
                                 inv_sig2, G, K, r, alpha, tmpK, tmpK2)
    return out
