"""Batched Newton-Woodbury Laplace step for pln and nbln: one chunk of cells at a time.

The mathematics is that of the per-cell kernels of :mod:`scribe_stan.laplace.cpu` (see
its docstring for the notation: log mean ``v = x - eta``, likelihood curvature
``lambda``, ``h = 1 / (1 + lambda d)``, ``M_c = I_K + W' diag(lambda_c h_c) W``), and
so are their inline pieces, which this module calls. What changes is where the
``O(G K^2)`` work of each cell goes: instead of a per-cell loop over the (G, K^2) pair
products, the work of a whole chunk of cells is one matrix product that BLAS runs near
the machine's peak:

- the K x K matrices of all cells: ``(n x G) @ (G x K(K+1)/2)``, the curvature weights
  ``lambda h`` against the products of W's column pairs (symmetric half only);
- the gradient's ``q_cg = W_g M_c^{-1} W_g'``: ``(n x K(K+1)/2) @ (K(K+1)/2 x G)``, and
  its ``sum_c (lambda h)_cg M_c^{-1}``: ``(G x n) @ (n x K(K+1)/2)``;
- the stacked K x K inverses with NumPy's batched ``linalg``.

The remaining ``O(G K)`` and element-wise work of a cell stays in Numba kernels that keep
the cell's G-vectors in cache (parallel over cells, counts read as CSR rows). Newton runs
in rounds: each round forms M for the cells still iterating (one product), then every one
of them takes one step with its own line search and convergence test, exactly the rule of
:func:`scribe_stan.laplace.cpu._newton_cell`. A chunk holds its counts (CSR) and views of
its rows of the modes, so the only N x G array of a fit is the modes; every temporary is
per chunk.

Outer gradient: Margossian et al. 2020 (arXiv:2004.12550), as in :mod:`.cpu`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from scribe_stan.laplace.cpu import (_FAST, STEP_CONTINUE, STEP_CONVERGED, STEP_FAILED,
                                     _a_inv_apply, _cell_terms, _cell_value_grad, _chol_logdet,
                                     _factor_m, _log_density, _newton_iteration,
                                     _obs_score_curv, gradient_accumulators)

#: Cells per chunk: about this many count-matrix elements per chunk keeps each per-chunk
#: temporary (an n x G float64 array) near 32 MB.
CHUNK_ELEMENTS = 4_000_000


def chunk_bounds(N, G, chunk_cells=None):
    """Half-open row ranges ``[(lo, hi), ...]`` covering N cells in chunks."""
    n = chunk_cells or max(64, CHUNK_ELEMENTS // max(G, 1))
    return [(lo, min(N, lo + n)) for lo in range(0, N, n)]


def _blocks(m):
    """Work blocks per parallel kernel call: several per thread balance unequal cells."""
    return max(1, min(m, 8 * numba.get_num_threads()))


# ---------------------------------------------------------------- Numba kernels
#
# Each parallel kernel is a thin ``prange`` loop over a serial kernel that does one work
# block's (or cell's) work. Numba's parfor passes (copy propagation over deep copies of
# the IR) grow much faster than linearly with the size of the loop body; with the inlined
# Newton and gradient pieces in the body, compiling this module took minutes.


@njit(cache=True, inline="always")
def _expand_row(indptr, indices, data, c, u):
    """Dense counts of CSR row c into u (G,)."""
    u[:] = 0.0
    for p in range(indptr[c], indptr[c + 1]):
        u[indices[p]] = data[p]


@njit(parallel=True, cache=True, fastmath=_FAST)
def curvature_weights(indptr, indices, data, E, inv_r, d, cells, out):
    """``out[i, g] = lambda h`` of cell ``cells[i]`` at means ``E[i]``: the weights of
    ``M = I + W' diag(lambda h) W``."""
    G = E.shape[1]
    for i in prange(cells.size):
        u = np.empty(G)
        _expand_row(indptr, indices, data, cells[i], u)
        for g in range(G):
            _, lg = _obs_score_curv(u[g], E[i, g], inv_r[g])
            out[i, g] = lg / (1.0 + lg * d[g])


