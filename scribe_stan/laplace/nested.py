"""Per-cell draws that integrate over the globals' posterior (nested Laplace draws).

For each draw ``theta_s`` of the globals from their Gaussian approximation
(:mod:`scribe_stan.laplace.globals_posterior`), every cell's mode is moved by one
Newton step from its mode at the MAP towards its mode at ``theta_s``, and the cell's
latents ``(x_c, eta_c)`` are drawn from its Laplace Gaussian there: one draw of
``p(theta, x, eta | u) ~ q(theta) prod_c q_c(x_c, eta_c | theta)``. The
point-globals draws of :meth:`~scribe_stan.laplace.solver.LaplaceProblem.sample` are
the special case ``theta_s = theta_hat``.

Two ways to take that step (``curvature``; ``"auto"``, the default, takes ``"map"`` for
pln fits of at least :data:`MAP_CURVATURE_MIN_CELLS` cells and ``"drawn"`` otherwise):

``"map"`` (large pln fits on the CPU)
    The Newton step and the Gaussian's covariance use each cell's Hessian at the MAP,
    factored once for all draws; a draw then costs a gradient and a Woodbury solve per
    cell, O(G K), about what a point draw costs
    (:func:`scribe_stan.laplace.cpu.nested_sample_cells`). The mode's error is second
    order in the globals' shift, and the covariance's first-order change averages out
    over the draws (its mean over symmetric shifts is zero), so the mixture's moments
    match to second order. That holds while the globals are well determined: the
    neglected term grows with their posterior variance (Jensen: the average over the
    draws of a cell's covariance exceeds its value at the MAP). Measured against
    ``"drawn"`` (simulations, 1500-2000 draws): pln per-cell sds 0.993 (x) and 0.989
    (eta) of ``"drawn"``'s at 400 cells x 30 genes, but 0.91 at 120 cells x 4 genes;
    nbln 0.94 and 0.91 at 400 cells x 30 genes, since NB's curvature also moves with the
    drawn dispersions. Hence the rule of ``"auto"``; the cost it saves matters only at
    scale anyway.
``"drawn"``
    ``newton_steps`` full Newton steps at ``theta_s`` (Hessian re-formed and factored,
    O(G K^2) per cell and step) and the Gaussian at the new point. The reference for
    ``"map"``, the path on a CUDA device, and the one behind ``values``.
"""

from __future__ import annotations

import numpy as np

#: Newton steps per cell at each drawn set of globals (:func:`nested_draws`).
NEWTON_STEPS_DEFAULT = 1
#: Hessians of the nested step (:func:`nested_draws`).
CURVATURES = ("auto", "map", "drawn")
#: Fewest cells for which ``curvature="auto"`` holds a pln fit's Hessians at the MAP.
MAP_CURVATURE_MIN_CELLS = 1000


