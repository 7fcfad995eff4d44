"""Outer problem of the Laplace fit: maximize the Laplace marginal over the globals.

Models ``pln`` (Poisson) and ``nbln`` (NegBinomial2 with per-gene dispersions r_g).
The objective is ``sum_c log p_hat(u_c | theta) + log prior(theta)``, exact with all
constants, where ``log p_hat`` is the Laplace approximation of each cell's marginal
over its latent log-rates x_c and capture eta_c (kernels in :mod:`.cpu`) and
``theta = (mu, W, d)`` plus ``log_r`` for nbln. Its gradient is exact, including the
dependence of the log-determinant on the mode (implicit differentiation; Margossian et
al. 2020, arXiv:2004.12550). The optimizer is SciPy's L-BFGS-B over
``(mu, W, log d[, log_r])``; the prior is the density in ``(mu, W, d, log_r)`` (a MAP
without change-of-variables term for d, as Stan's ``optimize`` does by default; log_r
is itself the parameter of the dispersion prior).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse, special
from scipy.sparse.linalg import LinearOperator, eigsh

from scribe_stan.laplace import batched, driver, em
from scribe_stan.laplace.device import check_dtype, device_counts, resolve_device
from scribe_stan.models import dispersion, loadings, pln

MODELS = ("pln", "nbln")
#: Laplace-EM iterations before L-BFGS by default (chosen by validation/bench_pln_laplace.py).
EM_ITERATIONS = 10

#: Largest |mu_g| the outer optimizer may try (log-rates beyond it overflow).
MU_BOUND = 50.0
#: Box on log_r in the outer fit: r from 1e-4 (extreme over-dispersion) to 1e8 (Poisson
#: to within any count's resolution); keeps trial points where lgamma(u + r) is finite.
LOG_R_BOUNDS = (float(np.log(1e-4)), float(np.log(1e8)))


def pair_products(W):
    """``WW[g, k*K + j] = W[g, k] W[g, j]``, shape (G, K*K): see cpu._curvature."""
    return np.ascontiguousarray((W[:, :, None] * W[:, None, :]).reshape(W.shape[0], -1))


def shared_factor(W, d):
    """Lower Cholesky factor of ``C = I_K + W' diag(1/d) W`` (shared by all cells)."""
    C = np.eye(W.shape[1]) + (W / d[:, None]).T @ W
    return np.linalg.cholesky(C)