@njit(cache=True, fastmath=_FAST)
def _newton_block(lo, hi, indptr, indices, data, a, sigma, mu, Wt, d, inv_d, inv_r, Lc, X, eta,
                  cells, E, f, alpha, w, Mf, fix_eta, tol, outcome, at_bound):
    """Body of :func:`newton_round` for the rows ``lo:hi`` of the round (one work block)."""
    K, G = Wt.shape
    ws_G = np.empty((11, G))
    ws_K = np.empty((2, K))
    Lm = np.empty((K, K))
    u = np.empty(G)
    for i in range(lo, hi):
        c = cells[i]
        if not _factor_m(Mf[i], K, Lm):
            outcome[i] = STEP_FAILED
            continue
        _expand_row(indptr, indices, data, c, u)
        inv_sig2 = 1.0 / (sigma[c] * sigma[c])
        if np.isnan(f[i]):
            f[i], _ = _log_density(u, X[c], eta[c], E[i], mu, Wt, inv_d, inv_r, Lc, a[c],
                                   inv_sig2, G, K, ws_G[4], alpha[i], ws_K[0], ws_K[1])
        ws_G[5, :] = alpha[i]
        _cell_terms(u, E[i], inv_r, d, G, ws_G[9], ws_G[0], ws_G[1], ws_G[2])
        out, e, f[i], bd = _newton_iteration(u, a[c], inv_sig2, mu, Wt, inv_d, inv_r, Lc, X[c],
                                             eta[c], E[i], f[i], fix_eta, tol, ws_G, ws_K, Lm,
                                             G, K)
        eta[c] = e
        outcome[i] = out
        at_bound[i] = bd
        if out == STEP_CONTINUE:  # state of the new point for the next round
            alpha[i, :] = ws_G[5]
            for g in range(G):
                _, lg = _obs_score_curv(u[g], E[i, g], inv_r[g])
                w[i, g] = lg / (1.0 + lg * d[g])


@njit(parallel=True, cache=True, fastmath=_FAST)
def newton_round(indptr, indices, data, a, sigma, mu, W, d, inv_r, Lc, X, eta, cells, E, f,
                 alpha, w, Mf, fix_eta, tol, outcome, at_bound, n_blocks):
    """One Newton iteration for each cell ``cells[i]``, with ``Mf[i]`` its ``M - I`` (K*K).

    Row i of the per-round state belongs to cell ``cells[i]``: ``E`` its means
    ``exp(x - eta)``, ``f`` its log density and ``alpha`` its ``Sigma^{-1}(x - mu)``
    (``f[i]`` NaN: compute both), ``w`` its curvature weights ``lambda h``. X and eta
    are updated in place, and so is the state, to the new point, for the next round
    (``w`` then holds the weights that form the next M). ``outcome[i]`` is one of
    cpu.STEP_* (STEP_FAILED: M not SPD), ``at_bound[i]`` whether eta's bound is active.
    """
    Wt = np.ascontiguousarray(W.T)
    inv_d = 1.0 / d
    m = cells.size
    nb = max(1, min(m, n_blocks))
    for b in prange(nb):
        _newton_block(b * m // nb, (b + 1) * m // nb, indptr, indices, data, a, sigma, mu, Wt,
                      d, inv_d, inv_r, Lc, X, eta, cells, E, f, alpha, w, Mf, fix_eta, tol,
                      outcome, at_bound)


@njit(cache=True, fastmath=_FAST)
def _value_grad_block(lo, hi, indptr, indices, data, const, a, sigma, mu, Wt, d, inv_d, inv_r,
                      Lc, X, eta, E, Mf, Q, fix_eta, want_grad, want_grad_r, value, acc_mu,
                      acc_W, acc_d, acc_r):
    """Body of :func:`value_grad_cells` for the cells ``lo:hi`` (one work block, adding
    into that block's gradient sums)."""
    K, G = Wt.shape
    ws_G = np.empty((12, G))
    ws_K = np.empty((5, K))
    Lm = np.empty((K, K))
    u = np.empty(G)
    for c in range(lo, hi):
        _expand_row(indptr, indices, data, c, u)
        _factor_m(Mf[c], K, Lm)
        _cell_terms(u, E[c], inv_r, d, G, ws_G[0], ws_G[1], ws_G[2], ws_G[3])
        value[c] = _cell_value_grad(u, X[c], eta[c], E[c], a[c], 1.0 / (sigma[c] * sigma[c]),
                                    const[c], mu, Wt, d, inv_d, inv_r, Lc, Lm,
                                    _chol_logdet(Lm, K), Q[c], fix_eta, want_grad, want_grad_r,
                                    ws_G, ws_K, acc_mu, acc_W, acc_d, acc_r)


