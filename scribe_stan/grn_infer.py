"""GRN inference from fitted latents: a sparse Lyapunov Jacobian and baselines.

Data term (``seeds/grn_biophysics_lognormal.txt``): the latent log-abundances of a cell
are a stationary draw ``x_c ~ N(mu, Sigma)`` of the linear-noise (Ornstein-Uhlenbeck)
approximation of a GRN, whose covariance solves the continuous Lyapunov equation::

    J Sigma + Sigma J' + 2 D = 0,

``J`` the Jacobian (``J[g, g'] > 0``: regulator g' activates target g), stable (every
eigenvalue with negative real part), ``D`` diagonal, positive (intrinsic noise).

**Non-identifiability.** ``Sigma`` alone does not determine ``J``: for any skew-symmetric
``K``, ``J = (-D + K) Sigma^{-1}`` solves the equation with the same ``Sigma`` and ``D``
(Dettling, Drton, Kolar et al. 2022, "Identifiability in continuous Lyapunov models",
arXiv:2209.03835; Belaustegui et al. 2024, "Inferring sparse structure of gene networks
from Lyapunov models", arXiv:2403.05457). Sparsity (an L1 penalty) and the prior's
support choose among the solutions; the sign and direction of an edge are only as good
as that choice, and the benchmark (``validation/bench_grn_inference.py``) says how
good. ``(J, D)`` and ``(c J, c D)`` give the same ``Sigma`` for every ``c > 0``: the
scale is fixed by writing ``J_gg = -exp(theta_g)`` with ``mean(theta) = 0``, i.e. the
geometric mean of the degradation rates is 1 (time in units of the mean mRNA
lifetime).

**Estimator** (:func:`fit_lyapunov`). With ``S`` the latent second moments of the chosen
genes, minimize per cell::

    1/2 [log det Sigma(J, D) + tr(Sigma(J, D)^{-1} S)]
        + alpha * sum_{(t, r) free} w_tr sqrt(J_tr^2 + eps^2)

(the Gaussian negative log likelihood over N, a smoothed L1 penalty with per-edge
weights ``w`` from the prior) by L-BFGS-B over the free off-diagonal entries, ``theta``
and ``log D``. The gradient goes through the adjoint Lyapunov equation
(:func:`lyapunov_nll`): one real Schur form of ``J`` (:func:`scipy.linalg.schur`) serves
the forward and the adjoint solve (Bartels-Stewart with LAPACK's ``dtrsyl``, as
:func:`scipy.linalg.solve_continuous_lyapunov` does for one equation).
Stability is enforced by the likelihood itself: ``Sigma`` is positive definite exactly
when ``J`` is stable (Lyapunov's theorem, ``D > 0``), and ``log det Sigma`` diverges at
the boundary; points outside get an infinite objective, so the line search stays inside.

**Latent moments** (:func:`latent_moments`). For a pln/nbln Laplace fit,
``S = mean_c[(x_hat_c - mu)(x_hat_c - mu)' + Cov_c]`` with ``Cov_c`` the block of each
cell's Laplace covariance ``(-H_c)^{-1}`` (marginal over ``eta_c``) on the chosen genes,
from the Woodbury pieces (``A^{-1} = diag(1/B) + (h W) M^{-1} (h W)'``, plus the eta
direction ``phi phi' / s``; :mod:`scribe_stan.laplace.cpu`), never a G x G matrix of
all fitted genes. lnm/lnmvcp fits use the CLR modes (no posterior covariance term).

**Baselines** (same interface, :data:`METHODS`): ``correlation`` (|Pearson r| of the
latents), ``partial_correlation`` (scikit-learn's :func:`sklearn.covariance.graphical_lasso`
on the correlation matrix), ``ridge`` (per-target ridge of each target on its candidate
regulators, CellOracle's bagged ridge; Kamimoto et al. 2023, Nature 614:742,
doi:10.1038/s41586-022-05688-9), ``prior`` (the prior's confidence) and ``random``.
Each runs on the fitted latents (``input="latent"``) or on log-normalized counts
(``input="lognorm"``: ``log1p(1e4 u / L)``), so a benchmark shows what the count model
buys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import linalg, optimize
from threadpoolctl import threadpool_limits

from scribe_stan.grn_prior import GrnPrior, as_prior

#: Inference methods of :func:`infer_grn`.
METHODS = ("lyapunov", "correlation", "partial_correlation", "ridge", "prior", "random",
           "stan")
#: What the data term sees: fitted latents or log-normalized counts.
INPUTS = ("latent", "lognorm")
#: How the prior enters: candidate edges only, or per-edge penalty weights.
SUPPORTS = ("hard", "soft")
#: Methods that form dense (genes x genes) matrices; their gene count is capped.
DENSE_METHODS = ("lyapunov", "correlation", "partial_correlation", "stan")
MAX_DENSE_GENES = 400


# --------------------------------------------------------------------------------------
# Lyapunov likelihood and estimator
# --------------------------------------------------------------------------------------


def lyapunov_nll(J, D, S):
    """Per-cell Gaussian negative log likelihood of ``Sigma(J, D)`` and its gradient.

    ``f = 1/2 [log det Sigma + tr(Sigma^{-1} S)]`` with ``J Sigma + Sigma J' + 2 diag(D)
    = 0``. With ``G_S = df/dSigma = 1/2 (Sigma^{-1} - Sigma^{-1} S Sigma^{-1})`` the
    adjoint ``P`` solves ``J' P + P J + G_S = 0``; then ``df/dJ = 2 P Sigma`` and
    ``df/dD = 2 diag(P)``.

    Parameters
    ----------
    J : (G, G) array;  D : (G,) positive diffusion;  S : (G, G) second moments.

    Returns
    -------
    value : float (``inf`` when ``J`` is unstable, or ``Sigma`` is not numerically
        positive definite: smallest Cholesky pivot^2 below 1e-12 of the largest variance)
    grad_J : (G, G) or None;  grad_D : (G,) or None;  Sigma : (G, G) or None
    """
    if not np.all(np.isfinite(J)):
        return np.inf, None, None, None
    T, U = linalg.schur(J, output="real")
    # the real Schur form's diagonal carries the real parts of the eigenvalues (2 x 2
    # blocks are standardized with equal diagonal entries): J must be stable
    if np.max(np.diag(T)) >= 0:
        return np.inf, None, None, None
    Sigma = _lyap_schur(T, U, -2.0 * np.diag(D), adjoint=False)
    try:
        cf = linalg.cho_factor(Sigma, lower=True, check_finite=True)
    except (linalg.LinAlgError, ValueError):
        return np.inf, None, None, None
    piv = np.diag(cf[0])
    if piv.min() ** 2 < 1e-12 * np.max(np.diag(Sigma)):
        # numerically singular Sigma: its inverse (and the likelihood) is not reliable
        return np.inf, None, None, None
    logdet = 2.0 * np.log(piv).sum()
    Sinv = linalg.cho_solve(cf, np.eye(len(D)))
    SinvS = Sinv @ S
    value = 0.5 * (logdet + np.trace(SinvS))
    Gs = 0.5 * (Sinv - SinvS @ Sinv)
    Gs = 0.5 * (Gs + Gs.T)
    P = _lyap_schur(T, U, -Gs, adjoint=True)
    return float(value), 2.0 * P @ Sigma, 2.0 * np.diag(P).copy(), Sigma


def _lyap_schur(T, U, Q, *, adjoint):
    """Solve ``J X + X J' = Q`` (or ``J' X + X J = Q`` when ``adjoint``), symmetric ``Q``.

    ``J = U T U'`` is the real Schur form of ``J``, computed once and shared by the forward
    and the adjoint equation; the triangular Sylvester equation is LAPACK's ``dtrsyl``
    (the Bartels-Stewart algorithm, as in :func:`scipy.linalg.solve_continuous_lyapunov`).
    """
    F = U.T @ Q @ U
    if adjoint:
        Y, scale, info = linalg.lapack.dtrsyl(T, T, F, trana="T", tranb="N")
    else:
        Y, scale, info = linalg.lapack.dtrsyl(T, T, F, trana="N", tranb="T")
    if info < 0:
        raise RuntimeError(f"dtrsyl failed (info={info})")
    X = U @ (Y / scale) @ U.T
    return 0.5 * (X + X.T)


@dataclass
class LyapunovFit:
    """Result of :func:`fit_lyapunov`.

    Attributes
    ----------
    J : (G, G) Jacobian ``[target, regulator]``, scale fixed (geometric mean of
        ``-diag(J)`` is 1);  D : (G,) diffusion;  Sigma : (G, G) ``Sigma(J, D)``.
    objective : float, per-cell penalized negative log likelihood.
    nll : float, per-cell negative log likelihood alone.
    n_iter : int;  success : bool;  message : str (from L-BFGS-B).
    abscissa : float, largest real part of the eigenvalues of ``J`` (< 0).
    """

    J: np.ndarray
    D: np.ndarray
    Sigma: np.ndarray
    objective: float
    nll: float
    n_iter: int
    success: bool
    message: str
    abscissa: float


def fit_lyapunov(S, *, free=None, weights=None, alpha=0.02, eps=1e-3, scale_ridge=0.0,
                 max_iter=3000, tol=1e-10):
    """Sparse stable ``(J, D)`` maximizing the Gaussian likelihood of ``S`` (see module).

    Parameters
    ----------
    S : (G, G) symmetric positive definite second-moment matrix (per cell).
    free : (G, G) bool, optional
        Off-diagonal entries ``[target, regulator]`` allowed to be non-zero (default
        all); the diagonal is always free (degradation).
    weights : (G, G) array, optional
        Per-entry L1 weights (default 1), used on the free entries.
    alpha : float
        L1 penalty per cell (``>= 0``).
    eps : float
        Smoothing of ``|J| ~ sqrt(J^2 + eps^2)``.
    scale_ridge : float
        ``scale_ridge / 2 * sum(theta_g^2)`` on the log degradation rates. The scale
        freedom ``(c J, c D)`` holds separately on every connected component of the
        network (an isolated gene's ``D_g / gamma_g`` is all its variance says); the
        global ``mean(theta) = 0`` fixes one, this weak ridge the others.
    max_iter, tol : L-BFGS-B limits (``maxiter``, ``ftol``).

    Returns
    -------
    LyapunovFit

    Raises
    ------
    ValueError
        ``S`` not square, symmetric, finite and positive definite; ``free``/``weights``
        of another shape; ``alpha < 0``.
    """
    S = np.array(S, dtype=float)  # a copy: never the caller's
    G = S.shape[0]
    if S.ndim != 2 or S.shape != (G, G) or not np.all(np.isfinite(S)):
        raise ValueError(f"S must be a finite square matrix; got shape {S.shape}")
    if not np.allclose(S, S.T, rtol=1e-8, atol=1e-12 * np.abs(S).max()):
        raise ValueError("S must be symmetric")
    try:
        np.linalg.cholesky(S)
    except np.linalg.LinAlgError:
        raise ValueError("S must be positive definite (more cells than genes, or the "
                         "latent moments with their posterior covariance)") from None
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0; got {alpha}")
    free = np.ones((G, G), bool) if free is None else np.array(free, dtype=bool)
    weights = np.ones((G, G)) if weights is None else np.array(weights, dtype=float)
    if free.shape != (G, G) or weights.shape != (G, G):
        raise ValueError(f"free and weights must have shape {(G, G)}; got {free.shape}, "
                         f"{weights.shape}")
    np.fill_diagonal(free, False)
    fr, fc = np.nonzero(free)
    w = weights[fr, fc]
    nf = fr.size

    def unpack(p):
        J = np.zeros((G, G))
        J[fr, fc] = p[:nf]
        theta = p[nf:nf + G]
        gam = np.exp(theta - theta.mean())
        J[np.diag_indices(G)] = -gam
        return J, np.exp(p[nf + G:]), gam

    last = [0.0]

    def objective(p):
        J, D, gam = unpack(p)
        val, gJ, gD, _ = lyapunov_nll(J, D, S)
        if not np.isfinite(val):
            # J unstable (or Sigma numerically singular): a steep wall (slope 1e4 along
            # the spectral abscissa) always above the last feasible value, so the line
            # search backs off towards stability
            vals, vl, vr = linalg.eig(J, left=True, right=True)
            k = int(np.argmax(vals.real))
            dlam = np.real(np.outer(vl[:, k].conj(), vr[:, k]) / (vl[:, k].conj() @ vr[:, k]))
            g = np.zeros_like(p)
            g[:nf] = 1e4 * dlam[fr, fc]
            gt = -np.diag(dlam) * gam * 1e4
            g[nf:nf + G] = gt - gt.mean()
            return last[0] + 10.0 + 1e4 * max(vals[k].real + 1e-3, 0.0), g
        last[0] = val
        v = p[:nf]
        sm = np.sqrt(v * v + eps * eps)
        tc = np.log(gam)
        val += alpha * np.dot(w, sm) + 0.5 * scale_ridge * np.dot(tc, tc)
        g = np.empty_like(p)
        g[:nf] = gJ[fr, fc] + alpha * w * v / sm
        gt = -np.diag(gJ) * gam + scale_ridge * tc
        g[nf:nf + G] = gt - gt.mean()
        g[nf + G:] = gD * D
        return val, g

    # start: J = -I, D = diag(S) / 1  -> Sigma = diag(S)
    p0 = np.concatenate([np.zeros(nf), np.zeros(G), np.log(np.diag(S))])
    # BLAS threads on G x G matrices (G <= a few hundred) cost more than they save: with
    # 2 threads on a busy 2-core machine a 100 x 100 Schur took 0.29 s instead of 0.015 s
    with threadpool_limits(limits=1, user_api="blas"):
        res = optimize.minimize(objective, p0, jac=True, method="L-BFGS-B",
                                options={"maxiter": int(max_iter), "ftol": tol,
                                         "gtol": 1e-8, "maxcor": 20})
        J, D, _ = unpack(res.x)
        nll, _, _, Sigma = lyapunov_nll(J, D, S)
        abscissa = float(np.max(np.linalg.eigvals(J).real))
    return LyapunovFit(J=J, D=D, Sigma=Sigma, objective=float(res.fun), nll=float(nll),
                       n_iter=int(res.nit), success=bool(res.success),
                       message=str(res.message), abscissa=abscissa)


# --------------------------------------------------------------------------------------
# Latent sources and moments
# --------------------------------------------------------------------------------------


@dataclass
class LatentSource:
    """What the inference needs from a fit, whatever it came from.

    Attributes
    ----------
    model : str;  genes : pandas.Index (G,) fitted genes;  obs_names : pandas.Index (N,)
    x : (N, G) latent modes (log-rates; CLR for lnm);  mu : (G,) or None
    W : (G, K), d : (G,) or None (lnm: None, no posterior covariance term)
    r : (G,) NB dispersions or None (Poisson);  eta : (N,) capture-loss modes or None
    counts : (N, G) counts of the fitted genes;  log_lib : (N,) log library sizes
    a, sigma : (N,) eta prior location and scale (or None)
    """

    model: str
    genes: pd.Index
    obs_names: pd.Index
    x: np.ndarray
    counts: np.ndarray
    log_lib: np.ndarray
    mu: np.ndarray | None = None
    W: np.ndarray | None = None
    d: np.ndarray | None = None
    r: np.ndarray | None = None
    eta: np.ndarray | None = None
    a: np.ndarray | None = None
    sigma: np.ndarray | None = None


def latent_source(fit, *, key=None, layer=None):
    """:class:`LatentSource` from a Laplace fit object or the AnnData it wrote.

    Parameters
    ----------
    fit : LaplaceFit (pln, nbln), LnmLaplaceFit (lnm, lnmvcp) or anndata.AnnData
        An AnnData must be the output of ``fit.to_anndata(adata)`` / ``scribe-stan fit
        --out`` (keys ``obsm[f"{key}_x"]``, ``var[f"{key}_mu"]``, ... and ``uns[key]``),
        with the raw counts still in ``.X`` (or ``layer``). The eta prior is rebuilt
        from ``uns[key]`` (``M0``, ``sigma_M``) and the library sizes over all genes of
        ``.X`` (a fit given ``library_size=`` is not reproduced).
    key : str, optional
        The fit's key in the AnnData (default: the one of pln, nbln, lnm, lnmvcp found).
    layer : str, optional
        Counts layer of the AnnData (default: the fit's recorded ``layer``, else ``.X``).

    Raises
    ------
    TypeError, ValueError
        Unsupported object; an AnnData without fit results (the message lists the keys
        looked for); an HMC fit (use its draws, or a Laplace fit).
    """
    import anndata

    from scribe_stan import specs
    from scribe_stan.fits.base import Fit

    family = (specs.get(fit.model).family
              if isinstance(fit, Fit) and fit.method == "laplace" else None)
    if family == "lognormal":
        prob = fit.solution.problem
        return LatentSource(model=fit.model, genes=pd.Index(fit.var_names),
                            obs_names=pd.Index(fit.obs_names), x=fit.x_hat,
                            counts=fit.data.counts, log_lib=fit.data.log_lib, mu=fit.mu,
                            W=fit.W, d=fit.d, r=fit.r, eta=fit.eta_hat, a=prob.a,
                            sigma=prob.sigma)
    from scribe_stan.models import lnm as lnm_model

    if family == "lnm":
        x = lnm_model.clr_mean(fit.y_hat, fit.ref)
        return LatentSource(model=fit.model, genes=pd.Index(fit.var_names),
                            obs_names=pd.Index(fit.obs_names), x=x,
                            counts=np.asarray(fit.data.counts), log_lib=fit.data.log_lib,
                            mu=x.mean(axis=0))
    if isinstance(fit, anndata.AnnData):
        return _source_from_anndata(fit, key, layer)
    raise TypeError(f"infer_grn needs a Laplace fit (pln, nbln, lnm, lnmvcp) or the AnnData "
                    f"its to_anndata() wrote; got {type(fit).__name__}")


def _source_from_anndata(adata, key, layer):
    from scipy import sparse

    keys = [k for k in ("pln", "nbln", "lnm", "lnmvcp") if k in adata.uns]
    if key is None:
        if not keys:
            raise ValueError("the AnnData holds no fit results: none of uns['pln'], "
                             "uns['nbln'], uns['lnm'], uns['lnmvcp'] (write one with "
                             "fit.to_anndata(adata) or scribe-stan fit --out)")
        key = keys[0]
    if key not in adata.uns or f"{key}_x" not in adata.obsm and f"{key}_clr" not in adata.obsm:
        raise ValueError(f"no fit results under key {key!r}; found {keys}")
    info = adata.uns[key]
    genes = pd.Index([str(g) for g in np.asarray(info["genes"])])
    pos = adata.var_names.get_indexer(genes)
    layer = layer if layer is not None else info.get("layer")
    X = adata.layers[layer] if layer else adata.X
    lib = np.asarray(X.sum(axis=1)).reshape(-1).astype(float)
    sub = X[:, pos]
    counts = np.asarray(sub.toarray() if sparse.issparse(sub) else sub)
    model = str(info.get("model", key))
    if f"{key}_clr" in adata.obsm:
        x = np.asarray(adata.obsm[f"{key}_clr"], float)
        return LatentSource(model=model, genes=genes, obs_names=adata.obs_names, x=x,
                            counts=counts, log_lib=np.log(lib), mu=x.mean(axis=0))
    r = (adata.var[f"{key}_r"].to_numpy()[pos] if f"{key}_r" in adata.var else None)
    sigma_M = float(info.get("sigma_M", 1.0))
    N = adata.n_obs
    return LatentSource(
        model=model, genes=genes, obs_names=adata.obs_names,
        x=np.asarray(adata.obsm[f"{key}_x"], float), counts=counts, log_lib=np.log(lib),
        mu=adata.var[f"{key}_mu"].to_numpy()[pos], W=np.asarray(adata.varm[f"{key}_W"])[pos],
        d=adata.var[f"{key}_d"].to_numpy()[pos], r=r,
        eta=adata.obs[f"{key}_eta"].to_numpy(float),
        a=np.log(float(info.get("M0", 1e5))) - np.log(lib), sigma=np.full(N, sigma_M))


#: BLAS on many small (K x K, R x R) matrices per cell chunk or per target: threads cost
#: more than they save (measured on 2 cores: a batch of 256 100 x 100 solves took 1.7 s
#: with 2 OpenBLAS threads, 0.03 s with 1).
_ONE_BLAS_THREAD = threadpool_limits.wrap(limits=1, user_api="blas")


@_ONE_BLAS_THREAD
def posterior_covariance_block(src, rows, cols, *, chunk_cells=256):
    """``sum_c Cov_c[rows, cols]`` of the cells' Laplace Gaussians (marginal over eta).

    Per cell, with ``lambda`` the likelihood curvature at the mode,
    ``h = 1/(1 + lambda d)``, ``1/B = d h``, ``M = I + W' diag(lambda h) W``,
    ``phi = A^{-1} lambda`` and ``s = 1/sigma_c^2 + sum lambda (1 - phi)``::

        Cov(x) = diag(1/B) + (h W) M^{-1} (h W)' + phi phi' / s,

    evaluated on the ``rows x cols`` block only: O(N (G K^2 + |rows| |cols| K)).

    Parameters
    ----------
    src : LatentSource (with ``W``, ``d``, ``eta``, ``a``, ``sigma``)
    rows, cols : int arrays of gene positions
    chunk_cells : int

    Returns
    -------
    (len(rows), len(cols)) array, summed over cells (divide by N for the mean).
    """
    W = src.W
    rows, cols = np.asarray(rows), np.asarray(cols)
    out = np.zeros((rows.size, cols.size))
    inv_r = None if src.r is None else 1.0 / np.asarray(src.r, float)
    same = np.equal.outer(rows, cols)
    N = src.x.shape[0]
    for lo in range(0, N, chunk_cells):
        hi = min(N, lo + chunk_cells)
        h, invB, Minv, phi, s = _woodbury_pieces(src, slice(lo, hi), inv_r)
        Hr = h[:, rows, None] * W[rows][None]  # (n, R, K)
        Hc = h[:, cols, None] * W[cols][None]
        HrM = np.matmul(Hr, Minv)
        out += np.tensordot(HrM, Hc, axes=([0, 2], [0, 2]))
        pr = phi[:, rows] / np.sqrt(s)[:, None]
        pc = phi[:, cols] / np.sqrt(s)[:, None]
        out += pr.T @ pc
        if same.any():
            ri, ci = np.nonzero(same)
            out[ri, ci] += invB[:, rows[ri]].sum(axis=0)
    return out


def _point_values(src, input):
    """(N, G) per-cell values of the data term: latent modes or log-normalized counts."""
    if input == "latent":
        return src.x
    counts = np.asarray(src.counts, float)
    return np.log1p(1e4 * counts / np.exp(src.log_lib)[:, None])


def latent_moments(src, rows, cols=None, *, input="latent", center=None, weights=None):
    """Second moments ``S[rows, cols]`` of the per-cell values (see module docstring).

    ``input="latent"``: ``mean_c[(x_hat_c - mu)(x_hat_c - mu)' + Cov_c]`` (``mu`` the
    fit's, the posterior covariance term when the fit has one); ``"lognorm"``: the
    covariance of ``log1p(1e4 u / L)``. ``weights`` (N,) reweights cells (bootstrap).

    Returns
    -------
    (len(rows), len(cols)) array
    """
    cols = rows if cols is None else cols
    X = _point_values(src, input)
    if center is None:
        center = (src.mu if input == "latent" and src.mu is not None else X.mean(axis=0))
    N = X.shape[0]
    w = np.ones(N) if weights is None else np.asarray(weights, float)
    Xr = X[:, rows] - center[rows]
    Xc = X[:, cols] - center[cols]
    S = (Xr * w[:, None]).T @ Xc / w.sum()
    if input == "latent" and src.W is not None:
        # blocks cached on the source: bagging asks for the same blocks (the posterior
        # covariance term is not resampled) once per bag
        key = (np.asarray(rows).tobytes(), np.asarray(cols).tobytes())
        cache = src.__dict__.setdefault("_cov_cache", {})
        if key not in cache:
            if len(cache) >= 4:
                cache.pop(next(iter(cache)))
            cache[key] = posterior_covariance_block(src, rows, cols) / N
        S = S + cache[key]
    return S


# --------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------


@dataclass
class GrnResult:
    """Inferred regulator -> target edges, and ``J``, ``D`` where the method gives them.

    Attributes
    ----------
    edges : pandas.DataFrame
        One row per candidate edge, best first: ``regulator``, ``target``, ``score``
        (>= 0; larger = more confident), ``sign`` (+1, -1, 0), ``weight`` (signed
        estimate: ``J[target, regulator]``, a ridge coefficient or a correlation),
        ``prior_confidence`` (0 where the prior has none), ``rank`` (1 = best) and,
        where available, ``bootstrap_frequency`` (ridge bagging: fraction of bags that
        agree in sign), ``posterior_mean``, ``posterior_lower``, ``posterior_upper``,
        ``inclusion`` (Stan: 90% interval and posterior probability of the sign).
    J : pandas.DataFrame or None
        (G, G) Jacobian, rows = targets, columns = regulators (lyapunov, stan).
    D : pandas.Series or None
        (G,) diffusion.
    genes : list of str;  regulators : list of str
    method, input, support : str;  settings : dict;  info : dict (iterations, wall time)
    unknown_genes : list of str, prior gene names not among the fitted genes.
    """

    edges: pd.DataFrame
    J: pd.DataFrame | None
    D: pd.Series | None
    genes: list
    regulators: list
    method: str
    input: str
    support: str
    settings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    unknown_genes: list = field(default_factory=list)

    def to_csv(self, path):
        """Write the edge table to ``path`` (CSV); ``J`` (if any) to ``<stem>.J.csv``.

        Returns the list of paths written.
        """
        import pathlib

        path = pathlib.Path(path)
        self.edges.to_csv(path, index=False)
        written = [path]
        if self.J is not None:
            jp = path.with_name(path.name.removesuffix(".csv") + ".J.csv")
            self.J.to_csv(jp)
            written.append(jp)
        return written

    def to_anndata(self, adata, *, key_added="grn"):
        """Copy of ``adata`` with ``uns[key_added]`` = edges, J, D, genes, settings.

        ``adata`` is not modified. ``uns[key]["edges"]`` is the edge table (a
        DataFrame, as anndata writes it to h5ad); ``J`` a (G, G) array with
        ``uns[key]["genes"]`` naming its rows (targets) and columns (regulators).
        """
        out = adata.to_memory() if adata.isbacked else adata.copy()
        rec = {"edges": self.edges.reset_index(drop=True),
               "genes": np.asarray(self.genes, dtype=str),
               "regulators": np.asarray(self.regulators, dtype=str),
               "method": self.method, "input": self.input, "support": self.support,
               "settings": {k: v for k, v in self.settings.items() if v is not None},
               "unknown_genes": np.asarray(self.unknown_genes, dtype=str)}
        if self.J is not None:
            rec["J"] = self.J.to_numpy()
            rec["D"] = self.D.to_numpy()
        out.uns[key_added] = rec
        return out

    def plot(self, top=30, *, ax=None):
        """Network figure of the ``top`` strongest edges (circular layout).

        Arrows point regulator -> target; red = activation, blue = repression, grey =
        unknown sign; width follows the score. Returns the matplotlib Figure.
        """
        return plot_network(self.edges, top=top, ax=ax,
                            title=f"{self.method} ({self.input}, {self.support} prior)")


def plot_network(edges, top=30, *, ax=None, title=None):
    """Draw the ``top`` highest-score edges of an edge table; returns the Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    e = edges.sort_values("score", ascending=False).head(int(top))
    e = e.loc[e["score"] > 0]
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 6))
    else:
        fig = ax.figure
    nodes = list(dict.fromkeys(list(e["regulator"]) + list(e["target"])))
    regs = set(e["regulator"])
    ang = np.linspace(0, 2 * np.pi, max(len(nodes), 1), endpoint=False)
    pos = {n: (np.cos(a), np.sin(a)) for n, a in zip(nodes, ang)}
    smax = float(e["score"].max()) if len(e) else 1.0
    for _, row in e.iterrows():
        color = {1: "tab:red", -1: "tab:blue"}.get(int(row["sign"]), "grey")
        ax.add_patch(FancyArrowPatch(pos[row["regulator"]], pos[row["target"]],
                                     arrowstyle="-|>", mutation_scale=10, color=color,
                                     lw=0.5 + 2.5 * row["score"] / smax, alpha=0.8,
                                     shrinkA=8, shrinkB=8, connectionstyle="arc3,rad=0.1"))
    for n, (px, py) in pos.items():
        ax.scatter([px], [py], s=120, color="black" if n in regs else "lightgrey",
                   edgecolor="black", zorder=3)
        ax.annotate(n, (px * 1.12, py * 1.12), ha="center", va="center", fontsize=7)
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or f"top {len(e)} edges")
    return fig


