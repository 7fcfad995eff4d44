"""Numba CPU kernels of the per-cell Laplace step for the composition block of lnm/lnmvcp.

Genes are ordered so the reference gene is left out: per cell the kernels see the
non-reference counts ``u`` (D = G - 1) and the total ``u_T`` (reference included). With
ALR coordinates ``y`` (D,), proportions ``p_j = exp(y_j - logZ)``, ``logZ = log(1 +
sum_j exp(y_j))`` and ``rho_ref = exp(-logZ)``, the log density (dropping constants) is::

    f(y) = u' y - u_T logZ(y) - 1/2 (y - mu)' Sigma^{-1} (y - mu)
    grad = u - u_T p - Sigma^{-1} (y - mu)
    -H   = u_T (diag(p) - p p') + Sigma^{-1} = A - u_T p p',   A = diag(lambda) + Sigma^{-1},
                                                              lambda = u_T p

``A`` has exactly pln's Woodbury structure (:mod:`scribe_stan.laplace.cpu`):
``A^{-1} v = v / B + h * (W M^{-1} W' (h * v))`` with ``B = lambda + 1/d``,
``h = 1 / (1 + lambda d)``, ``M = I_K + W' diag(lambda h) W``. The rank-one downdate
is handled by Sherman-Morrison, with ``a = A^{-1} p``::

    (-H)^{-1} = A^{-1} + (u_T / s) a a',   det(-H) = det(A) s,   s = 1 - u_T p' a.

Near-singular direction. ``s`` is the factor by which the multinomial's rank-one term
shrinks the curvature; computed as written it cancels catastrophically when
``u_T p' a -> 1`` (large totals, small ``Sigma^{-1}``: the softmax gauge direction that
the ALR fix leaves nearly flat). The kernels never form that difference. Using
``1 - A^{-1} lambda = A^{-1} Sigma^{-1} 1``::

    s = rho_ref + p' A^{-1} (Sigma^{-1} 1) = rho_ref + (1/u_T) 1' (diag(1/lambda) + Sigma)^{-1} 1,

a sum of two non-negative terms: the reference gene's proportion and the
``Sigma^{-1}`` part's contribution (a quadratic form of a positive definite matrix,
clipped at 0 against round-off). So ``s >= rho_ref > 0`` with no cancellation; the
default reference (a highly expressed gene) keeps ``rho_ref`` away from 0.
``Sigma^{-1} 1`` is shared by all cells.

Cost per Newton step and cell: forming ``M`` is O(D K^2), its Cholesky O(K^3), each
application of ``A^{-1}`` or ``Sigma^{-1}`` O(D K); three applications per step. So a
step costs O(D K^2 + K^3) time and O(D K) memory (the "O(G K + K^3)" usually quoted
counts only the solves). No D x D matrix is formed.

``low_rank`` mode: ``d = 0``, ``y = mu + W z`` with factor scores ``z ~ N(0, I_K)``;
Newton on z with the dense K x K negative Hessian ``W' diag(lambda) W - u_T (W'p)(W'p)'
+ I_K`` (>= I_K, so no guard is needed), O(D K^2 + K^3) per step.

Outer gradients (Margossian et al. 2020, arXiv:2004.12550): the Laplace value
``F = f(y_hat) - 1/2 log det(-H) + consts`` is differentiated totally, the mode's
dependence entering through the adjoint ``w = -1/2 (-H)^{-1} t`` with
``t_j = d log det(-H) / d y_j = u_T p_j [V_jj - tr(diag(p) V) - 2 (V p)_j + 2 p' V p]``,
``V = (-H)^{-1}`` (the third cumulant of the categorical distribution contracted with V).

All kernels assume valid input (checked at the API boundary).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from scribe_stan.laplace.cpu import _chol_solve, _cholesky_inplace, _woodbury_apply

_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, inline="always", fastmath=_FAST)
def _softmax(y, D, p):
    """Fill p_j = exp(y_j - logZ); return (logZ, rho_ref). Stable for any y."""
    m = 0.0
    for j in range(D):
        if y[j] > m:
            m = y[j]
    s = math.exp(-m)
    for j in range(D):
        e = math.exp(y[j] - m)
        p[j] = e
        s += e
    logz = m + math.log(s)
    for j in range(D):
        p[j] /= s
    return logz, math.exp(-logz)


@njit(cache=True, inline="always", fastmath=_FAST)
def _composition(u, uT, y, mu, Wt, inv_d, Lc, D, K, p, r, alpha, tmpK, tmpK2):
    """f(y) without constants; fills p, r = y - mu, alpha = Sigma^{-1} r.

    Returns (f, q = r' Sigma^{-1} r, lik = u'y - u_T logZ, rho_ref).
    """
    logz, rho_ref = _softmax(y, D, p)
    lik = -uT * logz
    for j in range(D):
        lik += u[j] * y[j]
        r[j] = y[j] - mu[j]
    _woodbury_apply(r, Wt, inv_d, inv_d, -1.0, Lc, D, K, tmpK, tmpK2, alpha)
    q = 0.0
    for j in range(D):
        q += r[j] * alpha[j]
    return lik - 0.5 * q, q, lik, rho_ref


@njit(cache=True, inline="always", fastmath=_FAST)
def _curvature(lam, W, d, WW, D, K, h, invB, Mf, Lm):
    """h, 1/B and the Cholesky factor of M for the given lambda. False if M fails."""
    KK = K * K
    for kj in range(KK):
        Mf[kj] = 0.0
    for j in range(D):
        hj = 1.0 / (1.0 + lam[j] * d[j])
        h[j] = hj
        invB[j] = d[j] * hj
        wj = lam[j] * hj
        for kj in range(KK):
            Mf[kj] += wj * WW[j, kj]
    for k in range(K):
        for j in range(K):
            Lm[k, j] = Mf[k * K + j]
        Lm[k, k] += 1.0
    return _cholesky_inplace(Lm, K)


@njit(cache=True, inline="always", fastmath=_FAST)
def _sm_factor(p, sig1, rho_ref, Wt, h, invB, Lm, D, K, tmpK, tmpK2, a, psi):
    """a = A^{-1} p and the guarded Sherman-Morrison denominator s (module docstring)."""
    _woodbury_apply(p, Wt, invB, h, 1.0, Lm, D, K, tmpK, tmpK2, a)
    _woodbury_apply(sig1, Wt, invB, h, 1.0, Lm, D, K, tmpK, tmpK2, psi)
    quad = 0.0
    for j in range(D):
        quad += p[j] * psi[j]
    return rho_ref + max(quad, 0.0)


# ---------------------------------------------------------------- full (y) mode


@njit(cache=True, fastmath=_FAST)
def _newton_full(u, uT, mu, Wt, d, WW, inv_d, Lc, sig1, y, tol, max_iter, ws, ws_K, Mf, Lm):
    """Damped Newton on y for one cell (y updated in place). Returns (n_iter, converged)."""
    K, D = Wt.shape
    p, r, alpha, lam, h, invB, g, dy, a, psi, yn = (ws[0], ws[1], ws[2], ws[3], ws[4],
                                                    ws[5], ws[6], ws[7], ws[8], ws[9], ws[10])
    tmpK, tmpK2 = ws_K[0], ws_K[1]
    f, _, _, rho_ref = _composition(u, uT, y, mu, Wt, inv_d, Lc, D, K, p, r, alpha, tmpK, tmpK2)
    for it in range(max_iter):
        for j in range(D):
            lam[j] = uT * p[j]
            g[j] = u[j] - lam[j] - alpha[j]
        if not _curvature(lam, Wt, d, WW, D, K, h, invB, Mf, Lm):
            return it, False
        s = _sm_factor(p, sig1, rho_ref, Wt, h, invB, Lm, D, K, tmpK, tmpK2, a, psi)
        _woodbury_apply(g, Wt, invB, h, 1.0, Lm, D, K, tmpK, tmpK2, dy)
        ag = 0.0
        for j in range(D):
            ag += a[j] * g[j]
        c = uT * ag / s
        dec = 0.0
        for j in range(D):
            dy[j] += c * a[j]
            dec += g[j] * dy[j]
        if 0.5 * dec < tol:  # converged; tested before the line search (see cpu.py)
            for j in range(D):
                y[j] += dy[j]
            _composition(u, uT, y, mu, Wt, inv_d, Lc, D, K, p, r, alpha, tmpK, tmpK2)
            return it + 1, True
        t = 1.0
        accepted = False
        for _ls in range(60):
            for j in range(D):
                yn[j] = y[j] + t * dy[j]
            fn, _, _, rn = _composition(u, uT, yn, mu, Wt, inv_d, Lc, D, K, p, r, alpha,
                                        tmpK, tmpK2)
            if math.isfinite(fn) and fn >= f + 1e-4 * t * dec - 1e-12 * abs(f):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            _composition(u, uT, y, mu, Wt, inv_d, Lc, D, K, p, r, alpha, tmpK, tmpK2)
            return it + 1, dec < 1e3 * tol
        for j in range(D):
            y[j] = yn[j]
        f, rho_ref = fn, rn
        if t < 1.0 and 0.5 * dec < 1e3 * tol:  # rounding noise of f (see cpu.py)
            return it + 1, True
    return max_iter, False


@njit(parallel=True, cache=True, fastmath=_FAST)
def newton_full(u, uT, mu, W, d, WW, Lc, sig1, y, tol, max_iter, n_chunks):
    """Per-cell Newton on y for all cells in parallel; ``y`` (N, D) updated in place.

    Parameters
    ----------
    u : (N, D) non-reference counts (float);  uT : (N,) totals;  mu (D,), W (D, K), d (D,);
    WW : (D, K*K) row outer products of W;  Lc : Cholesky of ``I + W' diag(1/d) W``;
    sig1 : (D,) ``Sigma^{-1} 1``;  tol : Newton-decrement tolerance;  max_iter : int.

    Returns
    -------
    n_iter : (N,) int64;  converged : (N,) bool
    """
    N, D = u.shape
    K = W.shape[1]
    Wt = np.ascontiguousarray(W.T)  # the layout of cpu._woodbury_apply
    inv_d = 1.0 / d
    n_iter = np.zeros(N, np.int64)
    converged = np.zeros(N, np.bool_)
    n_chunks = max(1, min(N, n_chunks))
    for ch in prange(n_chunks):
        ws = np.empty((11, D))
        ws_K = np.empty((2, K))
        Mf = np.empty(K * K)
        Lm = np.empty((K, K))
        for c in range(ch * N // n_chunks, (ch + 1) * N // n_chunks):
            it, ok = _newton_full(u[c], uT[c], mu, Wt, d, WW, inv_d, Lc, sig1, y[c], tol,
                                  max_iter, ws, ws_K, Mf, Lm)
            n_iter[c] = it
            converged[c] = ok
    return n_iter, converged


@njit(parallel=True, cache=True, fastmath=_FAST)
def value_grad_full(u, uT, const, mu, W, d, WW, Lc, sig1, y, want_grad, n_chunks):
    """Laplace log marginal of each cell's composition at the modes y, and its gradient.

    ``value_c = const_c + f(y_hat) - 1/2 [sum_j log(1 + lambda_j d_j) + log det M
    + log s]``: the ``log det Sigma`` of the Gaussian prior cancels against that of
    ``det(-H) = det(Sigma^{-1}) det(Sigma A) s``, and ``(D/2) log 2 pi`` against the
    Gaussian normalization. ``const`` holds the multinomial coefficient.

    Returns
    -------
    value : (N,);  g_mu : (D,), g_W : (D, K), g_d : (D,) gradients of ``sum(value)``.
    """
    N, D = u.shape
    K = W.shape[1]
    Wt = np.ascontiguousarray(W.T)  # the layout of cpu._woodbury_apply
    inv_d = 1.0 / d
    value = np.empty(N)
    n_chunks = max(1, min(N, n_chunks))
    acc_mu = np.zeros((n_chunks, D))
    acc_d = np.zeros((n_chunks, D))
    acc_W = np.zeros((n_chunks, D, K))
    for ch in prange(n_chunks):
        p, r, alpha, lam = np.empty(D), np.empty(D), np.empty(D), np.empty(D)
        h, invB, a, psi = np.empty(D), np.empty(D), np.empty(D), np.empty(D)
        t, adj, beta, b, vt = np.empty(D), np.empty(D), np.empty(D), np.empty(D), np.empty(D)
        Mf, Minv = np.empty(K * K), np.empty(K * K)
        Lm = np.empty((K, K))
        tmpK, tmpK2, unit = np.empty(K), np.empty(K), np.empty(K)
        kA, kB, kb, row = np.empty(K), np.empty(K), np.empty(K), np.empty(K)
        for c in range(ch * N // n_chunks, (ch + 1) * N // n_chunks):
            yc = y[c]
            f, q, lik, rho_ref = _composition(u[c], uT[c], yc, mu, Wt, inv_d, Lc, D, K, p, r,
                                              alpha, tmpK, tmpK2)
            for j in range(D):
                lam[j] = uT[c] * p[j]
            _curvature(lam, W, d, WW, D, K, h, invB, Mf, Lm)
            s = _sm_factor(p, sig1, rho_ref, Wt, h, invB, Lm, D, K, tmpK, tmpK2, a, psi)
            logdet = math.log(s)
            for k in range(K):
                logdet += 2.0 * math.log(Lm[k, k])
            for j in range(D):
                logdet += math.log1p(lam[j] * d[j])
            value[c] = const[c] + f - 0.5 * logdet
            if not want_grad:
                continue
            cT = uT[c] / s
            for k in range(K):
                for j in range(K):
                    unit[j] = 0.0
                unit[k] = 1.0
                _chol_solve(Lm, unit, K, tmpK2)
                for j in range(K):
                    Minv[k * K + j] = tmpK2[j]
            # diag(V), V p = a / s and the log-determinant's derivative t along y.
            pa = 0.0
            tr_pv = 0.0
            for j in range(D):
                # row = W_j M^{-1} (K^2) gives q_j = W_j M^{-1} W_j' and the explicit
                # log-det term -(lambda h)_j W_j M^{-1} of the W gradient in one pass.
                for k in range(K):
                    row[k] = 0.0
                for i in range(K):
                    wji = W[j, i]
                    for k in range(K):
                        row[k] += wji * Minv[i * K + k]
                qj = 0.0
                wj = lam[j] * h[j]
                for k in range(K):
                    qj += W[j, k] * row[k]
                    acc_W[ch, j, k] -= wj * row[k]
                psi[j] = qj  # psi reused: q_j = W_j M^{-1} W_j'
                vjj = invB[j] + h[j] * h[j] * qj + cT * a[j] * a[j]
                t[j] = vjj
                pa += p[j] * a[j]
                tr_pv += p[j] * vjj
            ssum = -tr_pv + 2.0 * pa / s
            for j in range(D):
                t[j] = uT[c] * p[j] * (t[j] + ssum - 2.0 * a[j] / s)
            # adjoint adj = -1/2 V t = -1/2 (A^{-1} t + cT a (a't))
            _woodbury_apply(t, Wt, invB, h, 1.0, Lm, D, K, tmpK, tmpK2, vt)
            at = 0.0
            for j in range(D):
                at += a[j] * t[j]
            for j in range(D):
                adj[j] = -0.5 * (vt[j] + cT * at * a[j])
            _woodbury_apply(adj, Wt, inv_d, inv_d, -1.0, Lc, D, K, tmpK, tmpK2, beta)
            _woodbury_apply(a, Wt, inv_d, inv_d, -1.0, Lc, D, K, tmpK, tmpK2, b)
            for k in range(K):
                kA[k] = 0.0
                kB[k] = 0.0
                kb[k] = 0.0
            for j in range(D):
                for k in range(K):
                    kA[k] += alpha[j] * W[j, k]
                    kB[k] += beta[j] * W[j, k]
                    kb[k] += b[j] * W[j, k]
            for j in range(D):
                wj = lam[j] * h[j]
                acc_mu[ch, j] += alpha[j] + beta[j]
                acc_d[ch, j] += (0.5 * (alpha[j] ** 2 - wj + wj * wj * psi[j] + cT * b[j] ** 2)
                                 + beta[j] * alpha[j])
                for k in range(K):
                    acc_W[ch, j, k] += (alpha[j] * (kA[k] + kB[k]) + beta[j] * kA[k]
                                        + cT * b[j] * kb[k])
    g_mu = np.zeros(D)
    g_d = np.zeros(D)
    g_W = np.zeros((D, K))
    for ch in range(n_chunks):
        g_mu += acc_mu[ch]
        g_d += acc_d[ch]
        g_W += acc_W[ch]
    return value, g_mu, g_W, g_d


# ---------------------------------------------------------------- low-rank (z) mode


@njit(cache=True, inline="always", fastmath=_FAST)
def _lowrank_density(u, uT, z, mu, W, D, K, y, p):
    """f(z) = u'y - u_T logZ(y) - |z|^2 / 2 at y = mu + W z (fills y, p); returns (f, lik)."""
    for j in range(D):
        s = mu[j]
        for k in range(K):
            s += W[j, k] * z[k]
        y[j] = s
    logz, _ = _softmax(y, D, p)
    lik = -uT * logz
    for j in range(D):
        lik += u[j] * y[j]
    zz = 0.0
    for k in range(K):
        zz += z[k] * z[k]
    return lik - 0.5 * zz, lik


