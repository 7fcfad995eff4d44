"""Laplace fit of the nbvcp model: Numba 1-D Newton per cell, L-BFGS-B over the globals.

Per cell c the only latent is the scalar capture loss eta (capture efficiency
``exp(-eta)``). With ``mu_g = exp(m_g - eta)``, ``r_g = exp(log_r_g)``, ``q_g = mu_g + r_g``
its log density (globals theta = (m, log_r) fixed) is::

    f(eta) = sum_g log NB2(u_g | mu_g, r_g) + log TruncNormal(eta | a, sigma_M; eta >= 0)
    f'(eta)  = -sum_g r_g (u_g - mu_g) / q_g - (eta - a) / sigma_M^2
    H(eta)   = -f''(eta) = sum_g w_g + 1 / sigma_M^2,   w_g = r_g mu_g (u_g + r_g) / q_g^2

``f`` is strictly concave, so a projected Newton step safeguarded by a bracket on the
sign of ``f'`` (bisection when Newton leaves the bracket) converges from any warm start;
a mode on the bound ``eta = 0`` is detected by ``f'(0) <= 0``. The Laplace marginal of
the cell is ``F = f(eta_hat) + 1/2 log(2 pi) - 1/2 log H(eta_hat)`` (as in pln, a mode on
the bound keeps the untruncated Gaussian and is flagged).

Gradient (Margossian et al. 2020, arXiv:2004.12550, in one dimension): with
``d eta_hat / d theta = (d f' / d theta) / H`` for an interior mode (0 on the bound),

    dF/dtheta = df/dtheta + 1/2 [d f''/dtheta + f'''(eta_hat) d eta_hat/dtheta] / H.

Every partial derivative is a per-(cell, gene) closed form; the ones that involve
``lgamma`` and ``digamma`` of ``u + r`` are needed only where ``u > 0`` (counts are held
in CSR form) and come from per-gene recurrence tables for ``u <= TABLE_CAP``, and from
``lgamma`` and an asymptotic digamma (:func:`digamma`) for the rare larger counts, so
that time and memory do not depend on the largest count; a Newton step costs O(G)
multiplications per cell and no exponential or logarithm per gene.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numba
import numpy as np
import scipy.sparse as sp
from numba import njit, prange
from scipy import special

from scribe_stan.laplace import driver
from scribe_stan.models import dispersion, nbvcp, pln

# Box on the globals: keeps every trial point of the line search finite (exp(m) and r
# far from overflow) while containing any plausible UMI data.
M_BOUNDS = (-40.0, 40.0)
LOG_R_BOUNDS = (-15.0, 15.0)
# Prior constants as globals so the Numba kernels see them as compile-time constants.
M_LOC, M_SCALE = nbvcp.M_LOC, nbvcp.M_SCALE
LOG_R_LOC, LOG_R_SCALE = dispersion.LOG_R_LOC, dispersion.LOG_R_SCALE
#: Largest count held in the per-gene lgamma/digamma tables; larger counts (rare in UMI
#: data) get the differences computed directly.
TABLE_CAP = 4096


# ----------------------------------------------------------------------------- kernels


# Reassociation and contraction let the gene loops vectorize; NaN/Inf semantics are kept.
_FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, fastmath=_FAST)
def _derivs(indptr, indices, vals, c, em, r, eta, a, inv_s2):
    """``f'(eta)`` and ``H = -f''(eta)`` of cell c.

    A dense pass adds the u = 0 form of every gene; a pass over the cell's non-zero
    counts adds the terms linear in u.
    """
    scale = math.exp(-eta)
    fp = -(eta - a) * inv_s2
    H = inv_s2
    for g in range(em.size):
        mu = em[g] * scale
        rq = r[g] / (mu + r[g])
        fp += rq * mu
        H += rq * rq * mu
    for k in range(indptr[c], indptr[c + 1]):
        g = indices[k]
        mu = em[g] * scale
        q = mu + r[g]
        fp -= r[g] * vals[k] / q
        H += r[g] * mu * vals[k] / (q * q)
    return fp, H


@njit(cache=True)
def _newton_cell(indptr, indices, vals, c, em, r, a, inv_s2, eta0, tol, max_iter):
    """Mode of f on eta >= 0 for cell c: (eta_hat, iterations, converged, at_bound)."""
    eta = max(eta0, 0.0)
    lo, hi = 0.0, np.inf  # f' > 0 at lo (once lo_known), f' < 0 at hi
    lo_known = False
    for it in range(1, max_iter + 1):
        fp, H = _derivs(indptr, indices, vals, c, em, r, eta, a, inv_s2)
        if fp > 0.0:
            lo, lo_known = eta, True
        elif eta == 0.0:
            return 0.0, it, True, True  # f'(0) <= 0: the mode sits on the bound
        else:
            hi = eta
        new = eta + fp / H
        if abs(new - eta) <= tol:
            return new, it, True, False
        if new <= lo:
            # Below the bracket: test the bound first, bisect once f'(0) > 0 is known.
            new = 0.5 * (lo + hi) if lo_known else 0.0
        elif new >= hi:
            new = 0.5 * (lo + hi)
        eta = new
    return eta, max_iter, False, False


@njit(cache=True, parallel=True)
def newton_all(indptr, indices, vals, em, r, a, sigma_M, eta, tol, max_iter):
    """Per-cell modes of eta, in place in ``eta`` (warm start on entry).

    Parameters
    ----------
    indptr, indices, vals : CSR counts (N cells x G genes), vals float64.
    em : (G,) ``exp(m)``;  r : (G,) dispersions;  a : (N,) capture prior locations.
    sigma_M : float;  eta : (N,) in/out;  tol : step tolerance (eta units).
    max_iter : int.

    Returns
    -------
    n_iter (N,) int64, converged (N,) bool, at_bound (N,) bool
    """
    N = a.size
    inv_s2 = 1.0 / (sigma_M * sigma_M)
    n_iter = np.zeros(N, np.int64)
    converged = np.zeros(N, np.bool_)
    at_bound = np.zeros(N, np.bool_)
    for c in prange(N):
        eta[c], n_iter[c], converged[c], at_bound[c] = _newton_cell(
            indptr, indices, vals, c, em, r, a[c], inv_s2, eta[c], tol, max_iter)
    return n_iter, converged, at_bound


@njit(cache=True)
def digamma(x):
    """Digamma function for ``x > 0``: recurrence up to ``x >= 10``, then the
    asymptotic series (absolute error below 1e-15)."""
    shift = 0.0
    while x < 10.0:
        shift -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    tail = f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (
        1.0 / 240 - f * (1.0 / 132 - f * (691.0 / 32760 - f / 12.0))))))
    return shift + math.log(x) - 0.5 / x - tail


@njit(cache=True)
def trigamma(x):
    """Trigamma function for ``x > 0``: recurrence up to ``x >= 10``, then the
    asymptotic series (relative error below 1e-15)."""
    shift = 0.0
    while x < 10.0:
        shift += 1.0 / (x * x)
        x += 1.0
    f = 1.0 / (x * x)
    tail = (1.0 / 6 - f * (1.0 / 30 - f * (1.0 / 42 - f * (1.0 / 30 - f * (
        5.0 / 66 - f * (691.0 / 2730 - f * 7.0 / 6)))))) / (x * x * x)
    return shift + 1.0 / x + 0.5 * f + tail


@njit(cache=True)
def _lgamma_diff(lg, offsets, g, u, r):
    """``lgamma(u + r) - lgamma(r)`` of gene g: from its table, or directly past it."""
    k = int(u)
    if k < offsets[g + 1] - offsets[g]:
        return lg[offsets[g] + k]
    return math.lgamma(u + r) - math.lgamma(r)


@njit(cache=True)
def _digamma_diff(dg, offsets, g, u, r):
    """``digamma(u + r) - digamma(r)`` of gene g: from its table, or directly past it."""
    k = int(u)
    if k < offsets[g + 1] - offsets[g]:
        return dg[offsets[g] + k]
    return digamma(u + r) - digamma(r)


def table_offsets(max_u):
    """Offsets of the per-gene tables of :func:`gamma_tables`.

    Parameters
    ----------
    max_u : (G,) int, largest count per gene.

    Returns
    -------
    (G + 1,) int64
        Gene g's table covers ``u = 0 .. min(max_u_g, TABLE_CAP)`` at
        ``offsets[g] + u``: at most ``G * (TABLE_CAP + 1)`` entries, whatever the counts.
    """
    return np.concatenate([[0], np.cumsum(np.minimum(max_u, TABLE_CAP) + 1)]).astype(np.int64)


@njit(cache=True, parallel=True)
def gamma_tables(r, offsets):
    """Per-gene tables of ``lgamma(u + r) - lgamma(r)`` and ``digamma(u + r) - digamma(r)``.

    Built by the exact recurrences ``lgamma(x + 1) = lgamma(x) + log x`` and
    ``digamma(x + 1) = digamma(x) + 1/x`` for ``u = 0 ..`` the table's end
    (:func:`table_offsets`): the total length is a few times G for UMI data, far less
    than the number of non-zero counts, and the differences carry no cancellation when
    ``r`` is large. Counts past a gene's table are computed directly by the kernels.

    Parameters
    ----------
    r : (G,) dispersions.
    offsets : (G + 1,) int64 from :func:`table_offsets`; gene g's entries are
        ``offsets[g] + u``.

    Returns
    -------
    lg, dg : (offsets[-1],) arrays
    """
    lg = np.empty(offsets[-1])
    dg = np.empty(offsets[-1])
    for g in prange(r.size):
        s_lg, s_dg = 0.0, 0.0
        for u in range(offsets[g + 1] - offsets[g]):
            lg[offsets[g] + u] = s_lg
            dg[offsets[g] + u] = s_dg
            s_lg += math.log(r[g] + u)
            s_dg += 1.0 / (r[g] + u)
    return lg, dg


@njit(cache=True, parallel=True, fastmath=_FAST)
def value_grad(indptr, indices, vals, lg, dg, offsets, const, m, r, a, sigma_M, eta, at_bound,
               want_grad, n_chunks):
    """Laplace value per cell and, optionally, its gradient summed over cells.

    Parameters
    ----------
    indptr, indices, vals : CSR counts.
    lg, dg, offsets : tables of :func:`gamma_tables`.
    const : (N,) terms constant in (theta, eta): ``-sum_g lgamma(u + 1)``, the capture
        prior's normalization and ``1/2 log(2 pi)``.
    m, r : (G,) log means and dispersions;  a : (N,);  sigma_M : float.
    eta : (N,) modes;  at_bound : (N,) bool.
    want_grad : bool;  n_chunks : int, work blocks.

    Returns
    -------
    value (N,), H (N,) curvature ``-f''`` at the mode, g_m (G,), g_log_r (G,)
    """
    N, G = a.size, m.size
    inv_s2 = 1.0 / (sigma_M * sigma_M)
    em = np.exp(m)
    value = np.empty(N)
    curv = np.empty(N)
    n_chunks = max(1, min(N, n_chunks))
    acc_m = np.zeros((n_chunks, G))
    acc_r = np.zeros((n_chunks, G))
    for ch in prange(n_chunks):
        mu = np.empty(G)
        rq = np.empty(G)  # r / q
        l1p = np.empty(G)  # log(q / r)
        for c in range(ch * N // n_chunks, (ch + 1) * N // n_chunks):
            e = eta[c]
            scale = math.exp(-e)
            val = const[c] - 0.5 * (e - a[c]) ** 2 * inv_s2
            H = inv_s2
            f3 = 0.0
            for g in range(G):  # u = 0 form of every gene
                mu[g] = em[g] * scale
                rq[g] = r[g] / (mu[g] + r[g])
                l1p[g] = math.log1p(mu[g] / r[g])
                val -= r[g] * l1p[g]
                t = rq[g] * rq[g] * mu[g]
                H += t
                f3 += t * (r[g] - mu[g]) / (mu[g] + r[g])
            for k in range(indptr[c], indptr[c + 1]):  # terms of the non-zero counts
                g, u = indices[k], vals[k]
                val += (_lgamma_diff(lg, offsets, g, u, r[g])
                        + u * (m[g] - e - l1p[g] - math.log(r[g])))
                t = rq[g] * rq[g] * mu[g] * u / r[g]
                H += t
                f3 += t * (r[g] - mu[g]) / (mu[g] + r[g])
            value[c] = val - 0.5 * math.log(H)
            curv[c] = H
            if not want_grad:
                continue
            # Total derivative of -1/2 log H: (d f''/dtheta + f''' d eta/dtheta) / (2H),
            # d eta/dtheta = (d f'/dtheta) / H in the interior, 0 on the bound.
            # Per gene: df/dm = r (u - mu)/q; df/dlog_r = r [D - log(q/r)] + r (mu - u)/q;
            # df'/dm = r mu (u + r)/q^2; df'/dlog_r = -r mu (u - mu)/q^2;
            # df''/dm = -r mu (u + r)(r - mu)/q^3; df''/dlog_r = -r mu [u (mu - r) + 2 r mu]/q^3
            # (D = digamma(u + r) - digamma(r)); the u = 0 parts first, then the u terms.
            half = 0.5 / H
            slope = 0.0 if at_bound[c] else f3 / H
            for g in range(G):
                mg, rg, b = mu[g], r[g], rq[g]
                w = b * b * mg  # r^2 mu / q^2
                acc_m[ch, g] += -b * mg + half * (-w * (rg - mg) / (mg + rg) + slope * w)
                acc_r[ch, g] += (-rg * l1p[g] + b * mg
                                 + half * (-2.0 * w * mg / (mg + rg) + slope * w * mg / rg))
            for k in range(indptr[c], indptr[c + 1]):
                g, u = indices[k], vals[k]
                mg, rg, b = mu[g], r[g], rq[g]
                q = mg + rg
                t = b * mg * u / q  # r mu u / q^2
                acc_m[ch, g] += b * u + half * (-t * (rg - mg) / q + slope * t)
                acc_r[ch, g] += (rg * _digamma_diff(dg, offsets, g, u, rg) - b * u
                                 + half * (-t * (mg - rg) / q - slope * t))
    return value, curv, acc_m.sum(axis=0), acc_r.sum(axis=0)


@njit(cache=True)
def _gene_sums(colptr, rows, vals, g, eta, m, r, T_table, want_r):
    """Score and second derivative of gene g's NB log likelihood (eta fixed), in m or
    (``want_r``) in log_r; the u = 0 form of every cell, then the non-zero counts'
    terms. ``T_table[u]`` holds (digamma, trigamma)(u + r) - (digamma, trigamma)(r);
    counts past its end get them directly."""
    s, h = 0.0, 0.0
    em = math.exp(m)
    for c in range(eta.size):
        mu = em * math.exp(-eta[c])
        q = mu + r
        if want_r:
            t = -r * math.log1p(mu / r) + r * mu / q
            s += t
            h += t + r * mu * mu / (q * q)
        else:
            s -= r * mu / q
            h -= r * r * mu / (q * q)
    for k in range(colptr[g], colptr[g + 1]):
        u = vals[k]
        mu = em * math.exp(-eta[rows[k]])
        q = mu + r
        if want_r:
            if int(u) < T_table.shape[0]:
                D, T = T_table[int(u), 0], T_table[int(u), 1]
            else:
                D, T = digamma(u + r) - digamma(r), trigamma(u + r) - trigamma(r)
            s += r * D - r * u / q
            h += r * D - r * mu * u / (q * q) + r * r * T
        else:
            s += r * u / q
            h -= r * mu * u / (q * q)
    return s, h


@njit(cache=True, parallel=True)
def gene_newton(colptr, rows, vals, table_u, eta, m, log_r, n_sweeps):
    """Per-gene MAP of ``(m_g, log_r_g)`` with eta held fixed, in place (start values).

    Given eta the genes decouple, so each gene alternates damped 1-D Newton steps
    (at most one unit per step) in m_g (concave) and in log_r_g, both with their
    priors; used to start the outer fit near its optimum.

    Parameters
    ----------
    colptr, rows, vals : CSC counts (N x G);  table_u : (G,) last count of each gene's
        digamma/trigamma table (its largest count, at most ``TABLE_CAP``).
    eta : (N,);  m, log_r : (G,) in/out;  n_sweeps : int.
    """
    inv_m = 1.0 / (M_SCALE * M_SCALE)
    inv_r = 1.0 / (LOG_R_SCALE * LOG_R_SCALE)
    for g in prange(m.size):
        table = np.zeros((table_u[g] + 1, 2))
        for sweep in range(n_sweeps):
            r = math.exp(log_r[g])
            for it in range(5):
                s, h = _gene_sums(colptr, rows, vals, g, eta, m[g], r, table, False)
                s -= (m[g] - M_LOC) * inv_m
                h -= inv_m
                m[g] = min(max(m[g] - max(-1.0, min(1.0, s / h)), M_BOUNDS[0]), M_BOUNDS[1])
            for it in range(5):
                r = math.exp(log_r[g])
                for u in range(1, table_u[g] + 1):
                    table[u, 0] = table[u - 1, 0] + 1.0 / (r + u - 1)
                    table[u, 1] = table[u - 1, 1] - 1.0 / ((r + u - 1) * (r + u - 1))
                s, h = _gene_sums(colptr, rows, vals, g, eta, m[g], r, table, True)
                s -= (log_r[g] - LOG_R_LOC) * inv_r
                h -= inv_r
                step = -s / h if h < 0.0 else (1.0 if s > 0.0 else -1.0)
                log_r[g] = min(max(log_r[g] + max(-1.0, min(1.0, step)), LOG_R_BOUNDS[0]),
                               LOG_R_BOUNDS[1])


# ----------------------------------------------------------------------------- problem


def _n_chunks():
    """Work blocks per parallel kernel call: several per thread for load balance."""
    return 8 * numba.get_num_threads()


@dataclass
class CellModes:
    """Per-cell modes of eta and Newton diagnostics.

    Attributes
    ----------
    eta : (N,) modes;  curvature : (N,) ``H = -f''(eta_hat)`` (the 1-D Laplace
    posterior precision); n_iter : (N,) Newton iterations; converged, at_bound : (N,) bool.
    """

    eta: np.ndarray
    curvature: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    at_bound: np.ndarray


class NbvcpProblem:
    """Per-cell 1-D Laplace approximations of the nbvcp model for one count matrix.

    Holds the counts (CSR), the capture prior and the warm-start modes across calls.

    Parameters
    ----------
    counts : (N, G) array or scipy sparse matrix of non-negative integers (validated by
        the caller; not modified).
    log_M0, sigma_M : float
        Capture prior (:mod:`scribe_stan.models.pln`).
    log_lib : (N,) array, optional
        Log library sizes (default: from ``counts``).
    newton_tol : float
        Newton stops when a step moves eta by less than this.
    max_newton : int
        Newton iterations per cell per call.
    """

    def __init__(self, counts, *, log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT,
                 log_lib=None, newton_tol=1e-10, max_newton=100):
        X = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        X.sum_duplicates()
        X.eliminate_zeros()
        X.sort_indices()
        self.csr = X
        self.indptr = X.indptr.astype(np.int64)
        self.indices = X.indices.astype(np.int64)
        self.vals = X.data
        N, G = X.shape
        self.shape = (N, G)
        self.max_u = np.zeros(G, np.int64)  # largest count per gene
        np.maximum.at(self.max_u, self.indices, self.vals.astype(np.int64))
        self.offsets = table_offsets(self.max_u)
        self.sigma_M = float(sigma_M)
        if log_lib is None:
            log_lib = np.log(np.asarray(X.sum(axis=1)).ravel())
        self.a = pln.capture_prior_mean(log_lib, float(log_M0))
        self.lgam_u = -np.bincount(np.repeat(np.arange(N), np.diff(X.indptr)),
                                   weights=special.gammaln(self.vals + 1.0), minlength=N)
        # capture prior normalization (truncation at 0) and the eta integral's 1/2 log 2 pi
        self.const = (self.lgam_u - 0.5 * np.log(2 * np.pi * self.sigma_M**2)
                      - special.log_ndtr(self.a / self.sigma_M) + 0.5 * np.log(2 * np.pi))
        self.newton_tol = float(newton_tol)
        self.max_newton = int(max_newton)
        self.eta = np.maximum(self.a, 0.0)
        self.n_iter = np.zeros(N, np.int64)
        self.converged = np.zeros(N, bool)
        self.at_bound = np.zeros(N, bool)
        self.curvature = np.full(N, np.nan)

    def modes(self, m, log_r):
        """Newton from the stored warm start; update and return the modes."""
        m = np.ascontiguousarray(m, dtype=np.float64)
        r = np.exp(np.asarray(log_r, dtype=np.float64))
        self.n_iter, self.converged, self.at_bound = newton_all(
            self.indptr, self.indices, self.vals, np.exp(m), r, self.a, self.sigma_M, self.eta,
            self.newton_tol, self.max_newton)
        if not self.converged.all():
            # Restart stragglers from the prior centre with a larger budget.
            bad = np.flatnonzero(~self.converged)
            rows = self.csr[bad]
            eb = np.maximum(self.a[bad], 0.0)
            it, ok, bd = newton_all(rows.indptr.astype(np.int64), rows.indices.astype(np.int64),
                                    rows.data, np.exp(m), r, self.a[bad], self.sigma_M, eb,
                                    self.newton_tol, 10 * self.max_newton)
            self.eta[bad] = eb
            self.n_iter[bad] += it
            self.converged[bad], self.at_bound[bad] = ok, bd
        return self.eta

    def log_marginal(self, m, log_r, *, grad=False):
        """Laplace log marginal per cell at the globals (modes recomputed).

        Parameters
        ----------
        m, log_r : (G,) arrays.
        grad : bool
            Also return the gradient of the sum over cells w.r.t. ``m`` and ``log_r``.

        Returns
        -------
        value : (N,); and if ``grad``: g_m (G,), g_log_r (G,)
        """
        m = np.ascontiguousarray(m, dtype=np.float64)
        log_r = np.ascontiguousarray(log_r, dtype=np.float64)
        self.modes(m, log_r)
        r = np.exp(log_r)
        lg, dg = gamma_tables(r, self.offsets)
        value, self.curvature, g_m, g_r = value_grad(
            self.indptr, self.indices, self.vals, lg, dg, self.offsets, self.const, m, r,
            self.a, self.sigma_M, self.eta, self.at_bound, bool(grad), _n_chunks())
        return (value, g_m, g_r) if grad else value

    def cell_modes(self):
        """Copy of the current modes and diagnostics as :class:`CellModes`."""
        return CellModes(self.eta.copy(), self.curvature.copy(), self.n_iter.copy(),
                         self.converged.copy(), self.at_bound.copy())


# ----------------------------------------------------------------------------- outer fit


def log_prior_and_grad(m, log_r):
    """Log prior of the globals (:func:`scribe_stan.models.nbvcp.log_prior_globals`) and
    its gradient w.r.t. ``m`` and ``log_r``."""
    value = nbvcp.log_prior_globals(m, log_r)
    return value, -(m - nbvcp.M_LOC) / nbvcp.M_SCALE**2, dispersion.log_prior_grad(log_r)


def objective(problem, theta):
    """Laplace objective (log marginal + log prior) and its gradient in ``(m, log_r)``.

    ``theta`` is ``concatenate([m, log_r])``.
    """
    G = problem.shape[1]
    m, log_r = theta[:G], theta[G:]
    value, g_m, g_r = problem.log_marginal(m, log_r, grad=True)
    lp, p_m, p_r = log_prior_and_grad(m, log_r)
    return float(value.sum() + lp), np.concatenate([g_m + p_m, g_r + p_r])


def initial_globals(counts, a):
    """Moment-based start for ``(m, log_r)`` with eta at its prior centre.

    With ``mu_cg = exp(m_g - a_c)``: ``m_g = log mean_c(u_cg exp(a_c))``, and
    ``r_g = sum_c mu_cg^2 / (sum_c (u_cg - mu_cg)^2 - sum_c mu_cg)`` from
    ``Var = mu + mu^2 / r`` (method of moments), clipped to ``r in [e^-3, e^10]``.

    Parameters
    ----------
    counts : scipy sparse CSR (N, G);  a : (N,) prior centres of eta.

    Returns
    -------
    m (G,), log_r (G,)
    """
    N, _ = counts.shape
    s = np.exp(np.maximum(a, 0.0))
    y = sp.diags(s) @ counts
    m = np.log(np.maximum(np.asarray(y.mean(axis=0)).ravel(), 0.5 / N * s.mean()))
    # mu_cg = exp(m_g) / s_c factorizes, so the sums below need only the sparse counts:
    # sum_c (u - mu)^2 = sum u^2 - 2 e^m sum_c u / s_c + e^2m sum_c 1 / s_c^2
    em = np.exp(m)
    inv_s = 1.0 / s
    sum_mu = em * inv_s.sum()
    sum_mu2 = em**2 * np.sum(inv_s**2)
    sum_u2 = np.asarray(counts.multiply(counts).sum(axis=0)).ravel()
    sum_u_over_s = np.asarray(counts.T @ inv_s).ravel()
    excess = sum_u2 - 2.0 * em * sum_u_over_s + sum_mu2 - sum_mu
    r = sum_mu2 / np.maximum(excess, 1e-12)
    return m, np.clip(np.log(r), -3.0, 10.0)


def diagonal_scaling(problem, m, log_r):
    """Per-coordinate scales ``sqrt(information)`` for the optimizer, floored at 1.

    The curvature in ``m_g`` is about ``sum_c w_cg`` and spans orders of magnitude
    between rare and abundant genes; for ``log_r_g`` the observed information at fixed
    eta is used (absolute value: it can be negative far from the optimum). The NB is
    orthogonal in (log mean, log dispersion), so a diagonal scaling is close to
    whitening. Optimizing ``theta * scale`` makes L-BFGS's start near-isotropic.
    """
    problem.modes(m, log_r)
    info = observed_information(problem, m, log_r)
    return np.sqrt(np.maximum(np.concatenate([info["mm"], np.abs(info["rr"])]), 1.0))


@dataclass
class NbvcpSolution:
    """Result of :func:`fit_nbvcp`.

    Attributes
    ----------
    problem : NbvcpProblem (data, capture prior, modes).
    m : (G,) log mean expression;  log_r : (G,) log dispersions.
    modes : CellModes at the final globals.
    objective : float, final Laplace objective (log marginal + log prior, nats).
    n_iter : int, outer L-BFGS-B iterations;  n_eval : int, objective evaluations.
    success : bool and message : str from the optimizer.
    history : objective per outer iteration;  wall_time_s : float.
    """

    problem: NbvcpProblem
    m: np.ndarray
    log_r: np.ndarray
    modes: CellModes
    objective: float
    n_iter: int
    n_eval: int
    success: bool
    message: str
    history: list = field(default_factory=list)
    wall_time_s: float = 0.0


def fit_nbvcp(counts, *, log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT,
              log_lib=None, tol=1e-10, max_iter=1000, newton_tol=1e-10, init=None,
              n_init_sweeps=3, progress=None):
    """Fit the nbvcp globals ``(m, log_r)`` by maximizing the exact Laplace objective.

    Parameters
    ----------
    counts : (N, G) non-negative integer counts, dense or sparse (validated).
    log_M0, sigma_M, log_lib : capture prior and library sizes (see NbvcpProblem).
    tol : float
        Relative objective tolerance of L-BFGS-B (``ftol``).
    max_iter : int, outer iterations.
    newton_tol : float, per-cell Newton step tolerance.
    init : tuple (m, log_r), optional
        Default: :func:`initial_globals`, refined by ``n_init_sweeps`` alternations of
        per-cell eta modes and per-gene MAPs (:func:`gene_newton`).
    n_init_sweeps : int
    progress : tqdm-like object with ``update``/``set_postfix``, optional.

    Returns
    -------
    NbvcpSolution
    """
    t0 = time.perf_counter()
    problem = NbvcpProblem(counts, log_M0=log_M0, sigma_M=sigma_M, log_lib=log_lib,
                           newton_tol=newton_tol)
    G = problem.shape[1]
    if init is None:
        m0, r0 = initial_globals(problem.csr, problem.a)
        # Alternate per-cell eta modes and per-gene MAPs given eta: a joint-MAP start
        # close to the Laplace optimum, where L-BFGS needs far fewer iterations.
        csc = problem.csr.tocsc()
        for _ in range(n_init_sweeps):
            problem.modes(m0, r0)
            gene_newton(csc.indptr.astype(np.int64), csc.indices.astype(np.int64), csc.data,
                        np.minimum(problem.max_u, TABLE_CAP), problem.eta, m0, r0, 2)
    else:
        m0, r0 = (np.array(v, dtype=np.float64) for v in init)
    lower = np.concatenate([np.full(G, M_BOUNDS[0]), np.full(G, LOG_R_BOUNDS[0])])
    upper = np.concatenate([np.full(G, M_BOUNDS[1]), np.full(G, LOG_R_BOUNDS[1])])
    theta0 = np.clip(np.concatenate([m0, r0]), lower, upper)
    scale = diagonal_scaling(problem, theta0[:G], theta0[G:])
    res = driver.maximize(lambda theta: objective(problem, theta), theta0, lower, upper,
                          scaling=lambda _: scale, tol=tol, max_iter=max_iter,
                          progress=progress)
    theta = res.theta
    # Final E-step at the returned globals (the last evaluation may be a line-search trial).
    final, _ = objective(problem, theta)
    modes = problem.cell_modes()
    if not modes.converged.all():
        warnings.warn(f"{int((~modes.converged).sum())} of {modes.converged.size} cells did not "
                      "converge in the per-cell Newton step; see fit.converged.", RuntimeWarning,
                      stacklevel=2)
    return NbvcpSolution(problem=problem, m=theta[:G].copy(), log_r=theta[G:].copy(),
                         modes=modes, objective=final, n_iter=res.n_iter, n_eval=res.n_eval,
                         success=res.success, message=res.message, history=res.history,
                         wall_time_s=time.perf_counter() - t0)


# ----------------------------------------------------------------------- posterior summaries


@njit(cache=True, parallel=True)
def log_lik_draws(indptr, indices, vals, lg, offsets, lgam_u, m, r, eta):
    """NB log likelihood of every cell at each draw of its eta.

    Parameters
    ----------
    indptr, indices, vals : CSR counts (N x G);  lg, offsets : :func:`gamma_tables`.
    lgam_u : (N,) ``-sum_g lgamma(u + 1)``;  m, r : (G,);  eta : (S, N) draws.

    Returns
    -------
    (S, N) array
    """
    S, N = eta.shape
    G = m.size
    em = np.exp(m)
    log_r = np.log(r)
    out = np.empty((S, N))
    for c in prange(N):
        l1p = np.empty(G)
        for s in range(S):
            e = eta[s, c]
            scale = math.exp(-e)
            val = lgam_u[c]
            for g in range(G):
                l1p[g] = math.log1p(em[g] * scale / r[g])
                val -= r[g] * l1p[g]
            for k in range(indptr[c], indptr[c + 1]):
                g, u = indices[k], vals[k]
                val += (_lgamma_diff(lg, offsets, g, u, r[g])
                        + u * (m[g] - e - l1p[g] - log_r[g]))
            out[s, c] = val
    return out


def _second_derivatives(problem, m, log_r, rows):
    """Second derivatives of the NB log likelihood of cells ``rows`` at the stored modes.

    Returns dense (n_rows, G) arrays keyed ``mm, mr, rr`` (w.r.t. m and log_r) and
    ``me, re`` (cross terms with eta), where for one (cell, gene), with
    ``D = digamma(u + r) - digamma(r)``, ``T = trigamma(u + r) - trigamma(r)``::

        d2/dm2 = -w,  w = r mu (u + r) / q^2;   d2/dm deta = w
        d2/dm dlog_r = r mu (u - mu) / q^2 = -d2/dlog_r deta
        d2/dlog_r2 = r [D - log(q/r)] + r (mu - u)/q + r u/q + r mu (mu - u)/q^2 + r^2 T
    """
    r = np.exp(log_r)[None, :]
    u = problem.csr[rows].toarray()
    mu = np.exp(m[None, :] - problem.eta[rows, None])
    q = mu + r
    nz = u > 0
    rb = np.broadcast_to(r, u.shape)[nz]
    D = np.zeros_like(u)
    T = np.zeros_like(u)
    D[nz] = special.digamma(u[nz] + rb) - special.digamma(rb)
    T[nz] = special.polygamma(1, u[nz] + rb) - special.polygamma(1, rb)
    w = r * mu * (u + r) / q**2
    cross = r * mu * (u - mu) / q**2
    h_rr = (r * (D - np.log1p(mu / r)) + r * (mu - u) / q + r * u / q
            + r * mu * (mu - u) / q**2 + r**2 * T)
    return {"mm": -w, "mr": cross, "rr": h_rr, "me": w, "re": -cross}


def _cell_blocks(N, G, budget=500_000):
    """Row slices of at most ``budget / G`` cells: bounds the dense temporaries."""
    step = max(1, budget // max(G, 1))
    return [slice(i, min(N, i + step)) for i in range(0, N, step)]


def observed_information(problem, m, log_r):
    """Per-gene 2 x 2 blocks of the negative Hessian of ``log p(u, eta | m, log_r) +
    log prior`` in ``(m_g, log_r_g)`` at fixed eta (the stored modes), summed over cells.

    Returns
    -------
    dict of (G,) arrays ``mm, mr, rr``
    """
    N, G = problem.shape
    out = {"mm": np.full(G, 1.0 / nbvcp.M_SCALE**2), "mr": np.zeros(G),
           "rr": np.full(G, 1.0 / dispersion.LOG_R_SCALE**2)}
    for rows in _cell_blocks(N, G):
        h = _second_derivatives(problem, m, log_r, rows)
        for key in out:
            out[key] -= h[key].sum(axis=0)
    return out


def gaussian_moments(problem, m, log_r):
    """Marginal posterior sds of ``m``, ``log_r`` and ``eta`` under a joint Gaussian.

    The joint posterior of ``theta = (m, log_r)`` and ``eta`` is approximated by the
    Gaussian whose precision ``Q`` is the negative Hessian of the log joint at
    ``(theta_hat, eta_hat(theta_hat))``: per-gene 2 x 2 blocks ``A`` for theta (plus
    the prior), the diagonal ``D_c = H_c`` for eta, and the cell-gene couplings ``B``.
    Then

    * ``Cov(theta) = S^{-1}``, ``S = A - B D^{-1} B'``: the observed information of
      the Laplace objective without the second derivatives of its ``-1/2 log H_c``
      terms (which are O(1) per cell against O(counts));
    * ``Var(eta_c) = 1/H_c + b_c' S^{-1} b_c`` with ``b_c = B[:, c] / H_c = d eta_hat_c
      / d theta`` (total variance: the 1-D Laplace variance plus the propagated
      uncertainty of the globals, dominated by the shared shift of ``m`` and ``eta``
      that only the priors pin down).

    ``S`` couples every pair of genes through the shared eta_c, so it is a dense
    ``2G x 2G`` matrix: memory O(G^2), time O(N G^2) (a few seconds for 3000 cells x
    2000 genes). A mode on the bound ``eta = 0`` is treated as interior.

    Parameters
    ----------
    problem : NbvcpProblem whose modes and curvatures are at ``(m, log_r)``.
    m, log_r : (G,) globals.

    Returns
    -------
    dict with (G,) ``m_sd``, ``log_r_sd``, ``m_log_r_corr`` and (N,) ``eta_sd``,
    ``eta_sd_given_globals`` (``1 / sqrt(H_c)``).
    """
    from scipy import linalg

    N, G = problem.shape
    H = problem.curvature
    info = observed_information(problem, m, log_r)
    S = np.zeros((2 * G, 2 * G), order="F")  # Fortran order: LAPACK works on it in place
    idx = np.arange(G)
    S[idx, idx] = info["mm"]
    S[idx + G, idx + G] = info["rr"]
    S[idx, idx + G] = S[idx + G, idx] = info["mr"]

    def couplings(rows):
        h = _second_derivatives(problem, m, log_r, rows)
        return -np.hstack([h["me"], h["re"]])  # B' rows: (n_rows, 2G)

    for rows in _cell_blocks(N, 2 * G):
        Bt = couplings(rows)
        S = linalg.blas.dgemm(-1.0, Bt / H[rows, None], Bt, beta=1.0, c=S, trans_a=True,
                              overwrite_c=True)
    # In place, so that only one 2G x 2G matrix is ever held: S -> its Cholesky factor
    # (used for the eta variances) -> S^{-1} (LAPACK potri, lower triangle).
    L = linalg.cholesky(S, lower=True, overwrite_a=True, check_finite=False)
    eta_var = 1.0 / H
    for rows in _cell_blocks(N, 2 * G):
        X = linalg.solve_triangular(L, (couplings(rows) / H[rows, None]).T, lower=True,
                                    check_finite=False)
        eta_var[rows] += np.sum(X**2, axis=0)
    cov, info_flag = linalg.lapack.dpotri(L, lower=True, overwrite_c=True)
    if info_flag != 0:
        raise np.linalg.LinAlgError(f"LAPACK dpotri failed (info={info_flag})")
    cov_diag = np.diag(cov).copy()
    cov_mr = cov[idx + G, idx].copy()  # lower triangle holds S^{-1}
    m_sd, r_sd = np.sqrt(cov_diag[:G]), np.sqrt(cov_diag[G:])
    return {"m_sd": m_sd, "log_r_sd": r_sd, "m_log_r_corr": cov_mr / (m_sd * r_sd),
            "eta_sd": np.sqrt(eta_var), "eta_sd_given_globals": 1.0 / np.sqrt(H)}
