"""Gene-regulatory-network (GRN) simulator: biophysical ground truth for validation.

Log-abundances ``x`` of G genes follow a multivariate Ornstein-Uhlenbeck process (the
linear-noise approximation of a GRN in log space)::

    dx = J (x - mu) dt + B dW_t,        D = B B' / 2

with a sparse Jacobian ``J`` (regulator -> target edges with signs, negative diagonal
for first-order mRNA degradation). When every eigenvalue of ``J`` has a negative real
part the process has a Gaussian stationary law ``N(mu, Sigma)`` whose covariance solves
the continuous Lyapunov equation (Gardiner, *Stochastic Methods*, 4th ed., Springer
2009, section 4.5.6; the stationary covariance of a linear SDE)::

    J Sigma + Sigma J' + 2 D = 0.

Cells are independent stationary draws ``x_c ~ N(mu, Sigma)``; counts then go through the
observation channel of a scribe-stan model (see :data:`MODELS` and :func:`simulate_grn`)
with the per-cell capture loss ``eta_c`` drawn from the models' capture prior.

Network design (decisions). ``n_regulators`` genes (default: ``rank``) act as
transcription factors; each other gene is a target of each regulator with probability
``density``, with a random sign and a magnitude uniform on ``edge_range``. Degradation
rates (``-J_gg``) are uniform on ``degradation_range``; diffusion is diagonal with
``D_gg = noise_g * gamma_g`` so that an isolated gene has stationary log-variance
``noise_g`` (uniform on ``noise_range``). Regulators thus induce a few shared programs:
the covariance is close to low rank plus diagonal, the models' assumption.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
from scipy import linalg, special, stats

from scribe_stan.models import pln

#: Observation channels: the model names of :func:`scribe_stan.fit`.
MODELS = ("pln", "nbln", "nbvcp", "lnm", "lnmvcp")


def check_stable(J):
    """Raise unless every eigenvalue of ``J`` has a strictly negative real part.

    Parameters
    ----------
    J : (G, G) array
        Jacobian (drift matrix) of the linearized dynamics.

    Returns
    -------
    float
        The spectral abscissa ``max Re(lambda(J))`` (negative).

    Raises
    ------
    ValueError
        ``J`` is not square and finite, or is not stable (the message gives the largest
        real part); an unstable J has no stationary covariance.
    """
    J = np.asarray(J, dtype=float)
    if J.ndim != 2 or J.shape[0] != J.shape[1] or not np.all(np.isfinite(J)):
        raise ValueError(f"J must be a finite square matrix; got shape {J.shape}")
    abscissa = float(np.max(np.linalg.eigvals(J).real))
    if abscissa >= 0:
        raise ValueError(f"J is not stable: max real part of its eigenvalues is "
                         f"{abscissa:.3g} (must be < 0); no stationary covariance exists")
    return abscissa


def lyapunov_covariance(J, D):
    """Stationary covariance ``Sigma`` solving ``J Sigma + Sigma J' + 2 D = 0``.

    Solved with :func:`scipy.linalg.solve_continuous_lyapunov` (Bartels-Stewart) and
    symmetrized.

    Parameters
    ----------
    J : (G, G) stable Jacobian (see :func:`check_stable`).
    D : (G, G) symmetric positive semi-definite diffusion matrix.

    Returns
    -------
    ndarray, shape (G, G)

    Raises
    ------
    ValueError
        Unstable ``J`` or ``D`` of another shape.
    """
    check_stable(J)
    J = np.asarray(J, dtype=float)
    D = np.asarray(D, dtype=float)
    if D.shape != J.shape:
        raise ValueError(f"D must have J's shape {J.shape}; got {D.shape}")
    Sigma = linalg.solve_continuous_lyapunov(J, -2.0 * D)
    return 0.5 * (Sigma + Sigma.T)


def low_rank_approximation(Sigma, K):
    """``W W' + diag(d)`` approximation of a covariance from its top-K eigenvectors.

    ``W = V_K diag(sqrt(lambda_K))`` (the K largest eigenpairs) and
    ``d = diag(Sigma - W W')``, floored at 1e-8 (the residual is PSD, so d >= 0 up to
    round-off). ``W W' + diag(d)`` matches ``Sigma`` on the diagonal exactly.

    Parameters
    ----------
    Sigma : (G, G) symmetric positive definite;  K : int, ``1 <= K < G``.

    Returns
    -------
    W : (G, K);  d : (G,)
    """
    Sigma = np.asarray(Sigma, dtype=float)
    G = Sigma.shape[0]
    if not 1 <= K < G:
        raise ValueError(f"rank K={K} out of range; allowed 1 <= K < G = {G}")
    vals, vecs = np.linalg.eigh(Sigma)
    top = np.argsort(vals)[::-1][:K]
    W = vecs[:, top] * np.sqrt(np.maximum(vals[top], 0.0))
    d = np.maximum(np.diag(Sigma) - np.sum(W**2, axis=1), 1e-8)
    return W, d


def random_network(G, *, n_regulators, density, rng, degradation_range=(0.5, 2.0),
                   edge_range=(0.3, 0.8), noise_range=(0.15, 0.4), max_tries=100):
    """Random stable regulator -> target Jacobian ``J`` and diagonal diffusion ``D``.

    Parameters
    ----------
    G : int, genes;  n_regulators : int, regulator genes (the first ones)
    density : float in (0, 1], probability of each regulator -> target edge
    rng : numpy.random.Generator
    degradation_range, edge_range, noise_range : (low, high) of the uniform draws
        described in the module docstring (rates in 1/time, noise as log-variance).
    max_tries : int, redraws when a network is not stable.

    Returns
    -------
    J : (G, G);  D : (G, G);  edges : pandas.DataFrame (regulator, target, sign, weight)

    Raises
    ------
    ValueError
        Bad sizes or probabilities, or no stable network in ``max_tries`` draws.
    """
    if not 1 <= n_regulators < G:
        raise ValueError(f"n_regulators={n_regulators} out of range; allowed 1 .. G-1 = {G - 1}")
    if not 0 < density <= 1:
        raise ValueError(f"density must lie in (0, 1]; got {density}")
    for _ in range(max_tries):
        gamma = rng.uniform(*degradation_range, G)
        J = -np.diag(gamma)
        edges = []
        for reg in range(n_regulators):
            for tgt in range(G):
                if tgt != reg and rng.uniform() < density:
                    sign = rng.choice((-1.0, 1.0))
                    w = sign * rng.uniform(*edge_range) * gamma[tgt]
                    J[tgt, reg] += w
                    edges.append((reg, tgt, int(sign), w))
        try:
            check_stable(J)
        except ValueError:
            continue
        D = np.diag(rng.uniform(*noise_range, G) * gamma)
        table = pd.DataFrame(edges, columns=["regulator", "target", "sign", "weight"])
        return J, D, table
    raise ValueError(f"no stable network in {max_tries} draws; lower density or edge_range")


def simulate_grn(n_cells, n_genes, *, model="pln", rank=2, seed=0, density=0.5,
                 n_regulators=None, lib_target=500.0, mu_spread=1.0, log_M0=np.log(pln.M0_DEFAULT),
                 sigma_M=0.3, r_range=(2.0, 30.0), r_T=20.0, ref=0, **network):
    """Simulate counts from a GRN's stationary log-abundances through a model's channel.

    Parameters
    ----------
    n_cells, n_genes : int
        Cells N and genes G (``G >= 3``).
    model : {"pln", "nbln", "nbvcp", "lnm", "lnmvcp"}
        Observation channel, with capture loss ``eta_c ~ Normal(log M0 - log lib_target,
        sigma_M)`` truncated to ``eta >= 0`` (the capture prior at the design library
        size ``lib_target``, stored as ``adata.obs["library_size"]``: pass it as
        ``library_size=`` to :func:`scribe_stan.fit` to fit the generating prior):

        * ``pln``: ``u ~ Poisson(exp(x - eta))``;
        * ``nbln`` and ``nbvcp``: ``u ~ NegBinomial2(exp(x - eta), r_g)``, ``r_g``
          log-uniform on ``r_range`` (nbvcp fits these data with independent genes,
          its Sigma -> 0 limit; its truth is ``m_g = mu_g + Sigma_gg / 2``);
        * ``lnm``/``lnmvcp``: composition ``softmax(x_c)`` (ALR truth against gene
          ``ref``), total ``NegBinomial2(m_T, r_T)`` with ``m_T = lib_target``
          (lnmvcp: ``m_T exp(a) exp(-eta_c)`` with ``a`` the capture prior centre).
    rank : int
        Rank K of the stored low-rank truth (:func:`low_rank_approximation`); also the
        default number of regulators.
    seed : int
    density : float
        Regulator -> target edge probability.
    n_regulators : int, optional
        Default ``rank``.
    lib_target : float
        Expected library size (counts per cell over the simulated genes).
    mu_spread : float
        Sd of the log gene shares (spread between low and high expression genes).
    log_M0, sigma_M : float
        Capture prior (log prior median mRNA per cell, log-scale sd).
    r_range : (float, float)
        nbln/nbvcp dispersion range.
    r_T : float
        lnm/lnmvcp total-count dispersion.
    ref : int
        lnm/lnmvcp ALR reference gene (0-based).
    **network
        ``degradation_range``, ``edge_range``, ``noise_range``, ``max_tries`` of
        :func:`random_network`.

    Returns
    -------
    adata : anndata.AnnData
        Counts (int64) in ``.X``, genes ``g0..``, cells ``c0..``; ``obs["library_size"]``
        the design library size; ``uns["grn"]`` the settings.
    truth : dict
        ``J``, ``D``, ``Sigma`` (G, G); ``mu`` (G,); ``x`` (N, G) latent log-abundances;
        ``eta`` (N,); ``W`` (G, K), ``d`` (G,) low-rank truth; ``edges`` (DataFrame);
        ``corr`` (G, G); plus ``r``, ``log_r``, ``m`` (nbln, nbvcp); ``ref``,
        ``mu_alr``, ``Sigma_alr``, ``y``, ``log_m_T``, ``log_r_T`` (lnm, lnmvcp).

    Raises
    ------
    ValueError
        Unknown model (the message lists :data:`MODELS`), sizes out of range, no
        stable network.

    Examples
    --------
    >>> adata, truth = simulate_grn(50, 8, model="pln", seed=1)
    >>> adata.shape, truth["Sigma"].shape
    ((50, 8), (8, 8))
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; allowed: {', '.join(MODELS)}")
    if n_cells < 1 or n_genes < 3:
        raise ValueError(f"need n_cells >= 1 and n_genes >= 3; got {n_cells}, {n_genes}")
    if not 0 <= ref < n_genes:
        raise ValueError(f"ref={ref} out of range; allowed 0 .. {n_genes - 1}")
    rng = np.random.default_rng(seed)
    J, D, edges = random_network(n_genes, n_regulators=n_regulators or rank, density=density,
                                 rng=rng, **network)
    Sigma = lyapunov_covariance(J, D)
    W, d = low_rank_approximation(Sigma, rank)
    eta_center = log_M0 - np.log(lib_target)
    log_share = mu_spread * rng.standard_normal(n_genes)
    log_share -= special.logsumexp(log_share + 0.5 * np.diag(Sigma))
    mu = eta_center + np.log(lib_target) + log_share  # E[library] = lib_target at eta_center
    x = rng.multivariate_normal(mu, Sigma, size=n_cells, method="cholesky")
    eta = stats.truncnorm.rvs(-eta_center / sigma_M, np.inf, loc=eta_center, scale=sigma_M,
                              size=n_cells, random_state=rng)
    sd = np.sqrt(np.diag(Sigma))
    truth = {"J": J, "D": D, "Sigma": Sigma, "corr": Sigma / np.outer(sd, sd), "mu": mu,
             "x": x, "eta": eta, "W": W, "d": d, "edges": edges, "log_M0": float(log_M0),
             "sigma_M": float(sigma_M)}
    counts = _observe(model, x, eta, truth, rng, lib_target=lib_target, r_range=r_range,
                      r_T=r_T, ref=ref, eta_center=eta_center)
    adata = anndata.AnnData(
        counts.astype(np.int64),
        obs=pd.DataFrame({"library_size": np.full(n_cells, float(lib_target))},
                         index=[f"c{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))
    adata.uns["grn"] = {"model": model, "rank": int(rank), "seed": int(seed),
                        "density": float(density), "lib_target": float(lib_target),
                        "mu_spread": float(mu_spread), "sigma_M": float(sigma_M)}
    return adata, truth


def _observe(model, x, eta, truth, rng, *, lib_target, r_range, r_T, ref, eta_center):
    """Counts (N, G) from latent log-abundances through ``model``'s channel (fills truth)."""
    N, G = x.shape
    if model == "pln":
        return rng.poisson(np.exp(x - eta[:, None]))
    if model in ("nbln", "nbvcp"):
        log_r = rng.uniform(np.log(r_range[0]), np.log(r_range[1]), G)
        r = np.exp(log_r)
        m = np.exp(x - eta[:, None])
        truth.update(r=r, log_r=log_r, m=truth["mu"] + 0.5 * np.diag(truth["Sigma"]))
        return rng.negative_binomial(r, r / (r + m))
    # lnm / lnmvcp: ALR truth y = x_{-ref} - x_ref, Sigma_alr = P Sigma P'
    P = np.delete(np.eye(G), ref, axis=0) - np.eye(G)[ref]
    log_m_T = np.log(lib_target) + (eta_center if model == "lnmvcp" else 0.0)
    log_mean = log_m_T - (eta if model == "lnmvcp" else 0.0)
    total = rng.negative_binomial(r_T, r_T / (r_T + np.exp(log_mean) * np.ones(N)))
    rho = special.softmax(x, axis=1)
    truth.update(ref=int(ref), y=x @ P.T, mu_alr=P @ truth["mu"],
                 Sigma_alr=P @ truth["Sigma"] @ P.T, log_m_T=float(log_m_T),
                 log_r_T=float(np.log(r_T)))
    if model == "lnm":
        truth["eta"] = None
    return np.stack([rng.multinomial(t, p / p.sum()) for t, p in zip(total, rho)])