@njit(parallel=True, cache=True, fastmath=_FAST)
def value_grad_cells(indptr, indices, data, const, a, sigma, mu, W, d, inv_r, Lc, X, eta, E, Mf,
                     Q, fix_eta, want_grad, want_grad_r, n_blocks):
    """Laplace value of each cell at its mode and the gradient sums, given M and q.

    ``E`` (n, G): ``exp(x - eta)``; ``Mf`` (n, K*K): each cell's ``M - I``; ``Q`` (n, G):
    ``W_g M_c^{-1} W_g'`` (read only with ``want_grad``). Returns value (n,) and the sums
    g_mu (G,), g_W (G, K), g_d (G,), g_log_r (G,) without the
    ``sum (lambda h) M^{-1}`` term of g_W (the caller's product).
    """
    n = X.shape[0]
    G, K = W.shape
    Wt = np.ascontiguousarray(W.T)
    inv_d = 1.0 / d
    value = np.empty(n)
    nb = max(1, min(n, n_blocks))
    acc_mu, acc_d, acc_r, acc_W = gradient_accumulators(nb, G, K)
    for b in prange(nb):
        _value_grad_block(b * n // nb, (b + 1) * n // nb, indptr, indices, data, const, a, sigma,
                          mu, Wt, d, inv_d, inv_r, Lc, X, eta, E, Mf, Q, fix_eta, want_grad,
                          want_grad_r, value, acc_mu[b], acc_W[b], acc_d[b], acc_r[b])
    return (value, acc_mu.sum(axis=0), acc_W.sum(axis=0), acc_d.sum(axis=0),
            acc_r.sum(axis=0))


@njit(cache=True, fastmath=_FAST)
def _posterior_cell(c, indptr, indices, data, E, inv_r, Wt, d, Mf, fix_eta, sigma, H, IB, PHI,
                    s):
    """Body of :func:`posterior_terms` for cell c."""
    K, G = Wt.shape
    u = np.empty(G)
    score = np.empty(G)
    lam = np.empty(G)
    Lm = np.empty((K, K))
    tmpK = np.empty(K)
    tmpK2 = np.empty(K)
    _expand_row(indptr, indices, data, c, u)
    _cell_terms(u, E[c], inv_r, d, G, score, lam, H[c], IB[c])
    _factor_m(Mf[c], K, Lm)
    if fix_eta:
        PHI[c] = 0.0
        s[c] = 1.0
        return
    _a_inv_apply(lam, Wt, H[c], IB[c], Lm, G, K, tmpK, tmpK2, PHI[c])
    sc = 1.0 / (sigma[c] * sigma[c])
    for g in range(G):
        sc += lam[g] * (1.0 - PHI[c, g])
    s[c] = sc


@njit(parallel=True, cache=True, fastmath=_FAST)
def posterior_terms(indptr, indices, data, E, inv_r, W, d, Mf, fix_eta, sigma, H, IB, PHI, s):
    """Pieces of each cell's Gaussian ``N(x_hat, V)`` (x block of ``(-H)^{-1}``) at its mode.

    ``V = A^{-1} + phi phi' / s`` with ``A^{-1} = diag(1/B) + (h W) M^{-1} (h W)'``:
    fills ``H`` = h, ``IB`` = 1/B, ``PHI`` = phi = ``A^{-1} lambda`` (zero with
    ``fix_eta``: eta is not integrated) and ``s`` = the Schur complement (n,).
    """
    Wt = np.ascontiguousarray(W.T)
    for c in prange(E.shape[0]):
        _posterior_cell(c, indptr, indices, data, E, inv_r, Wt, d, Mf, fix_eta, sigma, H, IB,
                        PHI, s)


# ---------------------------------------------------------------- globals, shared by cells


