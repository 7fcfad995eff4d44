"""Laplace fit of the logistic-normal multinomial models ``lnm`` and ``lnmvcp``.

Per cell the likelihood factorizes into the negative-binomial total and the multinomial
composition given the total, and the two blocks share no parameter: the composition
block has the globals ``(mu, W, d)`` and the latent ``y_c`` (ALR coordinates), the total
block has ``(m_T, r_T)`` and, for lnmvcp, the capture latent ``eta_c``. The joint
Hessian of the per-cell latents is block diagonal, so the Laplace objective is a sum of
two independent problems, fitted separately:

* :class:`CompositionProblem` / :func:`fit_composition`: per-cell Newton-Woodbury on y_c
  (kernels in :mod:`.lnm_cpu`, mode ``"full"``) or on factor scores z_c (``"low_rank"``,
  ``d = 0``), outer L-BFGS-B over ``(mu, W, log d)`` with the exact gradient
  (Margossian et al. 2020, arXiv:2004.12550).
* :class:`TotalProblem` / :func:`fit_totals`: lnm's total is closed form,
  ``sum_c log NB(u_T,c | m_T, r_T)``; lnmvcp's is a scalar projected Newton on each
  eta_c (strictly concave, eta >= 0) with a one-dimensional Laplace value and its exact
  gradient. Outer L-BFGS-B over ``(log m_T, log r_T)``.

Both objectives are exact with all constants, and priors enter as densities in the
natural parameters (``mu, W, d, log m_T, log r_T``: a MAP without change-of-variables
term, as for pln).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numba
import numpy as np
from scipy import special, stats

from scribe_stan.laplace import driver, lnm_cpu, solver
from scribe_stan.models import dispersion, lnm, pln

MODES = ("full", "low_rank")
#: Preconditioners of the composition block (:func:`composition_scaling`).
PRECONDITIONERS = ("block", "diagonal")
#: Outer iterations before the first renewal of the composition scale (doubling after).
RESCALE_FIRST = 50
_LOG_2PI = float(np.log(2.0 * np.pi))


def _n_chunks():
    return 8 * numba.get_num_threads()


def _pair_products(W):
    return np.ascontiguousarray((W[:, :, None] * W[:, None, :]).reshape(W.shape[0], -1))


def _sigma_parts(W, d):
    """Cholesky of ``C = I + W' diag(1/d) W`` and ``Sigma^{-1} 1`` (shared by all cells)."""
    Wd = W / d[:, None]
    Lc = np.linalg.cholesky(np.eye(W.shape[1]) + Wd.T @ W)
    one_d = 1.0 / d
    sig1 = one_d - Wd @ np.linalg.solve(Lc.T, np.linalg.solve(Lc, Wd.T @ np.ones_like(d)))
    return Lc, np.ascontiguousarray(sig1)


# --------------------------------------------------------------------------------------
# Composition block
# --------------------------------------------------------------------------------------


@dataclass
class CompositionModes:
    """Per-cell modes: ``y`` (N, D) ALR coordinates, ``z`` (N, K) factor scores
    (``low_rank`` only, else None), ``n_iter`` (N,) Newton iterations, ``converged`` (N,)."""

    y: np.ndarray
    z: np.ndarray | None
    n_iter: np.ndarray
    converged: np.ndarray