# --------------------------------------------------------------------------------------
# infer_grn
# --------------------------------------------------------------------------------------


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _choose_genes(src, genes, prior_genes, method):
    fitted = src.genes
    if genes is None:
        if prior_genes is not None and method in DENSE_METHODS:
            idx = np.flatnonzero(fitted.isin(prior_genes))
        else:
            idx = np.arange(len(fitted))
    elif isinstance(genes, str):
        raise TypeError("genes must be an int or a list of names; a single string is "
                        "not split into characters")
    elif np.isscalar(genes):
        n = int(genes)
        if not 2 <= n <= len(fitted):
            raise ValueError(f"genes={n} out of range; allowed 2 .. {len(fitted)}")
        level = src.mu if src.mu is not None else src.x.mean(axis=0)
        idx = np.sort(np.argsort(-level, kind="stable")[:n])
    else:
        names = pd.Index([str(g) for g in genes])
        missing = names[~names.isin(fitted)]
        if len(missing):
            raise ValueError(f"{len(missing)} genes are not among the {len(fitted)} fitted "
                             f"genes: {list(missing[:5])}")
        idx = fitted.get_indexer(names)
    if method in DENSE_METHODS and idx.size > MAX_DENSE_GENES:
        raise ValueError(f"method {method!r} forms genes x genes matrices: {idx.size} genes "
                         f"is more than {MAX_DENSE_GENES}; pass genes= (a number or names) "
                         f"or a prior, or use method='ridge'")
    if idx.size < 2:
        raise ValueError(f"need at least 2 genes; got {idx.size}")
    return np.asarray(idx)