def nested_draws(solution, post, draws, rng, *, genes=None, values=False,
                 newton_steps=NEWTON_STEPS_DEFAULT, curvature="auto"):
    """Joint draws of the globals and of every cell's latents.

    Parameters
    ----------
    solution : scribe_stan.laplace.solver.LaplaceSolution (its problem's modes are used
        as the warm start and put back at the MAP afterwards).
    post : scribe_stan.laplace.globals_posterior.GlobalsPosterior of that solution.
    draws : int >= 1;  rng : numpy Generator.
    genes : (Gs,) int indices of the genes whose x draws are returned (default all).
    values : bool
        Also return each cell's Laplace value ``log p_hat(u_c | theta_s)`` (``laplace``);
        the Newton steps then run to convergence (``curvature="drawn"``).
    newton_steps : int >= 1 or None
        ``curvature="drawn"``: Newton steps per cell at each ``theta_s`` from the MAP
        modes (None: to convergence; default :data:`NEWTON_STEPS_DEFAULT`). A draw of
        the globals moves each cell's mode by a fraction of its posterior sd, and Newton
        converges quadratically, so one step leaves an error of second order in that
        shift (measured on a 400-cell, 30-gene pln simulation: median 0.001, worst cell
        0.07 posterior sds; two steps: 6e-4 worst).
    curvature : {"auto", "map", "drawn"}
        The Hessian of the step and of the Gaussian (module docs); "auto": "map" for pln
        (``solution.log_r is None``) with at least :data:`MAP_CURVATURE_MIN_CELLS`
        cells, else "drawn". "map" needs the CPU kernels; on a device "drawn" is taken.

    Returns
    -------
    dict
        ``mu`` (S, G), ``W`` (S, G, K) (the fit's rotation), ``d`` (S, G), ``log_r``
        (S, G) or None; ``x`` (S, N, Gs), ``eta``, ``log_lik``, ``lp``, ``lp_approx``
        (S, N) as in ``LaplaceProblem.sample`` at each ``theta_s`` (``lp_approx`` the
        log density of the Gaussian the draw came from); ``log_prior`` (S,) the globals'
        log prior plus the ``log d`` Jacobian (density of the optimizer's coordinates);
        ``log_q`` (S,) their Gaussian's log density; ``converged`` (S,) fraction of
        cells whose Newton met the tolerance within ``newton_steps`` ("drawn"; NaN for
        "map", which takes no iterative step); with ``values`` also ``laplace`` (S, N).

    Raises
    ------
    ValueError
        ``curvature`` not one of ``("auto", "map", "drawn")``.
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}")
    if curvature == "auto":
        curvature = ("map" if solution.log_r is None
                     and solution.problem.shape[0] >= MAP_CURVATURE_MIN_CELLS else "drawn")
    problem, layout = solution.problem, post.layout
    N, G = problem.shape
    genes = np.arange(G) if genes is None else np.asarray(genes, dtype=np.int64)
    out = draw_globals(post, draws, rng)
    problem.modes(solution.mu, solution.W, solution.d, log_r=solution.log_r, eta=layout.eta)
    if curvature == "map" and not values and problem.shifts_on_host:
        out.update(problem.sample_shifted(solution.mu, solution.W, solution.d, out, rng,
                                          log_r=solution.log_r,
                                          fix_eta=layout.eta is not None, genes=genes))
        out["converged"] = np.full(draws, np.nan)
        return out
    out.update({"x": np.empty((draws, N, genes.size)), "converged": np.empty(draws),
                **{k: np.empty((draws, N)) for k in ("eta", "log_lik", "lp", "lp_approx")}})
    if values:
        out["laplace"] = np.empty((draws, N))
    problem.keep_modes()
    try:
        for s in range(draws):
            problem.restore_modes()
            mu, W, d = out["mu"][s], out["W"][s], out["d"][s]
            log_r = None if out["log_r"] is None else out["log_r"][s]
            if values:
                out["laplace"][s] = problem.log_marginal(mu, W, d, log_r=log_r,
                                                         eta=layout.eta)
            else:
                problem.modes(mu, W, d, log_r=log_r, eta=layout.eta, steps=newton_steps)
            out["converged"][s] = np.mean(problem.converged)
            smp = problem.sample(mu, W, d, 1, rng, log_r=log_r, genes=genes)
            for key in ("x", "eta", "log_lik", "lp", "lp_approx"):
                out[key][s] = smp[key][0]
    finally:
        problem.restore_modes()
        problem.sync_modes()
    return out


def draw_globals(post, draws, rng):
    """Draws of the globals from their Gaussian, no latents.

    Parameters
    ----------
    post : scribe_stan.laplace.globals_posterior.GlobalsPosterior;  draws : int >= 1;
    rng : numpy Generator.

    Returns
    -------
    dict
        ``mu`` (S, G), ``W`` (S, G, K) (the fit's rotation), ``d`` (S, G), ``log_r``
        (S, G) or None (pln, or a held ``log_r``); ``log_prior`` (S,) the globals' log
        prior plus the ``log d`` (and ``log tau``) Jacobian: the density of the
        Gaussian's coordinates; ``log_q`` (S,) the Gaussian's log density.
    """
    layout = post.layout
    thetas, log_q = post.draw(draws, rng)
    mu, W, d, log_r = zip(*(post.unpack(theta) for theta in thetas))
    log_prior = np.array([layout.log_prior(*g, layout.log_tau(theta))[0]
                          for g, theta in zip(zip(mu, W, d, log_r), thetas)])
    return {"mu": np.array(mu), "W": np.array(W), "d": np.array(d),
            "log_r": None if log_r[0] is None else np.array(log_r),
            "log_prior": log_prior + post.log_jacobian(thetas), "log_q": log_q}
