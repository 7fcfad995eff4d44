"""Nested Laplace for nbvcp: the globals' Gaussian at the Laplace MAP, and per-cell draws
that integrate over it.

The nbvcp fit (:func:`scribe_stan.laplace.nbvcp.fit_nbvcp`) maximizes the exact Laplace
objective ``F(theta) = sum_c log p_hat(u_c | theta) + log prior(theta)`` over
``theta = (m, log_r)`` (2G globals; the prior is a density in ``log_r`` itself, so no
Jacobian). As for pln/nbln (:mod:`scribe_stan.laplace.globals_posterior`, after INLA:
Rue, Martino & Chopin 2009, JRSS-B 71:319, doi:10.1111/j.1467-9868.2008.00700.x),
``exp F`` is treated as the unnormalized posterior of the globals and expanded to
second order at its mode: ``theta ~ N(theta_hat, A^{-1})``, ``A = -Hess F(theta_hat)``.

Why not :func:`~scribe_stan.laplace.nbvcp.gaussian_moments`. Its precision
``S = A_joint - B D^{-1} B'`` (Schur complement of the log joint's Hessian in
``(theta, eta)``) is the Hessian of ``F`` *without* the second derivatives of the
``-1/2 log H_c`` terms of each cell's Laplace value (and treats modes on the bound
``eta = 0`` as interior); those terms are O(1) per cell, which matters for ``log_r``
when cells are few (``tests/test_nbvcp.py``: up to a factor 2 in the sd of ``log_r``
at 25 cells). So ``A`` is built from the exact gradient of ``F``
(:func:`~scribe_stan.laplace.nbvcp.objective`, implicit differentiation through each
cell's mode) by central finite differences, and ``S`` is used only as the whitening:

* ``S = L L'`` (dense Cholesky; ``S`` couples every pair of genes through the shared
  eta_c, time O(N G^2), memory O(G^2); a diagonal scaling if ``S`` is not positive
  definite). In ``z = L' theta`` the negative Hessian ``A_z = L^{-1} A L^{-T}`` is the
  identity plus the O(1)-per-cell log-curvature terms, so one finite-difference step
  ``h`` suits every coordinate, and Hessian-vector products are
  ``A_z v ~ -L^{-1} (g(theta + h L^{-T} v) - g(theta - h L^{-T} v)) / (2 h)``, each
  gradient re-running every cell's 1-D Newton from the MAP modes.
* ``method="dense"`` (``2G <=`` :data:`DENSE_MAX`): ``A_z`` column by column, ``2 * 2G``
  gradient evaluations (16 for 4 genes), then all its eigenpairs.
* ``method="lowrank"`` (genome scale: ``G = 2000`` would take 8000 gradients dense):
  ``A_z = I + U diag(lam - 1) U'`` from ``rank`` extreme eigenpairs of ``A_z - I`` by
  Lanczos (:func:`scribe_stan.laplace.globals_posterior._lowrank`, three quarters from
  the bottom of the spectrum, a quarter from the top), about ``2 * (a few times rank)``
  gradients (each O(nnz + N G)) plus the O(N G^2) of ``S``; no ``2G x 2G`` matrix
  beyond ``S`` and its factor is formed.

Draws: ``theta = theta_hat + L^{-T} (I + U diag(lam^{-1/2} - 1) U') xi``, ``xi ~ N(0,
I)``; then (:func:`nested_draws`) every cell's eta mode is re-solved at ``theta_s``
(warm-started from its mode at the MAP, the same start for every draw; the 1-D Newton
converges in a few steps, O(nnz + N G) per draw like one value pass) and eta_c is drawn
from its 1-D Laplace Gaussian there, truncated to ``eta >= 0`` as the point draws of
:meth:`~scribe_stan.fits.nbvcp.NbvcpFit.to_datatree`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg, stats

from scribe_stan.laplace import nbvcp as lap
from scribe_stan.laplace.globals_posterior import EIG_FLOOR, RANK_DEFAULT, _lowrank
from scribe_stan.models import nbvcp, pln

METHODS = ("auto", "dense", "lowrank")
#: Largest number of globals ``2G`` for which ``method="auto"`` builds the dense Hessian
#: (``2 * 2G`` gradient evaluations).
DENSE_MAX = 400

_STATE = ("eta", "curvature", "n_iter", "converged", "at_bound")


@dataclass
class NbvcpGlobalsPosterior:
    """Gaussian approximation of ``p(m, log_r | u)`` at the Laplace MAP.

    ``theta = concatenate([m, log_r]) = mean + L^{-T} (I + U diag(lam^{-1/2} - 1) U') xi``,
    ``xi ~ N(0, I_2G)``: precision ``A = L (I + U diag(lam - 1) U') L'``.

    Attributes
    ----------
    theta_hat : (2G,) the MAP;  mean : (2G,) the Gaussian's mean (= ``theta_hat``).
    L : (2G, 2G) lower-triangular whitening (Cholesky factor of the Schur-complement
        precision ``S``, or diagonal when ``S`` is not positive definite).
    U : (2G, k) orthonormal eigenvectors;  lam : (k,) eigenvalues of the whitened
        precision ``A_z`` (all of them for ``"dense"``, the extreme ones for
        ``"lowrank"``; the rest are taken as 1).
    method : {"dense", "lowrank"};  n_gradients : int, gradient evaluations spent;
    wall_time_s : float;  n_floored : int, eigenvalues raised to ``EIG_FLOOR``;
    n_unconverged : int, largest number of cells whose Newton step failed in one
        gradient evaluation;  whitening : {"schur", "diagonal"}.
    """

    theta_hat: np.ndarray
    mean: np.ndarray
    L: np.ndarray
    U: np.ndarray
    lam: np.ndarray
    method: str
    n_gradients: int = 0
    wall_time_s: float = 0.0
    n_floored: int = 0
    n_unconverged: int = 0
    whitening: str = "schur"

    @property
    def size(self):
        """Number of globals ``2G``."""
        return self.theta_hat.size

    def _apply(self, z, power):
        """``(I + U diag(lam^power - 1) U') z`` for z (P,) or (P, n)."""
        return z + self.U @ ((self.lam**power - 1.0).reshape(-1, *([1] * (z.ndim - 1)))
                             * (self.U.T @ z))

    def _back(self, z):
        """``L^{-T} z``."""
        return linalg.solve_triangular(self.L, z, lower=True, trans="T", check_finite=False)

    def _log_det(self):
        """``log |det|`` of the map ``xi -> theta``, negated: ``log det L + 1/2 sum log lam``."""
        return float(np.sum(np.log(np.abs(np.diag(self.L)))) + 0.5 * np.sum(np.log(self.lam)))

    def draw(self, n, rng):
        """Draws of the globals.

        Parameters
        ----------
        n : int;  rng : numpy Generator.

        Returns
        -------
        theta : (n, 2G) ``concatenate([m, log_r])`` per draw.
        log_q : (n,) normalized log density of each draw under the Gaussian.
        """
        xi = rng.standard_normal((self.size, n))
        theta = self.mean[None, :] + self._back(self._apply(xi, -0.5)).T
        log_q = (-0.5 * np.sum(xi**2, axis=0) - 0.5 * self.size * np.log(2 * np.pi)
                 + self._log_det())
        return theta, log_q

    def log_density(self, theta):
        """Normalized log density of ``theta`` (n, 2G) or (2G,) under the Gaussian."""
        d = (np.atleast_2d(theta) - self.mean[None, :]).T
        xi = self._apply(self.L.T @ d, 0.5)
        out = (-0.5 * np.sum(xi**2, axis=0) - 0.5 * self.size * np.log(2 * np.pi)
               + self._log_det())
        return out if np.ndim(theta) == 2 else float(out[0])

    def precision_apply(self, v):
        """``A v`` for v (2G,) or (2G, n): the approximated negative Hessian of ``F``."""
        return self.L @ self._apply(self.L.T @ np.asarray(v, dtype=float), 1.0)

    def covariance(self):
        """Dense (2G, 2G) covariance ``A^{-1}``."""
        Linv_T = self._back(np.eye(self.size))  # L^{-T}
        return Linv_T @ self._apply(Linv_T.T, -1.0)

    def sd(self):
        """Marginal sds, (2G,): those of ``m`` then of ``log_r``."""
        return np.sqrt(np.diag(self.covariance()))


def schur_precision(problem, m, log_r):
    """Precision ``S = A_joint - B D^{-1} B'`` of ``(m, log_r)`` of
    :func:`~scribe_stan.laplace.nbvcp.gaussian_moments` (dense, 2G x 2G).

    ``problem``'s modes and curvatures must be at ``(m, log_r)``. Time O(N G^2).
    """
    N, G = problem.shape
    H = problem.curvature
    info = lap.observed_information(problem, m, log_r)
    S = np.zeros((2 * G, 2 * G))
    idx = np.arange(G)
    S[idx, idx] = info["mm"]
    S[idx + G, idx + G] = info["rr"]
    S[idx, idx + G] = S[idx + G, idx] = info["mr"]
    for rows in lap._cell_blocks(N, 2 * G):
        h = lap._second_derivatives(problem, m, log_r, rows)
        Bt = -np.hstack([h["me"], h["re"]])
        S -= (Bt / H[rows, None]).T @ Bt
    return 0.5 * (S + S.T)


class _State:
    """Save and restore the problem's modes; MAP modes as the warm start of every call."""

    def __init__(self, problem, eta_map):
        self.problem, self.eta_map = problem, np.array(eta_map, dtype=float)
        self.saved = {k: np.array(getattr(problem, k)) for k in _STATE}

    def warm(self):
        self.problem.eta[:] = self.eta_map

    def restore(self):
        for k, v in self.saved.items():
            if k == "eta":
                self.problem.eta[:] = v
            else:
                setattr(self.problem, k, v.copy())


def nbvcp_globals(solution, *, method="auto", rank=None, step=1e-3, tol=1e-3, seed=0):
    """Gaussian approximation of the globals' posterior of an nbvcp Laplace fit.

    Parameters
    ----------
    solution : scribe_stan.laplace.nbvcp.NbvcpSolution
        The fit; its problem's modes are used as warm starts and left as they were.
    method : {"auto", "dense", "lowrank"}
        Dense finite-difference Hessian (``4G`` gradient evaluations) or Lanczos
        low-rank correction of the Schur whitening (``2`` gradients per Lanczos
        product); ``"auto"``: dense when ``2G <=`` :data:`DENSE_MAX`.
    rank : int, optional
        Lowrank: eigenpairs kept (default
        :data:`scribe_stan.laplace.globals_posterior.RANK_DEFAULT`, at most ``2G - 1``).
    step : float > 0
        Finite-difference step in the whitened coordinates (unit curvature).
    tol : float
        Lowrank: relative accuracy of the Lanczos eigenvalues (ARPACK ``tol``).
    seed : int
        Lowrank: the Lanczos start vector.

    Returns
    -------
    NbvcpGlobalsPosterior

    Raises
    ------
    ValueError
        Unknown ``method`` (the allowed values are named), ``step <= 0`` or ``rank < 1``.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a globals-posterior method; allowed: "
                         f"{METHODS}")
    if not step > 0:
        raise ValueError(f"step must be > 0; got {step!r}")
    if rank is not None and int(rank) < 1:
        raise ValueError(f"rank must be >= 1; got {rank!r}")
    problem = solution.problem
    G = problem.shape[1]
    P = 2 * G
    theta_hat = np.concatenate([solution.m, solution.log_r])
    state = _State(problem, solution.modes.eta)
    count, worst = 0, 0

    def grad(theta):
        nonlocal count, worst
        state.warm()
        _, g = lap.objective(problem, theta)
        count += 1
        worst = max(worst, int(np.sum(~problem.converged)))
        return g

    try:
        state.warm()
        problem.log_marginal(solution.m, solution.log_r)  # modes, curvatures at the MAP
        S = schur_precision(problem, solution.m, solution.log_r)
        try:
            L, whitening = linalg.cholesky(S, lower=True, check_finite=False), "schur"
        except linalg.LinAlgError:
            L = np.diag(np.sqrt(np.maximum(np.abs(np.diag(S)), 1.0)))
            whitening = "diagonal"

        def hvp(v):
            dtheta = linalg.solve_triangular(L, step * np.asarray(v, dtype=float).ravel(),
                                             lower=True, trans="T", check_finite=False)
            dg = grad(theta_hat + dtheta) - grad(theta_hat - dtheta)
            return -linalg.solve_triangular(L, dg, lower=True, check_finite=False) / (2 * step)

        if method == "auto":
            method = "dense" if P <= DENSE_MAX else "lowrank"
        if method == "dense":
            A = np.column_stack([hvp(e) for e in np.eye(P)])
            lam, U = np.linalg.eigh(0.5 * (A + A.T))
        else:
            k = min(RANK_DEFAULT if rank is None else int(rank), P - 1)
            U, lam = _lowrank(hvp, np.zeros((P, 0)), P, k, tol, seed)
    finally:
        state.restore()
    n_floored = int(np.sum(lam < EIG_FLOOR))
    if n_floored:
        warnings.warn(f"{n_floored} eigenvalues of the globals' whitened precision were "
                      f"below {EIG_FLOOR:g} (not positive definite at the MAP: a saddle, "
                      "a parameter at its bound or finite-difference noise); floored.",
                      RuntimeWarning, stacklevel=2)
    return NbvcpGlobalsPosterior(theta_hat=theta_hat, mean=theta_hat.copy(), L=L, U=U,
                                 lam=np.maximum(lam, EIG_FLOOR), method=method,
                                 n_gradients=count, wall_time_s=time.perf_counter() - t0,
                                 n_floored=n_floored, n_unconverged=worst,
                                 whitening=whitening)


def nested_draws(solution, post, draws, rng):
    """Joint draws of the globals and of every cell's capture loss eta.

    For each ``theta_s`` drawn from ``post``, every cell's eta mode is re-solved at
    ``theta_s`` (converged 1-D Newton from the MAP modes) and eta_c is drawn from
    ``N(eta_hat_c(theta_s), 1 / H_c(theta_s))`` truncated to ``eta >= 0``.

    Parameters
    ----------
    solution : scribe_stan.laplace.nbvcp.NbvcpSolution (its problem's modes are left as
        they were).
    post : NbvcpGlobalsPosterior of that solution.
    draws : int >= 1;  rng : numpy Generator (globals first, then eta).

    Returns
    -------
    dict
        ``m``, ``log_r`` (S, G); ``eta``, ``eta_mode``, ``eta_sd`` (S, N) the draws and
        their Gaussians; ``log_lik`` (S, N) NB log likelihood per cell; ``lp`` (S, N)
        ``log p(u_c, eta_c | theta_s)``; ``lp_approx`` (S, N) truncated-Gaussian log
        density of eta_c; ``laplace`` (S, N) the cells' Laplace values
        ``log p_hat(u_c | theta_s)``; ``log_prior`` (S,) the globals' log prior;
        ``log_q`` (S,) their Gaussian's log density; ``converged`` (S,) fraction of
        cells whose Newton step converged.
    """
    problem = solution.problem
    N = problem.shape[0]
    glob = draw_globals(post, draws, rng)
    m, log_r = glob["m"], glob["log_r"]
    mode, sd, laplace = (np.empty((draws, N)) for _ in range(3))
    converged = np.empty(draws)
    state = _State(problem, solution.modes.eta)
    try:
        for s in range(draws):
            state.warm()
            laplace[s] = problem.log_marginal(m[s], log_r[s])
            mode[s], sd[s] = problem.eta, 1.0 / np.sqrt(problem.curvature)
            converged[s] = np.mean(problem.converged)
    finally:
        state.restore()
    lower = (0.0 - mode) / sd
    eta = stats.truncnorm.rvs(lower, np.inf, loc=mode, scale=sd, size=(draws, N),
                              random_state=rng)
    lp_approx = stats.truncnorm.logpdf(eta, lower, np.inf, loc=mode, scale=sd)
    log_lik = np.empty((draws, N))
    for s in range(draws):
        r = np.exp(log_r[s])
        lg, _ = lap.gamma_tables(r, problem.offsets)
        log_lik[s] = lap.log_lik_draws(problem.indptr, problem.indices, problem.vals, lg,
                                       problem.offsets, problem.lgam_u,
                                       np.ascontiguousarray(m[s]), r, eta[s:s + 1])[0]
    lp = log_lik + pln.log_capture_prior(eta, problem.a, problem.sigma_M)
    return {**glob, "eta": eta, "eta_mode": mode, "eta_sd": sd, "log_lik": log_lik,
            "lp": lp, "lp_approx": lp_approx, "laplace": laplace, "converged": converged}


def draw_globals(post, draws, rng):
    """Draws of ``(m, log_r)`` from their Gaussian, no latents.

    Parameters
    ----------
    post : NbvcpGlobalsPosterior;  draws : int >= 1;  rng : numpy Generator.

    Returns
    -------
    dict
        ``m``, ``log_r`` (S, G); ``log_prior`` (S,) the globals' log prior (a density in
        ``(m, log_r)``, the Gaussian's coordinates: no Jacobian); ``log_q`` (S,) the
        Gaussian's log density.
    """
    thetas, log_q = post.draw(draws, rng)
    G = post.size // 2
    m, log_r = thetas[:, :G], thetas[:, G:]
    log_prior = np.array([nbvcp.log_prior_globals(a, b) for a, b in zip(m, log_r)])
    return {"m": m, "log_r": log_r, "log_prior": log_prior, "log_q": log_q}