@njit(cache=True, inline="always", fastmath=_FAST)
def _lowrank_hessian(uT, p, W, WW, D, K, wp, Hf, L):
    """Cholesky L of -H_z = W' diag(u_T p) W - u_T (W'p)(W'p)' + I; fills wp = W'p."""
    KK = K * K
    for kj in range(KK):
        Hf[kj] = 0.0
    for k in range(K):
        wp[k] = 0.0
    for j in range(D):
        lj = uT * p[j]
        for kj in range(KK):
            Hf[kj] += lj * WW[j, kj]
        for k in range(K):
            wp[k] += W[j, k] * p[j]
    for k in range(K):
        for i in range(K):
            L[k, i] = Hf[k * K + i] - uT * wp[k] * wp[i]
        L[k, k] += 1.0
    return _cholesky_inplace(L, K)


@njit(cache=True, fastmath=_FAST)
def _newton_lowrank(u, uT, mu, W, WW, z, tol, max_iter, y, p, gz, dz, zn, wp, Hf, L):
    D, K = W.shape
    f, _ = _lowrank_density(u, uT, z, mu, W, D, K, y, p)
    for it in range(max_iter):
        for k in range(K):
            gz[k] = -z[k]
        for j in range(D):
            gj = u[j] - uT * p[j]
            for k in range(K):
                gz[k] += W[j, k] * gj
        if not _lowrank_hessian(uT, p, W, WW, D, K, wp, Hf, L):
            return it, False
        _chol_solve(L, gz, K, dz)
        dec = 0.0
        for k in range(K):
            dec += gz[k] * dz[k]
        if 0.5 * dec < tol:  # converged; tested before the line search (see cpu.py)
            for k in range(K):
                z[k] += dz[k]
            _lowrank_density(u, uT, z, mu, W, D, K, y, p)
            return it + 1, True
        t = 1.0
        accepted = False
        for _ls in range(60):
            for k in range(K):
                zn[k] = z[k] + t * dz[k]
            fn, _ = _lowrank_density(u, uT, zn, mu, W, D, K, y, p)
            if math.isfinite(fn) and fn >= f + 1e-4 * t * dec - 1e-12 * abs(f):
                accepted = True
                break
            t *= 0.5
        if not accepted:
            _lowrank_density(u, uT, z, mu, W, D, K, y, p)
            return it + 1, dec < 1e3 * tol
        for k in range(K):
            z[k] = zn[k]
        f = fn
        if t < 1.0 and 0.5 * dec < 1e3 * tol:  # rounding noise of f (see cpu.py)
            return it + 1, True
    return max_iter, False