def inverse_dispersion(log_r, G):
    """``inv_r = exp(-log_r)`` (G,) for the kernels; ``log_r=None`` (Poisson) gives zeros."""
    if log_r is None:
        return np.zeros(G)
    return np.ascontiguousarray(np.exp(-np.asarray(log_r, dtype=np.float64)))


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
    """Per-cell Laplace approximations of the pln / nbln model for one count matrix.

    Holds the counts, the eta prior and the warm-start modes across calls. Every method
    takes ``log_r`` (G,), the per-gene log dispersions of nbln; ``log_r=None`` is the
    Poisson (pln) likelihood.

    On the CPU, ``x``, ``eta``, ``n_iter``, ``converged`` and ``at_bound`` are the arrays
    the kernels update. With the CUDA kernels the cells live on the device for the
    problem's lifetime (:class:`scribe_stan.laplace.cuda.DeviceCells`): an evaluation
    sends the globals and brings back the values, gradient sums and ``converged``;
    ``x``, ``eta``, ``n_iter`` and ``at_bound`` are then a host mirror, brought up to
    date by :meth:`modes` and :meth:`sync_modes` (writing into it does not reach the
    device).

    Parameters
    ----------
    counts : (N, G) array of non-negative integers (validated by the caller).
    log_M0, sigma_M : float
        Capture prior ``eta_c ~ Normal(log M0 - log L_c, sigma_M)`` truncated to
        ``eta_c >= 0`` (see :mod:`scribe_stan.models.pln`).
    newton_tol : float
        Per-cell Newton stops when half the Newton decrement ``g' (-H)^{-1} g / 2``
        (the predicted gain in log density) is below this, after a full step.
    max_newton : int
        Newton iterations per cell per call.
    log_lib : (N,) array, optional
        Log library sizes (default: from ``counts``; pass the all-gene value when
        ``counts`` is a gene subset).
    eta_loc, eta_scale : (N,) arrays, optional
        Per-cell informative prior ``eta_c ~ Normal(eta_loc_c, eta_scale_c)`` truncated
        to ``eta_c >= 0``, replacing the capture prior (both or neither; e.g. the
        posterior of eta from an nbvcp fit). ``eta_scale > 0``.
    device : {"cpu", "cuda", "auto"}
        Kernels (:func:`scribe_stan.laplace.device.resolve_device`).
    dtype : {"float64", "float32"}
        Floating type of the CUDA kernels (float32: CUDA only; accuracy in
        :mod:`scribe_stan.laplace.cuda`).
    """

    def __init__(self, counts, *, log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT,
                 newton_tol=1e-10, max_newton=100, log_lib=None, eta_loc=None,
                 eta_scale=None, device="cpu", dtype="float64", chunk_cells=None):
        # Counts are held as CSR (sorted indices) whatever came in; dense copies are made
        # per chunk only where a per-cell kernel needs them.
        self.csr = sparse.csr_matrix(counts, dtype=np.float64, copy=True)
        self.csr.sum_duplicates()
        self.csr.eliminate_zeros()
        self.csr.sort_indices()
        self._kernels = resolve_device(device)
        self._dtype = check_dtype(self._kernels, dtype)
        # CPU: the batched BLAS path (scribe_stan.laplace.batched); CUDA: its own kernels
        self._batched = self._kernels.__name__.endswith(".cpu")
        self._dcounts_cache = None
        self._kept = None
        N, G = self.csr.shape
        if (eta_loc is None) != (eta_scale is None):
            raise ValueError("eta_loc and eta_scale go together: pass both (N,) arrays or "
                             "neither (capture prior from log_M0, sigma_M).")
        if eta_loc is None:
            if log_lib is None:
                log_lib = np.log(np.asarray(self.csr.sum(axis=1)).reshape(-1))
            self.a = pln.capture_prior_mean(log_lib, float(log_M0))
            self.sigma = np.full(N, float(sigma_M))
        else:
            self.a = _check_cells("eta_loc", eta_loc, N)
            self.sigma = _check_cells("eta_scale", eta_scale, N, positive=True)
        rows = np.repeat(np.arange(N), np.diff(self.csr.indptr))
        self._lgam = -np.bincount(rows, weights=special.gammaln(self.csr.data + 1.0),
                                  minlength=N)
        del rows
        self._nonzero_cache = None  # (rows, cols, counts), built by NB fits only
        self._nb_cache = None  # (log_r, lik_constants(log_r)) of the last NB call
        # eta prior normalization (truncation at 0) and the eta integral's 1/2 log 2 pi
        self._const_eta = (-0.5 * np.log(2 * np.pi * self.sigma**2)
                           - special.log_ndtr(self.a / self.sigma) + 0.5 * np.log(2 * np.pi))
        self.newton_tol = float(newton_tol)
        self.max_newton = int(max_newton)
        self.eta = np.maximum(self.a, 0.0)
        self.x = np.empty((N, G))
        self._restart(np.arange(N), reset_eta=False)
        self.n_iter = np.zeros(N, np.int64)
        self.converged = np.zeros(N, bool)
        self.at_bound = np.zeros(N, bool)
        self._bounds = batched.chunk_bounds(N, G, chunk_cells)
        # chunks view their rows of x and eta: keep those arrays, assign into them
        self._chunks = [batched.CellChunk(self.csr[lo:hi], self.a[lo:hi], self.sigma[lo:hi],
                                          self.x[lo:hi], self.eta[lo:hi])
                        for lo, hi in self._bounds]
        self._device = None if self._batched else self._kernels.DeviceCells(
            self._dcounts, self.a, self.sigma, self.x, self.eta)
        self._mirror_stale = False  # CUDA: the device modes moved since the last sync

    def _restart(self, cells, reset_eta=True):
        """Data-driven start for ``cells``: ``x = log(u + 1/2) + eta`` (eta at the prior's
        location, clipped at 0, when ``reset_eta``)."""
        if reset_eta:
            self.eta[cells] = np.maximum(self.a[cells], 0.0)
        sub = self.csr[cells]
        start = np.full((cells.size, self.csr.shape[1]), np.log(0.5))
        start[np.repeat(np.arange(cells.size), np.diff(sub.indptr)), sub.indices] = \
            np.log(sub.data + 0.5)
        self.x[cells] = start + self.eta[cells, None]

    @property
    def _dcounts(self):
        """Counts as the per-cell kernels take them (dense on the CPU), made on first use."""
        if self._dcounts_cache is None:
            self._dcounts_cache = device_counts(self._kernels, self.csr, self._dtype)
        return self._dcounts_cache

    def keep_modes(self):
        """Remember the current modes as the warm start to go back to
        (:mod:`scribe_stan.laplace.driver`); on the device with CUDA."""
        if self._device is not None:
            self._device.keep()
        elif self._kept is None:
            self._kept = (self.x.copy(), self.eta.copy())
        else:
            self._kept[0][:], self._kept[1][:] = self.x, self.eta

    def restore_modes(self):
        """Go back to the modes of the last :meth:`keep_modes` (in place: chunks view them)."""
        if self._device is not None:
            self._device.restore()
            self._mirror_stale = True
        else:
            self.x[:], self.eta[:] = self._kept

    def sync_modes(self):
        """Bring the device's modes and Newton diagnostics into ``x``, ``eta``,
        ``n_iter``, ``converged`` and ``at_bound`` (CUDA; a no-op on the CPU, and when
        nothing moved since the last sync)."""
        if self._device is not None and self._mirror_stale:
            self._device.pull(self.x, self.eta)
            self.n_iter, self.converged, self.at_bound = self._device.flags()
            self._mirror_stale = False

    def chunks(self):
        """``[(lo, hi, CellChunk), ...]``: the cells in chunks of the batched path."""
        return [(lo, hi, ch) for (lo, hi), ch in zip(self._bounds, self._chunks)]

    @property
    def shape(self):
        return self.csr.shape

    def lik_constants(self, log_r=None):
        """Per-cell z-independent log-likelihood terms (N,).

        Poisson: ``-sum_g lgamma(u + 1)``. NegBinomial2 (``log_r`` given): plus
        ``sum_g [lgamma(u + r) - lgamma(r) - u log r]``, which vanishes as r -> inf.
        The NB terms are zero where u = 0, so only the non-zero counts are visited, and
        the last result is reused while ``log_r`` is unchanged (a held dispersion).
        """
        if log_r is None:
            return self._lgam
        log_r = np.asarray(log_r, dtype=np.float64)
        if self._nb_cache is not None and np.array_equal(self._nb_cache[0], log_r):
            return self._nb_cache[1]
        rows, cols, u = self._nonzero()
        lr = log_r[cols]
        r = np.exp(lr)
        nb = special.gammaln(u + r) - special.gammaln(r) - u * lr
        value = self._lgam + np.bincount(rows, weights=nb, minlength=self.shape[0])
        self._nb_cache = (log_r.copy(), value)
        return value

    def _nonzero(self):
        """Row, column and count of each stored count, (nnz,) each, built on first use.

        Only the NB constants need them; at 16 bytes per stored count (about 1 GB at
        100,000 PBMC-like cells) a Poisson fit should not hold them.
        """
        if self._nonzero_cache is None:
            rows = np.repeat(np.arange(self.shape[0]), np.diff(self.csr.indptr))
            self._nonzero_cache = (rows, self.csr.indices.astype(np.int64), self.csr.data)
        return self._nonzero_cache

    def lik_constants_grad(self, log_r):
        """Gradient of ``sum(lik_constants(log_r))`` w.r.t. log_r, (G,):
        ``sum_c [r (psi(u + r) - psi(r)) - u]`` (zero where u = 0)."""
        _, cols, u = self._nonzero()
        r = np.exp(np.asarray(log_r, dtype=np.float64))[cols]
        terms = r * (special.digamma(u + r) - special.digamma(r)) - u
        return np.bincount(cols, weights=terms, minlength=self.shape[1])

    def _newton(self, mu, W, d, inv_r, fix, cells, cap=None):
        """Newton from the stored modes for ``cells`` (None: all), at most ``cap`` steps
        (default ``max_newton``); (n_iter, ok, at_bound)."""
        cap = self.max_newton if cap is None else cap
        N = self.shape[0]
        gl = batched.Globals.build(mu, W, d, inv_r)
        cells = np.arange(N) if cells is None else cells
        n_iter = np.zeros(cells.size, np.int64)
        ok = np.zeros(cells.size, bool)
        bound = np.zeros(cells.size, bool)
        for lo, hi, chunk in self.chunks():
            mine = np.flatnonzero((cells >= lo) & (cells < hi))
            if mine.size:
                n_iter[mine], ok[mine], bound[mine] = chunk.newton(
                    gl, fix, self.newton_tol, cap, cells[mine] - lo)
        return n_iter, ok, bound

    def modes(self, mu, W, d, *, log_r=None, eta=None, steps=None):
        """Run Newton from the stored warm start; update and return the modes.

        With ``eta`` (N,) given, eta is held there and only x is optimized. ``steps``
        caps the Newton steps per cell and skips the restart of unconverged cells: for
        globals close to those of the warm start, where one step (quadratic
        convergence) already puts each cell near its mode; ``converged`` then says
        which cells met the tolerance within the cap.
        """
        self._solve_modes(mu, W, d, log_r, eta, steps)
        self.sync_modes()
        return CellModes(self.x, self.eta, self.n_iter, self.converged, self.at_bound)

    def _solve_modes(self, mu, W, d, log_r, eta, steps=None):
        """Newton for every cell from the warm start, with a restart for the cells that
        fail (:meth:`modes` without the CUDA host sync)."""
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        inv_r = inverse_dispersion(log_r, self.shape[1])
        fix = eta is not None
        cap = self.max_newton if steps is None else int(steps)
        if self._device is not None:
            self._device_modes(mu, W, d, inv_r, eta, cap, restart=steps is None)
            return
        if fix:
            self.eta[:] = eta
        self.n_iter, self.converged, self.at_bound = self._newton(mu, W, d, inv_r, fix, None,
                                                                  cap)
        if steps is None and not np.all(self.converged):
            # A restart from the data-driven start rescues cells stranded by a bad warm start.
            bad = np.flatnonzero(~self.converged)
            self._restart(bad, reset_eta=not fix)
            it, ok, bd = self._newton(mu, W, d, inv_r, fix, bad)
            self.n_iter[bad] += it
            self.converged[bad], self.at_bound[bad] = ok, bd

    def _device_modes(self, mu, W, d, inv_r, eta, cap, restart=True):
        """:meth:`_solve_modes` on the device: the same rule, the modes stay there; only
        the converged flags come back (for the restart and the driver's check)."""
        dev = self._device
        fix = eta is not None
        if fix:
            dev.hold_eta(eta)
        Lc = shared_factor(W, d)
        dev.newton(mu, W, d, inv_r, Lc, fix, self.newton_tol, cap)
        self.converged = dev.converged_flags()
        if restart and not self.converged.all():
            bad = np.flatnonzero(~self.converged)
            dev.restart(bad, reset_eta=not fix)
            dev.newton(mu, W, d, inv_r, Lc, fix, self.newton_tol, self.max_newton, bad)
            self.converged = dev.converged_flags()
        self._mirror_stale = True

    def log_marginal(self, mu, W, d, *, log_r=None, eta=None, grad=False, grad_log_r=True):
        """Laplace log marginal per cell at the given globals (modes recomputed).

        Parameters
        ----------
        mu : (G,), W : (G, K), d : (G,) > 0
        log_r : (G,), optional
            Log dispersions (nbln); None is the Poisson likelihood (pln).
        eta : (N,), optional
            Hold the capture loss fixed and marginalize x only: this is the quantity of
            Stan's ``laplace_marginal_poisson_log_lpmf`` (or ``..._neg_binomial_2_log``)
            with log mean ``x - eta_c``.
        grad : bool
            Also return the gradient of the sum over cells.
        grad_log_r : bool
            With ``grad`` and ``log_r``: also the gradient in log_r (False skips it for a
            held dispersion and returns None in its place).

        Returns
        -------
        value : (N,) ; and if ``grad``: g_mu (G,), g_W (G, K), g_d (G,), and, when
        ``log_r`` is given, g_log_r (G,).
        """
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        self._solve_modes(mu, W, d, log_r, eta)
        fix = eta is not None
        const = self.lik_constants(log_r)
        if not fix:
            const = const + self._const_eta
        inv_r = inverse_dispersion(log_r, self.shape[1])
        if self._batched:
            value, g_mu, g_W, g_d, g_log_r = self._value_grad(mu, W, d, inv_r, const, fix,
                                                              grad, grad_log_r)
        else:
            value, g_mu, g_W, g_d, g_log_r = self._device.value_grad(
                const, mu, W, d, inv_r, shared_factor(W, d), fix, grad, grad_log_r)
        if not grad:
            return value
        if log_r is None:
            return value, g_mu, g_W, g_d
        if not grad_log_r:
            return value, g_mu, g_W, g_d, None
        return value, g_mu, g_W, g_d, g_log_r + self.lik_constants_grad(log_r)

    def _value_grad(self, mu, W, d, inv_r, const, fix, grad, grad_log_r):
        """Batched value and gradient: per-chunk results, summed (map-reduce over chunks)."""
        gl = batched.Globals.build(mu, W, d, inv_r)
        G, K = W.shape
        value = np.empty(self.shape[0])
        total = {"mu": np.zeros(G), "W": np.zeros((G, K)), "d": np.zeros(G),
                 "log_r": np.zeros(G)}
        for lo, hi, chunk in self.chunks():
            value[lo:hi], *part = chunk.value_grad(gl, const[lo:hi], fix, grad, grad_log_r)
            for key, g in zip(total, part):
                total[key] += g
        return value, total["mu"], total["W"], total["d"], total["log_r"]

    def em_statistics(self, mu, W, d, *, log_r=None, eta=None):
        """Modes at the globals, then the summed expected sufficient statistics of the
        factor model over all chunks (see :mod:`scribe_stan.laplace.em`).

        With CUDA they are summed on the device, where the modes stay.
        """
        if self._device is not None:
            self._solve_modes(mu, W, d, log_r, eta)
            inv_r = inverse_dispersion(log_r, self.shape[1])
            B = batched.Globals.build(mu, W, d, inv_r).sigma_inv_W
            return self._device.em_statistics(mu, W, d, inv_r, B, eta is not None)
        self.modes(mu, W, d, log_r=log_r, eta=eta)
        gl = batched.Globals.build(mu, W, d, inverse_dispersion(log_r, self.shape[1]))
        return em.reduce_statistics([chunk.em_statistics(gl, eta is not None)
                                     for _, _, chunk in self.chunks()])

    def fisher_sums(self, mu, W, d, log_r=None):
        """Sums over the cells, at the stored modes, of :func:`block_scaling`'s Fisher
        information: ``A`` (G, K + 1, K + 1) and ``info_d`` (G,) of :func:`fisher_sums`,
        and ``info_r`` (G,), ``sum_c (m_cg / (m_cg + r_g))^2`` (zeros for pln)."""
        return chunk_fisher_sums(((self.x[lo:hi], self.eta[lo:hi], self.csr[lo:hi])
                                  for lo, hi, _ in self.chunks()), mu, W, d, log_r)

    def log_joint(self, mu, W, d, x, eta, *, log_r=None):
        """Exact ``log p(u_c, x_c, eta_c | mu, W, d[, log_r])`` per cell (all constants), (N,).

        Parameters
        ----------
        x : (N, G) log-rates;  eta : (N,) capture losses (>= 0).
        """
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        Lc = shared_factor(W, d)
        G = self.shape[1]
        logdet_sigma = np.sum(np.log(d)) + 2 * np.sum(np.log(np.diag(Lc)))
        core = self._kernels.log_density_cells(self._dcounts, self.a, self.sigma, mu, W, d,
                                     inverse_dispersion(log_r, G), Lc,
                                     np.ascontiguousarray(x, dtype=np.float64),
                                     np.ascontiguousarray(eta, dtype=np.float64))
        # _const_eta carries +1/2 log 2 pi for the eta integral: take it back out.
        return (core + self.lik_constants(log_r) + self._const_eta - 0.5 * np.log(2 * np.pi)
                - 0.5 * G * np.log(2 * np.pi) - 0.5 * logdet_sigma)

    def sample(self, mu, W, d, draws, rng, *, log_r=None, genes=None, block_bytes=2**28):
        """Draws ``(x, eta)`` from each cell's Gaussian at the stored (converged) modes.

        Parameters
        ----------
        mu, W, d, log_r : the globals the modes were computed at.
        draws : int;  rng : numpy Generator.
        genes : (Gs,) int indices of genes whose x draws are returned (default: all).
        block_bytes : memory for standard-normal variates per block of draws.

        Returns
        -------
        dict with ``x`` (draws, N, Gs), ``eta`` (draws, N), ``log_lik`` (draws, N: log
        likelihood over all genes), ``lp`` (draws, N: exact log density of the draw
        given the globals), ``lp_approx`` (draws, N: the Gaussian's log density).
        """
        N, G = self.shape
        K = W.shape[1]
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        genes = np.arange(G) if genes is None else np.asarray(genes, dtype=np.int64)
        out = {"x": np.empty((draws, N, genes.size)),
               **{k: np.empty((draws, N)) for k in ("eta", "log_lik", "lp", "lp_approx")}}
        Lc = shared_factor(W, d)
        lik_const = self.lik_constants(log_r)
        inv_r = inverse_dispersion(log_r, G)
        block = max(1, min(draws, block_bytes // (8 * N * G)))
        # the kernels' cells: host arrays on the CPU, the resident ones with CUDA
        cells = self if self._device is None else self._device
        for start in range(0, draws, block):
            stop = min(draws, start + block)
            S = stop - start
            self._kernels.sample_cells(
                self._dcounts, lik_const + self._const_eta, lik_const, cells.a, cells.sigma, mu,
                W, d, inv_r, pair_products(W), Lc, cells.x, cells.eta, genes,
                rng.standard_normal((S, N, G)), rng.standard_normal((S, N, K)),
                rng.standard_normal((S, N)),
                *(out[k][start:stop] for k in ("x", "eta", "log_lik", "lp", "lp_approx")))
        return out

    @property
    def shifts_on_host(self):
        """Whether :meth:`sample_shifted` runs here (the CPU kernels; not on a device)."""
        return self._device is None and hasattr(self._kernels, "nested_sample_cells")

    def sample_shifted(self, mu, W, d, drawn, rng, *, log_r=None, fix_eta=False, genes=None,
                       block_bytes=2**28):
        """Draws ``(x, eta)`` at drawn globals, the Hessian held at the stored modes.

        The stored modes must be converged at ``(mu, W, d, log_r)`` (the MAP). Draw
        ``s`` moves every cell's mode by one Newton step towards its mode at
        ``drawn[s]`` with the Hessian of the MAP (no refactorization per draw), draws
        from the MAP's Gaussian around it, and scores the draw under ``drawn[s]``
        (:func:`scribe_stan.laplace.cpu.nested_sample_cells`). CPU kernels only
        (:attr:`shifts_on_host`).

        Parameters
        ----------
        mu, W, d, log_r : the MAP globals.
        drawn : dict with ``mu`` (S, G), ``W`` (S, G, K), ``d`` (S, G) and, for nbln,
            ``log_r`` (S, G): the drawn globals.
        rng : numpy Generator;  fix_eta : bool, eta held at its stored value in the step.
        genes, block_bytes : as in :meth:`sample`.

        Returns
        -------
        dict as :meth:`sample`, draw ``s`` scored at ``drawn[s]``.

        Raises
        ------
        RuntimeError
            On a device (use :meth:`modes` and :meth:`sample` per draw there).
        """
        if not self.shifts_on_host:
            raise RuntimeError("sample_shifted needs the CPU kernels; on a device take "
                               "modes(..., steps=1) and sample() at each draw")
        N, G = self.shape
        S = drawn["mu"].shape[0]
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        genes = np.arange(G) if genes is None else np.asarray(genes, dtype=np.int64)
        mu_s = np.ascontiguousarray(drawn["mu"], dtype=np.float64)
        W_s = np.asarray(drawn["W"], dtype=np.float64)
        d_s = np.asarray(drawn["d"], dtype=np.float64)
        log_r_s = drawn.get("log_r")
        if log_r_s is None and log_r is not None:  # dispersions held, not drawn
            log_r_s = np.broadcast_to(log_r, (S, G))
        Lc_s = np.linalg.cholesky(np.eye(W.shape[1]) + np.swapaxes(W_s / d_s[..., None], 1, 2)
                                  @ W_s)
        logdet_s = (2.0 * np.log(np.diagonal(Lc_s, axis1=1, axis2=2)).sum(axis=1)
                    + np.log(d_s).sum(axis=1))
        lik = np.stack([self.lik_constants(None if log_r_s is None else log_r_s[s])
                        for s in range(S)])
        inv_r_s = np.stack([inverse_dispersion(None if log_r_s is None else log_r_s[s], G)
                            for s in range(S)])
        out = {"x": np.empty((S, N, genes.size)),
               **{k: np.empty((S, N)) for k in ("eta", "log_lik", "lp", "lp_approx")}}
        block = max(1, min(S, block_bytes // (8 * N * G)))
        for start in range(0, S, block):
            sl = slice(start, min(S, start + block))
            n = sl.stop - start
            self._kernels.nested_sample_cells(
                self._dcounts, lik[sl] + self._const_eta, lik[sl], self.a, self.sigma, mu,
                W, d, inverse_dispersion(log_r, G), pair_products(W), shared_factor(W, d),
                self.x, self.eta, bool(fix_eta), genes, mu_s[sl],
                np.ascontiguousarray(np.swapaxes(W_s[sl], 1, 2)),
                np.ascontiguousarray(1.0 / d_s[sl]), inv_r_s[sl],
                np.ascontiguousarray(Lc_s[sl]), logdet_s[sl],
                rng.standard_normal((n, N, G)), rng.standard_normal((n, N, W.shape[1])),
                rng.standard_normal((n, N)),
                *(out[k][sl] for k in ("x", "eta", "log_lik", "lp", "lp_approx")))
        return out


def _check_cells(name, value, n, *, positive=False):
    """A length-n finite float vector (copied); ValueError naming ``name`` otherwise."""
    arr = np.array(value, dtype=np.float64).reshape(-1) if np.ndim(value) else None
    if arr is None or arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be {n} finite values; got shape {np.shape(value)}")
    if positive and not np.all(arr > 0):
        raise ValueError(f"{name} must be positive (allowed: 0 < value < inf); got "
                         f"min {arr.min():.4g}")
    return arr


def _gamma_logpdf_grad(d):
    """Summed pln prior ``d_g ~ Gamma(D_SHAPE, D_RATE)`` log density and its gradient."""
    value = float(np.sum(special.xlogy(pln.D_SHAPE - 1.0, d) - pln.D_RATE * d
                         + pln.D_SHAPE * np.log(pln.D_RATE) - special.gammaln(pln.D_SHAPE)))
    return value, (pln.D_SHAPE - 1.0) / d - pln.D_RATE


def _normal_logpdf_grad(x, loc, scale):
    """Summed normalized Normal(loc, scale) log density of x and its gradient."""
    z = (x - loc) / scale
    value = float(np.sum(-0.5 * z * z - np.log(scale) - 0.5 * np.log(2 * np.pi)))
    return value, -z / scale


@dataclass(frozen=True, eq=False)
class OuterLayout:
    """What the outer optimizer moves and which priors replace the defaults.

    The optimizer vector is ``[mu (unless log_mean is held), W (row-major), log d,
    log_r (nbln, unless held), log_tau (shrinkage loadings priors)]``.

    Attributes
    ----------
    G, K : int
    model : {"pln", "nbln"}
    log_r : (G,) array or None
        nbln: log dispersions held fixed (not optimized); None optimizes them.
    eta : (N,) array or None
        Capture losses held fixed per cell (x alone is marginalized).
    mu_prior, log_r_prior : tuple (loc, scale) of (G,) arrays, or None
        Gaussian priors replacing the default ones on mu (``pln``'s) and on log_r
        (:mod:`scribe_stan.models.dispersion`).
    log_mean : (G,) array or None
        Hold each gene's log-normal mean log-rate ``mu_g + Sigma_gg / 2`` at this value:
        mu is then a function of (W, d), not an optimizer coordinate.
    log_mean_prior : tuple (loc, scale) of (G,) arrays, or None
        Gaussian prior on ``mu_g + Sigma_gg / 2`` replacing the default mu prior (the
        cascade's use of an nbvcp fit's log mean expression; :mod:`scribe_stan.cascade`).
    loadings_prior : str
        One of :data:`scribe_stan.models.loadings.PRIORS`; the shrinkage ones add the
        log column scales ``log_tau`` (K,) to the optimizer vector.
    """

    G: int
    K: int
    model: str = "pln"
    log_r: np.ndarray | None = None
    eta: np.ndarray | None = None
    mu_prior: tuple | None = None
    log_r_prior: tuple | None = None
    log_mean: np.ndarray | None = None
    log_mean_prior: tuple | None = None
    loadings_prior: str = "normal"

    @property
    def free_log_r(self):
        return self.model == "nbln" and self.log_r is None

    @property
    def free_mu(self):
        return self.log_mean is None

    @property
    def n_tau(self):
        return loadings.n_scales(self.loadings_prior, self.K)

    def pack(self, mu, W, d, log_r=None, log_tau=None):
        """Optimizer vector (see the class docstring)."""
        parts = [mu] if self.free_mu else []
        parts += [np.ravel(W), np.log(d)]
        if self.free_log_r:
            parts.append(log_r)
        if self.n_tau:
            parts.append(log_tau)
        return np.concatenate(parts)

    def _split(self, theta):
        G, K = self.G, self.K
        sizes = [G if self.free_mu else 0, G * K, G, G if self.free_log_r else 0, self.n_tau]
        return np.split(theta, np.cumsum(sizes)[:-1])

    def unpack(self, theta):
        """(mu, W, d, log_r) from the optimizer vector; log_r is None for pln."""
        mu, W, log_d, log_r, _ = self._split(theta)
        W = W.reshape(self.G, self.K)
        d = np.exp(log_d)
        if not self.free_mu:
            mu = self.log_mean - 0.5 * (np.sum(W**2, axis=1) + d)
        if self.model == "pln":
            return mu, W, d, None
        return mu, W, d, (log_r if self.free_log_r else self.log_r)

    def log_tau(self, theta):
        """Log column scales of a shrinkage loadings prior, (K,) or (0,)."""
        return self._split(theta)[4]

    def log_prior(self, mu, W, d, log_r, log_tau=None):
        """Log prior of the moved globals and its gradient.

        W (with its column scales) and d, and mu by default, use the pln prior shared
        by every model; priors of held parameters are constants and are left out.

        Returns
        -------
        lp, g_mu, g_W, g_d, g_log_r (None unless free), g_log_tau ((0,) unless shrinkage)
        """
        lp, g_W, g_log_tau = loadings.log_prior_and_grad(
            W, np.zeros(0) if log_tau is None else log_tau, self.loadings_prior)
        lp_d, g_d = _gamma_logpdf_grad(d)
        lp += lp_d
        if self.mu_prior is None and self.log_mean_prior is None:
            lp_mu, g_mu = _normal_logpdf_grad(mu, pln.MU_LOC, pln.MU_SCALE)
            lp += lp_mu
        else:
            g_mu = np.zeros_like(mu)
        if self.mu_prior is not None:
            lp_mu, g_mu = _normal_logpdf_grad(mu, *self.mu_prior)
            lp += lp_mu
        if self.log_mean_prior is not None:
            # prior on s = mu + (|W_g|^2 + d_g) / 2: ds/dmu = 1, ds/dW = W, ds/dd = 1/2
            s = mu + 0.5 * (np.sum(W**2, axis=1) + d)
            v1, g_s = _normal_logpdf_grad(s, *self.log_mean_prior)
            lp, g_mu = lp + v1, g_mu + g_s
            g_W, g_d = g_W + g_s[:, None] * W, g_d + 0.5 * g_s
        g_log_r = None
        if self.free_log_r:
            if self.log_r_prior is None:
                v, g_log_r = dispersion.log_prior(log_r), dispersion.log_prior_grad(log_r)
            else:
                v, g_log_r = _normal_logpdf_grad(log_r, *self.log_r_prior)
            lp += v
        return lp, g_mu, g_W, g_d, g_log_r, g_log_tau


def pack(mu, W, d, log_r=None):
    """Optimizer vector ``[mu, W, log d(, log_r)]`` (see :class:`OuterLayout`)."""
    G, K = np.shape(W)
    return OuterLayout(G, K, "pln" if log_r is None else "nbln").pack(mu, W, d, log_r)


def objective(problem, theta, layout):
    """Laplace objective and its gradient in the optimizer's coordinates.

    Parameters
    ----------
    problem : LaplaceProblem;  theta : vector from ``layout.pack``
    layout : OuterLayout

    Returns
    -------
    total : float, ``sum_c log p_hat(u_c | theta) + log prior``
    grad : like ``theta``; w.r.t. (mu, W, log d[, log_r][, log_tau]).
    """
    mu, W, d, log_r = layout.unpack(theta)
    log_tau = layout.log_tau(theta)
    out = problem.log_marginal(mu, W, d, log_r=log_r, eta=layout.eta, grad=True,
                               grad_log_r=layout.free_log_r)
    value, g_mu, g_W, g_d = out[:4]
    lp, p_mu, p_W, p_d, p_r, p_tau = layout.log_prior(mu, W, d, log_r, log_tau)
    total = float(value.sum() + lp)
    g_mu, g_W, g_d = g_mu + p_mu, g_W + p_W, g_d + p_d
    parts = []
    if layout.free_mu:
        parts.append(g_mu)
    else:
        # mu = log_mean - (|W_g|^2 + d_g) / 2 moves with W and d
        g_W, g_d = g_W - g_mu[:, None] * W, g_d - 0.5 * g_mu
    parts += [g_W.ravel(), g_d * d]
    if layout.free_log_r:
        parts.append(out[4] + p_r)
    if layout.n_tau:
        parts.append(p_tau)
    return total, np.concatenate(parts)


def factor_fisher(chunks, mu, W, d=None, *, w_precision=None):
    """Per-gene Fisher information of ``(mu_g, W_g)`` given the factors, and of ``log d_g``.

    Gene g's latent is ``x_cg = mu_g + W_g z_c + e_cg`` with factors ``z_c ~ N(0, I_K)``
    and ``e_cg ~ N(0, d_g)``. Given ``z_c``, the count carries information
    ``w_cg = lambda_cg / (1 + lambda_cg d_g)`` about the linear predictor
    ``mu_g + W_g z_c`` (lambda the likelihood curvature at the mode), so the curvature in
    gene g's ``(mu_g, W_g)`` is about
    ``A_g = sum_c w_cg E[(1, z_c)(1, z_c)'] + prior precision of W_g``, the expectation
    over ``z_c`` given the mode ``x_hat_c``: mean ``P W' D^{-1} (x_hat_c - mu)``,
    covariance ``P = (I + W' D^{-1} W)^{-1}`` (factor analysis; Bishop 2006, Pattern
    Recognition and Machine Learning, sec. 12.2.4). Without residual (``d=None``,
    ``x_c = mu + W z_c``) the factors are the modes themselves: ``w = lambda``, ``P = 0``.
    ``log d_g`` carries ``1/2 sum_c (w_cg d_g)^2`` (a variance's Fisher information).
    The first diagonal entry (mu_g) is floored at 1: coordinates of nearly silent genes
    are never stretched, so a unit step never moves them by more than one natural unit.
    Shared by pln/nbln (:func:`block_scaling`) and the lnm composition block
    (:func:`scribe_stan.laplace.lnm_solver.composition_scaling`).

    Parameters
    ----------
    chunks : iterable of ``(modes, lam)`` per chunk of cells: ``modes`` (n, G), the
        latent's modes ``x_hat_c`` (with ``d=None``: the factor scores ``z_c``, (n, K));
        ``lam`` (n, G) >= 0, the likelihood's curvature in the latent at the mode.
    mu : (G,);  W : (G, K);  d : (G,) > 0 or None.
    w_precision : (K,) prior precision of each loadings column (default ones: the
        normal(0, 1) prior).

    Returns
    -------
    A : (G, K + 1, K + 1) positive definite, over ``(mu_g, W_g)`` (mu's row and column
        first).
    info_d : (G,) information in ``log d_g`` (zeros when ``d`` is None).
    """
    A, info_d = fisher_sums(chunks, mu, W, d)
    return fisher_finish(A, info_d, w_precision=w_precision)


def fisher_sums(chunks, mu, W, d=None, *, A=None, info_d=None):
    """The sums over cells of :func:`factor_fisher`, before the prior and the floor.

    The part of the preconditioner a chunk (or a worker holding several chunks)
    computes; :func:`fisher_finish` turns the summed parts into :func:`factor_fisher`'s
    result. Arguments as :func:`factor_fisher`; ``A`` (G, K + 1, K + 1) and ``info_d``
    (G,) are accumulated into when given (default: zeros).

    Returns
    -------
    A : (G, K + 1, K + 1), ``sum_c w_cg E[(1, z_c)(1, z_c)']`` per gene.
    info_d : (G,), ``sum_c (w_cg d_g)^2`` (zeros when ``d`` is None).
    """
    G, K = W.shape
    A = np.zeros((G, K + 1, K + 1)) if A is None else A
    info_d = np.zeros(G) if info_d is None else info_d
    if d is not None:
        W_over_d = W / d[:, None]
        P = np.linalg.inv(np.eye(K) + W.T @ W_over_d)
    for modes, lam in chunks:  # per chunk: no N x G temporaries
        if d is None:
            w, z = lam, modes
        else:
            w = lam / (1.0 + lam * d)
            z = (modes - mu) @ W_over_d @ P
            A[:, 1:, 1:] += w.sum(axis=0)[:, None, None] * P
            info_d += np.sum((w * d) ** 2, axis=0)
        z1 = np.hstack([np.ones((len(z), 1)), z])
        # sum_c w_cg (1, z_c)(1, z_c)' for every gene: one GEMM over the outer products
        A += (w.T @ (z1[:, :, None] * z1[:, None, :]).reshape(len(z), -1)).reshape(A.shape)
    return A, info_d


def fisher_finish(A, info_d, *, w_precision=None):
    """:func:`factor_fisher` from the summed :func:`fisher_sums` (modified in place):
    adds the loadings prior precision, floors mu's entry at 1, halves ``info_d``."""
    K = A.shape[1] - 1
    A[:, 1:, 1:] += np.diag(np.ones(K) if w_precision is None else w_precision)
    A[:, 0, 0] = np.maximum(A[:, 0, 0], 1.0)
    return A, 0.5 * info_d


def chunk_fisher_sums(chunks, mu, W, d, log_r=None):
    """:func:`fisher_sums` of pln / nbln chunks, with the NB information in log r.

    Parameters
    ----------
    chunks : iterable of ``(x, eta, csr)`` per chunk of cells: modes (n, G) and (n,),
        counts (n, G) CSR (read for nbln only).
    mu, W, d : globals;  log_r : (G,) or None (pln).

    Returns
    -------
    A (G, K + 1, K + 1), info_d (G,), info_r (G,) (zeros for pln).
    """
    G = W.shape[0]
    phi = None if log_r is None else np.exp(-np.asarray(log_r))
    r = None if log_r is None else np.exp(np.asarray(log_r))
    info_r = np.zeros(G)

    def pairs():
        nonlocal info_r
        for x, eta, csr in chunks:
            m = np.exp(x - eta[:, None])
            if log_r is None:
                yield x, m
            else:
                u = csr.toarray()
                info_r += np.sum((m / (m + r)) ** 2, axis=0)
                yield x, m * (1 + phi * u) / (1 + phi * m) ** 2

    A, info_d = fisher_sums(pairs(), mu, W, d)
    return A, info_d, info_r


def gene_block_scale(A, tail, *, free_mu=True):
    """The :class:`driver.BlockScale` of per-gene blocks over ``[mu, W, tail]``.

    Parameters
    ----------
    A : (G, K + 1, K + 1) positive definite curvature of gene g's ``(mu_g, W_g)`` in the
        optimizer's coordinates (mu's row and column first; dropped when mu is not free).
    tail : (T,) > 0, curvature of the coordinates after W (diagonal scale ``sqrt``).
    free_mu : bool, the first G coordinates are mu (else the vector starts with W).

    Returns
    -------
    driver.BlockScale
        Over ``[mu (if free), W (row-major), tail]``.
    """
    G, K = A.shape[0], A.shape[1] - 1
    off_W = G if free_mu else 0
    index = off_W + np.arange(G)[:, None] * K + np.arange(K)[None, :]
    if free_mu:
        index = np.hstack([np.arange(G)[:, None], index])
    else:
        A = A[:, 1:, 1:]
    diag = np.sqrt(np.concatenate([np.ones(off_W + G * K), tail]))
    return driver.BlockScale(diag, index, np.linalg.cholesky(A))


def block_scaling(problem, mu, W, d, log_r=None, *, eta=None, free_mu=True,
                  free_log_r=False, w_precision=None):
    """Preconditioner of the outer problem: per-gene blocks of the Fisher information
    given the factors (:func:`factor_fisher`).

    The block of gene g couples ``mu_g`` with the loadings (through the w-weighted mean
    of the factors) and the loadings with each other, which a diagonal scale cannot
    express; on a 400-gene PBMC subset (K=10) the blocks took L-BFGS from 177 to 105
    iterations to the same tolerance. ``log d_g`` keeps a diagonal scale, and a free
    ``log r_g`` the NegBinomial2 information in log r at mean m, about
    ``1/2 (m / (m + r))^2`` per cell; both floored at 1.

    Parameters
    ----------
    problem : LaplaceProblem (its modes are set at these globals).
    mu : (G,);  W : (G, K);  d : (G,) > 0;  log_r : (G,) or None (pln).
    eta : (N,) held capture losses, optional.
    free_mu : bool, mu is an optimizer coordinate (first G entries).
    free_log_r : bool, log r is an optimizer coordinate (after log d).
    w_precision : (K,) prior precision of each loadings column (default ones: the
        normal(0, 1) prior).

    Returns
    -------
    driver.BlockScale
        Over ``[mu (if free), W (row-major), log d, log r (if free)]``; the blocks are
        gene g's ``(mu_g, W_g)``, or ``W_g`` alone when mu is not free.
    """
    problem.modes(mu, W, d, log_r=log_r, eta=eta)
    A, info_d, info_r = problem.fisher_sums(mu, W, d, log_r)
    A, info_d = fisher_finish(A, info_d, w_precision=w_precision)
    tail = [np.maximum(info_d, 1.0)]
    if free_log_r:
        tail.append(np.maximum(0.5 * info_r, 1.0))
    return gene_block_scale(A, np.concatenate(tail), free_mu=free_mu)


def outer_scaling(problem, theta, layout):
    """:func:`block_scaling` over the whole optimizer vector of ``layout``.

    Parameters
    ----------
    problem : LaplaceProblem (its modes are set at these globals).
    theta : (P,) optimizer vector (:meth:`OuterLayout.pack`).
    layout : OuterLayout

    Returns
    -------
    driver.BlockScale
        ``z = T theta`` with ``T' T`` about the objective's negative Hessian: the blocks of
        :func:`block_scaling`, and ``sqrt(2 (G - 1))`` for each log column scale of a
        shrinkage loadings prior (its prior curvature near its conditional mode).
    """
    mu, W, d, log_r = layout.unpack(theta)
    log_tau = layout.log_tau(theta)
    scale = block_scaling(problem, mu, W, d, log_r, eta=layout.eta, free_mu=layout.free_mu,
                          free_log_r=layout.free_log_r,
                          w_precision=np.exp(-2 * log_tau) if layout.n_tau else None)
    return driver.BlockScale(np.concatenate([scale.diag,
                                             np.full(layout.n_tau,
                                                     np.sqrt(2.0 * (layout.G - 1)))]),
                             scale.index, scale.chol)


def initial_globals(counts, a, K, *, seed=0):
    """Moment-based starting point for (mu, W, d).

    Counts are rescaled by the prior capture ``exp(a_c)``; log-normal moments
    ``m = exp(mu + Sigma/2)``, ``Var = m^2 (e^Sigma - 1) + Poisson noise`` give mu and
    the diagonal of Sigma (Aitchison & Ho 1989, Biometrika 76:643,
    doi:10.1093/biomet/76.4.643), and the top-K eigenvectors of the relative covariance
    (without its Poisson part) give W, via a matrix-free eigensolver (no G x G matrix).
    """
    y = sparse.diags(np.exp(a)) @ sparse.csr_matrix(counts, dtype=np.float64)
    N, G = y.shape
    scale = np.exp(a)
    m = np.maximum(np.asarray(y.mean(axis=0)).reshape(-1), 1e-3 * scale.mean() / N)
    poisson_part = np.mean(scale) * m
    var = np.asarray(y.multiply(y).mean(axis=0)).reshape(-1) - np.asarray(
        y.mean(axis=0)).reshape(-1) ** 2
    rel_var = np.maximum(var - poisson_part, 0.0) / m**2
    sigma_diag = np.clip(np.log1p(rel_var), 0.05, 5.0)
    mu = np.log(m) - 0.5 * sigma_diag
    # relative covariance Z'Z of Z = (y - m) / m / sqrt(N), applied without forming Z
    noise = poisson_part / m**2
    root_n = np.sqrt(N)

    def matvec(v):
        v = v.ravel()
        zv = (y @ (v / m) - v.sum()) / root_n
        return (y.T @ zv / m - zv.sum()) / root_n - noise * v

    op = LinearOperator((G, G), matvec=matvec, dtype=float)
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


def optimize_problem(problem, layout, init, *, tol=1e-8, max_iter=1000, progress=None,
                     precondition=True, max_unconverged=0.01, em_iterations=None,
                     rescale_first=None, theta0=None, callback=None, em_callback=None):
    """Laplace-EM start, then the outer L-BFGS (:func:`driver.maximize`) of a problem.

    The part of :func:`fit_laplace` after the problem is built, shared by every problem
    that sums over its chunks of cells: :class:`LaplaceProblem` (in process) and
    :class:`scribe_stan.distributed.ChunkedProblem` (chunks on Dask workers). A problem
    supplies ``log_marginal`` (used by :func:`objective`), ``em_statistics``, ``modes``
    and ``fisher_sums`` (used by :func:`block_scaling`) and the warm-start protocol of
    :mod:`scribe_stan.laplace.driver`.

    Parameters
    ----------
    problem : the problem (see above).
    layout : OuterLayout.
    init : tuple (mu, W, d) or (mu, W, d, log_r) of start values (see
        :func:`fit_laplace`).
    tol, max_iter, progress, precondition, max_unconverged, em_iterations,
    rescale_first : as :func:`fit_laplace`.
    theta0 : (P,) optimizer vector, optional
        Start the L-BFGS here (e.g. a checkpoint), skipping the Laplace-EM iterations;
        ``init`` is then ignored.
    callback : callable ``(theta, value, n_iter)``, optional
        After each L-BFGS iteration (:func:`driver.maximize`).
    em_callback : callable ``(iteration, mu, W, d)``, optional
        After each Laplace-EM iteration.

    Returns
    -------
    res : driver.OuterResult;  em_done : int, Laplace-EM iterations run.
    """
    G, K = layout.G, layout.K
    eta = layout.eta
    if theta0 is not None:
        init = layout.unpack(np.asarray(theta0, dtype=np.float64))
    if layout.free_log_r and len(init) == 3:  # log_r starts at the prior's location
        init = (*init, np.full(G, dispersion.LOG_R_LOC))
    mu0, W0, d0 = init[:3]
    # EM moves (mu, W, d) only; with a free dispersion it would hold r at its start while
    # d absorbs the over-dispersion, which can leave a gene on the wrong side of the d-r
    # ridge (seen in tests/test_nbln_laplace.py), so it runs where r is held or absent.
    em_done = 0
    em_iterations = EM_ITERATIONS if em_iterations is None else int(em_iterations)
    use_em = layout.free_mu and not layout.free_log_r and theta0 is None
    for em_done in range(1, (em_iterations if use_em else 0) + 1):
        stats = problem.em_statistics(mu0, W0, d0, log_r=layout.log_r, eta=eta)
        mu0, W0, d0 = em.m_step(stats, mu0)
        d0 = np.minimum(d0, 1e2)  # inside the outer box
        if em_callback is not None:
            em_callback(em_done, mu0, W0, d0)
    if not layout.free_mu:
        mu0 = layout.log_mean - 0.5 * (np.sum(W0**2, axis=1) + d0)
    log_r0 = init[3] if layout.free_log_r else layout.log_r
    if theta0 is None:
        log_tau0 = loadings.initial_log_tau(W0, layout.loadings_prior)
        theta0 = layout.pack(mu0, W0, d0, log_r0, log_tau0)

    def scaling(theta):
        if not precondition:
            return np.ones(theta.size)
        return outer_scaling(problem, theta, layout)

    def value_grad(theta):
        # mu is in the preconditioner's blocks, where no box applies: trial points past
        # |mu| = MU_BOUND (rates that overflow) are rejected as infeasible instead.
        if layout.free_mu and np.max(np.abs(theta[:G])) > MU_BOUND:
            return -np.inf, np.zeros_like(theta)
        return objective(problem, theta, layout)

    # Box on log d (and log r) keeps trial points where the rates stay finite.
    # Column scales stay above the floor of the shrinkage priors.
    lower = [np.full(G * K, -np.inf), np.full(G, np.log(1e-6))]
    upper = [np.full(G * K, np.inf), np.full(G, np.log(1e2))]
    if layout.free_mu:
        lower.insert(0, np.full(G, -np.inf))
        upper.insert(0, np.full(G, np.inf))
    if layout.free_log_r:
        lower.append(np.full(G, LOG_R_BOUNDS[0]))
        upper.append(np.full(G, LOG_R_BOUNDS[1]))
    lower.append(np.full(layout.n_tau, np.log(loadings.TAU_MIN)))
    upper.append(np.full(layout.n_tau, np.log(1e3)))
    res = driver.maximize(value_grad, theta0,
                          np.concatenate(lower), np.concatenate(upper), problem=problem,
                          scaling=scaling, tol=tol, max_iter=max_iter,
                          progress=progress, max_unconverged=max_unconverged,
                          rescale_first=rescale_first, callback=callback)
    return res, em_done


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
    em_iterations : int, Laplace-EM iterations before L-BFGS.
    success : bool, the outer optimizer met its tolerance; message : str.
    history : list of objective values per outer iteration.
    wall_time_s : float.
    model : {"pln", "nbln"}.
    log_r : (G,) log dispersions (nbln: fitted or held), None for pln.
    log_tau : (K,) log loadings column scales of a shrinkage prior, (0,) otherwise.
    loadings_prior : str.
    layout : OuterLayout of the optimizer vector (what was free, which priors), so that
        :func:`objective` can be evaluated again at the fitted globals (e.g. by
        :mod:`scribe_stan.laplace.globals_posterior`).
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
    model: str = "pln"
    log_r: np.ndarray | None = None
    log_tau: np.ndarray | None = None
    loadings_prior: str = "normal"
    em_iterations: int = 0
    layout: OuterLayout | None = None

    @property
    def r(self):
        """(G,) dispersions ``exp(log_r)`` (nbln), None for pln."""
        return None if self.log_r is None else np.exp(self.log_r)


def _gene_prior(name, prior, G):
    """(loc, scale) of (G,) arrays from a user's (loc, scale) pair of scalars or arrays."""
    if prior is None:
        return None
    try:
        loc, scale = prior
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (loc, scale) of scalars or ({G},) arrays; "
                         f"got {prior!r}") from None
    return (_check_cells(f"{name} loc", np.broadcast_to(np.asarray(loc, float), (G,)), G),
            _check_cells(f"{name} scale", np.broadcast_to(np.asarray(scale, float), (G,)), G,
                         positive=True))


def fit_laplace(counts, K, *, model="pln", log_M0=np.log(pln.M0_DEFAULT),
                sigma_M=pln.SIGMA_M_DEFAULT, log_lib=None, eta_loc=None, eta_scale=None,
                eta=None, log_r=None, mu_prior=None, log_r_prior=None, log_mean=None,
                log_mean_prior=None, loadings_prior="normal", tol=1e-8,
                max_iter=1000, newton_tol=1e-10, init=None, seed=0, progress=None,
                precondition=True, max_unconverged=0.01, device="cpu", dtype="float64",
                em_iterations=None, rescale_first=None):
    """Fit the pln or nbln globals by maximizing the exact Laplace objective.

    Parameters
    ----------
    counts : (N, G) non-negative integer counts (validated).
    K : int, latent rank.
    model : {"pln", "nbln"}
        Poisson or NegBinomial2 (per-gene dispersion r_g, parameter ``log_r``) counts.
    log_M0, sigma_M, log_lib : capture prior and library sizes (see LaplaceProblem).
    eta_loc, eta_scale : (N,) arrays, optional
        Informative per-cell prior ``eta_c ~ Normal(eta_loc_c, eta_scale_c)`` truncated
        to eta >= 0 in place of the capture prior (e.g. from an nbvcp fit).
    eta : (N,) array >= 0, optional
        Hold each cell's capture loss at this value; only x is marginalized.
    log_r : (G,) array, optional
        nbln only: hold the log dispersions at these values (not optimized; their prior
        is then a constant and left out of the objective).
    mu_prior, log_r_prior : (loc, scale), optional
        Gaussian priors ``mu_g ~ Normal(loc_g, scale_g)`` and
        ``log_r_g ~ Normal(loc_g, scale_g)`` replacing the defaults (pln's mu prior,
        :mod:`scribe_stan.models.dispersion`); loc and scale are scalars or (G,) arrays,
        scale > 0. ``log_r_prior`` applies to a free log_r (nbln).
    log_mean : (G,) array, optional
        Hold each gene's log-normal mean log-rate ``mu_g + Sigma_gg / 2`` here; mu
        follows W and d (see :class:`OuterLayout`).
    log_mean_prior : (loc, scale), optional
        Gaussian prior on ``mu_g + Sigma_gg / 2`` in place of the mu prior.
    loadings_prior : str
        Prior on W, one of :data:`scribe_stan.models.loadings.PRIORS`; the columnwise
        shrinkage priors optimize the log column scales jointly with the globals.
    tol : float
        Relative objective tolerance of L-BFGS-B (``ftol``): stop when
        ``(f_k - f_{k+1}) / max(|f_k|, |f_{k+1}|, 1) <= tol``.
    max_iter : int, outer iterations.
    init : tuple (mu, W, d) or, for nbln with free log_r, (mu, W, d, log_r), optional.
        Default: :func:`initial_globals` and ``log_r`` at the dispersion prior's
        location (r = 10).
    progress : tqdm-like object with ``update``/``set_postfix``, optional.
    precondition : bool
        Optimize in the coordinates of :func:`block_scaling` (default).
    max_unconverged : float
        After an evaluation where a larger fraction of cells fails the Newton step, the
        next one warm-starts from the last good modes.
    device : {"cpu", "cuda", "auto"}
        Kernels (:func:`scribe_stan.laplace.device.resolve_device`).
    dtype : {"float64", "float32"}
        Floating type of the CUDA kernels (float32: CUDA only; accuracy in
        :mod:`scribe_stan.laplace.cuda`).
    em_iterations : int, optional
        Laplace-EM iterations (closed-form factor-analysis M-steps,
        :mod:`scribe_stan.laplace.em`) from the start before the exact L-BFGS; 0 skips
        them; None: :data:`EM_ITERATIONS`. Used only where mu is free (not with ``log_mean``) and the dispersions are
        absent (pln) or held (``log_r`` given).
    rescale_first : int, optional
        Renew the diagonal scale after this many L-BFGS iterations, then after twice as
        many each time (:func:`scribe_stan.laplace.driver.maximize`); default never.

    Returns
    -------
    LaplaceSolution

    Raises
    ------
    ValueError
        Unknown model; ``log_r`` or ``log_r_prior`` with model="pln"; arrays of the
        wrong length, non-finite values or non-positive scales; only one of
        ``eta_loc``/``eta_scale``; negative ``eta``.
    """
    t0 = time.perf_counter()
    if model not in MODELS:
        raise ValueError(f"model={model!r} is not a Laplace model; allowed: {MODELS}")
    problem = LaplaceProblem(counts, log_M0=log_M0, sigma_M=sigma_M, newton_tol=newton_tol,
                             log_lib=log_lib, eta_loc=eta_loc, eta_scale=eta_scale,
                             device=device, dtype=dtype)
    N, G = problem.shape
    if model == "pln" and (log_r is not None or log_r_prior is not None):
        raise ValueError("log_r and log_r_prior apply to model='nbln' only (pln is Poisson).")
    if log_r is not None:
        log_r = _check_cells("log_r", log_r, G)
    if eta is not None:
        eta = _check_cells("eta", eta, N)
        if np.any(eta < 0):
            raise ValueError("eta (held capture losses) must be >= 0 (allowed: 0 <= eta).")
    if sum(p is not None for p in (mu_prior, log_mean, log_mean_prior)) > 1:
        raise ValueError("give at most one of mu_prior, log_mean and log_mean_prior (each "
                         "replaces the prior on mu).")
    layout = OuterLayout(G, K, model, log_r=log_r, eta=eta,
                         mu_prior=_gene_prior("mu_prior", mu_prior, G),
                         log_r_prior=_gene_prior("log_r_prior", log_r_prior, G),
                         log_mean=None if log_mean is None else _check_cells("log_mean",
                                                                             log_mean, G),
                         log_mean_prior=_gene_prior("log_mean_prior", log_mean_prior, G),
                         loadings_prior=loadings.check_prior(loadings_prior))
    if init is None:
        init = initial_globals(problem.csr, problem.a, K, seed=seed)
    res, em_done = optimize_problem(problem, layout, init, tol=tol, max_iter=max_iter,
                                    progress=progress, precondition=precondition,
                                    max_unconverged=max_unconverged,
                                    em_iterations=em_iterations, rescale_first=rescale_first)
    theta = res.theta
    mu, W, d, log_r_hat = layout.unpack(theta)
    # Final E-step and objective at the returned globals (the optimizer's last
    # evaluation may have been a rejected line-search point).
    final, _ = objective(problem, theta, layout)
    problem.sync_modes()
    modes = CellModes(problem.x.copy(), problem.eta.copy(), problem.n_iter.copy(),
                      problem.converged.copy(), problem.at_bound.copy())
    if not modes.converged.all():
        warnings.warn(f"{int((~modes.converged).sum())} of {modes.converged.size} cells did not "
                      "converge in the per-cell Newton step; see fit.converged.", RuntimeWarning,
                      stacklevel=2)
    return LaplaceSolution(problem=problem, mu=mu.copy(), W=W.copy(), d=d.copy(), modes=modes,
                           objective=final, em_iterations=em_done,
                           n_iter=res.n_iter, n_eval=res.n_eval, success=res.success,
                           message=res.message, history=res.history,
                           wall_time_s=time.perf_counter() - t0, model=model,
                           log_r=None if log_r_hat is None else np.array(log_r_hat),
                           log_tau=layout.log_tau(theta).copy(),
                           loadings_prior=layout.loadings_prior, layout=layout)