class CompositionProblem:
    """Per-cell Laplace approximations of the multinomial-given-total composition block.

    Parameters
    ----------
    counts : (N, G) non-negative integer counts (validated by the caller).
    ref : int
        0-based reference gene; ALR coordinates are the other genes in order.
    mode : {"full", "low_rank"}
        Latent per cell: y_c in R^{G-1} (default) or factor scores z_c in R^K with d = 0.
    newton_tol : float
        Stop when half the Newton decrement (predicted gain, nats) is below this after a
        full step.
    max_newton : int
        Newton iterations per cell per call.
    """

    def __init__(self, counts, ref, *, mode="full", newton_tol=1e-10, max_newton=100):
        if mode not in MODES:
            raise ValueError(f"unknown Laplace mode {mode!r}; allowed: {', '.join(MODES)}")
        counts = np.asarray(counts, dtype=np.float64)
        self.mode = mode
        self.ref = int(ref)
        self.others = np.delete(np.arange(counts.shape[1]), self.ref)
        self.u = np.ascontiguousarray(counts[:, self.others])
        self.u_ref = counts[:, self.ref].copy()
        self.uT = counts.sum(axis=1)
        # log multinomial coefficient
        self.const = special.gammaln(self.uT + 1.0) - special.gammaln(counts + 1.0).sum(axis=1)
        self.newton_tol = float(newton_tol)
        self.max_newton = int(max_newton)
        self.y = self._start()
        self.z = None
        self.n_iter = np.zeros(self.u.shape[0], np.int64)
        self.converged = np.zeros(self.u.shape[0], bool)

    @property
    def shape(self):
        """(N, D): cells and ALR dimension."""
        return self.u.shape

    def keep_modes(self):
        """Remember the current modes (:mod:`scribe_stan.laplace.driver`)."""
        self._kept = (self.y.copy(), None if self.z is None else self.z.copy())

    def restore_modes(self):
        """Go back to the modes of the last :meth:`keep_modes`."""
        self.y[:] = self._kept[0]
        if self._kept[1] is not None:
            self.z[:] = self._kept[1]

    def _start(self):
        """Data-driven start: empirical log-ratios with a 1/2 pseudo-count."""
        return np.log(self.u + 0.5) - np.log(self.u_ref + 0.5)[:, None]

    def modes(self, mu, W, d=None, *, steps=None):
        """Newton from the stored warm start at globals ``(mu, W, d)``; returns the modes.

        ``d`` is ignored in the ``low_rank`` mode. Cells that fail are restarted once from
        the data-driven start (full mode) or from z = 0 (low rank). ``steps`` caps the
        Newton steps per cell and skips that restart (globals near those of the warm
        start, as in the nested draws of :mod:`scribe_stan.laplace.lnm_globals`);
        ``converged`` then says which cells met the tolerance within the cap.
        """
        mu, W = np.ascontiguousarray(mu, float), np.ascontiguousarray(W, float)
        WW = _pair_products(W)
        N, K = self.shape[0], W.shape[1]
        cap = self.max_newton if steps is None else int(steps)
        if self.mode == "low_rank":
            if self.z is None or self.z.shape[1] != K:
                self.z = np.zeros((N, K))
            run = lambda idx, z: lnm_cpu.newton_lowrank(  # noqa: E731
                self.u[idx], self.uT[idx], mu, W, WW, z, self.newton_tol, cap, _n_chunks())
            state, fresh = self.z, lambda idx: np.zeros((idx.size, K))  # noqa: E731
        else:
            d = np.ascontiguousarray(d, float)
            Lc, sig1 = _sigma_parts(W, d)
            run = lambda idx, y: lnm_cpu.newton_full(  # noqa: E731
                self.u[idx], self.uT[idx], mu, W, d, WW, Lc, sig1, y, self.newton_tol, cap,
                _n_chunks())
            state, fresh = self.y, lambda idx: self._start()[idx]  # noqa: E731
        self.n_iter, self.converged = run(np.arange(N), state)
        if steps is None and not self.converged.all():
            bad = np.flatnonzero(~self.converged)
            sub = np.ascontiguousarray(fresh(bad))
            it, ok = run(bad, sub)
            state[bad] = sub
            self.n_iter[bad] += it
            self.converged[bad] = ok
        if self.mode == "low_rank":
            self.y = mu + self.z @ W.T
        return CompositionModes(self.y, self.z, self.n_iter, self.converged)

    def log_marginal(self, mu, W, d=None, *, grad=False):
        """Laplace log marginal of each cell's composition (modes recomputed).

        Returns
        -------
        value : (N,) ``log p_hat(u_c | u_T,c, mu, W, d)`` with all constants; and if
        ``grad``: g_mu (D,), g_W (D, K), g_d (D,) (None in ``low_rank`` mode), the
        gradient of ``sum(value)``.
        """
        self.modes(mu, W, d)
        mu, W = np.ascontiguousarray(mu, float), np.ascontiguousarray(W, float)
        WW = _pair_products(W)
        if self.mode == "low_rank":
            value, g_mu, g_W = lnm_cpu.value_grad_lowrank(self.u, self.uT, self.const, mu, W,
                                                         WW, self.z, grad,
                                                         numba.get_num_threads())
            g_d = None
        else:
            d = np.ascontiguousarray(d, float)
            Lc, sig1 = _sigma_parts(W, d)
            value, g_mu, g_W, g_d = lnm_cpu.value_grad_full(self.u, self.uT, self.const, mu, W,
                                                            d, WW, Lc, sig1, self.y, grad,
                                                            numba.get_num_threads())
        return (value, g_mu, g_W, g_d) if grad else value

    def sample(self, mu, W, d, draws, rng):
        """Draws of y from each cell's Gaussian at the stored modes (vectorized NumPy).

        Full mode: ``N(y_hat, V)``, ``V = A^{-1} + (u_T/s) a a'``, drawn as
        ``A^{-1}(Sigma^{-1} x0 + lambda^{1/2} e) + (u_T/s)^{1/2} a xi`` with
        ``x0 ~ N(0, Sigma)`` (covariance ``A^{-1} (Sigma^{-1} + diag(lambda)) A^{-1} =
        A^{-1}``) plus an independent rank-one term. Low rank: ``z ~ N(z_hat, (-H_z)^{-1})``
        and ``y = mu + W z``.

        Returns
        -------
        dict with ``y`` (draws, N, D), ``log_lik`` (draws, N: log multinomial),
        ``lp`` (draws, N: log multinomial + log prior of the latent) and
        ``lp_approx`` (draws, N: log density of the Gaussian).
        """
        N, D = self.shape
        K = W.shape[1]
        p = np.exp(lnm.logits(self.y, D)
                   - special.logsumexp(lnm.logits(self.y, D), axis=1, keepdims=True))[:, :D]
        lam = self.uT[:, None] * p
        out = {k: np.empty((draws, N)) for k in ("log_lik", "lp", "lp_approx")}
        out["y"] = np.empty((draws, N, D))
        if self.mode == "low_rank":
            H = np.einsum("nd,dk,dj->nkj", lam, W, W) + np.eye(K)
            wp = p @ W
            H -= self.uT[:, None, None] * wp[:, :, None] * wp[:, None, :]
            L = np.linalg.cholesky(H)
            half_logdet = np.log(np.diagonal(L, axis1=1, axis2=2)).sum(axis=1)
            for s in range(draws):
                xi = rng.standard_normal((N, K))
                dz = np.linalg.solve(np.swapaxes(L, 1, 2), xi[..., None])[..., 0]
                z = self.z + dz
                y = mu + z @ W.T
                out["y"][s] = y
                out["log_lik"][s] = self._log_mult(y)
                out["lp"][s] = out["log_lik"][s] - 0.5 * (z**2).sum(1) - 0.5 * K * _LOG_2PI
                out["lp_approx"][s] = half_logdet - 0.5 * (xi**2).sum(1) - 0.5 * K * _LOG_2PI
            return out
        Lc, sig1 = _sigma_parts(W, d)
        Wd = W / d[:, None]

        def sig_inv(v):  # (N, D) rows times Sigma^{-1}
            return v / d - np.linalg.solve(Lc.T, np.linalg.solve(Lc, (v @ Wd).T)).T @ Wd.T

        h = 1.0 / (1.0 + lam * d)
        invB = d * h
        M = np.einsum("nd,dk,dj->nkj", lam * h, W, W) + np.eye(K)
        LM = np.linalg.cholesky(M)

        def a_inv(v):  # (N, D) rows times A^{-1}, per cell
            t = np.einsum("nd,dk->nk", h * v, W)
            sol = np.linalg.solve(np.swapaxes(LM, 1, 2),
                                  np.linalg.solve(LM, t[..., None]))[..., 0]
            return v * invB + h * (sol @ W.T)

        a = a_inv(p)
        rho_ref = np.exp(-special.logsumexp(lnm.logits(self.y, D), axis=1))
        s_fac = rho_ref + np.maximum((p * a_inv(np.broadcast_to(sig1, (N, D)))).sum(1), 0.0)
        logdet_sigma = np.log(d).sum() + 2 * np.log(np.diag(Lc)).sum()
        logdet_negH = (-logdet_sigma + np.log1p(lam * d).sum(1)
                       + 2 * np.log(np.diagonal(LM, axis1=1, axis2=2)).sum(1) + np.log(s_fac))
        cT = np.sqrt(self.uT / s_fac)
        for s in range(draws):
            x0 = rng.standard_normal((N, K)) @ W.T + np.sqrt(d) * rng.standard_normal((N, D))
            e1 = a_inv(sig_inv(x0) + np.sqrt(lam) * rng.standard_normal((N, D)))
            delta = e1 + (cT * rng.standard_normal(N))[:, None] * a
            y = self.y + delta
            out["y"][s] = y
            out["log_lik"][s] = self._log_mult(y)
            r = y - mu
            out["lp"][s] = (out["log_lik"][s] - 0.5 * (r * sig_inv(r)).sum(1)
                            - 0.5 * D * _LOG_2PI - 0.5 * logdet_sigma)
            quad = (self.uT * ((p * delta**2).sum(1) - (p * delta).sum(1) ** 2)
                    + (delta * sig_inv(delta)).sum(1))
            out["lp_approx"][s] = -0.5 * D * _LOG_2PI + 0.5 * logdet_negH - 0.5 * quad
        return out

    def _log_mult(self, y):
        """log Multinomial(u_c | u_T,c, softmax([y_c, 0])) with the coefficient, (N,)."""
        D = self.shape[1]
        lg = lnm.logits(y, D)
        log_rho = lg - special.logsumexp(lg, axis=1, keepdims=True)
        return self.const + (self.u * log_rho[:, :D]).sum(1) + self.u_ref * log_rho[:, D]