def infer_grn(fit, *, prior=None, method="lyapunov", genes=None, regulators=None,
              support="hard", input="latent", alpha=None, strength=10.0, n_bags=0,
              seed=0, max_iter=3000, key=None, stan_kwargs=None):
    """Infer a regulator -> target network from a fit's latents and prior knowledge.

    Parameters
    ----------
    fit : LaplaceFit, LnmLaplaceFit or anndata.AnnData
        A pln/nbln Laplace fit (latent moments with each cell's Laplace covariance), an
        lnm/lnmvcp fit (CLR modes), or the AnnData written by ``fit.to_anndata`` /
        ``scribe-stan fit --out`` (see :func:`latent_source`). Saving and loading fit
        objects is not available yet: the h5ad is how a fit travels.
    prior : GrnPrior, DataFrame, path, list of them, or None
        Prior knowledge (:mod:`scribe_stan.grn_prior`); a list is combined with
        :func:`~scribe_stan.grn_prior.combine_priors`.
    method : {"lyapunov", "correlation", "partial_correlation", "ridge", "prior",
        "random", "stan"}
        See the module docstring; ``"stan"`` samples ``stan/grn.stan`` with NUTS
        (<= 12 genes; posterior mean, 90% interval and sign probability per edge).
    genes : None, int or list of str
        Genes of the network: default the prior's genes among the fitted ones (dense
        methods) or every fitted gene (ridge, prior, random); ``n`` the highest-mean
        ``n``; or names. Dense methods allow at most :data:`MAX_DENSE_GENES`.
    regulators : list of str, optional
        Candidate regulators (default: the prior's regulators, else every gene).
    support : {"hard", "soft"}
        Prior edges only, or every pair with prior edges penalized less (weight
        ``1 / (1 + strength * confidence)``). Methods without a per-edge penalty
        (correlation, partial correlation, random) mask (hard) or multiply their scores
        by ``1 + strength * confidence`` (soft).
    input : {"latent", "lognorm"}
        Fitted latents or log-normalized counts of the same cells and genes.
    alpha : float, optional
        Penalty: lyapunov L1 per cell (default 0.02), ridge (default 1.0, on
        standardized values, per cell), graphical lasso (default 0.05).
    strength : float
        Soft-prior strength (>= 0).
    n_bags : int
        Ridge: bootstrap bags over cells (0: one fit on all cells).
    seed : int
    max_iter : int
        Lyapunov optimizer iterations.
    key : str, optional
        Fit key inside an AnnData ``fit``.
    stan_kwargs : dict, optional
        ``chains, draws, warmup, backend, tau`` for ``method="stan"``.

    Returns
    -------
    GrnResult

    Raises
    ------
    ValueError
        Unknown ``method``/``support``/``input`` (allowed values listed), genes not
        fitted or too many for a dense method, empty prior support, a ``"prior"``
        method or a hard support without a prior, regulators not among the genes.
    TypeError
        Unsupported ``fit``.

    Examples
    --------
    >>> res = infer_grn(fit, prior="edges.csv", method="lyapunov")   # doctest: +SKIP
    >>> res.edges.head()                                              # doctest: +SKIP
    """
    t0 = time.perf_counter()
    _check("method", method, METHODS)
    _check("support", support, SUPPORTS)
    _check("input", input, INPUTS)
    if strength < 0:
        raise ValueError(f"strength must be >= 0; got {strength}")
    if n_bags < 0:
        raise ValueError(f"n_bags must be >= 0; got {n_bags}")
    prior = as_prior(prior)
    if method == "prior" and prior is None:
        raise ValueError("method='prior' ranks the prior's edges: pass prior=")
    src = latent_source(fit, key=key)
    if input == "latent" and src.model == "nbvcp":
        raise ValueError("an nbvcp fit has no latent log-abundances; use input='lognorm' "
                         "or a pln/nbln/lnm fit")
    idx = _choose_genes(src, genes, None if prior is None else prior.genes, method)
    gnames = list(src.genes[idx])
    G = len(gnames)
    conf = np.zeros((G, G))
    psign = np.zeros((G, G))
    unknown = []
    if prior is not None:
        matched, unknown = prior.match(gnames)
        conf[matched["tgt_idx"], matched["reg_idx"]] = matched["confidence"]
        psign[matched["tgt_idx"], matched["reg_idx"]] = matched["sign"]
    if regulators is None:
        reg_mask = (conf.max(axis=0) > 0) if prior is not None else np.ones(G, bool)
    else:
        regulators = [str(r) for r in regulators]
        bad = [r for r in regulators if r not in gnames]
        if bad:
            raise ValueError(f"{len(bad)} regulators are not among the genes: {bad[:5]}")
        reg_mask = np.isin(gnames, regulators)
    cand = np.zeros((G, G), bool)
    cand[:, reg_mask] = True
    np.fill_diagonal(cand, False)
    if support == "hard" and prior is not None:
        cand &= conf > 0
    weights = np.where(conf > 0, 1.0 / (1.0 + strength * conf), 1.0)
    rng = np.random.default_rng(seed)
    settings = {"method": method, "input": input, "support": support, "strength": strength,
                "seed": seed, "n_genes": G, "model": src.model}
    info = {}
    J = D = None
    extra = {}
    if method == "lyapunov":
        a = 0.02 if alpha is None else float(alpha)
        S = latent_moments(src, idx, input=input)
        lf = fit_lyapunov(S, free=cand, weights=weights, alpha=a, max_iter=max_iter)
        W = lf.J
        score = np.abs(W)
        J, D = lf.J, lf.D
        info.update(n_iter=lf.n_iter, success=lf.success, nll=lf.nll,
                    objective=lf.objective, abscissa=lf.abscissa, message=lf.message)
        settings["alpha"] = a
    elif method in ("correlation", "partial_correlation"):
        S = latent_moments(src, idx, input=input)
        sd = np.sqrt(np.diag(S))
        R = S / np.outer(sd, sd)
        if method == "partial_correlation":
            from sklearn.covariance import graphical_lasso

            a = 0.05 if alpha is None else float(alpha)
            _, P = graphical_lasso(R, alpha=a, max_iter=200)
            ps = np.sqrt(np.diag(P))
            W = -P / np.outer(ps, ps)
            settings["alpha"] = a
        else:
            W = R.copy()
        np.fill_diagonal(W, 0.0)
        score = np.abs(W)
    elif method == "ridge":
        a = 1.0 if alpha is None else float(alpha)
        W, freq = _ridge(src, idx, cand, weights if support == "soft" else None, a, input,
                         n_bags, rng)
        score = np.abs(W)
        if freq is not None:
            extra["bootstrap_frequency"] = freq
        settings.update(alpha=a, n_bags=n_bags)
    elif method == "prior":
        W = conf * np.where(psign != 0, psign, 1.0)
        score = conf.copy()
    elif method == "random":
        score = rng.uniform(size=(G, G))
        W = np.zeros((G, G))
    else:  # stan
        from scribe_stan.models import grn as grn_model

        if prior is None:
            raise ValueError("method='stan' samples J on the prior support: pass prior=")
        out = grn_model.sample_network(src, idx, cand, conf, **(stan_kwargs or {}))
        W = out["mean"]
        score = np.abs(out["z"])
        J = W
        D = out["D"]
        extra.update(posterior_mean=out["mean"], posterior_lower=out["lower"],
                     posterior_upper=out["upper"], inclusion=out["inclusion"])
        info.update(out["info"])
    if method in ("correlation", "partial_correlation", "random"):
        if support == "soft" and prior is not None:
            score = score * (1.0 + strength * conf)
    score = np.where(cand, score, 0.0)
    edges = _edge_table(gnames, cand, score, W, conf, extra)
    info["wall_time_s"] = time.perf_counter() - t0
    Jdf = None if J is None else pd.DataFrame(J, index=gnames, columns=gnames)
    Ds = None if D is None else pd.Series(np.asarray(D), index=gnames, name="D")
    return GrnResult(edges=edges, J=Jdf, D=Ds, genes=gnames,
                     regulators=[g for g, m in zip(gnames, reg_mask) if m], method=method,
                     input=input, support=support, settings=settings, info=info,
                     unknown_genes=unknown)