@njit(parallel=True, cache=True, fastmath=_FAST)
def newton_lowrank(u, uT, mu, W, WW, z, tol, max_iter, n_chunks):
    """Per-cell Newton on factor scores z (N, K), updated in place. Returns (n_iter, converged)."""
    N, D = u.shape
    K = W.shape[1]
    n_iter = np.zeros(N, np.int64)
    converged = np.zeros(N, np.bool_)
    n_chunks = max(1, min(N, n_chunks))
    for ch in prange(n_chunks):
        y, p = np.empty(D), np.empty(D)
        gz, dz, zn, wp = np.empty(K), np.empty(K), np.empty(K), np.empty(K)
        Hf, L = np.empty(K * K), np.empty((K, K))
        for c in range(ch * N // n_chunks, (ch + 1) * N // n_chunks):
            it, ok = _newton_lowrank(u[c], uT[c], mu, W, WW, z[c], tol, max_iter, y, p, gz, dz,
                                     zn, wp, Hf, L)
            n_iter[c] = it
            converged[c] = ok
    return n_iter, converged


@njit(parallel=True, cache=True, fastmath=_FAST)
def value_grad_lowrank(u, uT, const, mu, W, WW, z, want_grad, n_chunks):
    """Laplace value per cell in the low-rank mode and the gradient w.r.t. (mu, W).

    ``value_c = const_c + f(z_hat) - 1/2 log det(-H_z)`` (the ``K/2 log 2 pi`` terms
    cancel). Gradient: see the module docstring; with ``g = u - u_T p``,
    ``Lambda v = u_T (p * v - p (p'v))``, ``V~ = W V_z W'`` and the adjoint
    ``w_z = -1/2 V_z W' tau``, ``omega = W w_z``, ``e = g - tau / 2 - Lambda omega``::

        d/dmu = e,   d/dW = e z' + g w_z' - (Lambda W) V_z.
    """
    N, D = u.shape
    K = W.shape[1]
    value = np.empty(N)
    n_chunks = max(1, min(N, n_chunks))
    acc_mu = np.zeros((n_chunks, D))
    acc_W = np.zeros((n_chunks, D, K))
    for ch in prange(n_chunks):
        y, p, g, tau, om = np.empty(D), np.empty(D), np.empty(D), np.empty(D), np.empty(D)
        wp, tmp, wz, vwp, unit, row = (np.empty(K), np.empty(K), np.empty(K), np.empty(K),
                                       np.empty(K), np.empty(K))
        Hf, L, Vz = np.empty(K * K), np.empty((K, K)), np.empty(K * K)
        for c in range(ch * N // n_chunks, (ch + 1) * N // n_chunks):
            zc = z[c]
            f, _ = _lowrank_density(u[c], uT[c], zc, mu, W, D, K, y, p)
            _lowrank_hessian(uT[c], p, W, WW, D, K, wp, Hf, L)
            logdet = 0.0
            for k in range(K):
                logdet += 2.0 * math.log(L[k, k])
            value[c] = const[c] + f - 0.5 * logdet
            if not want_grad:
                continue
            uTc = uT[c]
            for k in range(K):
                for i in range(K):
                    unit[i] = 0.0
                unit[k] = 1.0
                _chol_solve(L, unit, K, tmp)
                for i in range(K):
                    Vz[k * K + i] = tmp[i]
            # V~ p = W (V_z W'p);  p'V~p = (W'p)' V_z (W'p)
            pvp = 0.0
            for k in range(K):
                s = 0.0
                for i in range(K):
                    s += Vz[k * K + i] * wp[i]
                vwp[k] = s
                pvp += wp[k] * s
            tr_pv = 0.0
            for j in range(D):
                vjj = 0.0
                for kj in range(K * K):
                    vjj += WW[j, kj] * Vz[kj]
                tau[j] = vjj
                tr_pv += p[j] * vjj
            for k in range(K):
                tmp[k] = 0.0
            for j in range(D):
                vp = 0.0
                for k in range(K):
                    vp += W[j, k] * vwp[k]
                tau[j] = uTc * p[j] * (tau[j] - tr_pv - 2.0 * vp + 2.0 * pvp)
                g[j] = u[c, j] - uTc * p[j]
                for k in range(K):
                    tmp[k] += W[j, k] * tau[j]
            for k in range(K):
                s = 0.0
                for i in range(K):
                    s += Vz[k * K + i] * tmp[i]
                wz[k] = -0.5 * s
            p_om = 0.0
            for j in range(D):
                s = 0.0
                for k in range(K):
                    s += W[j, k] * wz[k]
                om[j] = s
                p_om += p[j] * s
            # (Lambda W) V_z = u_T [(p * W) V_z - p ((W'p)' V_z)]; vwp = V_z W'p (symmetric)
            for j in range(D):
                e = g[j] - 0.5 * tau[j] - uTc * p[j] * (om[j] - p_om)
                acc_mu[ch, j] += e
                for k in range(K):
                    row[k] = 0.0
                for i in range(K):
                    wji = W[j, i]
                    for k in range(K):
                        row[k] += wji * Vz[i * K + k]
                for k in range(K):
                    acc_W[ch, j, k] += (e * zc[k] + g[j] * wz[k]
                                        - uTc * p[j] * (row[k] - vwp[k]))
    g_mu = np.zeros(D)
    g_W = np.zeros((D, K))
    for ch in range(n_chunks):
        g_mu += acc_mu[ch]
        g_W += acc_W[ch]
    return value, g_mu, g_W
