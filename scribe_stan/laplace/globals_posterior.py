"""Gaussian approximation of the globals' posterior at the Laplace MAP (nested Laplace).

The Laplace fit (:func:`scribe_stan.laplace.solver.fit_laplace`) maximizes
``F(theta) = sum_c log p_hat(u_c | theta) + log prior(theta)``, the exact Laplace
marginal of the per-cell latents plus the globals' prior. Treating ``exp F`` as the
(unnormalized) posterior of the globals and expanding it to second order at its mode is
the outer Laplace step of a nested Laplace approximation, in the spirit of INLA (Rue,
Martino & Chopin 2009, JRSS-B 71:319, doi:10.1111/j.1467-9868.2008.00700.x), where it
plays the role of the Gaussian approximation of ``p(theta | u)``.

Coordinates. Everything is in the optimizer's coordinates ``theta = (mu, W, log d[,
log r][, log tau])`` (:class:`~scribe_stan.laplace.solver.OuterLayout`): the positive
variances and dispersions on the log scale, where their posterior is closest to
Gaussian. The prior of ``d`` (and of the shrinkage scales ``tau``) is a density in
``d`` (``tau``), so the posterior density in ``log d`` carries the Jacobian
``+ sum log d``; its Hessian in ``log d`` is zero, so it moves only the mean: one Newton
step ``theta_hat + Cov grad(sum log d)`` from the fitted MAP (``jacobian=True``).

Hessian. ``F``'s gradient is exact (implicit differentiation through each cell's mode),
so the Hessian comes from central finite differences of the gradient: ``H v ~ (g(theta
+ h T^{-1} v) - g(theta - h T^{-1} v)) / (2 h)``, each gradient re-running every cell's
Newton step warm-started from the MAP modes (the same start for every evaluation, so
both sides of a difference see the same start). The differences are taken in the
whitened coordinates ``z = T theta`` of the fit's block preconditioner
(:func:`~scribe_stan.laplace.solver.outer_scaling`: per-gene Fisher blocks of ``(mu_g,
W_g)``, diagonal scales for ``log d``, ``log r``), where the negative Hessian ``A_z``
is near the identity, so one step ``h`` suits every coordinate.

* ``method="dense"`` (small problems): ``A_z`` column by column, ``2 P`` gradients.
* ``method="lowrank"`` (genome scale, ``P = G (K + 2)`` of about 24,000): ``A_z = I +
  V diag(lam - 1) V'`` from ``rank`` extreme eigenpairs of ``A_z - I`` (three
  quarters from the bottom of the spectrum, a quarter from the top) by Lanczos (ARPACK's ``eigsh`` on a matrix-free operator of Hessian-vector
  products): the posterior covariance is then block-diagonal (``T^{-1} T^{-T}``) plus
  low rank, and no ``P x P`` matrix is formed. The directions the preconditioner gets
  most wrong in either direction (poorly determined ones with ``lam << 1``, sharply
  determined ones with ``lam >> 1``) are corrected first.

Rotations. ``W -> W R`` (R orthogonal) leaves ``Sigma = W W' + diag(d)``, the
likelihood and the default normal loadings prior unchanged: the ``K (K - 1) / 2``
tangent directions ``W A`` (A antisymmetric) are flat, and ``A_z`` is singular along
them. They are projected out explicitly: the Gaussian lives on the orthogonal
complement (in z) of the rotation generators, with no variance along them. Before
anything is computed, ``W`` is turned to a canonical rotation (its right singular
vectors, column signs fixed), so the Gaussian and its draws depend on the fit only
through rotation-invariant quantities; draws of ``W`` are turned back to the fit's own
rotation. Report only rotation-invariant quantities (``Sigma``, ``mu``, ``d``, ``r``).
With a shrinkage loadings prior the rotation is not exactly flat (the prior is not
rotation invariant); it is projected out all the same.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from scribe_stan.laplace import solver

METHODS = ("auto", "dense", "lowrank")
#: Largest number of globals for which ``method="auto"`` builds the dense Hessian.
DENSE_MAX = 1500
#: Default rank of the low-rank correction (Lanczos eigenpairs). Measured on a pln
#: simulation of 600 cells x 150 genes, K=3 (750 globals) against the dense Hessian:
#: 20 eigenpairs cost 296 gradient evaluations and give per-global sds within a median
#: ratio of 1.001 (5th percentile 0.90, worst 0.75); 60 cost 894 for 1.001 (0.93,
#: 0.80).
RANK_DEFAULT = 20
#: Lowrank: one eigenpair in LARGE_SHARE is taken from the top of the spectrum (over-
#: stated variances), the rest from the bottom (understated ones, which the block
#: preconditioner misses most: the variance error of a direction is ``|1/lam - 1|``).
LARGE_SHARE = 4
#: Floor on the eigenvalues of the whitened precision (a saddle or finite-difference
#: noise); floored eigenvalues are counted in ``n_floored``.
EIG_FLOOR = 1e-4


def rotation_generators(W, layout):
    """Tangent directions of ``W -> W expm(A)`` (A antisymmetric) in the optimizer vector.

    Parameters
    ----------
    W : (G, K) loadings.
    layout : OuterLayout

    Returns
    -------
    (P, K (K - 1) / 2) array
        Column ``(k, l)``, ``k < l``: ``W (E_kl - E_lk)`` in the W block of the
        optimizer vector (zeros elsewhere; mu held through ``log_mean`` is rotation
        invariant).
    """
    G, K = W.shape
    P = layout.pack(np.zeros(G), W, np.ones(G), np.zeros(G), np.zeros(layout.n_tau)).size
    off = G if layout.free_mu else 0
    pairs = [(k, l) for k in range(K) for l in range(k + 1, K)]
    out = np.zeros((P, len(pairs)))
    for j, (k, l) in enumerate(pairs):
        dW = np.zeros((G, K))
        dW[:, l], dW[:, k] = W[:, k], -W[:, l]
        out[off:off + G * K, j] = dW.ravel()
    return out


def canonical_rotation(W):
    """Orthogonal ``V`` (K, K) that turns ``W`` into its canonical rotation ``W V``.

    ``W V = U S`` from the thin SVD ``W = U S V'``: orthogonal columns in decreasing
    norm, each column's largest-magnitude entry positive. Rotations of ``W`` give the
    same ``W V`` (up to ties among singular values).
    """
    _, _, Vt = np.linalg.svd(W, full_matrices=False)
    V = Vt.T
    Wc = W @ V
    sign = np.sign(Wc[np.argmax(np.abs(Wc), axis=0), np.arange(W.shape[1])])
    return V * np.where(sign == 0, 1.0, sign)[None, :]


@dataclass
class GlobalsPosterior:
    """Gaussian approximation of ``p(theta | u)`` in the optimizer's coordinates.

    ``theta = mean + T^{-1} S xi``, ``xi ~ N(0, I_P)``, with ``S = Pi + U diag(lam^{-1/2}
    - 1) U'``, ``Pi`` the projector onto the complement of the rotation generators (in
    ``z = T theta``) and ``U`` orthonormal within that complement: the whitened precision
    is ``Pi + U diag(lam - 1) U'`` (exactly, ``method="dense"``; its extreme part,
    ``method="lowrank"``).

    Attributes
    ----------
    layout : OuterLayout of the fit.
    theta_hat : (P,) the MAP, W at its canonical rotation.
    mean : (P,) the Gaussian's mean (``theta_hat`` plus the Jacobian step).
    rotation : (K, K) orthogonal ``V``: canonical ``W = W_fit V``.
    scale : driver.BlockScale ``T`` (the whitening).
    rotations : (P, r) orthonormal basis (in z) of the rotation generators.
    U : (P, m) eigenvectors;  lam : (m,) eigenvalues of the whitened precision.
    method : {"dense", "lowrank"}
    n_gradients : int, gradient evaluations spent;  wall_time_s : float.
    n_floored : int, eigenvalues raised to :data:`EIG_FLOOR` (not positive definite).
    n_unconverged : int, largest number of cells whose Newton step failed in one
        gradient evaluation.
    """

    layout: object
    theta_hat: np.ndarray
    mean: np.ndarray
    rotation: np.ndarray
    scale: object
    rotations: np.ndarray
    U: np.ndarray
    lam: np.ndarray
    method: str
    n_gradients: int = 0
    wall_time_s: float = 0.0
    n_floored: int = 0
    n_unconverged: int = 0

    @property
    def size(self):
        """Number of globals P."""
        return self.theta_hat.size

    def _project(self, z):
        """``Pi z`` for z (P,) or (P, n)."""
        Q = self.rotations
        return z - Q @ (Q.T @ z)

    def _sqrt(self, xi):
        """``S xi`` for xi (P, n)."""
        px = self._project(xi)
        return px + self.U @ ((self.lam ** -0.5 - 1.0)[:, None] * (self.U.T @ px))

    def covariance_apply(self, v):
        """``Cov v`` for v (P,) or (P, n) in theta coordinates (``T^{-1} S S T^{-T} v``)."""
        v2 = np.asarray(v, dtype=float).reshape(self.size, -1)
        gz = np.column_stack([self.scale.gradient(c) for c in v2.T])  # T^{-T} v
        cz = self._sqrt(self._sqrt(gz))
        out = np.column_stack([self.scale.backward(c) for c in cz.T])
        return out.reshape(np.shape(v))

    def precision_apply(self, v):
        """``A v`` for v (P,): the approximated negative Hessian of the objective in theta
        coordinates, ``T' (Pi + U diag(lam - 1) U') T v`` (zero along the rotations)."""
        z = self.scale.forward(np.asarray(v, dtype=float).copy())
        pz = self._project(z)
        az = pz + self.U @ ((self.lam - 1.0) * (self.U.T @ pz))
        return _transpose_apply(self.scale, az)

    def covariance(self):
        """Dense (P, P) covariance in theta coordinates (small problems only)."""
        if self.size > 5000:
            raise ValueError(f"covariance() forms a P x P matrix; P = {self.size} > 5000. "
                             "Use draw() or covariance_apply() at this scale.")
        return self.covariance_apply(np.eye(self.size))

    def draw(self, n, rng):
        """Draws of the globals.

        Parameters
        ----------
        n : int;  rng : numpy Generator.

        Returns
        -------
        theta : (n, P) optimizer vectors, W at the *canonical* rotation (use
            :meth:`unpack` for the fit's rotation).
        log_q : (n,) log density of each draw under the Gaussian, on the complement of
            the rotations (a constant off the density in theta: only differences between
            draws are meaningful, as in importance ratios).
        """
        xi = rng.standard_normal((self.size, n))
        pxi = self._project(xi)
        z = self._sqrt(xi)
        theta = self.mean[None, :] + np.column_stack([self.scale.backward(c)
                                                      for c in z.T]).T
        m = self.size - self.rotations.shape[1]
        log_q = (-0.5 * np.sum(pxi**2, axis=0) - 0.5 * m * np.log(2 * np.pi)
                 + 0.5 * np.sum(np.log(self.lam)) + _log_det(self.scale))
        return theta, log_q

    def unpack(self, theta):
        """``(mu, W, d, log_r)`` of one draw, W turned back to the fit's rotation."""
        mu, W, d, log_r = self.layout.unpack(theta)
        return mu, W @ self.rotation.T, d, log_r

    def log_jacobian(self, theta):
        """``sum log d (+ sum log tau)``: log density of theta's coordinates over the
        prior's (``d``, ``tau``), for draws (n, P) or one (P,)."""
        return np.asarray(theta) @ _jacobian_gradient(self.layout, self.size)


def _transpose_apply(scale, z):
    """``T' z`` of a BlockScale (the adjoint of ``forward``)."""
    out = z * scale.diag
    out[scale.index] = np.einsum("bij,bj->bi", scale.chol, z[scale.index])
    return out


def _log_det(scale):
    """``log |det T|`` of a BlockScale."""
    free = np.ones(scale.diag.size, bool)
    free[scale.index.ravel()] = False
    blocks = np.sum(np.log(np.abs(np.diagonal(scale.chol, axis1=1, axis2=2)))) \
        if len(scale.chol) else 0.0
    return float(np.sum(np.log(scale.diag[free])) + blocks)


def _jacobian_gradient(layout, P):
    """Gradient (P,) of ``sum log d + sum log tau`` in the optimizer vector."""
    G, K = layout.G, layout.K
    e = np.zeros(P)
    off = (G if layout.free_mu else 0) + G * K
    e[off:off + G] = 1.0
    if layout.n_tau:
        e[P - layout.n_tau:] = 1.0
    return e


class _Gradients:
    """Exact gradients of a Laplace objective, each from the MAP modes as warm start.

    ``objective(theta) -> (value, gradient)`` re-solves the problem's cell modes from
    its current modes; ``finish()`` puts the problem back after the MAP modes are
    restored (pln: sync them to the device; lnm: the Newton flags).
    """

    def __init__(self, problem, objective, theta_hat, finish):
        self.problem, self.objective, self.finish = problem, objective, finish
        self.count, self.worst = 0, 0
        objective(theta_hat)  # modes at the MAP
        problem.keep_modes()

    def __call__(self, theta):
        self.problem.restore_modes()
        _, g = self.objective(theta)
        self.count += 1
        self.worst = max(self.worst, int(np.sum(~np.asarray(self.problem.converged))))
        return g

    def close(self):
        """Put the MAP modes back in the problem."""
        self.problem.restore_modes()
        self.finish()


def laplace_globals(solution, *, method="auto", rank=None, step=1e-3, jacobian=True,
                    tol=1e-3, seed=0):
    """Gaussian approximation of the globals' posterior of a pln/nbln Laplace fit.

    Parameters
    ----------
    solution : scribe_stan.laplace.solver.LaplaceSolution
        The fit (its problem's modes are used as warm starts and left at the MAP).
    method : {"auto", "dense", "lowrank"}
        Dense Hessian (``2 P`` gradients) or Lanczos low-rank-plus-block-diagonal;
        ``"auto"``: dense when ``P <=`` :data:`DENSE_MAX`.
    rank : int, optional
        Lowrank: eigenpairs kept (default :data:`RANK_DEFAULT`, at most ``P - r - 1``).
    step : float > 0
        Finite-difference step ``h`` in the whitened coordinates (unit curvature).
    jacobian : bool
        Add the Newton step of the ``log d`` (``log tau``) Jacobian to the mean.
    tol : float
        Lowrank: relative accuracy of the Lanczos eigenvalues (ARPACK ``tol``).
    seed : int
        Lowrank: the Lanczos start vector.

    Returns
    -------
    GlobalsPosterior

    Raises
    ------
    ValueError
        Unknown ``method`` (the allowed values are named), ``step <= 0``, a solution
        without its layout, or ``rank < 1``.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a globals-posterior method; allowed: "
                         f"{METHODS}")
    if not step > 0:
        raise ValueError(f"step must be > 0; got {step!r}")
    layout = solution.layout
    if layout is None:
        raise ValueError("the solution carries no OuterLayout (fitted by an older "
                         "version); refit with scribe_stan.fit")
    problem = solution.problem
    V = canonical_rotation(solution.W)
    theta_hat = layout.pack(solution.mu, solution.W @ V, solution.d, solution.log_r,
                            solution.log_tau)
    P = theta_hat.size
    grads = _Gradients(problem, lambda theta: solver.objective(problem, theta, layout),
                       theta_hat, problem.sync_modes)
    try:
        scale = solver.outer_scaling(problem, theta_hat, layout)
        problem.restore_modes()
        method, Qz, U, lam = whitened_eigenpairs(grads, scale, theta_hat,
                                                 rotation_generators(solution.W @ V, layout),
                                                 method=method, rank=rank, step=step,
                                                 tol=tol, seed=seed)
    finally:
        grads.close()
    n_floored = int(np.sum(lam < EIG_FLOOR))
    if n_floored:
        warnings.warn(f"{n_floored} eigenvalues of the globals' whitened precision were "
                      f"below {EIG_FLOOR:g} (not positive definite at the MAP: a saddle, "
                      "a parameter at its bound or finite-difference noise); floored.",
                      RuntimeWarning, stacklevel=2)
    lam = np.maximum(lam, EIG_FLOOR)
    post = GlobalsPosterior(layout=layout, theta_hat=theta_hat, mean=theta_hat.copy(),
                            rotation=V, scale=scale, rotations=Qz, U=U, lam=lam,
                            method=method, n_floored=n_floored)
    if jacobian:
        post.mean = theta_hat + post.covariance_apply(_jacobian_gradient(layout, P))
    post.n_gradients, post.n_unconverged = grads.count, grads.worst
    post.wall_time_s = time.perf_counter() - t0
    return post


def whitened_eigenpairs(grads, scale, theta_hat, Q, *, method, rank, step, tol, seed):
    """Eigenpairs of the whitened negative Hessian on the complement of the rotations.

    Parameters
    ----------
    grads : callable, theta (P,) -> exact gradient (P,) of the objective.
    scale : whitening with ``forward``, ``backward``, ``gradient`` (``z = T theta``).
    theta_hat : (P,) the MAP;  Q : (P, r) rotation generators in theta coordinates.
    method : {"auto", "dense", "lowrank"};  rank, step, tol, seed : as
        :func:`laplace_globals`.

    Returns
    -------
    method : the method used ("auto" resolved by :data:`DENSE_MAX`).
    Qz : (P, r) orthonormal whitened rotation generators.
    U : (P, k) eigenvectors;  lam : (k,) eigenvalues (not floored).

    Raises
    ------
    ValueError
        ``rank < 1``.
    """
    P = theta_hat.size
    Qz = np.column_stack([scale.forward(c) for c in Q.T]) if Q.shape[1] else Q
    Qz = np.linalg.qr(Qz)[0] if Q.shape[1] else Qz

    def hvp(v):
        """Whitened negative Hessian times v (P,): central differences of g."""
        dtheta = scale.backward(step * np.asarray(v, dtype=float).ravel())
        dg = grads(theta_hat + dtheta) - grads(theta_hat - dtheta)
        return -scale.gradient(dg) / (2.0 * step)

    if method == "auto":
        method = "dense" if P <= DENSE_MAX else "lowrank"
    if method == "dense":
        return (method, Qz, *_dense(hvp, Qz, P))
    k = RANK_DEFAULT if rank is None else int(rank)
    if k < 1:
        raise ValueError(f"rank must be >= 1; got {rank!r}")
    return (method, Qz, *_lowrank(hvp, Qz, P, min(k, P - Qz.shape[1] - 1), tol, seed))


def _dense(hvp, Qz, P):
    """All eigenpairs of the whitened precision on the complement of ``Qz``."""
    A = np.column_stack([hvp(e) for e in np.eye(P)])
    A = 0.5 * (A + A.T)
    # orthonormal basis of the complement of the rotations
    C = np.linalg.qr(np.hstack([Qz, np.eye(P)]))[0][:, Qz.shape[1]:P] \
        if Qz.shape[1] else np.eye(P)
    lam, E = np.linalg.eigh(C.T @ A @ C)
    return C @ E, lam


def _lowrank(hvp, Qz, P, k, tol, seed):
    """Extreme eigenpairs (both ends) of ``Pi (A_z - I) Pi`` by Lanczos."""

    def project(v):
        return v - Qz @ (Qz.T @ v)

    def matvec(v):
        pv = project(np.asarray(v, dtype=float).ravel())
        return project(hvp(pv) - pv)

    op = LinearOperator((P, P), matvec=matvec, dtype=float)
    v0 = project(np.random.default_rng(seed).standard_normal(P))
    k_large = k // LARGE_SHARE
    parts = []
    for which, n in (("SA", k - k_large), ("LA", k_large)):
        if n < 1:
            continue
        try:
            parts.append(eigsh(op, k=n, which=which, v0=v0, tol=tol,
                               ncv=min(P, max(2 * n + 1, n + 20))))
        except ArpackNoConvergence as err:  # keep what converged
            parts.append((err.eigenvalues, err.eigenvectors))
            warnings.warn(f"Lanczos converged {err.eigenvalues.size} of {n} eigenpairs "
                          f"({which}) of the globals' Hessian; using those.",
                          RuntimeWarning, stacklevel=3)
    vals = np.concatenate([p[0] for p in parts])
    vecs = np.linalg.qr(project(np.hstack([p[1] for p in parts])))[0]  # orthonormal
    return vecs, 1.0 + vals