def _edge_table(gnames, cand, score, W, conf, extra):
    ti, ri = np.nonzero(cand)
    g = np.asarray(gnames)
    e = pd.DataFrame({"regulator": g[ri], "target": g[ti], "score": score[ti, ri],
                      "sign": np.sign(W[ti, ri]).astype(int), "weight": W[ti, ri],
                      "prior_confidence": conf[ti, ri]})
    for k, v in extra.items():
        e[k] = v[ti, ri]
    e = e.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    e["rank"] = np.arange(1, len(e) + 1)
    return e


@_ONE_BLAS_THREAD
def _ridge(src, idx, cand, weights, alpha, input, n_bags, rng, chunk=256):
    """Per-target (masked, optionally weighted) ridge on standardized moments.

    For target t with candidate regulators m_t: ``beta = (R_mm + alpha diag(w))^{-1}
    R_mt`` with ``R`` the correlation-scale second moments (so ``alpha`` is per cell,
    scale-free). Bagging resamples cells (the posterior covariance term is kept).
    Only the (regulators x regulators) and (regulators x genes) blocks are formed.
    """
    G = idx.size
    regs = np.flatnonzero(cand.any(axis=0))
    if regs.size == 0:
        raise ValueError("no candidate regulator")
    ridx, N = idx[regs], src.x.shape[0]

    def solve(weights_cells):
        Srr = latent_moments(src, ridx, input=input, weights=weights_cells)
        Srt = latent_moments(src, ridx, idx, input=input, weights=weights_cells)
        sd_t = np.sqrt(_diag_moments(src, idx, input, weights_cells))
        sd_r = np.sqrt(np.diag(Srr))
        Rrr = Srr / np.outer(sd_r, sd_r)
        Rrt = Srt / np.outer(sd_r, sd_t)
        B = np.zeros((G, G))
        mask = cand[:, regs]  # (G targets, R)
        for lo in range(0, G, chunk):
            hi = min(G, lo + chunk)
            m = mask[lo:hi]
            A = np.broadcast_to(Rrr, (hi - lo,) + Rrr.shape).copy()
            pen = alpha * (np.ones_like(m, float) if weights is None else weights[lo:hi][:, regs])
            # masked-out regulators: identity row/column and zero right-hand side
            A *= (m[:, :, None] & m[:, None, :])
            diag = np.where(m, pen, 1.0)
            A[:, np.arange(regs.size), np.arange(regs.size)] += diag
            b = np.where(m, Rrt[:, lo:hi].T, 0.0)
            beta = np.linalg.solve(A, b[..., None])[..., 0]
            B[lo:hi][:, regs] = beta
        return B

    full = solve(None)
    if n_bags == 0:
        return full, None
    agree = np.zeros_like(full)
    coefs = []
    for _ in range(n_bags):
        wts = rng.multinomial(N, np.full(N, 1.0 / N)).astype(float)
        b = solve(wts)
        coefs.append(b)
        agree += np.sign(b) == np.sign(full)
    mean = np.mean(coefs, axis=0)
    return mean, agree / n_bags


