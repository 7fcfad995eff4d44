"""Outer problem of the pln Laplace fit: maximize the Laplace marginal over (mu, W, d).

The objective is ``sum_c log p_hat(u_c | mu, W, d) + log prior(mu, W, d)``, exact with
all constants, where ``log p_hat`` is the Laplace approximation of each cell's marginal
over its latent log-rates x_c and capture eta_c (kernels in :mod:`.cpu`). Its gradient
is exact, including the dependence of the log-determinant on the mode (implicit
differentiation; Margossian et al. 2020, arXiv:2004.12550). The optimizer is SciPy's
L-BFGS-B over ``(mu, W, log d)``; the prior is the density in ``(mu, W, d)`` (a MAP
without change-of-variables term, as Stan's ``optimize`` does by default).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numba
import numpy as np
from scipy import optimize, special
from scipy.sparse.linalg import LinearOperator, eigsh

from scribe_stan.laplace import cpu
from scribe_stan.models import pln


def _n_chunks():
    """Work blocks per parallel kernel call: several per thread for load balance."""
    return 8 * numba.get_num_threads()


def pair_products(W):
    """``WW[g, k*K + j] = W[g, k] W[g, j]``, shape (G, K*K): see cpu._curvature."""
    return np.ascontiguousarray((W[:, :, None] * W[:, None, :]).reshape(W.shape[0], -1))


def shared_factor(W, d):
    """Lower Cholesky factor of ``C = I_K + W' diag(1/d) W`` (shared by all cells)."""
    C = np.eye(W.shape[1]) + (W / d[:, None]).T @ W
    return np.linalg.cholesky(C)


@dataclass
class CellModes:
    """Per-cell modes and Newton diagnostics.

    Attributes
    ----------
    x : (N, G) mode of the log-rates;  eta : (N,) mode of the capture loss.
    n_iter : (N,) Newton iterations;  converged : (N,) bool;
    at_bound : (N,) bool, eta's mode sits on its bound eta = 0.
    """

    x: np.ndarray
    eta: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    at_bound: np.ndarray