def composition_prior(mu, W, d=None):
    """Log prior of the composition globals (pln's default prior) and its gradient.

    Returns ``(value, g_mu, g_W, g_d)``; ``d=None`` (low-rank mode) omits d's prior and
    returns ``g_d = None``.
    """
    value = (stats.norm.logpdf(mu, pln.MU_LOC, pln.MU_SCALE).sum()
             + stats.norm.logpdf(W, 0.0, pln.W_SCALE).sum())
    g_mu = -(mu - pln.MU_LOC) / pln.MU_SCALE**2
    g_W = -W / pln.W_SCALE**2
    g_d = None
    if d is not None:
        value += stats.gamma.logpdf(d, pln.D_SHAPE, scale=1.0 / pln.D_RATE).sum()
        g_d = (pln.D_SHAPE - 1.0) / d - pln.D_RATE
    return float(value), g_mu, g_W, g_d


def _unpack(theta, D, K, mode):
    """Globals ``(mu, W, d)`` from the optimizer's ``(m, W, log d)``.

    The optimizer moves the log-mean ``m = mu + diag(Sigma) / 2`` (``log E[exp(y_j)]``)
    instead of ``mu``: a rare gene's counts fix ``m`` well but hardly split it into
    ``mu`` and the variance, so in ``(mu, log d)`` the optimum lies along a curved
    valley (``mu`` falls as ``d`` rises) that L-BFGS followed for hundreds of iterations.
    """
    W = theta[D:D + D * K].reshape(D, K)
    d = np.exp(theta[D + D * K:]) if mode == "full" else None
    var = np.sum(W**2, axis=1) + (d if d is not None else 0.0)
    return theta[:D] - 0.5 * var, W, d


