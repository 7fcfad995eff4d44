"""``numba.cuda`` kernels of the per-cell Newton-Woodbury Laplace step (pln and nbln).

Same public functions, arguments and returns as :mod:`scribe_stan.laplace.cpu` (the
mathematics, the NegBinomial2 curvature and the Woodbury forms are documented there), so
:mod:`scribe_stan.laplace.solver` swaps the two modules by ``device``.

Thread mapping
--------------
One thread block per cell; a grid of ``B`` blocks strides over the cells (block ``b``
takes cells ``b, b + B, ...``). Inside a block the threads stride over genes, which is
where the work is: every Newton step is a handful of O(G K) passes plus one O(G K^2)
pass that forms ``M = I + W' diag(lambda h) W``. For G ~ 2000-20000 that gives each of
the 128 threads 16-160 genes, coalesced loads (``W`` is kept transposed, ``(K, G)``, so
neighbouring threads read neighbouring genes), and a per-cell working set that stays in
L2. One thread per cell was rejected: it needs O(G) private vectors per thread, reads
them uncoalesced, and diverges on every line-search step of a different cell.

Reductions over genes (K-vectors ``W' v``, the ``K (K + 1) / 2`` entries of ``M``,
scalar sums) go through per-thread register accumulators and one shared-memory tree
reduction for up to 16 values at a time; ``M`` is built in 4 x 4 tiles so each gene's
loads feed 16 multiply-adds. The K x K Cholesky is right-looking with the threads
sharing the rows of each column; the K-vector triangular solves run on thread 0 (O(K^2),
negligible next to O(G K)). Per-gene work vectors live in a global scratch array, one
slice per block (``B x ~17 x G``), reused from cell to cell.

Outer gradient: each block accumulates its cells' gene arrays (``g_mu``, ``g_W``,
``g_d``, ``g_log_r``) into its own slice of a ``(B, K + 3, G)`` array (threads own
distinct genes, so no atomics and a deterministic sum), and a second kernel sums the B
slices. Atomics were rejected: ``N G (K + 3)`` float64 atomics per evaluation would
serialize on the same G (K + 3) addresses from every block. The M^{-1} term of the
loadings gradient is contracted with W per cell (O(G K^2)) instead of accumulating the
CPU's ``(G, K^2)`` array per block. The Laplace-EM statistics are summed the same way,
into ``(B, K + 2, G)`` slices; their ``sum_c diag(h_c) W M_c^{-1} W' diag(h_c) B`` term
goes through each cell's K x K ``M_c^{-1} (W' diag(h_c) B)``, as on the CPU.

Data placement and precision
----------------------------
A fit's cells live on the device for the whole fit (:class:`DeviceCells`, what
:class:`scribe_stan.laplace.solver.LaplaceProblem` uses): the counts (dense or CSR,
:func:`to_device_counts`), the eta prior, the modes ``x``, ``eta``, the Newton flags and
all scratch are allocated once and updated in place. An outer evaluation sends the
globals (O(G K)) and brings back reductions (per-cell values, gradient sums, converged
flags, the Laplace-EM statistics of :mod:`scribe_stan.laplace.em`), never the O(N G)
modes; every host <-> device copy is counted in
:data:`TRANSFERS`. The module functions (:func:`newton_all`, ...) keep the host-array
interface of :mod:`scribe_stan.laplace.cpu` and copy host arrays in and back per call.
With CSR counts each block scatters the cell's nonzeros into a dense G-vector of its
scratch slice, because the rate part ``exp(v)`` (and the NB curvature) runs over every
gene anyway. The floating type of every kernel follows the counts: float64 by default; with
float32 counts the per-gene arrays, ``x`` and the globals are float32 (half the memory
and bandwidth) while every sum over genes, the K x K factorization and the shared
scratch stay float64. Accuracy of float32 against float64 is measured in
``tests/test_cuda.py``.

``WW`` (the CPU's pair products of W) is accepted for interface parity and not read: on
the GPU forming ``W_g W_g'`` from ``W`` costs 2 K loads per gene instead of K^2.
``n_chunks`` is likewise ignored: the grid size comes from the device's multiprocessor
count (:func:`grid_blocks`).

All kernels assume valid input (checked in :mod:`scribe_stan._validate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import config, cuda, float64, int32

#: True when ``NUMBA_ENABLE_CUDASIM=1`` was set before numba was imported.
SIMULATOR = bool(config.ENABLE_CUDASIM)
#: Threads per block (a power of 2). The simulator runs each thread as a Python thread,
#: so it uses 4: still fewer than the genes of the tests, so every gene-strided loop wraps,
#: and a reduction still takes two tree levels.
THREADS_PER_BLOCK = 4 if SIMULATOR else 128
MAX_THREADS = 128
#: Largest latent rank the shared K-vectors hold.
KMAX = 128
_ROWS = 16  # values reduced together in one shared-memory tree reduction
_TILE = 4  # M is formed in _TILE x _TILE tiles (_TILE**2 == _ROWS)
BLOCKS_PER_SM = 8
#: Relative slack of the line search's sufficient-increase test: the CPU's 1e-12 in
#: float64; in float32 the log density carries ~1e-7 relative rounding per term, and a
#: tighter test would reject converged full steps on rounding noise alone.
_SLACK = {"float64": 1e-12, "float32": 1e-5}

# Rows of the per-block scratch ws[b, row, :] (G-vectors).
_U, _LAM, _H, _INVB, _GX, _R, _ALPHA, _DX, _PHI, _XN, _SCORE, _TMP = range(12)
_T, _VARV, _WX, _BETA, _GAM = range(12, 17)
_NV = 17
# Rows of the shared K-vectors.
_K1, _K2, _KA, _KB, _KG = range(5)


# ---------------------------------------------------------------- block primitives


@cuda.jit(device=True)
def _reduce_rows(part, nrows, tid, nt):
    """Tree-sum ``part[j, 0:nt]`` into ``part[j, 0]`` for ``j < nrows`` (nt a power of 2)."""
    cuda.syncthreads()
    s = nt // 2
    while s > 0:
        if tid < s:
            for j in range(nrows):
                part[j, tid] += part[j, tid + s]
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def _bsum2(v1, v2, part, tid, nt):
    """Block-wide sums of two per-thread values, returned to every thread."""
    part[0, tid] = v1
    part[1, tid] = v2
    _reduce_rows(part, 2, tid, nt)
    s1 = part[0, 0]
    s2 = part[1, 0]
    cuda.syncthreads()  # part is reused by the next reduction
    return s1, s2


@cuda.jit(device=True)
def _project(Wt, v, out, part, tid, nt, G, K):
    """``out[k] = sum_g Wt[k, g] v[g]`` (shared out, K <= KMAX)."""
    acc = cuda.local.array(_ROWS, float64)
    for k0 in range(0, K, _ROWS):
        nk = min(_ROWS, K - k0)
        for j in range(_ROWS):
            acc[j] = 0.0
        for g in range(tid, G, nt):
            vg = v[g]
            for j in range(nk):
                acc[j] += Wt[k0 + j, g] * vg
        for j in range(nk):
            part[j, tid] = acc[j]
        _reduce_rows(part, nk, tid, nt)
        for j in range(tid, nk, nt):
            out[k0 + j] = part[j, 0]
        cuda.syncthreads()


@cuda.jit(device=True)
def _weighted_products(Wt, Bt, wgt, out, part, tid, nt, G, K, lower):
    """``out[k, j] = sum_g wgt[g] Wt[k, g] Bt[j, g]`` (K x K) in _TILE x _TILE tiles, the
    block's threads striding over genes; with ``lower`` only ``j <= k`` (Bt = Wt, a
    symmetric product)."""
    acc = cuda.local.array(_ROWS, float64)
    wa = cuda.local.array(_TILE, float64)
    wb = cuda.local.array(_TILE, float64)
    nb = (K + _TILE - 1) // _TILE
    for kb in range(nb):
        for jb in range(kb + 1 if lower else nb):
            for j in range(_ROWS):
                acc[j] = 0.0
            for g in range(tid, G, nt):
                w = wgt[g]
                for i in range(_TILE):
                    k = kb * _TILE + i
                    wa[i] = Wt[k, g] * w if k < K else 0.0
                    jj = jb * _TILE + i
                    wb[i] = Bt[jj, g] if jj < K else 0.0
                for i in range(_TILE):
                    for j in range(_TILE):
                        acc[i * _TILE + j] += wa[i] * wb[j]
            for j in range(_ROWS):
                part[j, tid] = acc[j]
            _reduce_rows(part, _ROWS, tid, nt)
            for p in range(tid, _ROWS, nt):
                k = kb * _TILE + p // _TILE
                j = jb * _TILE + p % _TILE
                if k < K and j < K and (j <= k or not lower):
                    out[k, j] = part[p, 0]
            cuda.syncthreads()


@cuda.jit(device=True)
def _form_m(Wt, wgt, Lm, part, tid, nt, G, K):
    """Lower triangle of ``Lm = I + Wt diag(wgt) Wt'``."""
    _weighted_products(Wt, Wt, wgt, Lm, part, tid, nt, G, K, True)
    for k in range(tid, K, nt):
        Lm[k, k] += 1.0
    cuda.syncthreads()