class LaplaceProblem:
    """Per-cell Laplace approximations of the pln model for one count matrix.

    Holds the counts, capture prior and the warm-start modes across calls.

    Parameters
    ----------
    counts : (N, G) array of non-negative integers (validated by the caller).
    log_M0, sigma_M : float
        Capture prior (see :mod:`scribe_stan.models.pln`).
    newton_tol : float
        Per-cell Newton stops when half the Newton decrement ``g' (-H)^{-1} g / 2``
        (the predicted gain in log density) is below this, after a full step.
    max_newton : int
        Newton iterations per cell per call.
    log_lib : (N,) array, optional
        Log library sizes (default: from ``counts``; pass the all-gene value when
        ``counts`` is a gene subset).
    """

    def __init__(self, counts, *, log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT,
                 newton_tol=1e-10, max_newton=100, log_lib=None):
        self.counts = np.ascontiguousarray(counts, dtype=np.float64)
        N, G = self.counts.shape
        self.sigma_M = float(sigma_M)
        self.log_M0 = float(log_M0)
        if log_lib is None:
            log_lib = np.log(self.counts.sum(axis=1))
        self.a = pln.capture_prior_mean(log_lib, self.log_M0)
        lgam = -special.gammaln(self.counts + 1.0).sum(axis=1)
        self._const_x = lgam
        # capture prior normalization (truncation at 0) and the eta integral's 1/2 log 2 pi
        self._const_joint = (lgam - 0.5 * np.log(2 * np.pi * self.sigma_M**2)
                             - special.log_ndtr(self.a / self.sigma_M) + 0.5 * np.log(2 * np.pi))
        self.newton_tol = float(newton_tol)
        self.max_newton = int(max_newton)
        self.eta = np.maximum(self.a, 0.0)
        self.x = np.log(self.counts + 0.5) + self.eta[:, None]
        self.n_iter = np.zeros(N, np.int64)
        self.converged = np.zeros(N, bool)
        self.at_bound = np.zeros(N, bool)

    @property
    def shape(self):
        return self.counts.shape

    def modes(self, mu, W, d, *, eta=None):
        """Run Newton from the stored warm start; update and return the modes.

        With ``eta`` (N,) given, eta is held there and only x is optimized.
        """
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        fix = eta is not None
        if fix:
            self.eta = np.array(eta, dtype=np.float64)
        Lc = shared_factor(W, d)
        self.n_iter, self.converged, self.at_bound = cpu.newton_all(
            self.counts, self.a, self.sigma_M, mu, W, d, pair_products(W), Lc, self.x, self.eta,
            fix,
            self.newton_tol, self.max_newton, _n_chunks())
        if not np.all(self.converged):
            # A restart from the data-driven start rescues cells stranded by a bad warm start.
            bad = np.flatnonzero(~self.converged)
            if not fix:
                self.eta[bad] = np.maximum(self.a[bad], 0.0)
            self.x[bad] = np.log(self.counts[bad] + 0.5) + self.eta[bad, None]
            it, ok, bd = cpu.newton_all(self.counts[bad], self.a[bad], self.sigma_M, mu, W, d,
                                        pair_products(W), Lc,
                                        xb := self.x[bad], eb := self.eta[bad], fix,
                                        self.newton_tol, self.max_newton, _n_chunks())
            self.x[bad], self.eta[bad] = xb, eb
            self.n_iter[bad] += it
            self.converged[bad], self.at_bound[bad] = ok, bd
        return CellModes(self.x, self.eta, self.n_iter, self.converged, self.at_bound)

    def log_marginal(self, mu, W, d, *, eta=None, grad=False):
        """Laplace log marginal per cell at the given globals (modes recomputed).

        Parameters
        ----------
        mu : (G,), W : (G, K), d : (G,) > 0
        eta : (N,), optional
            Hold the capture loss fixed and marginalize x only: this is the quantity of
            Stan's ``laplace_marginal_poisson_log_lpmf`` with mean ``mu - eta_c``.
        grad : bool
            Also return the gradient of the sum over cells w.r.t. (mu, W, d).

        Returns
        -------
        value : (N,) ; and if ``grad``: g_mu (G,), g_W (G, K), g_d (G,)
        """
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        self.modes(mu, W, d, eta=eta)
        fix = eta is not None
        const = self._const_x if fix else self._const_joint
        # the gradient pass costs the same for every cell: one block per thread
        out = cpu.laplace_value_grad(self.counts, const, self.a, self.sigma_M, mu, W, d,
                                     pair_products(W), shared_factor(W, d), self.x, self.eta,
                                     fix, grad, numba.get_num_threads())
        return out if grad else out[0]

    def log_joint(self, mu, W, d, x, eta):
        """Exact ``log p(u_c, x_c, eta_c | mu, W, d)`` per cell (all constants), (N,).

        Parameters
        ----------
        x : (N, G) log-rates;  eta : (N,) capture losses (>= 0).
        """
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        Lc = shared_factor(W, d)
        G = self.shape[1]
        logdet_sigma = np.sum(np.log(d)) + 2 * np.sum(np.log(np.diag(Lc)))
        core = cpu.log_density_cells(self.counts, self.a, self.sigma_M, mu, W, d, Lc,
                                     np.ascontiguousarray(x, dtype=np.float64),
                                     np.ascontiguousarray(eta, dtype=np.float64))
        # _const_joint carries +1/2 log 2 pi for the eta integral: take it back out.
        return (core + self._const_joint - 0.5 * np.log(2 * np.pi)
                - 0.5 * G * np.log(2 * np.pi) - 0.5 * logdet_sigma)

    def sample(self, mu, W, d, draws, rng, *, genes=None, block_bytes=2**28):
        """Draws ``(x, eta)`` from each cell's Gaussian at the stored (converged) modes.

        Parameters
        ----------
        mu, W, d : the globals the modes were computed at.
        draws : int;  rng : numpy Generator.
        genes : (Gs,) int indices of genes whose x draws are returned (default: all).
        block_bytes : memory for standard-normal variates per block of draws.

        Returns
        -------
        dict with ``x`` (draws, N, Gs), ``eta`` (draws, N), ``log_lik`` (draws, N: Poisson
        log likelihood over all genes), ``lp`` (draws, N: exact log density of the draw
        given the globals), ``lp_approx`` (draws, N: the Gaussian's log density).
        """
        N, G = self.shape
        K = W.shape[1]
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        genes = np.arange(G) if genes is None else np.asarray(genes, dtype=np.int64)
        out = {"x": np.empty((draws, N, genes.size)),
               **{k: np.empty((draws, N)) for k in ("eta", "log_lik", "lp", "lp_approx")}}
        Lc = shared_factor(W, d)
        block = max(1, min(draws, block_bytes // (8 * N * G)))
        for start in range(0, draws, block):
            stop = min(draws, start + block)
            S = stop - start
            cpu.sample_cells(self.counts, self._const_joint, self._const_x, self.a, self.sigma_M,
                             mu, W, d, pair_products(W), Lc,
                             self.x, self.eta, genes, rng.standard_normal((S, N, G)),
                             rng.standard_normal((S, N, K)), rng.standard_normal((S, N)),
                             *(out[k][start:stop] for k in ("x", "eta", "log_lik", "lp",
                                                            "lp_approx")))
        return out


def log_prior_and_grad(mu, W, d):
    """Global log prior (as in :func:`scribe_stan.models.pln.log_prior_globals`) and gradient."""
    value = pln.log_prior_globals(mu, W, d)
    g_mu = -(mu - pln.MU_LOC) / pln.MU_SCALE**2
    g_W = -W / pln.W_SCALE**2
    g_d = (pln.D_SHAPE - 1.0) / d - pln.D_RATE
    return value, g_mu, g_W, g_d


def pack(mu, W, d):
    return np.concatenate([mu, W.ravel(), np.log(d)])


def unpack(theta, G, K):
    mu = theta[:G]
    W = theta[G:G + G * K].reshape(G, K)
    d = np.exp(theta[G + G * K:])
    return mu, W, d


def objective(problem, theta, K):
    """Laplace objective and its gradient in the optimizer's coordinates (mu, W, log d)."""
    G = problem.shape[1]
    mu, W, d = unpack(theta, G, K)
    value, g_mu, g_W, g_d = problem.log_marginal(mu, W, d, grad=True)
    lp, p_mu, p_W, p_d = log_prior_and_grad(mu, W, d)
    total = float(value.sum() + lp)
    grad = np.concatenate([g_mu + p_mu, (g_W + p_W).ravel(), (g_d + p_d) * d])
    return total, grad


def diagonal_scaling(problem, mu, W, d):
    """Per-coordinate scales for the optimizer, from the per-gene Fisher information.

    The curvature of the objective in mu_g is about ``I_g = sum_c w_cg``,
    ``w = lambda / (1 + lambda Sigma_gg)``, which spans orders of magnitude between
    rare and abundant genes; W's row g scales alike, and log d_g with
    ``1/2 sum_c (w_cg d_g)^2``. Optimizing ``theta * scale`` makes L-BFGS's start
    near-isotropic. Returns ``scale`` shaped like :func:`pack`'s vector.
    """
    problem.modes(mu, W, d)
    lam = np.exp(problem.x - problem.eta[:, None])
    sig = np.sum(W**2, axis=1) + d
    w = lam / (1.0 + lam * sig)
    # Floor at 1: coordinates of nearly silent genes are never stretched, so a unit
    # step of the optimizer never moves them by more than one natural unit.
    info = np.maximum(w.sum(axis=0), 1.0)
    info_d = np.maximum(0.5 * np.sum((w * d) ** 2, axis=0), 1.0)
    K = W.shape[1]
    return np.sqrt(np.concatenate([info, np.repeat(info, K), info_d]))


def initial_globals(counts, a, K, *, seed=0):
    """Moment-based starting point for (mu, W, d).

    Counts are rescaled by the prior capture ``exp(a_c)``; log-normal moments
    ``m = exp(mu + Sigma/2)``, ``Var = m^2 (e^Sigma - 1) + Poisson noise`` give mu and
    the diagonal of Sigma (Aitchison & Ho 1989, Biometrika 76:643,
    doi:10.1093/biomet/76.4.643), and the top-K eigenvectors of the relative covariance
    (without its Poisson part) give W, via a matrix-free eigensolver (no G x G matrix).
    """
    counts = np.asarray(counts, float)
    N, G = counts.shape
    scale = np.exp(a)
    y = counts * scale[:, None]
    m = np.maximum(y.mean(axis=0), 1e-3 * scale.mean() / N)
    poisson_part = np.mean(scale) * m
    rel_var = np.maximum(y.var(axis=0) - poisson_part, 0.0) / m**2
    sigma_diag = np.clip(np.log1p(rel_var), 0.05, 5.0)
    mu = np.log(m) - 0.5 * sigma_diag
    Z = (y - m) / m / np.sqrt(N)
    noise = poisson_part / m**2
    op = LinearOperator((G, G), matvec=lambda v: Z.T @ (Z @ v.ravel()) - noise * v.ravel(),
                        dtype=float)
    rng = np.random.default_rng(seed)
    try:
        vals, vecs = eigsh(op, k=K, which="LA", v0=rng.standard_normal(G), maxiter=2000,
                           tol=1e-4)
        W = vecs * np.sqrt(np.clip(vals, 1e-3, None))
    except Exception:  # noqa: BLE001  (ARPACK non-convergence: fall back to small loadings)
        W = 0.1 * rng.standard_normal((G, K))
    # log(1 + s) compresses large relative covariances; keep the start inside the data.
    row = np.sum(W**2, axis=1)
    shrink = np.sqrt(np.minimum(1.0, 0.8 * sigma_diag / np.maximum(row, 1e-12)))
    W = W * shrink[:, None]
    d = np.maximum(sigma_diag - np.sum(W**2, axis=1), 0.05)
    return mu, W, d


@dataclass
class LaplaceSolution:
    """Result of :func:`fit_laplace` (arrays in the fitted gene order).

    Attributes
    ----------
    problem : LaplaceProblem holding the data and the modes (for sampling).
    mu : (G,) log-rate means;  W : (G, K) loadings;  d : (G,) residual variances.
    modes : CellModes at the final globals.
    objective : float, final Laplace objective (log marginal + log prior, nats).
    n_iter : int, outer L-BFGS iterations;  n_eval : int, objective evaluations.
    success : bool, the outer optimizer met its tolerance; message : str.
    history : list of objective values per outer iteration.
    wall_time_s : float.
    """

    problem: LaplaceProblem
    mu: np.ndarray
    W: np.ndarray
    d: np.ndarray
    modes: CellModes
    objective: float
    n_iter: int
    n_eval: int
    success: bool
    message: str
    history: list = field(default_factory=list)
    wall_time_s: float = 0.0


def fit_laplace(counts, K, *, log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT,
                log_lib=None, tol=1e-8, max_iter=1000, newton_tol=1e-10, init=None, seed=0,
                progress=None, precondition=True, max_unconverged=0.01):
    """Fit the pln globals by maximizing the exact Laplace objective.

    Parameters
    ----------
    counts : (N, G) non-negative integer counts (validated).
    K : int, latent rank.
    log_M0, sigma_M, log_lib : capture prior and library sizes (see LaplaceProblem).
    tol : float
        Relative objective tolerance of L-BFGS-B (``ftol``): stop when
        ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= tol``.
    max_iter : int, outer iterations.
    init : tuple (mu, W, d), optional; default :func:`initial_globals`.
    progress : tqdm-like object with ``update``/``set_postfix``, optional.
    precondition : bool
        Optimize in coordinates scaled by :func:`diagonal_scaling` (default).
    max_unconverged : float
        After an evaluation where a larger fraction of cells fails the Newton step, the
        next one warm-starts from the last good modes.

    Returns
    -------
    LaplaceSolution
    """
    t0 = time.perf_counter()
    problem = LaplaceProblem(counts, log_M0=log_M0, sigma_M=sigma_M, newton_tol=newton_tol,
                             log_lib=log_lib)
    G = problem.shape[1]
    mu0, W0, d0 = init if init is not None else initial_globals(problem.counts, problem.a, K,
                                                                seed=seed)
    history = []
    n_eval = 0
    scale = (diagonal_scaling(problem, mu0, W0, d0) if precondition
             else np.ones(G * (K + 2)))

    good = {"x": problem.x.copy(), "eta": problem.eta.copy()}

    def fun(theta_scaled):
        # A line-search trial far from the data can strand cells; their modes are not
        # kept as warm starts (the line search backtracks on the poor value it sees).
        nonlocal n_eval
        n_eval += 1
        value, grad = objective(problem, theta_scaled / scale, K)
        if not np.isfinite(value) or np.mean(~problem.converged) > max_unconverged:
            problem.x[:], problem.eta[:] = good["x"], good["eta"]
        else:
            good["x"][:], good["eta"][:] = problem.x, problem.eta
        if not np.isfinite(value):
            return np.inf, np.zeros_like(theta_scaled)
        return -value, -grad / scale

    def callback(intermediate_result):
        history.append(-float(intermediate_result.fun))
        if progress is not None:
            progress.update(1)
            progress.set_postfix(objective=f"{history[-1]:.6g}")

    # Box on mu and log d keeps trial points where exp(x - eta) stays finite.
    lower = np.concatenate([np.full(G, -50.0), np.full(G * K, -np.inf), np.full(G, np.log(1e-6))])
    upper = np.concatenate([np.full(G, 50.0), np.full(G * K, np.inf), np.full(G, np.log(1e2))])
    theta0 = np.clip(pack(mu0, W0, d0), lower, upper)
    res = optimize.minimize(fun, theta0 * scale, jac=True, method="L-BFGS-B",
                            bounds=list(zip(lower * scale, upper * scale)), callback=callback,
                            options={"maxiter": max_iter, "ftol": tol, "gtol": 1e-6,
                                     "maxcor": 20, "maxls": 40})
    theta = res.x / scale
    mu, W, d = unpack(theta, G, K)
    # Final E-step and objective at the returned globals (the optimizer's last
    # evaluation may have been a rejected line-search point).
    final, _ = objective(problem, theta, K)
    modes = CellModes(problem.x.copy(), problem.eta.copy(), problem.n_iter.copy(),
                      problem.converged.copy(), problem.at_bound.copy())
    if not modes.converged.all():
        warnings.warn(f"{int((~modes.converged).sum())} of {modes.converged.size} cells did not "
                      "converge in the per-cell Newton step; see fit.converged.", RuntimeWarning,
                      stacklevel=2)
    return LaplaceSolution(problem=problem, mu=mu.copy(), W=W.copy(), d=d.copy(), modes=modes,
                           objective=final,
                           n_iter=int(res.nit), n_eval=n_eval, success=bool(res.success),
                           message=str(res.message), history=history,
                           wall_time_s=time.perf_counter() - t0)