def _pack(mu, W, d):
    """Inverse of :func:`_unpack`."""
    var = np.sum(W**2, axis=1) + (d if d is not None else 0.0)
    parts = [mu + 0.5 * var, W.ravel()] + ([np.log(d)] if d is not None else [])
    return np.concatenate(parts)


def composition_objective(problem, theta, K):
    """Laplace objective (sum of cell values + log prior) and its gradient in the
    optimizer's coordinates ``(m, W, log d)`` (full) or ``(m, W)`` (low rank); see
    :func:`_unpack`."""
    D = problem.shape[1]
    mu, W, d = _unpack(theta, D, K, problem.mode)
    value, g_mu, g_W, g_d = problem.log_marginal(mu, W, d, grad=True)
    lp, p_mu, p_W, p_d = composition_prior(mu, W, d)
    g_mu = g_mu + p_mu
    # chain rule through mu = m - (|W_j|^2 + d_j) / 2
    parts = [g_mu, (g_W + p_W - g_mu[:, None] * W).ravel()]
    if d is not None:
        parts.append((g_d + p_d - 0.5 * g_mu) * d)
    return float(value.sum() + lp), np.concatenate(parts)


def initial_composition(problem, K, *, seed=0):
    """Moment start: mean and top-K principal axes of the empirical log-ratios.

    The multinomial sampling variance of an empirical log-ratio,
    ``1/(u_j + 1/2) + 1/(u_ref + 1/2)``, is subtracted from the variances before
    splitting them into loadings and residual ``d`` (floored at 0.05).
    """
    Y = problem._start()
    N, D = Y.shape
    mu = Y.mean(axis=0)
    Z = (Y - mu) / np.sqrt(N)
    noise = np.mean(1.0 / (problem.u + 0.5) + 1.0 / (problem.u_ref + 0.5)[:, None], axis=0)
    var = np.maximum((Z**2).sum(0) - noise, 0.05)
    rng = np.random.default_rng(seed)
    _, sv, vt = np.linalg.svd(Z - 1e-9 * rng.standard_normal(Z.shape), full_matrices=False)
    W = vt[:K].T * sv[:K]
    row = np.sum(W**2, axis=1)
    W *= np.sqrt(np.minimum(1.0, 0.8 * var / np.maximum(row, 1e-12)))[:, None]
    d = np.maximum(var - np.sum(W**2, axis=1), 0.05)
    return mu, W, d