@cuda.jit(device=True)
def _cholesky(Lm, flag, tid, nt, K):
    """Right-looking Cholesky of the lower triangle of Lm, in place. False if not SPD."""
    for j in range(K):
        if tid == 0:
            s = Lm[j, j]
            if s > 0.0:
                Lm[j, j] = math.sqrt(s)
                flag[0] = 1
            else:
                flag[0] = 0
        cuda.syncthreads()
        if flag[0] == 0:
            return False
        ljj = Lm[j, j]
        for i in range(j + 1 + tid, K, nt):
            Lm[i, j] = Lm[i, j] / ljj
        cuda.syncthreads()
        for i in range(j + 1 + tid, K, nt):
            lij = Lm[i, j]
            for k in range(j + 1, i + 1):
                Lm[i, k] -= lij * Lm[k, j]
        cuda.syncthreads()
    for p in range(tid, K * K, nt):
        if p % K > p // K:
            Lm[p // K, p % K] = 0.0
    cuda.syncthreads()
    return True


@cuda.jit(device=True)
def _chol_solve(L, b, out, K):
    """Solve ``(L L') out = b`` (one thread)."""
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


@cuda.jit(device=True)
def _chol_logdet(L, K):
    s = 0.0
    for k in range(K):
        s += 2.0 * math.log(L[k, k])
    return s


@cuda.jit(device=True)
def _chol_inverse(L, Minv, tid, nt, K):
    """``Minv = (L L')^{-1}``: column k by thread k (rows of the symmetric inverse)."""
    for k in range(tid, K, nt):
        Mk = Minv[k]
        for i in range(K):
            tt = 1.0 if i == k else 0.0
            for j in range(i):
                tt -= L[i, j] * Mk[j]
            Mk[i] = tt / L[i, i]
        for i in range(K - 1, -1, -1):
            tt = Mk[i]
            for j in range(i + 1, K):
                tt -= L[j, i] * Mk[j]
            Mk[i] = tt / L[i, i]
    cuda.syncthreads()


@cuda.jit(device=True)
def _woodbury(v, diag, scale, sign, L, Wt, out, tmp, kv, part, tid, nt, G, K):
    """``out = diag * v + sign * scale * (W (L L')^{-1} W' (scale * v))``; out != v."""
    for g in range(tid, G, nt):
        tmp[g] = scale[g] * v[g]
    cuda.syncthreads()
    _project(Wt, tmp, kv[_K1], part, tid, nt, G, K)
    if tid == 0:
        _chol_solve(L, kv[_K1], kv[_K2], K)
    cuda.syncthreads()
    for g in range(tid, G, nt):
        s = 0.0
        for k in range(K):
            s += Wt[k, g] * kv[_K2, k]
        out[g] = diag[g] * v[g] + sign * scale[g] * s
    cuda.syncthreads()


# ---------------------------------------------------------------- likelihood pieces


@cuda.jit(device=True)
def _obs_loglik(u, v, phi):
    """v-dependent NegBinomial2 log pmf at log mean v, phi = 1/r (Poisson at phi = 0)."""
    if phi == 0.0:
        return u * v - math.exp(v)
    return u * v - (u + 1.0 / phi) * math.log1p(phi * math.exp(v))


@cuda.jit(device=True)
def _obs_score_curv(u, v, phi):
    """(dl/dv, -d2l/dv2) of the NegBinomial2 log pmf at log mean v."""
    m = math.exp(v)
    if phi == 0.0:
        return u - m, m
    q = 1.0 + phi * m
    return (u - m) / q, m * (1.0 + phi * u) / (q * q)


@cuda.jit(device=True)
def _load_counts(c, cdata, cind, cptr, is_csr, u, tid, nt, G):
    """Cell c's counts into the dense G-vector u (scatter of its nonzeros for CSR)."""
    if is_csr:
        for g in range(tid, G, nt):
            u[g] = 0.0
        cuda.syncthreads()
        for p in range(cptr[c] + tid, cptr[c + 1], nt):
            u[cind[p]] = cdata[p]
    else:
        for g in range(tid, G, nt):
            u[g] = cdata[c * G + g]
    cuda.syncthreads()


@cuda.jit(device=True)
def _log_density(w, xv, eta, mu, Wt, inv_d, inv_r, Lc, a, inv_sig2, kv, part, tid, nt, G, K):
    """(f, q) at (xv, eta) as in the CPU kernel; fills w[_R] = xv - mu, w[_ALPHA]."""
    lik = 0.0
    u = w[_U]
    r = w[_R]
    for g in range(tid, G, nt):
        lik += _obs_loglik(u[g], xv[g] - eta, inv_r[g])
        r[g] = xv[g] - mu[g]
    cuda.syncthreads()
    _woodbury(r, inv_d, inv_d, -1.0, Lc, Wt, w[_ALPHA], w[_TMP], kv, part, tid, nt, G, K)
    qp = 0.0
    alpha = w[_ALPHA]
    for g in range(tid, G, nt):
        qp += r[g] * alpha[g]
    lik, q = _bsum2(lik, qp, part, tid, nt)
    return lik - 0.5 * q - 0.5 * (eta - a) ** 2 * inv_sig2, q


@cuda.jit(device=True)
def _curvature(w, xv, eta, inv_r, Wt, d, Lm, flag, part, tid, nt, G, K):
    """Score, lambda, h, 1/B into w and the Cholesky factor of M into Lm; False on failure."""
    u = w[_U]
    for g in range(tid, G, nt):
        sg, lg = _obs_score_curv(u[g], xv[g] - eta, inv_r[g])
        w[_SCORE, g] = sg
        w[_LAM, g] = lg
        hg = 1.0 / (1.0 + lg * d[g])
        w[_H, g] = hg
        w[_INVB, g] = d[g] * hg
        w[_TMP, g] = lg * hg
    cuda.syncthreads()
    _form_m(Wt, w[_TMP], Lm, part, tid, nt, G, K)
    return _cholesky(Lm, flag, tid, nt, K)


# ---------------------------------------------------------------- kernels


@cuda.jit
def _newton_kernel(cdata, cind, cptr, is_csr, a, sigma, mu, Wt, d, inv_d, inv_r, Lc, x, eta,
                   cells, add_iter, fix_eta, tol, max_iter, slack, ws, wk, n_iter, converged,
                   at_bound):
    """Newton for the cells ``cells`` (indices into x); ``add_iter``: n_iter accumulates."""
    part = cuda.shared.array((_ROWS, MAX_THREADS), float64)
    kv = cuda.shared.array((5, KMAX), float64)
    flag = cuda.shared.array(1, int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    b = cuda.blockIdx.x
    G = x.shape[1]
    K = Wt.shape[0]
    w = ws[b]
    Lm = wk[b, 0]
    lam, h, invB, gx, alpha, dx, phi, xn, score = (w[_LAM], w[_H], w[_INVB], w[_GX],
                                                   w[_ALPHA], w[_DX], w[_PHI], w[_XN],
                                                   w[_SCORE])
    for i in range(b, cells.shape[0], cuda.gridDim.x):
        c = cells[i]
        _load_counts(c, cdata, cind, cptr, is_csr, w[_U], tid, nt, G)
        xc = x[c]
        ac = a[c]
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        e = eta[c] + 0.0  # float64 scalar whatever the storage type
        bound = False
        ok = False
        n_it = max_iter
        f, _ = _log_density(w, xc, e, mu, Wt, inv_d, inv_r, Lc, ac, inv_sig2, kv, part, tid,
                            nt, G, K)
        for it in range(max_iter):
            if not _curvature(w, xc, e, inv_r, Wt, d, Lm, flag, part, tid, nt, G, K):
                n_it = it
                break
            lp = 0.0
            rp = 0.0
            for g in range(tid, G, nt):
                gx[g] = score[g] - alpha[g]
                lp += lam[g]
                rp += score[g]
            sum_lam, resid = _bsum2(lp, rp, part, tid, nt)
            g_eta = -resid - (e - ac) * inv_sig2
            _woodbury(gx, invB, h, 1.0, Lm, Wt, dx, w[_TMP], kv, part, tid, nt, G, K)
            d_eta = 0.0
            if not fix_eta:
                _woodbury(lam, invB, h, 1.0, Lm, Wt, phi, w[_TMP], kv, part, tid, nt, G, K)
                sp = 0.0
                lpsi = 0.0
                for g in range(tid, G, nt):
                    sp += lam[g] * phi[g]
                    lpsi += lam[g] * dx[g]
                sp, lpsi = _bsum2(sp, lpsi, part, tid, nt)
                s = sum_lam + inv_sig2 - sp
                d_eta = (g_eta + lpsi) / s
                if e <= 0.0 and d_eta < 0.0:
                    d_eta = 0.0  # bound active: x-only step
                    bound = True
                else:
                    bound = False
                    for g in range(tid, G, nt):
                        dx[g] += phi[g] * d_eta
                    cuda.syncthreads()
            dp = 0.0
            for g in range(tid, G, nt):
                dp += gx[g] * dx[g]
            dec, _ = _bsum2(dp, 0.0, part, tid, nt)
            dec += g_eta * d_eta
            if 0.5 * dec < tol:  # converged; tested before the line search (see cpu.py)
                for g in range(tid, G, nt):
                    xc[g] += dx[g]
                cuda.syncthreads()
                e = max(e + d_eta, 0.0)
                n_it = it + 1
                ok = True
                bound = bound and e == 0.0
                break
            # Backtracking line search (Armijo), eta projected onto [0, inf).
            t = 1.0
            accepted = False
            en = e
            fn = f
            for _ls in range(60):
                for g in range(tid, G, nt):
                    xn[g] = xc[g] + t * dx[g]
                cuda.syncthreads()
                en = e + t * d_eta
                if en < 0.0:
                    en = 0.0
                fn, _ = _log_density(w, xn, en, mu, Wt, inv_d, inv_r, Lc, ac, inv_sig2, kv,
                                     part, tid, nt, G, K)
                if math.isfinite(fn) and fn >= f + 1e-4 * t * dec - slack * abs(f):
                    accepted = True
                    break
                t *= 0.5
            if not accepted:
                n_it = it + 1
                ok = dec < 1e3 * tol
                break
            for g in range(tid, G, nt):
                xc[g] = xn[g]
            cuda.syncthreads()
            e = en
            f = fn
            if t < 1.0 and 0.5 * dec < 1e3 * tol:  # rounding noise of f (see cpu.py)
                n_it = it + 1
                ok = True
                bound = bound and e == 0.0
                break
        if tid == 0:
            eta[c] = e
            n_iter[c] = n_it + n_iter[c] if add_iter else n_it
            converged[c] = ok
            at_bound[c] = bound
        cuda.syncthreads()


@cuda.jit
def _value_grad_kernel(cdata, cind, cptr, is_csr, const, a, sigma, mu, Wt, d, inv_d, inv_r, Lc,
                       x, eta, fix_eta, want_grad, want_grad_r, ws, wk, value, acc):
    part = cuda.shared.array((_ROWS, MAX_THREADS), float64)
    kv = cuda.shared.array((5, KMAX), float64)
    flag = cuda.shared.array(1, int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    b = cuda.blockIdx.x
    N = x.shape[0]
    G = x.shape[1]
    K = Wt.shape[0]
    w = ws[b]
    Lm = wk[b, 0]
    Minv = wk[b, 1]
    ab = acc[b]
    u, lam, h, invB, alpha, phi = w[_U], w[_LAM], w[_H], w[_INVB], w[_ALPHA], w[_PHI]
    t, var_v, wx, beta, gam = w[_T], w[_VARV], w[_WX], w[_BETA], w[_GAM]
    for j in range(K + 3):
        for g in range(tid, G, nt):
            ab[j, g] = 0.0
    for c in range(b, N, cuda.gridDim.x):
        _load_counts(c, cdata, cind, cptr, is_csr, u, tid, nt, G)
        xc = x[c]
        e = eta[c] + 0.0
        ac = a[c]
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        _curvature(w, xc, e, inv_r, Wt, d, Lm, flag, part, tid, nt, G, K)
        f, q = _log_density(w, xc, e, mu, Wt, inv_d, inv_r, Lc, ac, inv_sig2, kv, part, tid,
                            nt, G, K)
        lik_f = f + 0.5 * q + 0.5 * (e - ac) ** 2 * inv_sig2
        ldp = 0.0
        for g in range(tid, G, nt):
            ldp += math.log1p(lam[g] * d[g])
        logdet, _ = _bsum2(ldp, 0.0, part, tid, nt)
        logdet += _chol_logdet(Lm, K)
        val = const[c] + lik_f - 0.5 * q - 0.5 * logdet
        s = 1.0
        if not fix_eta:
            _woodbury(lam, invB, h, 1.0, Lm, Wt, phi, w[_TMP], kv, part, tid, nt, G, K)
            sp = 0.0
            for g in range(tid, G, nt):
                sp += lam[g] * (1.0 - phi[g])
            sp, _ = _bsum2(sp, 0.0, part, tid, nt)
            s = inv_sig2 + sp
            val += -0.5 * (e - ac) ** 2 * inv_sig2 - 0.5 * math.log(s)
        if tid == 0:
            value[c] = val
        if not want_grad:
            continue
        _chol_inverse(Lm, Minv, tid, nt, K)
        for g in range(tid, G, nt):
            wg = lam[g] * h[g]
            qg = 0.0
            for k in range(K):
                sk = 0.0
                for j in range(K):
                    sk += Wt[j, g] * Minv[j, k]
                qg += Wt[k, g] * sk
                # explicit partial of -1/2 log det M w.r.t. W (the CPU's acc_R term)
                ab[k, g] -= wg * sk
            vg = invB[g] + h[g] * h[g] * qg
            if not fix_eta:
                vg += (phi[g] - 1.0) ** 2 / s
            var_v[g] = vg
            pg = inv_r[g]
            if pg == 0.0:
                t[g] = lam[g] * vg
            else:
                pm = pg * math.exp(xc[g] - e)
                t[g] = lam[g] * (1.0 - pm) / (1.0 + pm) * vg
            ab[K + 1, g] += -0.5 * wg + 0.5 * wg * wg * qg
        cuda.syncthreads()
        _woodbury(t, invB, h, 1.0, Lm, Wt, wx, w[_TMP], kv, part, tid, nt, G, K)
        w_eta = 0.0
        d_eta = 0.0
        if not fix_eta:
            dp = 0.0
            for g in range(tid, G, nt):
                dp += lam[g] * wx[g] - t[g]
            d_eta, _ = _bsum2(dp, 0.0, part, tid, nt)
            d_eta /= s
            w_eta = -0.5 * d_eta
        for g in range(tid, G, nt):
            wx[g] = -0.5 * (wx[g] + phi[g] * d_eta) if not fix_eta else -0.5 * wx[g]
            pg = inv_r[g]
            if want_grad_r and pg != 0.0:
                ug = u[g]
                m = math.exp(xc[g] - e)
                q1 = 1.0 + pg * m
                dlik = m * (1.0 + pg * ug) / q1 - math.log1p(pg * m) / pg
                dlam = -pg * m * (ug * q1 - 2.0 * m * (1.0 + pg * ug)) / (q1 * q1 * q1)
                dscore = pg * (ug - m) * m / (q1 * q1)
                ab[K + 2, g] += dlik - 0.5 * var_v[g] * dlam + (wx[g] - w_eta) * dscore
        cuda.syncthreads()
        _woodbury(wx, inv_d, inv_d, -1.0, Lc, Wt, beta, w[_TMP], kv, part, tid, nt, G, K)
        _project(Wt, alpha, kv[_KA], part, tid, nt, G, K)
        _project(Wt, beta, kv[_KB], part, tid, nt, G, K)
        if not fix_eta:
            _woodbury(phi, inv_d, inv_d, -1.0, Lc, Wt, gam, w[_TMP], kv, part, tid, nt, G, K)
            _project(Wt, gam, kv[_KG], part, tid, nt, G, K)
        inv_s = 1.0 / s
        for g in range(tid, G, nt):
            ag = alpha[g]
            bg = beta[g]
            ab[K, g] += ag + bg
            dd = 0.5 * ag * ag + ag * bg
            if not fix_eta:
                gg = gam[g]
                dd += 0.5 * gg * gg * inv_s
                for k in range(K):
                    ab[k, g] += (ag * (kv[_KA, k] + kv[_KB, k]) + bg * kv[_KA, k]
                                 + gg * kv[_KG, k] * inv_s)
            else:
                for k in range(K):
                    ab[k, g] += ag * (kv[_KA, k] + kv[_KB, k]) + bg * kv[_KA, k]
            ab[K + 1, g] += dd
        cuda.syncthreads()


@cuda.jit
def _em_stats_kernel(cdata, cind, cptr, is_csr, sigma, mu, Wt, d, inv_r, Bt, x, eta, fix_eta,
                     ws, wk, acc, acc_z):
    """Per-block sums of the Laplace-EM sufficient statistics (module docstring of
    :mod:`scribe_stan.laplace.em`; the CPU's ``CellChunk.em_statistics``).

    ``Bt`` (K, G) is ``(Sigma^{-1} W)'``. Block b adds its cells' ``E[r z']`` into
    ``acc[b, 0:K]`` (K, G), ``E[x]`` into ``acc[b, K]``, ``E[r^2]`` into ``acc[b, K + 1]``
    and ``E[z]`` into ``acc_z[b, 0]`` (K,), with ``r = x - mu``; ``wk[b]`` holds the
    cell's factor of M, M^{-1}, ``Z = W' diag(h) B`` and ``Y = M^{-1} Z``.
    """
    part = cuda.shared.array((_ROWS, MAX_THREADS), float64)
    kv = cuda.shared.array((5, KMAX), float64)
    flag = cuda.shared.array(1, int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    b = cuda.blockIdx.x
    N = x.shape[0]
    G = x.shape[1]
    K = Wt.shape[0]
    w = ws[b]
    Lm, Minv, Z, Y = wk[b, 0], wk[b, 1], wk[b, 2], wk[b, 3]
    ab = acc[b]
    lam, h, invB, phi, r = w[_LAM], w[_H], w[_INVB], w[_PHI], w[_R]
    for j in range(K + 2):
        for g in range(tid, G, nt):
            ab[j, g] = 0.0
    for k in range(tid, K, nt):
        acc_z[b, 0, k] = 0.0
    for c in range(b, N, cuda.gridDim.x):
        _load_counts(c, cdata, cind, cptr, is_csr, w[_U], tid, nt, G)
        xc = x[c]
        e = eta[c] + 0.0
        _curvature(w, xc, e, inv_r, Wt, d, Lm, flag, part, tid, nt, G, K)
        inv_s = 0.0  # fix_eta: eta is not integrated, phi = 0
        if not fix_eta:
            _woodbury(lam, invB, h, 1.0, Lm, Wt, phi, w[_TMP], kv, part, tid, nt, G, K)
            sp = 0.0
            for g in range(tid, G, nt):
                sp += lam[g] * (1.0 - phi[g])
            sp, _ = _bsum2(sp, 0.0, part, tid, nt)
            inv_s = 1.0 / (1.0 / (sigma[c] * sigma[c]) + sp)
            _project(Bt, phi, kv[_KB], part, tid, nt, G, K)
        for g in range(tid, G, nt):
            r[g] = xc[g] - mu[g]
        cuda.syncthreads()
        _project(Bt, r, kv[_KA], part, tid, nt, G, K)  # (x - mu)' B: E[z | x]
        _chol_inverse(Lm, Minv, tid, nt, K)
        _weighted_products(Wt, Bt, h, Z, part, tid, nt, G, K, False)
        for p in range(tid, K * K, nt):
            k = p // K
            j = p % K
            tt = 0.0
            for i in range(K):
                tt += Minv[k, i] * Z[i, j]
            Y[k, j] = tt
        cuda.syncthreads()
        for g in range(tid, G, nt):
            rg = r[g]
            hg = h[g]
            pg = phi[g] * inv_s if not fix_eta else 0.0
            qg = 0.0
            for k in range(K):
                sk = 0.0
                wy = 0.0
                for j in range(K):
                    sk += Wt[j, g] * Minv[j, k]
                    wy += Wt[j, g] * Y[j, k]
                qg += Wt[k, g] * sk
                ab[k, g] += rg * kv[_KA, k] + invB[g] * Bt[k, g] + hg * wy
                if not fix_eta:
                    ab[k, g] += pg * kv[_KB, k]
            ab[K, g] += xc[g]
            ab[K + 1, g] += rg * rg + invB[g] + hg * hg * qg
            if not fix_eta:
                ab[K + 1, g] += phi[g] * pg
        if tid == 0:
            for k in range(K):
                acc_z[b, 0, k] += kv[_KA, k]
        cuda.syncthreads()


@cuda.jit
def _sum_blocks(acc, out):
    """``out[j, g] = sum_b acc[b, j, g]`` (float64), one thread per (j, g)."""
    i = cuda.grid(1)
    J = acc.shape[1]
    G = acc.shape[2]
    if i < J * G:
        j = i // G
        g = i % G
        s = 0.0
        for b in range(acc.shape[0]):
            s += acc[b, j, g]
        out[j, g] = s


@cuda.jit
def _sample_kernel(cdata, cind, cptr, is_csr, const, lgam, a, sigma, mu, Wt, d, inv_d, inv_r,
                   Lc, logdet_sigma, x, eta, genes, eps_G, eps_K, eps_eta, ws, wk, out_x,
                   out_eta, out_loglik, out_lp, out_lp_approx):
    part = cuda.shared.array((_ROWS, MAX_THREADS), float64)
    kv = cuda.shared.array((5, KMAX), float64)
    flag = cuda.shared.array(1, int32)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    b = cuda.blockIdx.x
    S = eps_G.shape[0]
    N = x.shape[0]
    G = x.shape[1]
    K = Wt.shape[0]
    Gs = genes.shape[0]
    w = ws[b]
    Lm = wk[b, 0]
    u, lam, h, invB, phi = w[_U], w[_LAM], w[_H], w[_INVB], w[_PHI]
    dx, xs, alpha = w[_DX], w[_XN], w[_ALPHA]
    half_log_2pi = 0.5 * math.log(2.0 * math.pi)
    for c in range(b, N, cuda.gridDim.x):
        _load_counts(c, cdata, cind, cptr, is_csr, u, tid, nt, G)
        xc = x[c]
        ec = eta[c] + 0.0
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        _curvature(w, xc, ec, inv_r, Wt, d, Lm, flag, part, tid, nt, G, K)
        _woodbury(lam, invB, h, 1.0, Lm, Wt, phi, w[_TMP], kv, part, tid, nt, G, K)
        sp = 0.0
        ldp = 0.0
        for g in range(tid, G, nt):
            sp += lam[g] * (1.0 - phi[g])
            ldp += math.log1p(lam[g] * d[g])
        sp, ldp = _bsum2(sp, ldp, part, tid, nt)
        s = inv_sig2 + sp
        # log det(-H) = log det A + log s
        logdet_h = _chol_logdet(Lm, K) - logdet_sigma + ldp + math.log(s)
        lp_sum = 0.0
        for g in range(tid, G, nt):
            lp_sum += lam[g]
        sum_lam, _ = _bsum2(lp_sum, 0.0, part, tid, nt)
        lp_const = const[c] - (G + 1) * half_log_2pi - 0.5 * logdet_sigma
        lpa_const = -(G + 1) * half_log_2pi + 0.5 * logdet_h
        for i in range(S):
            if tid == 0:
                # L_M^{-T} eps_K by back substitution with the lower factor.
                for k in range(K - 1, -1, -1):
                    tt = eps_K[i, c, k] + 0.0
                    for j in range(k + 1, K):
                        tt -= Lm[j, k] * kv[_K1, j]
                    kv[_K1, k] = tt / Lm[k, k]
            cuda.syncthreads()
            de = eps_eta[i, c] / math.sqrt(s)
            e = ec + de
            quad_lam = 0.0
            lam_dx = 0.0
            for g in range(tid, G, nt):
                sg = 0.0
                for k in range(K):
                    sg += Wt[k, g] * kv[_K1, k]
                dg = eps_G[i, c, g] * math.sqrt(invB[g]) + h[g] * sg + phi[g] * de
                dx[g] = dg
                xs[g] = xc[g] + dg
                quad_lam += lam[g] * dg * dg
                lam_dx += lam[g] * dg
            cuda.syncthreads()
            # log N(x | mu, Sigma) via r' Sigma^{-1} r; the Gaussian via dx' Sigma^{-1} dx.
            # (a = 0, 1/sigma^2 = 0 leave f = lik - q / 2.)
            f, q = _log_density(w, xs, e, mu, Wt, inv_d, inv_r, Lc, 0.0, 0.0, kv, part, tid,
                                nt, G, K)
            lik = f + 0.5 * q
            _woodbury(dx, inv_d, inv_d, -1.0, Lc, Wt, alpha, w[_TMP], kv, part, tid, nt, G, K)
            qp = 0.0
            for g in range(tid, G, nt):
                qp += dx[g] * alpha[g]
            qd, lam_dx = _bsum2(qp + quad_lam, lam_dx, part, tid, nt)
            # dz' (-H) dz = dx' A dx - 2 de lambda'dx + (sum(lambda) + 1/sigma_c^2) de^2
            qd += -2.0 * de * lam_dx + (sum_lam + inv_sig2) * de * de
            for j in range(tid, Gs, nt):
                out_x[i, c, j] = xs[genes[j]]
            if tid == 0:
                out_eta[i, c] = e
                out_loglik[i, c] = lik + lgam[c]
                if e < 0.0:
                    out_lp[i, c] = -math.inf  # outside the truncated prior's support
                else:
                    out_lp[i, c] = (lp_const + lik - 0.5 * q
                                    - 0.5 * (e - a[c]) ** 2 * inv_sig2)
                out_lp_approx[i, c] = lpa_const - 0.5 * qd
            cuda.syncthreads()


@cuda.jit
def _log_density_kernel(cdata, cind, cptr, is_csr, a, sigma, mu, Wt, inv_d, inv_r, Lc, x, eta,
                        ws, out):
    part = cuda.shared.array((_ROWS, MAX_THREADS), float64)
    kv = cuda.shared.array((5, KMAX), float64)
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    b = cuda.blockIdx.x
    N = x.shape[0]
    G = x.shape[1]
    K = Wt.shape[0]
    w = ws[b]
    for c in range(b, N, cuda.gridDim.x):
        _load_counts(c, cdata, cind, cptr, is_csr, w[_U], tid, nt, G)
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        f, _ = _log_density(w, x[c], eta[c] + 0.0, mu, Wt, inv_d, inv_r, Lc, a[c], inv_sig2,
                            kv, part, tid, nt, G, K)
        if tid == 0:
            out[c] = f
        cuda.syncthreads()


@cuda.jit
def _restart_kernel(cdata, cind, cptr, is_csr, a, x, eta, cells, reset_eta):
    """Data-driven start ``x = log(u + 1/2) + eta`` of the cells ``cells``, on the device
    (``reset_eta``: eta first set to ``max(a, 0)``), as the CPU path's restart."""
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    G = x.shape[1]
    log_half = math.log(0.5)
    for i in range(cuda.blockIdx.x, cells.shape[0], cuda.gridDim.x):
        c = cells[i]
        e = max(a[c] + 0.0, 0.0) if reset_eta else eta[c] + 0.0
        xc = x[c]
        if is_csr:
            for g in range(tid, G, nt):
                xc[g] = log_half + e
            cuda.syncthreads()
            for p in range(cptr[c] + tid, cptr[c + 1], nt):
                xc[cind[p]] = math.log(cdata[p] + 0.5) + e
        else:
            for g in range(tid, G, nt):
                xc[g] = math.log(cdata[c * G + g] + 0.5) + e
        cuda.syncthreads()
        if tid == 0:
            eta[c] = e
        cuda.syncthreads()


# ---------------------------------------------------------------- host side


@dataclass(frozen=True)
class DeviceCounts:
    """A count matrix resident on the device, dense or CSR.

    Attributes
    ----------
    data : device array
        Dense: the row-major ``(N * G,)`` counts. CSR: the ``(nnz,)`` nonzero values.
    indices, indptr : device int64 arrays
        CSR column indices ``(nnz,)`` and row pointers ``(N + 1,)``; length-1
        placeholders for dense counts.
    shape : (N, G);  is_csr : bool;  dtype : numpy dtype of ``data`` and of every float
        array the kernels use with these counts (float64 or float32).
    """

    data: object
    indices: object
    indptr: object
    shape: tuple
    is_csr: bool
    dtype: np.dtype


DTYPES = ("float64", "float32")


def _check_dtype(dtype):
    name = np.dtype(dtype).name if dtype is not None else None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported by the CUDA kernels; allowed: "
                         f"{DTYPES}")
    return np.dtype(name)


def to_device_counts(counts, dtype=np.float64):
    """Copy a count matrix to the device once, for all kernel calls of a fit.

    Parameters
    ----------
    counts : (N, G) ndarray, scipy.sparse matrix/array (stored as CSR), or DeviceCounts
        Non-negative integer counts (validated by the caller). A DeviceCounts is
        returned unchanged if its dtype matches.
    dtype : {"float64", "float32"}
        Floating type of the counts and of all kernel arithmetic on arrays (sums stay
        float64; see the module docstring). float32 holds integers exactly up to 2**24.

    Returns
    -------
    DeviceCounts

    Raises
    ------
    ValueError
        Unsupported dtype, a DeviceCounts of another dtype, or counts that are not 2-D.
    """
    dtype = _check_dtype(dtype)
    if isinstance(counts, DeviceCounts):
        if counts.dtype != dtype:
            raise ValueError(f"counts are on the device as {counts.dtype}, not {dtype}")
        return counts
    if hasattr(counts, "tocsr"):  # scipy.sparse
        csr = counts.tocsr()
        csr.sort_indices()
        return DeviceCounts(_upload(csr.data, dtype), _upload(csr.indices, np.int64),
                            _upload(csr.indptr, np.int64), csr.shape, True, dtype)
    dense = np.ascontiguousarray(counts, dtype=dtype)
    if dense.ndim != 2:
        raise ValueError(f"counts must be 2-D (cells x genes); got shape {dense.shape}")
    stub = _upload(np.zeros(1, np.int64), np.int64)
    return DeviceCounts(_upload(dense.reshape(-1), dtype), stub, stub, dense.shape, False,
                        dtype)


def grid_blocks(n_cells):
    """Blocks per launch: enough to fill the device (BLOCKS_PER_SM per multiprocessor).

    The per-block scratch (``B x 17 x G`` floats) and gradient slices scale with it,
    not with the number of cells. The simulator uses 2 blocks, so the grid-stride
    loop over cells is exercised.
    """
    if SIMULATOR:
        return max(1, min(n_cells, 2))
    sms = cuda.get_current_device().MULTIPROCESSOR_COUNT
    return max(1, min(n_cells, sms * BLOCKS_PER_SM))


def _as_counts(counts):
    """DeviceCounts as given, or a float64 per-call copy of host counts."""
    return counts if isinstance(counts, DeviceCounts) else to_device_counts(counts)


def _is_device(arr):
    return hasattr(arr, "copy_to_host")


#: Host <-> device traffic of this module since import (or the last
#: :func:`reset_transfers`): ``to_device``/``to_host`` copies and their bytes, and the
#: largest single copy each way. Every copy between host and device goes through
#: :func:`_upload`, :func:`_upload_into` or :func:`_download`, so a fit's traffic per
#: evaluation can be read off (tests/test_cuda.py checks that the modes never move).
TRANSFERS = {}


def reset_transfers():
    """Zero :data:`TRANSFERS`."""
    TRANSFERS.update(to_device=0, to_device_bytes=0, to_device_max=0, to_host=0,
                     to_host_bytes=0, to_host_max=0)


reset_transfers()


def _count(way, nbytes):
    TRANSFERS[way] += 1
    TRANSFERS[f"{way}_bytes"] += nbytes
    TRANSFERS[f"{way}_max"] = max(TRANSFERS[f"{way}_max"], nbytes)


def _upload(arr, dtype):
    """Device copy of host ``arr`` in ``dtype``; a device array is returned as it is
    (it must already have ``dtype``), so callers may keep data on the device."""
    if _is_device(arr):
        if np.dtype(arr.dtype) != dtype:
            raise ValueError(f"device array of dtype {arr.dtype} passed where {dtype} is "
                             "needed (the dtype of the counts)")
        return arr
    host = np.ascontiguousarray(arr, dtype=dtype)
    _count("to_device", host.nbytes)
    return cuda.to_device(host)


def _upload_into(device, arr):
    """Overwrite the device array ``device`` with host ``arr`` (same shape), in place."""
    host = np.ascontiguousarray(arr, dtype=device.dtype)
    _count("to_device", host.nbytes)
    device.copy_to_device(host)


def _download(device):
    """Host copy of a device array."""
    host = device.copy_to_host()
    _count("to_host", host.nbytes)
    return host


def _back(host, device):
    """Copy a device result into the caller's host array, in place (no-op for device)."""
    if not _is_device(host):
        host[...] = _download(device)


def _globals(counts, mu, W, d, inv_r, Lc):
    """Device copies of the globals in the counts' dtype: mu, W' (K, G), d, 1/d, inv_r, Lc."""
    K = np.shape(W)[1]
    if K > KMAX:
        raise ValueError(f"rank K={K} exceeds the CUDA kernels' maximum KMAX={KMAX}")
    dt = counts.dtype
    d = np.asarray(d, dtype=np.float64)
    return (_upload(mu, dt), _upload(np.ascontiguousarray(np.asarray(W).T), dt), _upload(d, dt),
            _upload(1.0 / d, dt), _upload(inv_r, dt), _upload(Lc, dt))


def _scratch(counts, B, K, dt):
    G = counts.shape[1]
    return (cuda.device_array((B, _NV, G), dtype=dt),
            cuda.device_array((B, 2, K, K), dtype=np.float64))


def _counts_args(counts):
    return counts.data, counts.indices, counts.indptr, counts.is_csr


class DeviceCells:
    """The cells of one Laplace problem, resident on the device for a whole fit.

    The CPU path keeps each chunk's counts and its rows of the modes in host memory
    (:class:`scribe_stan.laplace.batched.CellChunk`); this is its device counterpart,
    one "chunk" holding every cell. The counts, the eta prior, the modes ``x`` (N, G)
    and ``eta`` (N,), the Newton diagnostics (``n_iter``, ``converged``, ``at_bound``),
    the per-block scratch and the gradient slices are allocated once and updated in
    place by the kernels, so an outer evaluation moves only the globals to the device
    (plus the per-cell constants when they change, e.g. with a free dispersion) and
    brings back only reductions: the per-cell values (N,), the gradient sums
    ((K + 3) x G) and the converged flags (N bytes); an EM step, its statistics
    ((K + 2) x G and K). Uploading x and eta on every call,
    as the host-array functions :func:`newton_all` and :func:`laplace_value_grad` must,
    would move 2 N G values per evaluation, the dominant cost of a large fit.

    Parameters
    ----------
    counts : DeviceCounts (its dtype is that of every array here)
    a, sigma : (N,) eta prior location and scale
    x : (N, G), eta : (N,) starting modes: host arrays (copied once) or device arrays
        of the counts' dtype (used in place)
    """

    def __init__(self, counts, a, sigma, x, eta):
        self.counts = counts
        dt = counts.dtype
        N = counts.shape[0]
        self.a, self.sigma = _upload(a, dt), _upload(sigma, dt)
        self.x, self.eta = _upload(x, dt), _upload(eta, dt)
        self.n_iter = cuda.device_array(N, dtype=np.int64)
        self.converged = cuda.device_array(N, dtype=np.bool_)
        self.at_bound = cuda.device_array(N, dtype=np.bool_)
        self._all = _upload(np.arange(N, dtype=np.int64), np.int64)
        self._blocks = grid_blocks(N)
        self._work = {}  # per rank K: scratch and gradient buffers
        self._kept = None  # (x, eta) device copies for keep/restore
        self._const = None  # (host, device) per-cell constants of the last value_grad
        self._held_eta = None  # host copy of eta as last uploaded by hold_eta

    def _buffers(self, K):
        if K not in self._work:
            G = self.counts.shape[1]
            B = self._blocks
            ws, wk = _scratch(self.counts, B, K, self.counts.dtype)
            self._work = {K: {"ws": ws, "wk": wk,
                              "wk_em": cuda.device_array((B, 4, K, K), dtype=np.float64),
                              "acc_em": cuda.device_array((B, K + 2, G), dtype=np.float64),
                              "acc_z": cuda.device_array((B, 1, K), dtype=np.float64),
                              "total_em": cuda.device_array((K + 2, G), dtype=np.float64),
                              "total_z": cuda.device_array((1, K), dtype=np.float64),
                              "acc": cuda.device_array((B, K + 3, G), dtype=np.float64),
                              "total": cuda.device_array((K + 3, G), dtype=np.float64),
                              "value": cuda.device_array(self.counts.shape[0],
                                                         dtype=np.float64)}}
        return self._work[K]

    def _cells(self, cells):
        """Device index array of host ``cells`` (None: all cells, resident)."""
        return self._all if cells is None else _upload(np.asarray(cells, np.int64), np.int64)

    def newton(self, mu, W, d, inv_r, Lc, fix_eta, tol, max_iter, cells=None):
        """Per-cell Newton from the resident modes, updated in place.

        Rule and arguments as :func:`scribe_stan.laplace.cpu.newton_all`; ``Lc`` the
        lower Cholesky factor of ``I + W' diag(1/d) W``. ``cells`` (host int array):
        only these cells, with their iterations added to ``n_iter`` (a restart
        continues the count, as the CPU path's rescue does); default all cells.
        """
        dt = self.counts.dtype
        buf = self._buffers(np.shape(W)[1])
        idx = self._cells(cells)
        if not fix_eta:
            self._held_eta = None  # eta moves: a held eta must be uploaded again
        B = grid_blocks(idx.shape[0])
        _newton_kernel[B, THREADS_PER_BLOCK](*_counts_args(self.counts), self.a, self.sigma,
                                             *_globals(self.counts, mu, W, d, inv_r, Lc),
                                             self.x, self.eta, idx, cells is not None,
                                             bool(fix_eta), float(tol), int(max_iter),
                                             _SLACK[dt.name], buf["ws"], buf["wk"], self.n_iter,
                                             self.converged, self.at_bound)

    def restart(self, cells, reset_eta):
        """Data-driven start ``x = log(u + 1/2) + eta`` for the host indices ``cells``
        (``reset_eta``: eta at ``max(a, 0)`` first), on the device."""
        idx = self._cells(cells)
        _restart_kernel[grid_blocks(idx.shape[0]), THREADS_PER_BLOCK](
            *_counts_args(self.counts), self.a, self.x, self.eta, idx, bool(reset_eta))
        if reset_eta:
            self._held_eta = None

    def hold_eta(self, eta):
        """Set eta to the held values (N,), uploading only when they changed."""
        if self._held_eta is None or not np.array_equal(self._held_eta, eta):
            _upload_into(self.eta, eta)
            self._held_eta = np.array(eta, dtype=np.float64)

    def converged_flags(self):
        """(N,) bool host copy of the converged flags."""
        return _download(self.converged)

    def flags(self):
        """Host copies of n_iter (N,) int64, converged (N,) bool, at_bound (N,) bool."""
        return _download(self.n_iter), _download(self.converged), _download(self.at_bound)

    def pull(self, x, eta):
        """Copy the resident modes into the host arrays x (N, G) and eta (N,) (float64)."""
        x[...] = _download(self.x)
        eta[...] = _download(self.eta)

    def keep(self):
        """Remember the current modes (device-to-device copy)."""
        if self._kept is None:
            self._kept = (cuda.device_array_like(self.x), cuda.device_array_like(self.eta))
        self._kept[0].copy_to_device(self.x)
        self._kept[1].copy_to_device(self.eta)

    def restore(self):
        """Go back to the modes of the last :meth:`keep` (device-to-device copy)."""
        self.x.copy_to_device(self._kept[0])
        self.eta.copy_to_device(self._kept[1])
        self._held_eta = None

    def value_grad(self, const, mu, W, d, inv_r, Lc, fix_eta, want_grad, want_grad_r=True):
        """Laplace log marginal per cell at the resident modes and its exact gradient.

        Quantities as :func:`scribe_stan.laplace.cpu.laplace_value_grad` (and the CPU
        path's :meth:`scribe_stan.laplace.batched.CellChunk.value_grad`); ``const`` (N,)
        host per-cell constants, uploaded only when they differ from the last call's.

        Returns
        -------
        value (N,), g_mu (G,), g_W (G, K), g_d (G,), g_log_r (G,): float64 host arrays;
        the gradients are zero unless ``want_grad``.
        """
        K = np.shape(W)[1]
        buf = self._buffers(K)
        if self._const is None or not np.array_equal(self._const[0], const):
            self._const = (np.array(const, dtype=np.float64), _upload(const, np.float64))
        acc, total = buf["acc"], buf["total"]
        _value_grad_kernel[self._blocks, THREADS_PER_BLOCK](
            *_counts_args(self.counts), self._const[1], self.a, self.sigma,
            *_globals(self.counts, mu, W, d, inv_r, Lc), self.x, self.eta, bool(fix_eta),
            bool(want_grad), bool(want_grad_r), buf["ws"], buf["wk"], buf["value"], acc)
        n = total.shape[0] * total.shape[1]
        _sum_blocks[(n + 127) // 128, 128](acc, total)
        t = _download(total)
        return (_download(buf["value"]), t[K].copy(), np.ascontiguousarray(t[:K].T),
                t[K + 1].copy(), t[K + 2].copy())

    def em_statistics(self, mu, W, d, inv_r, B, fix_eta):
        """Laplace-EM sufficient statistics of all cells at the resident modes.

        The quantities of :meth:`scribe_stan.laplace.batched.CellChunk.em_statistics`
        summed over every cell, with ``B = Sigma^{-1} W`` (G, K) at the globals; per
        cell the same Woodbury pieces (no G x G matrix), summed per block on the device.
        Only the ``(K + 2) x G`` and ``K`` sums come back.
        """
        K = np.shape(W)[1]
        buf = self._buffers(K)
        dt = self.counts.dtype
        N = self.counts.shape[0]
        B = np.asarray(B, dtype=np.float64)
        _em_stats_kernel[self._blocks, THREADS_PER_BLOCK](
            *_counts_args(self.counts), self.sigma, _upload(mu, dt),
            _upload(np.asarray(W).T, dt), _upload(d, dt), _upload(inv_r, dt), _upload(B.T, dt),
            self.x, self.eta, bool(fix_eta), buf["ws"], buf["wk_em"], buf["acc_em"],
            buf["acc_z"])
        for part, total in ((buf["acc_em"], buf["total_em"]), (buf["acc_z"], buf["total_z"])):
            n = total.shape[0] * total.shape[1]
            _sum_blocks[(n + 127) // 128, 128](part, total)
        t = _download(buf["total_em"])
        rz = np.ascontiguousarray(t[:K].T)
        return {"n": N, "x": t[K], "rr": t[K + 1], "rz": rz, "z": _download(buf["total_z"])[0],
                "zz": N * (np.eye(K) - B.T @ np.asarray(W)) + B.T @ rz}


def newton_all(counts, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta, fix_eta, tol, max_iter,
               n_chunks):
    """Per-cell Newton for all cells on the GPU; x (N, G) and eta (N,) updated in place.

    Arguments and returns as :func:`scribe_stan.laplace.cpu.newton_all`, except:
    ``counts`` may be a host array or :class:`DeviceCounts` (whose dtype sets the
    kernels'), ``x`` and ``eta`` may be device arrays (updated there; host arrays are
    copied in and back: a fit keeps them resident in a :class:`DeviceCells` instead),
    and ``WW``, ``n_chunks`` are not used (module docstring).

    Returns
    -------
    n_iter (N,) int64, converged (N,) bool, at_bound (N,) bool (host arrays).
    """
    cells = DeviceCells(_as_counts(counts), a, sigma, x, eta)
    cells.newton(mu, W, d, inv_r, Lc, fix_eta, tol, max_iter)
    _back(x, cells.x)
    _back(eta, cells.eta)
    return cells.flags()


def laplace_value_grad(counts, const, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta, fix_eta,
                       want_grad, n_chunks, want_grad_r=True):
    """Laplace log marginal per cell at the modes and its exact gradient, on the GPU.

    Arguments and returns as :func:`scribe_stan.laplace.cpu.laplace_value_grad`
    (``counts``, ``x``, ``eta`` as in :func:`newton_all`): ``value`` (N,), ``g_mu``
    (G,), ``g_W`` (G, K), ``g_d`` (G,), ``g_log_r`` (G,), float64 host arrays; the
    gradients are zero unless ``want_grad``.
    """
    return DeviceCells(_as_counts(counts), a, sigma, x, eta).value_grad(
        const, mu, W, d, inv_r, Lc, fix_eta, want_grad, want_grad_r)


def sample_cells(counts, const, lgam, a, sigma, mu, W, d, inv_r, WW, Lc, x, eta, genes, eps_G,
                 eps_K, eps_eta, out_x, out_eta, out_loglik, out_lp, out_lp_approx):
    """Draws from each cell's Gaussian through the Woodbury square root, on the GPU.

    Arguments as :func:`scribe_stan.laplace.cpu.sample_cells` (``counts``, ``x``,
    ``eta`` as in :func:`newton_all`); the ``out_*`` arrays (host or device) are filled.
    """
    counts = _as_counts(counts)
    dt = counts.dtype
    N, G = counts.shape
    K = np.shape(W)[1]
    d_mu, d_Wt, d_d, d_inv_d, d_inv_r, d_Lc = _globals(counts, mu, W, d, inv_r, Lc)
    Lc64 = np.asarray(Lc, dtype=np.float64)
    logdet_sigma = float(np.sum(np.log(np.asarray(d, dtype=np.float64)))
                         + 2.0 * np.sum(np.log(np.diag(Lc64))))
    B = grid_blocks(N)
    ws, wk = _scratch(counts, B, K, dt)
    outs = [out_x, out_eta, out_loglik, out_lp, out_lp_approx]
    d_outs = [o if _is_device(o) else cuda.device_array(o.shape, dtype=np.float64)
              for o in outs]
    _sample_kernel[B, THREADS_PER_BLOCK](*_counts_args(counts), _upload(const, np.float64),
                                         _upload(lgam, np.float64), _upload(a, dt),
                                         _upload(sigma, dt),
                                         d_mu, d_Wt, d_d, d_inv_d, d_inv_r, d_Lc, logdet_sigma,
                                         _upload(x, dt), _upload(eta, dt),
                                         _upload(genes, np.int64), _upload(eps_G, dt),
                                         _upload(eps_K, dt), _upload(eps_eta, dt), ws, wk, *d_outs)
    for o, do in zip(outs, d_outs):
        _back(o, do)


def log_density_cells(counts, a, sigma, mu, W, d, inv_r, Lc, x, eta):
    """Per-cell z-dependent log joint density, on the GPU.

    As :func:`scribe_stan.laplace.cpu.log_density_cells` (``counts``, ``x``, ``eta``
    as in :func:`newton_all`). Returns (N,) float64 host array.
    """
    counts = _as_counts(counts)
    dt = counts.dtype
    N, G = counts.shape
    K = np.shape(W)[1]
    d_mu, d_Wt, _, d_inv_d, d_inv_r, d_Lc = _globals(counts, mu, W, d, inv_r, Lc)
    B = grid_blocks(N)
    ws, _ = _scratch(counts, B, K, dt)
    out = cuda.device_array(N, dtype=np.float64)
    _log_density_kernel[B, THREADS_PER_BLOCK](*_counts_args(counts), _upload(a, dt),
                                              _upload(sigma, dt), d_mu, d_Wt, d_inv_d, d_inv_r,
                                              d_Lc, _upload(x, dt), _upload(eta, dt), ws, out)
    return _download(out)


def kernel_signatures(dtype=np.float64):
    """Explicit launch signatures of every kernel for one floating type.

    Used to compile ahead of time for a given target, e.g.
    ``numba.cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))``, which needs no GPU (the
    tests do this so code the simulator accepts but the CUDA compiler rejects fails).

    Parameters
    ----------
    dtype : {"float64", "float32"}

    Returns
    -------
    dict mapping kernel name to ``(dispatcher, signature tuple)``.
    """
    from numba import boolean, float32, int64

    f = {"float64": float64, "float32": float32}[_check_dtype(dtype).name]
    v, m, t3 = f[::1], f[:, ::1], f[:, :, ::1]
    iv, bv, dv, dm = int64[::1], boolean[::1], float64[::1], float64[:, ::1]
    wk = float64[:, :, :, ::1]
    cnt = (v, iv, iv, boolean)
    return {
        "newton": (_newton_kernel, cnt + (v, v, v, m, v, v, v, m, m, v, iv, boolean, boolean,
                                          float64, int64, float64, t3, wk, iv, bv, bv)),
        "restart": (_restart_kernel, cnt + (v, m, v, iv, boolean)),
        "em_stats": (_em_stats_kernel, cnt + (v, v, m, v, v, m, m, v, boolean, t3, wk,
                                              float64[:, :, ::1], float64[:, :, ::1])),
        "value_grad": (_value_grad_kernel, cnt + (dv, v, v, v, m, v, v, v, m, m, v, boolean,
                                                  boolean, boolean, t3, wk, dv, float64[:, :, ::1])),
        "sum_blocks": (_sum_blocks, (float64[:, :, ::1], float64[:, ::1])),
        "sample": (_sample_kernel, cnt + (dv, dv, v, v, v, m, v, v, v, m, float64, m, v, iv, t3,
                                          t3, m, t3, wk, float64[:, :, ::1]) + (dm,) * 4),
        "log_density": (_log_density_kernel, cnt + (v, v, v, m, v, v, m, m, v, t3, dv)),
    }