@dataclass
class Globals:
    """The globals in the forms the batched step needs, built once per evaluation.

    Attributes
    ----------
    mu : (G,);  W : (G, K);  d : (G,);  inv_r : (G,) inverse dispersions (0: Poisson)
    Lc : (K, K) lower Cholesky factor of ``C = I_K + W' diag(1/d) W``
    pairs : (G, P) products ``W[:, k] W[:, j]`` for ``k <= j`` (P = K(K+1)/2)
    ki, kj : (P,) the column pair of each product;  off : (P,) 1 on the diagonal, 2 off it
    """

    mu: np.ndarray
    W: np.ndarray
    d: np.ndarray
    inv_r: np.ndarray
    Lc: np.ndarray
    pairs: np.ndarray
    ki: np.ndarray
    kj: np.ndarray
    off: np.ndarray

    @property
    def sigma_inv_W(self):
        """``Sigma^{-1} W`` (G, K) = ``W/d - (W/d) C^{-1} W'(W/d)``."""
        Wd = self.W / self.d[:, None]
        return Wd - Wd @ np.linalg.solve(self.Lc @ self.Lc.T, self.W.T @ Wd)

    @classmethod
    def build(cls, mu, W, d, inv_r):
        """Globals from ``mu`` (G,), ``W`` (G, K), ``d`` (G,) > 0 and ``inv_r`` (G,) >= 0.

        Raises ``numpy.linalg.LinAlgError`` if ``C = I + W' diag(1/d) W`` is not
        numerically positive definite (non-finite or non-positive ``d``).
        """
        mu, W, d, inv_r = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d, inv_r))
        K = W.shape[1]
        ki, kj = np.triu_indices(K)
        return cls(mu=mu, W=W, d=d, inv_r=inv_r,
                   Lc=np.linalg.cholesky(np.eye(K) + (W / d[:, None]).T @ W),
                   pairs=np.ascontiguousarray(W[:, ki] * W[:, kj]), ki=ki, kj=kj,
                   off=np.where(ki == kj, 1.0, 2.0))

    def m_minus_identity(self, w):
        """``W' diag(w_c) W`` of each row of the weights w (n, G), as (n, K*K) rows."""
        K = self.W.shape[1]
        packed = w @ self.pairs
        out = np.empty((w.shape[0], K, K))
        out[:, self.ki, self.kj] = packed
        out[:, self.kj, self.ki] = packed
        return out.reshape(w.shape[0], K * K)


# ---------------------------------------------------------------- one chunk of cells