def composition_scaling(problem, mu, W, d, *, precondition="block"):
    """Preconditioner of the composition block in the optimizer's ``(m, W, log d)``.

    The multinomial's curvature in y_cj at the mode is about ``lambda_cj = u_T,c p_cj``
    (its rank-one part ``-u_T p p'`` left out).

    ``"block"``: gene j's ``(m_j, W_j)`` block of the Fisher information given the
    factors (:func:`scribe_stan.laplace.solver.factor_fisher`, pln's), built in
    ``(mu_j, W_j)`` as ``A_j`` and carried to the optimizer's coordinates through
    ``mu_j = m_j - (|W_j|^2 + d_j) / 2``: with ``J_j = d(mu_j, W_j) / d(m_j, W_j) =
    [[1, -W_j'], [0, I]]`` the block is ``J_j' A_j J_j``. In the low-rank mode
    (``d=None``) the factor scores are the modes and ``w = lambda``. ``log d_j`` keeps
    a diagonal scale ``1/2 sum_c (w_cj d_j)^2``, floored at 1. On the 400-gene PBMC
    subset (K=10) the blocks took L-BFGS from 223 to 177 iterations (low rank: 211 to
    123) with the diagonal scale below, to objectives 0.5 (0.7) nats higher.

    ``"diagonal"``: curvature in m_j, and in each of W_j's entries, about
    ``sum_c lambda_cj / (1 + lambda_cj Sigma_jj)``, floored at 1 so silent coordinates
    are never stretched; log d_j as above with that weight.

    Parameters
    ----------
    problem : CompositionProblem (its modes are set at these globals).
    mu : (D,);  W : (D, K);  d : (D,) > 0 or None (low rank).
    precondition : {"block", "diagonal"}

    Returns
    -------
    driver.BlockScale (``"block"``) or (P,) ndarray of scales (``"diagonal"``).
    """
    problem.modes(mu, W, d)
    D, K = W.shape
    lg = lnm.logits(problem.y, D)
    lam = problem.uT[:, None] * np.exp(lg - special.logsumexp(lg, axis=1, keepdims=True))[:, :D]
    if precondition == "block":
        modes = problem.y if d is not None else problem.z
        A, info_d = solver.factor_fisher([(modes, lam)], mu, W, d,
                                         w_precision=np.full(K, 1.0 / pln.W_SCALE**2))
        J = np.broadcast_to(np.eye(K + 1), A.shape).copy()
        J[:, 0, 1:] = -W
        A = np.einsum("gji,gjk,gkl->gil", J, A, J)
        tail = np.maximum(info_d, 1.0) if d is not None else np.zeros(0)
        return solver.gene_block_scale(A, tail)
    sig = np.sum(W**2, axis=1) + (d if d is not None else 0.0)
    w = lam / (1.0 + lam * sig)
    info = np.maximum(w.sum(0), 1.0)
    parts = [info, np.repeat(info, K)]
    if d is not None:
        parts.append(np.maximum(0.5 * np.sum((w * d) ** 2, axis=0), 1.0))
    return np.sqrt(np.concatenate(parts))


@dataclass
class CompositionSolution:
    """Result of :func:`fit_composition` (ALR coordinates against ``problem.ref``).

    Attributes: problem, mu (D,), W (D, K), d (D,) or None (low rank), modes,
    objective (nats, with the prior), n_iter, n_eval, success, message, history.
    """

    problem: CompositionProblem
    mu: np.ndarray
    W: np.ndarray
    d: np.ndarray | None
    modes: CompositionModes
    objective: float
    n_iter: int
    n_eval: int
    success: bool
    message: str
    history: list = field(default_factory=list)