def _diag_moments(src, idx, input, weights):
    """Diagonal of the second moments on ``idx`` (posterior variance included)."""
    X = _point_values(src, input)
    center = src.mu if input == "latent" and src.mu is not None else X.mean(axis=0)
    w = np.ones(X.shape[0]) if weights is None else weights
    v = (w[:, None] * (X[:, idx] - center[idx]) ** 2).sum(axis=0) / w.sum()
    if input == "latent" and src.W is not None:
        cache = getattr(src, "_diag_cache", None)
        key = tuple(idx)
        if cache is None or cache[0] != key:
            cache = (key, _posterior_variance(src, idx) / X.shape[0])
            src._diag_cache = cache
        v = v + cache[1]
    return v


def _woodbury_pieces(src, sl, inv_r):
    """Per-cell pieces of the Laplace covariance of the cells ``sl`` in Woodbury form.

    With likelihood curvature ``lambda`` (Poisson, or NB2 at dispersion ``1/inv_r``),
    ``h = 1 / (1 + lambda d)``, ``M_c = I + W' diag(lambda h) W``: returns ``h``,
    ``invB = d h``, ``M^{-1}`` (n, K, K), ``phi`` (the x-eta coupling of each cell) and
    ``s`` (the Schur complement in eta), as in :mod:`scribe_stan.laplace.cpu`.
    """
    W, d = src.W, src.d
    K = W.shape[1]
    m = np.exp(np.minimum(src.x[sl] - src.eta[sl, None], 700.0))
    if inv_r is None:
        lam = m
    else:
        u = np.asarray(src.counts[sl], float)
        q = 1.0 + inv_r * m
        lam = m * (1.0 + inv_r * u) / (q * q)
    h = 1.0 / (1.0 + lam * d)
    invB = d * h
    Minv = np.linalg.inv(np.matmul(W.T[None] * (lam * h)[:, None, :], W) + np.eye(K))
    y = np.matmul(Minv, ((h * lam) @ W)[:, :, None])[:, :, 0]
    phi = lam * invB + h * (y @ W.T)
    s = 1.0 / src.sigma[sl] ** 2 + np.sum(lam * (1.0 - phi), axis=1)
    return h, invB, Minv, phi, s


@_ONE_BLAS_THREAD
def _posterior_variance(src, idx, chunk_cells=256):
    """``sum_c diag(Cov_c)[idx]`` without forming blocks (see
    :func:`posterior_covariance_block`)."""
    out = np.zeros(idx.size)
    N = src.x.shape[0]
    for lo in range(0, N, chunk_cells):
        hi = min(N, lo + chunk_cells)
        out += _var_chunk(src, np.arange(lo, hi), idx)
    return out


def _var_chunk(src, sl, idx):
    W = src.W
    inv_r = None if src.r is None else 1.0 / np.asarray(src.r, float)
    h, invB, Minv, phi, s = _woodbury_pieces(src, sl, inv_r)
    Hi = h[:, idx, None] * W[idx][None]
    quad = np.sum(np.matmul(Hi, Minv) * Hi, axis=2)
    return (invB[:, idx] + quad + phi[:, idx] ** 2 / s[:, None]).sum(axis=0)


__all__ = ["infer_grn", "GrnResult", "fit_lyapunov", "lyapunov_nll", "latent_moments",
           "latent_source", "posterior_covariance_block", "plot_network", "GrnPrior",
           "METHODS", "INPUTS", "SUPPORTS"]
