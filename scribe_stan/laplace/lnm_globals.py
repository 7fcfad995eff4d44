"""Nested Laplace for lnm / lnmvcp: the globals' Gaussian at the MAP and draws over it.

The lnm Laplace fit (:func:`scribe_stan.laplace.lnm_solver.fit_laplace`) maximizes two
independent objectives: the composition block's ``F(theta) = sum_c log p_hat(u_c | u_T,c,
theta) + log prior(theta)`` over ``theta = (m, W, log d)`` (ALR log-mean ``m = mu +
diag(Sigma) / 2``, loadings, log residual variances; ``(m, W)`` in the ``low_rank`` mode,
see :func:`~scribe_stan.laplace.lnm_solver._unpack`) and the totals block over
``(log m_T, log r_T)``. Expanding each to second order at its mode gives the Gaussian
approximation of the globals' posterior, the outer step of a nested Laplace
approximation in the spirit of INLA (Rue, Martino & Chopin 2009, JRSS-B 71:319,
doi:10.1111/j.1467-9868.2008.00700.x). The two blocks share no parameter and no latent,
so their Gaussians are independent.

Composition. Built exactly as :func:`scribe_stan.laplace.globals_posterior.laplace_globals`
builds pln's, with the same pieces (:class:`~.globals_posterior.GlobalsPosterior`,
``_dense``, ``_lowrank``, :func:`~.globals_posterior.rotation_generators`,
:func:`~.globals_posterior.canonical_rotation`) through :class:`CompositionLayout`, an
adapter with the interface of :class:`~scribe_stan.laplace.solver.OuterLayout`:

* the negative Hessian from central finite differences of the exact gradient of
  :func:`~scribe_stan.laplace.lnm_solver.composition_objective` (implicit
  differentiation through every cell's mode), each gradient re-running every cell's
  Newton from the MAP modes, taken in the whitened coordinates of the fit's block
  preconditioner (:func:`~scribe_stan.laplace.lnm_solver.composition_scaling`);
  ``method="dense"``: ``2 P`` gradients, ``P = D (K + 2)`` (``D (K + 1)`` low rank),
  ``D = G - 1``; ``method="lowrank"``: 2 gradients per Lanczos product (about 15 P-free
  products per eigenpair kept);
* W's rotations ``W -> W R`` leave ``Sigma = W W' + diag(d)``, the multinomial, the
  normal loadings prior and ``m`` (through ``|W_j|^2``) unchanged: the ``K (K - 1) / 2``
  directions ``W A`` (A antisymmetric) are flat and projected out; W is first turned to
  its canonical rotation and draws are turned back to the fit's rotation;
* the prior is a density in ``(mu, W, d)``; the map ``(m, W, log d) -> (mu, W, d)`` is
  triangular with Jacobian ``prod_j d_j``, so the density in the optimizer's coordinates
  carries ``+ sum log d`` (as for pln), added to the mean by one Newton step.

Totals. Two scalars ``(log m_T, log r_T)`` whose prior is already a density in these
coordinates (no Jacobian): a dense 2 x 2 Hessian by central differences of the exact
gradient (lnmvcp: through each cell's eta mode), 8 gradient evaluations of the totals
block (a first pass for the scale, a second in whitened coordinates). With few cells
``log r_T`` is skewed: on 100 simulated cells the Gaussian's mean sat 0.28 posterior
sds above, and its sd at 0.81 of, a grid quadrature of the exact totals posterior
(``log m_T``: 0.03 and 1.00).

Draws (:func:`nested_draws`): for each drawn set of globals, every cell's y is re-solved
warm-started from its MAP mode (one Newton step by default) and drawn from its Laplace
Gaussian there; for lnmvcp every cell's eta mode is re-solved at the drawn totals
globals (to convergence: a vectorized scalar Newton, cheap) and eta is drawn from its
Gaussian truncated to eta >= 0, as in the point draws.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from scribe_stan.laplace import globals_posterior as gp
from scribe_stan.laplace import lnm_solver

#: Newton steps per cell at each drawn set of composition globals (:func:`nested_draws`).
NEWTON_STEPS_DEFAULT = 1


@dataclass
class CompositionLayout:
    """The composition block's optimizer vector ``(m, W, log d)`` behind the interface of
    :class:`scribe_stan.laplace.solver.OuterLayout` that
    :mod:`~scribe_stan.laplace.globals_posterior` uses (``G``, ``K``, ``free_mu``,
    ``n_tau``, ``pack``, ``unpack``).

    Attributes
    ----------
    G : int, ALR dimension ``D = genes - 1`` (named as OuterLayout's gene count).
    K : int, rank.
    mode : {"full", "low_rank"} (``low_rank``: no ``log d`` block, ``d`` is None).
    """

    G: int
    K: int
    mode: str
    free_mu = True  # the first D coordinates are m (rotation invariant)
    n_tau = 0

    def pack(self, mu, W, d, log_r=None, log_tau=None):
        """``(m, W, log d)`` from ``(mu, W, d)`` (``d`` ignored in the low-rank mode)."""
        return lnm_solver._pack(mu, W, d if self.mode == "full" else None)

    def unpack(self, theta):
        """``(mu, W, d, None)`` of an optimizer vector (``d`` None in the low-rank mode)."""
        mu, W, d = lnm_solver._unpack(np.asarray(theta, dtype=float), self.G, self.K,
                                      self.mode)
        return mu, W, d, None


def composition_globals(solution, *, method="auto", rank=None, step=1e-3, jacobian=True,
                        tol=1e-3, seed=0):
    """Gaussian approximation of the composition globals' posterior of an lnm fit.

    Parameters
    ----------
    solution : scribe_stan.laplace.lnm_solver.CompositionSolution
        The fit; its problem's modes are the warm starts and are left at the MAP.
    method : {"auto", "dense", "lowrank"}
        Dense Hessian (``2 P`` gradient evaluations, ``P = D (K + 2)`` globals, ``D (K +
        1)`` in the low-rank mode) or Lanczos low-rank plus block-diagonal (2 per
        Hessian-vector product); ``"auto"``: dense when ``P <=``
        :data:`scribe_stan.laplace.globals_posterior.DENSE_MAX`.
    rank : int, optional
        Lowrank: eigenpairs kept (default
        :data:`scribe_stan.laplace.globals_posterior.RANK_DEFAULT`).
    step : float > 0
        Finite-difference step in the whitened coordinates (unit curvature).
    jacobian : bool
        Add the Newton step of the ``log d`` Jacobian (``+ sum log d``) to the mean.
    tol, seed : Lanczos accuracy and start vector (lowrank).

    Returns
    -------
    scribe_stan.laplace.globals_posterior.GlobalsPosterior
        With ``layout`` a :class:`CompositionLayout`: ``theta = (m, W, log d)``,
        ``unpack`` gives ``(mu_alr, W_alr, d_alr, None)`` in the fit's rotation.

    Raises
    ------
    ValueError
        Unknown ``method`` (the allowed values are named), ``step <= 0``, ``rank < 1``.
    """
    t0 = time.perf_counter()
    if method not in gp.METHODS:
        raise ValueError(f"method={method!r} is not a globals-posterior method; allowed: "
                         f"{gp.METHODS}")
    if not step > 0:
        raise ValueError(f"step must be > 0; got {step!r}")
    problem = solution.problem
    D, K = solution.W.shape
    layout = CompositionLayout(D, K, problem.mode)
    V = gp.canonical_rotation(solution.W)
    Wc = solution.W @ V
    theta_hat = layout.pack(solution.mu, Wc, solution.d)
    P = theta_hat.size
    flags = (problem.n_iter.copy(), problem.converged.copy())

    def restore_flags():
        problem.n_iter, problem.converged = flags

    grads = gp._Gradients(problem,
                          lambda theta: lnm_solver.composition_objective(problem, theta, K),
                          theta_hat, restore_flags)
    try:
        scale = lnm_solver.composition_scaling(problem, solution.mu, Wc, solution.d)
        problem.restore_modes()
        method, Qz, U, lam = gp.whitened_eigenpairs(grads, scale, theta_hat,
                                                    gp.rotation_generators(Wc, layout),
                                                    method=method, rank=rank, step=step,
                                                    tol=tol, seed=seed)
    finally:
        grads.close()
    n_floored = int(np.sum(lam < gp.EIG_FLOOR))
    if n_floored:
        warnings.warn(f"{n_floored} eigenvalues of the composition globals' whitened "
                      f"precision were below {gp.EIG_FLOOR:g} (not positive definite at the "
                      "MAP); floored.", RuntimeWarning, stacklevel=2)
    lam = np.maximum(lam, gp.EIG_FLOOR)
    post = gp.GlobalsPosterior(layout=layout, theta_hat=theta_hat, mean=theta_hat.copy(),
                               rotation=V, scale=scale, rotations=Qz, U=U, lam=lam,
                               method=method, n_floored=n_floored)
    if jacobian:
        post.mean = theta_hat + post.covariance_apply(gp._jacobian_gradient(layout, P))
    post.n_gradients, post.n_unconverged = grads.count, grads.worst
    post.wall_time_s = time.perf_counter() - t0
    return post


@dataclass
class TotalsPosterior:
    """Gaussian approximation of ``p(log m_T, log r_T | totals)``.

    Attributes
    ----------
    theta_hat : (2,) the MAP ``(log m_T, log r_T)`` (also the mean: no Jacobian).
    mean : (2,);  chol : (2, 2) lower Cholesky factor of the covariance.
    n_gradients : int, gradient evaluations of the totals block.
    """

    theta_hat: np.ndarray
    mean: np.ndarray
    chol: np.ndarray
    n_gradients: int = 0

    @property
    def covariance(self):
        """(2, 2) covariance."""
        return self.chol @ self.chol.T

    def draw(self, n, rng):
        """``theta`` (n, 2) draws of ``(log m_T, log r_T)`` and their log density (n,)."""
        xi = rng.standard_normal((n, 2))
        theta = self.mean + xi @ self.chol.T
        log_q = (-0.5 * np.sum(xi**2, axis=1) - np.log(2 * np.pi)
                 - np.sum(np.log(np.diag(self.chol))))
        return theta, log_q


def _totals_value_grad(problem, theta):
    """Totals objective (sum of cell values + prior) and its gradient (2,)."""
    value, g = problem.log_marginal(theta[0], theta[1], grad=True)
    lp, g_p = lnm_solver.totals_prior(theta[0], theta[1])
    return float(value.sum() + lp), g + g_p


def totals_globals(total, *, step=1e-3):
    """Gaussian approximation of the totals globals' posterior of an lnm / lnmvcp fit.

    Negative Hessian of the totals objective (exact for lnm, Laplace in each eta_c for
    lnmvcp) by central differences of its exact gradient: a first pass with step
    ``step / 10`` in ``(log m_T, log r_T)`` gives a scale ``L``, a second one with
    ``step`` in ``z = L' theta``: 8 gradient evaluations. The eta modes (lnmvcp) start
    from the MAP's for every evaluation and are put back afterwards.

    Parameters
    ----------
    total : scribe_stan.laplace.lnm_solver.TotalSolution
    step : float > 0

    Returns
    -------
    TotalsPosterior

    Raises
    ------
    ValueError
        ``step <= 0``.
    """
    if not step > 0:
        raise ValueError(f"step must be > 0; got {step!r}")
    problem = total.problem
    theta_hat = np.array([total.log_m_T, total.log_r_T])
    kept = (problem.eta.copy(), problem.converged.copy(), problem.at_bound.copy(),
            problem.n_iter.copy())
    count = 0

    def grad(theta):
        nonlocal count
        problem.eta = kept[0].copy()
        count += 1
        return _totals_value_grad(problem, theta)[1]

    def hessian(T_inv, h):
        cols = [grad(theta_hat + h * T_inv[:, j]) - grad(theta_hat - h * T_inv[:, j])
                for j in range(2)]
        A = -T_inv.T @ np.column_stack(cols) / (2.0 * h)
        return 0.5 * (A + A.T)

    try:
        A0 = hessian(np.eye(2), step / 10)
        try:
            L = np.linalg.cholesky(A0)
        except np.linalg.LinAlgError:
            L = np.diag(np.sqrt(np.maximum(np.abs(np.diag(A0)), 1e-8)))
        T_inv = np.linalg.inv(L.T)  # theta = T_inv z
        lam, E = np.linalg.eigh(hessian(T_inv, step))
    finally:
        problem.eta, problem.converged, problem.at_bound, problem.n_iter = kept
    if np.any(lam < gp.EIG_FLOOR):
        warnings.warn("the totals globals' Hessian is not positive definite at the MAP "
                      "(a dispersion at its bound?); its eigenvalues were floored.",
                      RuntimeWarning, stacklevel=2)
    lam = np.maximum(lam, gp.EIG_FLOOR)
    # Cov = T_inv E diag(1/lam) E' T_inv'
    C = T_inv @ E @ np.diag(1.0 / lam) @ E.T @ T_inv.T
    return TotalsPosterior(theta_hat=theta_hat, mean=theta_hat.copy(),
                           chol=np.linalg.cholesky(0.5 * (C + C.T)), n_gradients=count)


@dataclass
class LnmGlobalsPosterior:
    """The two independent Gaussians of an lnm / lnmvcp fit's globals.

    Attributes
    ----------
    composition : scribe_stan.laplace.globals_posterior.GlobalsPosterior over ``(m, W,
        log d)`` (:func:`composition_globals`).
    totals : TotalsPosterior over ``(log m_T, log r_T)`` (:func:`totals_globals`).
    """

    composition: gp.GlobalsPosterior
    totals: TotalsPosterior

    @property
    def n_gradients(self):
        """Composition-block gradient evaluations spent (the totals' are negligible)."""
        return self.composition.n_gradients


def laplace_globals(composition, total, *, method="auto", rank=None, step=1e-3, seed=0):
    """:class:`LnmGlobalsPosterior` of a fit's two solutions (see the two builders)."""
    return LnmGlobalsPosterior(
        composition=composition_globals(composition, method=method, rank=rank, step=step,
                                        seed=seed),
        totals=totals_globals(total, step=step))


def nested_draws(composition, total, post, draws, rng, *, values=False,
                 newton_steps=NEWTON_STEPS_DEFAULT):
    """Joint draws of the globals and of every cell's latents (y, and eta for lnmvcp).

    Parameters
    ----------
    composition : lnm_solver.CompositionSolution;  total : lnm_solver.TotalSolution
        The fit's solutions; their problems' modes are the warm starts and are put back
        at the MAP afterwards.
    post : LnmGlobalsPosterior of these solutions.
    draws : int >= 1;  rng : numpy Generator.
    values : bool
        Also return each cell's composition Laplace value ``log p_hat(u_c | u_T,c,
        theta_s)`` (``laplace``, (S, N)); the Newton steps then run to convergence.
    newton_steps : int >= 1 or None
        Composition Newton steps per cell at each ``theta_s`` from the MAP modes (None:
        to convergence). One step (default) leaves an error of second order in the
        mode's shift, at a fraction of the cost of a converged solve, as for pln
        (:mod:`scribe_stan.laplace.nested`); measured on a 100-cell, 5-gene lnmvcp
        simulation (tests/test_lnm_nested.py): the drawn globals move the modes by a
        median 0.095 posterior sds, and one step lands within a median 5e-4, worst
        0.05 sds of the converged mode. ``converged`` then reads near 0 (one step
        rarely meets the 1e-10 nats tolerance), which is expected.

    Returns
    -------
    dict
        ``mu``, ``d`` (S, D) (``d`` None in the low-rank mode), ``W`` (S, D, K) (the fit's
        rotation); ``y`` (S, N, D); ``log_lik``, ``lp``, ``lp_approx`` (S, N) of the
        composition as in ``CompositionProblem.sample`` at each ``theta_s``;
        ``log_prior`` (S,) composition prior plus the ``log d`` Jacobian; ``log_q`` (S,)
        the composition Gaussian's log density (up to a constant); ``converged`` (S,)
        fraction of cells whose Newton met the tolerance (within ``newton_steps``);
        ``log_m_T``, ``log_r_T``, ``totals_log_prior``, ``totals_log_q`` (S,); ``eta``
        (S, N) or None (lnm); ``nb``, ``totals_lp``, ``totals_lp_approx`` (S, N): the NB
        log pmf of each total, plus eta's capture prior, and eta's truncated-Gaussian log
        density (0 for lnm); with ``values`` also ``laplace`` (S, N).
    """
    problem = composition.problem
    cpost = post.composition
    N, D = problem.shape
    full = problem.mode == "full"
    out = _composition_draws(cpost, draws, rng)
    out.update({"y": np.empty((draws, N, D)), "converged": np.empty(draws),
                **{k: np.empty((draws, N)) for k in ("log_lik", "lp", "lp_approx")}})
    if values:
        out["laplace"] = np.empty((draws, N))
    flags = (problem.n_iter.copy(), problem.converged.copy())
    problem.modes(composition.mu, composition.W, composition.d)
    problem.keep_modes()
    try:
        for s in range(draws):
            problem.restore_modes()
            mu, W, d = out["mu"][s], out["W"][s], out["d"][s] if full else None
            if values:
                out["laplace"][s] = problem.log_marginal(mu, W, d)
            else:
                problem.modes(mu, W, d, steps=newton_steps)
            out["converged"][s] = np.mean(problem.converged)
            smp = problem.sample(mu, W, d, 1, rng)
            for key in ("y", "log_lik", "lp", "lp_approx"):
                out[key][s] = smp[key][0]
    finally:
        problem.restore_modes()
        problem.n_iter, problem.converged = flags
    out.update(_totals_nested(total, post.totals, draws, rng))
    return out


def _composition_draws(cpost, draws, rng):
    """Draws of the composition globals: ``mu``, ``d`` (S, D) (``d`` None in the low-rank
    mode), ``W`` (S, D, K) in the fit's rotation, ``log_prior`` (S,) their prior plus the
    ``log d`` Jacobian (a density in the Gaussian's coordinates ``(m, W, log d)``),
    ``log_q`` (S,) the Gaussian's log density (up to a constant)."""
    thetas, log_q = cpost.draw(draws, rng)
    mu, W, d, _ = zip(*(cpost.unpack(theta) for theta in thetas))
    log_prior = (np.array([lnm_solver.composition_prior(*g)[0] for g in zip(mu, W, d)])
                 + cpost.log_jacobian(thetas))
    return {"mu": np.array(mu), "W": np.array(W),
            "d": None if d[0] is None else np.array(d), "log_prior": log_prior,
            "log_q": log_q}


def _totals_globals(tpost, draws, rng):
    """Draws of ``(log m_T, log r_T)`` (S,) each, their prior ``totals_log_prior`` and
    Gaussian log density ``totals_log_q`` (S,): the prior is a density in these
    coordinates (no Jacobian)."""
    theta, log_q = tpost.draw(draws, rng)
    return {"log_m_T": theta[:, 0], "log_r_T": theta[:, 1], "totals_log_q": log_q,
            "totals_log_prior": np.array([lnm_solver.totals_prior(*t)[0] for t in theta])}


def draw_globals(post, draws, rng):
    """Draws of all globals of an lnm / lnmvcp fit from their Gaussians, no latents.

    Parameters
    ----------
    post : LnmGlobalsPosterior;  draws : int >= 1;  rng : numpy Generator.

    Returns
    -------
    dict
        The globals' keys of :func:`nested_draws`: ``mu``, ``W``, ``d`` (None in the
        low-rank mode), ``log_prior``, ``log_q`` of the composition; ``log_m_T``,
        ``log_r_T``, ``totals_log_prior``, ``totals_log_q`` of the totals.
    """
    return {**_composition_draws(post.composition, draws, rng),
            **_totals_globals(post.totals, draws, rng)}


def _totals_nested(total, tpost, draws, rng):
    """The totals part of :func:`nested_draws` (see its Returns)."""
    tp = total.problem
    N = tp.uT.size
    out = _totals_globals(tpost, draws, rng)
    kept = (tp.eta.copy(), tp.converged.copy(), tp.at_bound.copy(), tp.n_iter.copy())
    parts = []
    try:
        for log_m, log_r in zip(out["log_m_T"], out["log_r_T"]):
            if tp.capture:  # eta's modes at the drawn globals, from the MAP's
                tp.eta = kept[0].copy()
                tp.modes(log_m, log_r)
            parts.append(tp.sample(log_m, log_r, 1, rng))
    finally:
        tp.eta, tp.converged, tp.at_bound, tp.n_iter = kept
    eta, nb, lp, lp_approx = zip(*parts)
    out.update({"eta": np.concatenate(eta) if tp.capture else None,
                "nb": np.concatenate(nb), "totals_lp": np.concatenate(lp),
                "totals_lp_approx": np.concatenate([np.broadcast_to(a, (1, N))
                                                    for a in lp_approx])})
    return out