def fit_composition(counts, ref, K, *, mode="full", tol=1e-8, max_iter=1000,
                    newton_tol=1e-10, init=None, seed=0, progress=None, max_unconverged=0.01,
                    precondition="block"):
    """Maximize the composition block's Laplace objective over the globals by L-BFGS-B.

    L-BFGS-B runs in ``(m, W, log d)`` (:func:`_unpack`) in the coordinates of
    :func:`composition_scaling`, renewed at restarts after ``RESCALE_FIRST`` outer
    iterations and then after twice as many each time.

    Parameters
    ----------
    counts : (N, G) counts;  ref : int reference gene;  K : int rank.
    mode : {"full", "low_rank"}
    tol : relative objective tolerance (``ftol``);  max_iter : outer iterations.
    newton_tol : per-cell Newton tolerance.
    init : (mu, W, d), optional; default :func:`initial_composition`.
    progress : tqdm-like, optional.
    max_unconverged : fraction of failed cells above which a line-search trial's modes
        are not kept as warm starts.
    precondition : {"block", "diagonal"}
        Per-gene blocks of ``(m_j, W_j)`` (default) or a diagonal scale
        (:func:`composition_scaling`).

    Returns
    -------
    CompositionSolution

    Raises
    ------
    ValueError
        Unknown ``precondition``.
    """
    if precondition not in PRECONDITIONERS:
        raise ValueError(f"unknown precondition {precondition!r}; allowed: "
                         f"{', '.join(PRECONDITIONERS)}")
    problem = CompositionProblem(counts, ref, mode=mode, newton_tol=newton_tol)
    D = problem.shape[1]
    mu0, W0, d0 = init if init is not None else initial_composition(problem, K, seed=seed)
    if mode == "low_rank":
        d0 = None
    n_d = D if mode == "full" else 0
    # Box on log d only: m is in the preconditioner's blocks, where no box applies.
    lower = np.concatenate([np.full(D + D * K, -np.inf), np.full(n_d, np.log(1e-6))])
    upper = np.concatenate([np.full(D + D * K, np.inf), np.full(n_d, np.log(1e2))])

    def value_grad(theta):
        # trial points past |m| = MU_BOUND (log-ratios whose softmax overflows) are
        # rejected as infeasible instead.
        if np.max(np.abs(theta[:D])) > solver.MU_BOUND:
            return -np.inf, np.zeros_like(theta)
        return composition_objective(problem, theta, K)

    # The scale is renewed at restarts after 50, 100, 200, ... iterations: the
    # information in log d_j grows with d_j^2, and rare genes' d_j rise by orders of
    # magnitude from the moment start, so a scale fixed there mis-scales their log d
    # coordinates (on PBMC they carried most of the gradient at iteration 300).
    res = driver.maximize(value_grad, _pack(mu0, W0, d0), lower, upper, problem=problem,
                          scaling=lambda theta: composition_scaling(
                              problem, *_unpack(theta, D, K, mode),
                              precondition=precondition),
                          tol=tol, max_iter=max_iter, progress=progress,
                          max_unconverged=max_unconverged, rescale_first=RESCALE_FIRST)
    theta = res.theta
    final, _ = composition_objective(problem, theta, K)
    mu, W, d = _unpack(theta, D, K, mode)
    modes = CompositionModes(problem.y.copy(), None if problem.z is None else problem.z.copy(),
                             problem.n_iter.copy(), problem.converged.copy())
    return CompositionSolution(problem=problem, mu=mu.copy(), W=W.copy(),
                               d=None if d is None else d.copy(), modes=modes, objective=final,
                               n_iter=res.n_iter, n_eval=res.n_eval, success=res.success,
                               message=res.message, history=res.history)


# --------------------------------------------------------------------------------------
# Total-count block
# --------------------------------------------------------------------------------------


def _nb_parts(uT, v, r):
    """NB2 log pmf in the log mean v and its derivatives.

    Returns (l, dl/dv, L2 = -d2l/dv2, dl/dr, dL2/dv, dL2/dr, d(dl/dv)/dr).
    """
    m = np.exp(v)
    mr = m + r
    l = dispersion.nb_logpmf(uT, v, r)
    dl_dv = r * (uT - m) / mr
    L2 = (uT + r) * m * r / mr**2
    dl_dr = (special.digamma(uT + r) - special.digamma(r) + np.log(r) + 1.0 - np.log(mr)
             - (uT + r) / mr)
    dL2_dv = (uT + r) * r * m * (r - m) / mr**3
    dL2_dr = m * ((uT + 2 * r) * mr - 2 * r * (uT + r)) / mr**3
    ddl_dr = (uT - m) * m / mr**2
    return l, dl_dv, L2, dl_dr, dL2_dv, dL2_dr, ddl_dr