class CellChunk:
    """One chunk of cells: its counts (CSR), eta prior and views of its rows of the modes.

    Parameters
    ----------
    csr : scipy.sparse.csr_matrix (n, G) of counts (sorted indices).
    a, sigma : (n,) eta prior location and scale.
    x : (n, G) view of the modes;  eta : (n,) view of the capture-loss modes.
    """

    def __init__(self, csr, a, sigma, x, eta):
        self.indptr = csr.indptr.astype(np.int64)
        self.indices = csr.indices.astype(np.int64)
        self.data = np.asarray(csr.data, dtype=np.float64)
        self.a = a
        self.sigma = sigma
        self.x = x
        self.eta = eta

    def __len__(self):
        return self.x.shape[0]

    def _means(self, cells=None):
        """``exp(x - eta)`` of the rows ``cells`` (all by default), with NumPy's vectorized exp."""
        if cells is None:
            return np.exp(self.x - self.eta[:, None])
        return np.exp(self.x[cells] - self.eta[cells, None])

    def _weights(self, gl, E, cells):
        w = np.empty(E.shape)
        curvature_weights(self.indptr, self.indices, self.data, E, gl.inv_r, gl.d, cells, w)
        return w

    def newton(self, gl, fix_eta, tol, max_iter, cells=None):
        """Projected damped Newton on the chunk's cells; modes updated in place.

        Same rule as :func:`scribe_stan.laplace.cpu._newton_cell`, in rounds of one
        iteration for every cell still iterating.

        Parameters
        ----------
        gl : Globals;  fix_eta : bool, hold eta;  tol, max_iter : Newton stopping rule
        cells : (m,) int array of chunk rows to iterate (default: all).

        Returns
        -------
        n_iter, converged, at_bound : (m,) arrays (int64, bool, bool) for ``cells``.
        """
        cells = np.arange(len(self)) if cells is None else np.asarray(cells, np.int64)
        m = cells.size
        n_iter = np.zeros(m, np.int64)
        converged = np.zeros(m, bool)
        at_bound = np.zeros(m, bool)
        active = np.arange(m)  # positions in ``cells`` still iterating
        # per-round state, rows following ``active``; newton_round keeps it current
        E = self._means(cells)
        f = np.full(m, np.nan)
        alpha = np.empty(E.shape)
        w = self._weights(gl, E, cells)
        for it in range(max_iter):
            if active.size == 0:
                break
            rows = cells[active]
            Mf = gl.m_minus_identity(w)
            outcome = np.empty(active.size, np.int64)
            bound = np.zeros(active.size, bool)
            newton_round(self.indptr, self.indices, self.data, self.a, self.sigma, gl.mu, gl.W,
                         gl.d, gl.inv_r, gl.Lc, self.x, self.eta, rows, E, f, alpha, w, Mf,
                         fix_eta, tol, outcome, bound, _blocks(rows.size))
            failed = outcome == STEP_FAILED
            n_iter[active] = np.where(failed, it, it + 1)
            at_bound[active[~failed]] = bound[~failed]
            converged[active] = outcome == STEP_CONVERGED
            going = outcome == STEP_CONTINUE
            if not going.all():
                active, E, f, alpha, w = (v[going] for v in (active, E, f, alpha, w))
        return n_iter, converged, at_bound

    def value_grad(self, gl, const, fix_eta, want_grad, want_grad_r):
        """Laplace log marginal of each cell at the modes, and the chunk's gradient sums.

        Same quantities as :func:`scribe_stan.laplace.cpu.laplace_value_grad` for the
        chunk's cells; ``const`` (n,) the per-cell z-independent terms.

        Returns
        -------
        value (n,), g_mu (G,), g_W (G, K), g_d (G,), g_log_r (G,) (gradient sums; zeros
        unless ``want_grad``, g_log_r also unless ``want_grad_r``).
        """
        n = len(self)
        G, K = gl.W.shape
        E = self._means()
        w = self._weights(gl, E, np.arange(n))
        Mf = gl.m_minus_identity(w)
        Q = np.empty((n, 0))
        if want_grad:
            Minv = np.linalg.inv(Mf.reshape(n, K, K) + np.eye(K))
            packed = Minv[:, gl.ki, gl.kj]
            Q = (packed * gl.off) @ gl.pairs.T  # Q[c, g] = W_g M_c^{-1} W_g'
        value, g_mu, g_W, g_d, g_log_r = value_grad_cells(
            self.indptr, self.indices, self.data, const, self.a, self.sigma, gl.mu, gl.W, gl.d,
            gl.inv_r, gl.Lc, self.x, self.eta, E, Mf, Q, fix_eta, want_grad, want_grad_r,
            numba.get_num_threads())
        if want_grad:
            # explicit partial of -1/2 log det M in W: -W_g sum_c (lambda h)_cg M_c^{-1}
            Rp = w.T @ packed
            R = np.empty((G, K, K))
            R[:, gl.ki, gl.kj] = Rp
            R[:, gl.kj, gl.ki] = Rp
            g_W -= np.einsum("gj,gjk->gk", gl.W, R)
        return value, g_mu, g_W, g_d, g_log_r

    def em_statistics(self, gl, fix_eta):
        """Expected complete-data sufficient statistics of the factor model (one chunk).

        With each cell's Gaussian ``q(x_c) = N(x_hat_c, V_c)`` at its mode and the factors
        ``z_c | x_c ~ N(beta (x_c - mu), I - beta W)``, ``beta = W' Sigma^{-1}`` (at the
        current globals), returns the sums over the chunk's cells of ``E[x]`` (G,),
        ``E[r^2]`` (G,), ``E[r z']`` (G, K), ``E[z]`` (K,), ``E[z z']`` (K, K) with
        ``r = x - mu``, and the number of cells. Every ``V_c`` product goes through its
        Woodbury form (no G x G matrix).
        """
        n = len(self)
        G, K = gl.W.shape
        E = self._means()
        Mf = gl.m_minus_identity(self._weights(gl, E, np.arange(n)))
        Minv = np.linalg.inv(Mf.reshape(n, K, K) + np.eye(K))
        H, IB, PHI = (np.empty((n, G)) for _ in range(3))
        s = np.empty(n)
        posterior_terms(self.indptr, self.indices, self.data, E, gl.inv_r, gl.W, gl.d, Mf,
                        fix_eta, self.sigma, H, IB, PHI, s)
        del E
        B = gl.sigma_inv_W  # Sigma^{-1} W (G, K)
        R = self.x - gl.mu
        RB = R @ B
        PHs = PHI / np.sqrt(s)[:, None]
        # sum_c V_c B = sum 1/B_c * B + sum diag(h_c) W M_c^{-1} W' diag(h_c) B + sum phi phi'B/s
        Z = (H @ (gl.W[:, :, None] * B[:, None, :]).reshape(G, K * K)).reshape(n, K, K)
        Y = np.matmul(Minv, Z).reshape(n, K * K)
        HY = (H.T @ Y).reshape(G, K, K)
        VB = (IB.sum(axis=0)[:, None] * B + np.einsum("gk,gkj->gj", gl.W, HY)
              + PHs.T @ (PHs @ B))
        packed = Minv[:, gl.ki, gl.kj]
        q = (packed * gl.off) @ gl.pairs.T  # W_g M_c^{-1} W_g'
        diag_v = (IB + H * H * q + PHs * PHs).sum(axis=0)
        Ez = RB.sum(axis=0)
        Srz = R.T @ RB + VB
        Szz = n * (np.eye(K) - B.T @ gl.W) + B.T @ Srz
        return {"n": n, "x": self.x.sum(axis=0), "rr": np.einsum("ng,ng->g", R, R) + diag_v,
                "rz": Srz, "z": Ez, "zz": Szz}