class TotalProblem:
    """The total-count block: ``u_T,c ~ NB(m_T [exp(-eta_c)], r_T)``.

    Parameters
    ----------
    totals : (N,) totals ``u_T,c``.
    capture : bool
        lnmvcp (True): eta_c with the truncated-normal capture prior, marginalized by a
        scalar Laplace approximation; lnm (False): closed form.
    log_lib, log_M0, sigma_M : capture prior inputs (lnmvcp).
    """

    def __init__(self, totals, *, capture=False, log_lib=None, log_M0=np.log(pln.M0_DEFAULT),
                 sigma_M=pln.SIGMA_M_DEFAULT, newton_tol=1e-12, max_newton=100):
        self.uT = np.asarray(totals, dtype=float)
        self.capture = bool(capture)
        self.sigma_M = float(sigma_M)
        if log_lib is None:
            log_lib = np.log(np.maximum(self.uT, 1.0))
        self.a = pln.capture_prior_mean(log_lib, log_M0)
        self.eta = np.maximum(self.a, 0.0)
        self.newton_tol = float(newton_tol)
        self.max_newton = int(max_newton)
        self.converged = np.ones(self.uT.size, bool)
        self.at_bound = np.zeros(self.uT.size, bool)
        self.n_iter = np.zeros(self.uT.size, np.int64)

    def _f(self, eta, log_m, r, idx=slice(None)):
        """Log density of eta (up to constants) for the cells ``idx``."""
        return (dispersion.nb_logpmf(self.uT[idx], log_m - eta, r)
                - 0.5 * (eta - self.a[idx]) ** 2 / self.sigma_M**2)

    def modes(self, log_m, log_r):
        """Projected damped Newton on every eta_c (vectorized); updates ``self.eta``."""
        r = np.exp(log_r)
        inv_s2 = 1.0 / self.sigma_M**2
        eta = self.eta.copy()
        f = self._f(eta, log_m, r)
        active = np.ones(eta.size, bool)
        self.n_iter[:] = 0
        for _ in range(self.max_newton):
            _, dl_dv, L2, *_ = _nb_parts(self.uT, log_m - eta, r)
            grad = -dl_dv - (eta - self.a) * inv_s2
            step = grad / (L2 + inv_s2)
            t = np.ones_like(eta)
            new = np.maximum(eta + step, 0.0)
            fn = self._f(new, log_m, r)
            for _ls in range(50):
                bad = active & ~(fn >= f - 1e-12 * np.abs(f))
                if not bad.any():
                    break
                t[bad] *= 0.5
                new[bad] = np.maximum(eta[bad] + t[bad] * step[bad], 0.0)
                fn[bad] = self._f(new[bad], log_m, r, bad)
            moved = np.abs(new - eta)
            eta = np.where(active, new, eta)
            f = np.where(active, fn, f)
            self.n_iter += active
            active &= ~((moved < self.newton_tol * (1 + eta)) & (t == 1.0))
            if not active.any():
                break
        self.eta = eta
        self.converged = ~active
        _, dl_dv, *_ = _nb_parts(self.uT, log_m - eta, r)
        self.at_bound = (eta == 0.0) & (-dl_dv + self.a * inv_s2 < 0)
        return eta

    def log_marginal(self, log_m, log_r, *, grad=False):
        """Per-cell log marginal of the total (exact for lnm, Laplace in eta for lnmvcp).

        Returns value (N,) and, if ``grad``, the gradient of ``sum(value)`` w.r.t.
        ``(log m_T, log r_T)`` (shape (2,)), including the mode's dependence.
        """
        r = np.exp(log_r)
        if not self.capture:
            l, dl_dv, _, dl_dr, *_ = _nb_parts(self.uT, np.full_like(self.uT, log_m), r)
            return (l, np.array([dl_dv.sum(), (r * dl_dr).sum()])) if grad else l
        eta = self.modes(log_m, log_r)
        inv_s2 = 1.0 / self.sigma_M**2
        l, dl_dv, L2, dl_dr, dL2_dv, dL2_dr, ddl_dr = _nb_parts(self.uT, log_m - eta, r)
        kappa = L2 + inv_s2
        value = (l + pln.log_capture_prior(eta, self.a, self.sigma_M)
                 + 0.5 * _LOG_2PI - 0.5 * np.log(kappa))
        if not grad:
            return value
        # d eta_hat / d theta = (d f'(eta) / d theta) / kappa, zero where the bound binds
        free = ~self.at_bound
        deta_dm = np.where(free, L2 / kappa, 0.0)
        deta_dr = np.where(free, -r * ddl_dr / kappa, 0.0)
        half = -0.5 / kappa
        g_m = dl_dv + half * dL2_dv + half * (-dL2_dv) * deta_dm
        g_r = r * dl_dr + half * r * dL2_dr + half * (-dL2_dv) * deta_dr
        return value, np.array([g_m.sum(), g_r.sum()])

    def sample(self, log_m, log_r, draws, rng):
        """Draws of eta at the stored modes and the totals' log terms at ``(log_m, log_r)``.

        lnmvcp: eta_c from its 1-D Laplace Gaussian ``N(eta_hat_c, 1 / kappa_c)`` at the
        stored modes ``self.eta`` (which must be those of ``(log_m, log_r)``: the fit's,
        or after :meth:`modes` there), truncated to ``eta >= 0``; the state is not
        changed. lnm: no latent, the NB log pmf repeated over draws.

        Parameters
        ----------
        log_m, log_r : float, the totals' globals.
        draws : int >= 1;  rng : numpy Generator.

        Returns
        -------
        eta : (draws, N) or None (lnm).
        nb : (draws, N) NB log pmf of each total at its draw's capture.
        lp : (draws, N) ``nb`` plus eta's capture prior (lnm: ``nb``).
        lp_approx : (draws, N) eta's truncated-Gaussian log density, or 0.0 (lnm).
        """
        N = self.uT.size
        r = np.exp(log_r)
        if not self.capture:
            nb = np.broadcast_to(dispersion.nb_logpmf(self.uT, np.full(N, log_m), r),
                                 (draws, N))
            return None, nb, nb, 0.0
        eta_hat = self.eta
        _, _, L2, *_ = _nb_parts(self.uT, log_m - eta_hat, r)
        sd = 1.0 / np.sqrt(L2 + 1.0 / self.sigma_M**2)
        lower = -eta_hat / sd
        eta = stats.truncnorm.rvs(lower, np.inf, loc=eta_hat, scale=sd, size=(draws, N),
                                  random_state=rng)
        nb = dispersion.nb_logpmf(self.uT, log_m - eta, r)
        lp = nb + pln.log_capture_prior(eta, self.a, self.sigma_M)
        lp_approx = stats.truncnorm.logpdf(eta, lower, np.inf, loc=eta_hat, scale=sd)
        return eta, nb, lp, lp_approx


def totals_prior(log_m, log_r):
    """Log prior of ``(log m_T, log r_T)`` and its gradient (2,)."""
    value = lnm.log_prior_totals(log_m, log_r)
    g = np.array([-(log_m - lnm.LOG_M_T_LOC) / lnm.LOG_M_T_SCALE**2,
                  float(dispersion.log_prior_grad(np.atleast_1d(log_r))[0])])
    return value, g


@dataclass
class TotalSolution:
    """Result of :func:`fit_totals`: problem, log_m_T, log_r_T, objective, success, message."""

    problem: TotalProblem
    log_m_T: float
    log_r_T: float
    objective: float
    success: bool
    message: str


def fit_totals(totals, *, capture=False, log_lib=None, log_M0=np.log(pln.M0_DEFAULT),
               sigma_M=pln.SIGMA_M_DEFAULT, tol=1e-12):
    """MAP of ``(log m_T, log r_T)`` under the (Laplace-)marginal of the totals.

    Start: ``m_T`` from the mean total (times the prior capture ``exp(a)`` for
    lnmvcp) and ``r_T`` from the method of moments ``Var = m + m^2 / r``.
    """
    problem = TotalProblem(totals, capture=capture, log_lib=log_lib, log_M0=log_M0,
                           sigma_M=sigma_M)
    uT = problem.uT
    m = max(uT.mean(), 1e-3)
    r0 = m**2 / max(uT.var() - m, 1e-2 * m**2)
    log_m0 = np.log(m) + (np.mean(np.maximum(problem.a, 0.0)) if capture else 0.0)
    theta0 = np.array([log_m0, np.log(np.clip(r0, 1e-2, 1e4))])

    def value_grad(theta):
        value, grad = problem.log_marginal(theta[0], theta[1], grad=True)
        lp, g_p = totals_prior(theta[0], theta[1])
        return value.sum() + lp, grad + g_p

    res = driver.maximize(value_grad, theta0, np.array([-50.0, np.log(1e-4)]),
                          np.array([50.0, np.log(1e8)]), tol=tol, gtol=1e-8, max_iter=500)
    return TotalSolution(problem=problem, log_m_T=float(res.theta[0]),
                         log_r_T=float(res.theta[1]), objective=float(value_grad(res.theta)[0]),
                         success=res.success, message=res.message)


def fit_laplace(counts, ref, K, *, capture=False, mode="full", log_lib=None,
                log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT, tol=1e-8,
                max_iter=1000, newton_tol=1e-10, seed=0, progress=None):
    """Fit lnm (``capture=False``) or lnmvcp by the Laplace approximation.

    Returns
    -------
    (CompositionSolution, TotalSolution, wall_time_s)
    """
    t0 = time.perf_counter()
    counts = np.asarray(counts)
    comp = fit_composition(counts, ref, K, mode=mode, tol=tol, max_iter=max_iter,
                           newton_tol=newton_tol, seed=seed, progress=progress)
    total = fit_totals(counts.sum(axis=1), capture=capture, log_lib=log_lib, log_M0=log_M0,
                       sigma_M=sigma_M)
    if not comp.modes.converged.all():
        warnings.warn(f"{int((~comp.modes.converged).sum())} of {comp.modes.converged.size} "
                      "cells did not converge in the composition Newton step; see "
                      "fit.converged.", RuntimeWarning, stacklevel=2)
    return comp, total, time.perf_counter() - t0
