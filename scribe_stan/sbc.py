"""Simulation-based calibration (SBC) of the Stan programs and the Laplace posteriors.

SBC (Talts, Betancourt, Simpson, Vehtari & Gelman 2018, "Validating Bayesian inference
algorithms with simulation-based calibration", arXiv:1804.06788) repeats

1. draw the parameters from the prior of the Stan program, ``theta ~ p(theta)``;
2. simulate counts through the model's observation channel, ``u ~ p(u | theta)``;
3. fit the full-joint Stan program ``stan/<model>.stan`` with NUTS;
4. record the rank of the true value of each scalar quantity among ``L`` thinned
   posterior draws (``0 .. L``).

If the program and the sampler are correct, each rank is uniform on ``0 .. L``. Ranks
are turned into randomized PIT values ``(rank + U) / (L + 1)``, ``U ~ Uniform(0, 1)``,
which are exactly Uniform(0, 1) under calibration, and the ECDF of the PIT values over
the simulations is compared with the simultaneous band of Säilynoja, Bürkner & Vehtari
(2022), "Graphical test for discrete uniformity and its applications in goodness-of-fit
evaluation and multiple sample comparison", Statistics and Computing 32:32,
doi:10.1007/s11222-022-10090-6, computed by :func:`arviz_stats.ecdf_utils.ecdf_pit`. A
quantity is *flagged* when its ECDF leaves the band anywhere (:func:`ecdf_band_test`).
With band probability ``prob`` a calibrated quantity is flagged with probability
``1 - prob``, so about ``(1 - prob) * n_quantities`` false flags are expected per model.

The Laplace posterior of the same simulated data (``scribe_stan.fit(...,
method="laplace")``) is checked on the per-cell latents (x and eta; y and eta for
lnm/lnmvcp): coverage of central 50 % and 90 % intervals and the PIT of the truth
among Laplace draws. By default the Laplace globals are point estimates (MAP of the
Laplace marginal), so its per-cell intervals ignore the globals' uncertainty and are
not expected to be exactly calibrated; :func:`laplace_study` re-runs the Laplace check
alone on a stored study's simulations, also with the globals drawn from their Gaussian
(nested draws). The public ``fit`` refuses cells with zero library size and drops all-zero genes (with a warning): the Laplace check therefore fits the
cells with counts and reports the latents of the genes it kept; a fit that raises (for
example fewer than two non-zero genes left) is recorded with its error message and
counted in the summary, not hidden.

Priors. :func:`draw_prior` draws every parameter of the Stan program's ``parameters``
block from exactly its prior, with the constants of :mod:`scribe_stan.models` (the
ones the Stan programs mirror): ``mu, m, mu_alr, log m_T ~ Normal(0, 10)``, loadings
``W[g, k] ~ Normal(0, 1)`` (the default ``loadings_prior="normal"``; the shrinkage
priors are not covered: ARD's ``Gamma(1e-3, 1e-3)`` precision is too close to improper
to simulate from), ``d ~ Gamma(2, rate 4)``, ``log r ~ Normal(log 10, 3)``, innovations
``z ~ Normal(0, 1)`` and the truncated-normal capture. The Stan programs fix these
hyperparameters (no data-passed prior scales), so SBC uses them as they are, wide as
they are: ``Normal(0, 10)`` on a log mean makes many genes all-zero and some huge.

Two design choices keep the simulation exactly the generative model of the program:

* **Library size as a covariate.** The capture prior ``eta_c ~ Normal(log M0 - log L_c,
  sigma_M)`` is centred on the library size, which the counts themselves produce; no
  simulation can draw eta before the data it depends on. The programs take ``log_lib``
  as *data*, so SBC draws a design library size per cell first
  (``log L_c ~ Normal(log 2000, 0.5)``, :data:`LOG_LIB_LOC`, :data:`LOG_LIB_SCALE`),
  passes it as ``log_lib`` and draws eta from the prior given it (as
  :func:`scribe_stan.models.pln.simulate` does).
* **Rejection on the data only.** Simulations whose largest per-cell total exceeds
  ``max_total`` (default 1e4 over the G simulated genes; a 10x cell has about 1e3-5e4
  UMIs over all its genes) are redrawn. Conditioning the joint on an event that depends
  on the data only leaves every posterior ``p(theta | u)`` unchanged, so the ranks stay
  uniform; the rejection rate is reported. The wide ``Normal(0, 10)`` log-mean prior
  otherwise makes data no sequencer produces: a gene with 1e6 counts per cell beside
  all-zero genes. NUTS cannot mix there (the captured log-rates of that gene are
  pinned to about 1e-3 while the rest spread over units): in the pln study with
  the earlier 1e8 threshold, 59 of 100 simulations had max R-hat > 1.05, against
  8 of the 47 with totals up to 1e4 (1 of 33 up to 1e3). SBC thus checks the programs
  on data sets of realistic depth. ``min_total`` is the same kind of condition from
  below (redraw when no cell reaches it) and ``all_genes_detected`` the usual gene
  filter, for studies where empty data would dominate.

The lnm/lnmvcp reference gene is data of the program; SBC fixes it at gene 0.

Examples
--------
>>> from scribe_stan import sbc
>>> res = sbc.run_sbc("nbvcp", n_sims=2, seed=1)          # doctest: +SKIP
>>> res.ranks.shape                                         # doctest: +SKIP
(2, 13)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from scribe_stan import stan
from scribe_stan.models import dispersion, lnm, loadings, nbvcp, pln

__all__ = [
    "MODELS",
    "SBCSettings",
    "SBCResult",
    "draw_prior",
    "simulate_counts",
    "simulate",
    "stan_data",
    "quantities",
    "ranks_of_truth",
    "pit_from_ranks",
    "ecdf_band",
    "ecdf_band_test",
    "calibration_table",
    "run_simulation",
    "run_sbc",
    "load_result",
    "plot_rank_histograms",
    "plot_ecdf_differences",
]

#: Models with a full-joint Stan program covered by SBC.
MODELS = ("pln", "nbln", "nbvcp", "lnm", "lnmvcp")

#: Design log library size (covariate of the capture prior): Normal(loc, scale) per cell.
LOG_LIB_LOC = float(np.log(2000.0))
LOG_LIB_SCALE = 0.5
#: Largest allowed per-cell total count of a simulation (larger ones are redrawn).
MAX_TOTAL = 1.0e4
#: Rate cap before drawing Poisson counts (numpy's limit is ~9e18); any rate this large
#: gives a count far above :data:`MAX_TOTAL`, so the simulation is rejected either way.
_RATE_CAP = 1.0e15
#: Reference gene (0-based) of the lnm/lnmvcp simulations.
LNM_REF = 0


@dataclass
class SBCSettings:
    """Sizes and sampler settings of one SBC study.

    Attributes
    ----------
    N, G, K : int
        Cells, genes, latent rank (K unused by nbvcp; lnm needs ``K < G - 1``).
    chains, warmup, draws : int
        NUTS chains and iterations per chain.
    adapt_delta : float
        NUTS target acceptance rate.
    max_depth : int
        NUTS maximum tree depth.
    L : int
        Number of thinned posterior draws the truth is ranked among (ranks ``0 .. L``).
    laplace_draws : int
        Laplace draws per simulation (0 skips the Laplace check).
    n_cells_tracked, n_genes_tracked : int
        Per-cell latents ranked by NUTS: ``eta`` of the first ``n_cells_tracked`` cells
        and ``x`` / ``y`` of those cells times the first ``n_genes_tracked`` genes.
    log_M0, sigma_M : float
        Capture prior (defaults of :mod:`scribe_stan.models.pln`).
    max_total : float
        Rejection threshold on per-cell totals (:data:`MAX_TOTAL`).
    min_total : float
        Simulations in which no cell reaches this total are redrawn (default 0: none).
        lnm/lnmvcp studies use it: under the ``Normal(0, 10)`` prior on ``log m_T`` most
        simulated data sets are all zeros, which inform nothing.
    all_genes_detected : bool
        Redraw simulations in which a gene has no count in any cell, the gene filter
        every scRNA-seq pipeline applies before modelling (default False). The Laplace
        fit drops such genes, so without it its check covers fewer simulations.
    backend : str
        Stan backend (:func:`scribe_stan.stan.resolve_backend`).
    """

    N: int = 20
    G: int = 5
    K: int = 1
    chains: int = 2
    warmup: int = 1000
    draws: int = 500
    adapt_delta: float = 0.9
    max_depth: int = 10
    L: int = 100
    laplace_draws: int = 400
    n_cells_tracked: int = 3
    n_genes_tracked: int = 2
    log_M0: float = float(np.log(pln.M0_DEFAULT))
    sigma_M: float = pln.SIGMA_M_DEFAULT
    max_total: float = MAX_TOTAL
    min_total: float = 0.0
    all_genes_detected: bool = False
    backend: str = "auto"

    def __post_init__(self):
        total = self.chains * self.draws
        if not 1 <= self.L <= total:
            raise ValueError(f"L={self.L} must lie in 1 .. chains * draws = {total}")
        if not 0 < self.max_total < 2**31:
            raise ValueError(f"max_total={self.max_total} must lie in (0, 2^31): Stan's "
                             "integer counts are 32-bit")
        if not 0 <= self.min_total <= self.max_total:
            raise ValueError(f"min_total={self.min_total} must lie in 0 .. max_total = "
                             f"{self.max_total}")
        if self.K < 1 or self.K >= self.G:
            raise ValueError(f"need 1 <= K < G; got K={self.K}, G={self.G}")


def _check_model(model):
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for SBC; allowed: {', '.join(MODELS)}")
    if model in ("lnm", "lnmvcp"):
        return True
    return False


# --------------------------------------------------------------------------------------
# Prior draws and the observation channel
# --------------------------------------------------------------------------------------


def _capture(rng, log_lib, log_M0, sigma_M):
    """eta from its prior, normal(a, sigma_M) truncated to ``eta >= 0``."""
    a = pln.capture_prior_mean(log_lib, log_M0)
    return stats.truncnorm.rvs(-a / sigma_M, np.inf, loc=a, scale=sigma_M, size=a.shape,
                               random_state=rng)


def _latent(rng, N, dim, K):
    """Composition/log-rate globals (pln priors) and non-centred latents."""
    mu = rng.normal(pln.MU_LOC, pln.MU_SCALE, size=dim)
    W = rng.normal(0.0, loadings.W_SCALE, size=(dim, K))
    d = rng.gamma(pln.D_SHAPE, 1.0 / pln.D_RATE, size=dim)
    z = rng.standard_normal((N, dim))
    Sigma = pln.covariance(W, d)
    x = mu + z @ np.linalg.cholesky(Sigma).T  # as pln_latent in the Stan program
    return mu, W, d, z, Sigma, x


def draw_prior(model, N, G, K, rng, *, log_lib, log_M0=float(np.log(pln.M0_DEFAULT)),
               sigma_M=pln.SIGMA_M_DEFAULT):
    """One draw of every parameter of ``stan/<model>.stan`` from its prior.

    Parameters
    ----------
    model : {"pln", "nbln", "nbvcp", "lnm", "lnmvcp"}
    N, G, K : int
        Cells, genes, latent rank (ignored by nbvcp; lnm/lnmvcp need ``1 <= K < G - 1``).
    rng : numpy.random.Generator
    log_lib : (N,) array
        Design log library sizes (the capture prior's covariate, passed to Stan as data).
    log_M0, sigma_M : float
        Capture prior (log prior median total mRNA; log-scale sd).

    Returns
    -------
    dict of str to ndarray or float
        The parameters under their Stan names on the constrained scale (pln:
        ``W (G, K), d (G,)``; nbln adds ``log_r (G,)``; nbvcp:
        ``m_free, log_r (G,), eta_level, eta_dev (N,)``; lnm: ``mu_alr, d_alr (G-1,),
        W_alr (G-1, K), log_m_T, log_r_T, z (N, G-1)``; the per-cell coordinates of pln,
        nbln and lnmvcp and pln's and nbln's mu coordinates depend on the counts or sit
        beside them, so :func:`simulate` adds them) and the quantities the programs
        compute from them (``mu, Sigma, x, eta, r, m``; lnm: ``Sigma_alr, y, m_T,
        r_T``).

    Raises
    ------
    ValueError
        Unknown model or ``log_lib`` of the wrong shape.
    """
    is_lnm = _check_model(model)
    log_lib = np.asarray(log_lib, dtype=float)
    if log_lib.shape != (N,):
        raise ValueError(f"log_lib must have shape ({N},), got {log_lib.shape}")
    out = {}
    if model == "nbvcp":
        out["m"] = rng.normal(nbvcp.M_LOC, nbvcp.M_SCALE, size=G)
        out["log_r"] = rng.normal(dispersion.LOG_R_LOC, dispersion.LOG_R_SCALE, size=G)
        out["r"] = np.exp(out["log_r"])
    elif is_lnm:
        mu, W, d, z, Sigma, y = _latent(rng, N, G - 1, K)
        out.update(mu_alr=mu, W_alr=W, d_alr=d, z=z, Sigma_alr=Sigma, y=y)
        out["log_m_T"] = float(rng.normal(lnm.LOG_M_T_LOC, lnm.LOG_M_T_SCALE))
        out["log_r_T"] = float(rng.normal(dispersion.LOG_R_LOC, dispersion.LOG_R_SCALE))
        out["m_T"], out["r_T"] = float(np.exp(out["log_m_T"])), float(np.exp(out["log_r_T"]))
    else:
        mu, W, d, _, Sigma, x = _latent(rng, N, G, K)
        out.update(mu=mu, W=W, d=d, Sigma=Sigma, x=x)
        if model == "nbln":
            out["log_r"] = rng.normal(dispersion.LOG_R_LOC, dispersion.LOG_R_SCALE, size=G)
            out["r"] = np.exp(out["log_r"])
    if model == "nbvcp":
        # nbvcp.stan samples eta as (eta_level, eta_dev) and m relative to eta_level
        out["eta"] = _capture(rng, log_lib, log_M0, sigma_M)
        out["eta_level"], out["eta_dev"] = pln.capture_coordinates(out["eta"])
        out["m_free"] = out["m"] - out["eta_level"]
    elif model == "lnmvcp":
        out["eta"] = _capture(rng, log_lib, log_M0, sigma_M)  # eta_q: see simulate
    elif model != "lnm":
        # pln.stan and nbln.stan sample the captured log-rates x - eta, whitened by the
        # counts, and eta's quantile: simulate adds them
        out["eta"] = _capture(rng, log_lib, log_M0, sigma_M)
    return out


def _poisson(rng, log_rate):
    return rng.poisson(np.minimum(np.exp(np.minimum(log_rate, 700.0)), _RATE_CAP))


def _neg_binomial(rng, log_mean, r):
    """NegBinomial2(exp(log_mean), r) as a gamma-Poisson draw (variance m + m^2 / r)."""
    m = np.exp(np.minimum(log_mean, 700.0))
    lam = rng.gamma(np.broadcast_to(r, m.shape), m / r)
    return rng.poisson(np.minimum(lam, _RATE_CAP))


def simulate_counts(model, truth, rng, *, max_total=MAX_TOTAL):
    """Counts from the model's observation channel given the parameters.

    Parameters
    ----------
    model : str
    truth : dict
        Output of :func:`draw_prior`.
    rng : numpy.random.Generator
    max_total : float
        lnm/lnmvcp: when a total exceeds it, the composition is not drawn (the counts
        keep the totals in gene 0; :func:`simulate` rejects them).

    Returns
    -------
    ndarray of int64, shape (N, G)
        Rates above 1e15 are capped before drawing (such draws are rejected by
        :func:`simulate` anyway).
    """
    is_lnm = _check_model(model)
    if model == "pln":
        return _poisson(rng, truth["x"] - truth["eta"][:, None]).astype(np.int64)
    if model == "nbln":
        return _neg_binomial(rng, truth["x"] - truth["eta"][:, None],
                             truth["r"]).astype(np.int64)
    if model == "nbvcp":
        return _neg_binomial(rng, truth["m"][None, :] - truth["eta"][:, None],
                             truth["r"]).astype(np.int64)
    assert is_lnm
    N = truth["y"].shape[0]
    log_mean = np.full(N, truth["log_m_T"])
    if model == "lnmvcp":
        log_mean = log_mean - truth["eta"]
    total = _neg_binomial(rng, log_mean, truth["r_T"]).astype(np.int64)
    G = truth["y"].shape[1] + 1
    if total.max() > max_total:  # rejected by simulate(): keep the totals, skip the rest
        return np.column_stack([total, np.zeros((N, G - 1), dtype=np.int64)])
    lg = lnm.logits(truth["y"], LNM_REF)
    rho = np.exp(lg - lg.max(axis=1, keepdims=True))
    rho /= rho.sum(axis=1, keepdims=True)
    return np.stack([rng.multinomial(t, p) for t, p in zip(total, rho)]).astype(np.int64)


def simulate(model, settings, rng):
    """Prior draw and counts, redrawn until the largest per-cell total lies in
    ``min_total .. max_total`` (and, with ``all_genes_detected``, every gene has a count).

    Parameters
    ----------
    model : str
    settings : SBCSettings
    rng : numpy.random.Generator

    Returns
    -------
    truth : dict
        :func:`draw_prior` output plus ``log_lib`` (N,) and ``counts`` (N, G); lnmvcp
        also ``eta_q`` (N,); pln and nbln also ``mu_level``, ``mu_dev`` (G,),
        ``theta_z`` (N, K + 1), ``theta_e`` (N, G) and ``eta_q`` (N,)
        (:func:`scribe_stan.models.pln.observed_capture_coordinates`).
    n_rejected : int
        Simulations redrawn before this one was accepted.
    """
    s = settings
    n_rejected = 0
    while True:
        log_lib = rng.normal(LOG_LIB_LOC, LOG_LIB_SCALE, size=s.N)
        truth = draw_prior(model, s.N, s.G, s.K, rng, log_lib=log_lib, log_M0=s.log_M0,
                           sigma_M=s.sigma_M)
        counts = simulate_counts(model, truth, rng, max_total=s.max_total)
        accepted = s.min_total <= counts.sum(axis=1).max() <= s.max_total
        if accepted and s.all_genes_detected:
            accepted = bool(counts.sum(axis=0).min() > 0)
        if accepted:
            truth.update(log_lib=log_lib, counts=counts)
            if model == "lnmvcp":
                truth["eta_q"], _ = lnm.capture_quantile_coordinates(
                    truth["eta"], counts.sum(axis=1), truth["log_m_T"], truth["log_r_T"],
                    pln.capture_prior_mean(log_lib, s.log_M0), s.sigma_M)
            elif model in ("pln", "nbln"):
                coords = pln.observed_capture_coordinates(
                    counts, truth["x"], truth["eta"], truth["mu"], truth["W"], truth["d"],
                    pln.capture_prior_mean(log_lib, s.log_M0), s.sigma_M,
                    r=truth.get("r"))
                truth.update({k: coords[k] for k in pln.SAMPLED_COORDINATES})
            return truth, n_rejected
        n_rejected += 1


def stan_data(model, truth, settings):
    """Data dict of ``stan/<model>.stan`` for simulated ``truth`` (counts, design log_lib)."""
    capture = {"log_M0": settings.log_M0, "sigma_M": settings.sigma_M,
               "log_lib": truth["log_lib"]}
    if model in ("pln", "nbln"):
        return pln.stan_data(truth["counts"], settings.K, **capture)
    if model == "nbvcp":
        return nbvcp.stan_data(truth["counts"], **capture)
    return lnm.stan_data(truth["counts"], settings.K, LNM_REF, **capture)


# --------------------------------------------------------------------------------------
# Rotation-invariant scalar quantities and ranks
# --------------------------------------------------------------------------------------


def _corr(S):
    sd = np.sqrt(np.diagonal(S, axis1=-2, axis2=-1))
    return S / (sd[..., :, None] * sd[..., None, :])


def quantities(model, values, settings):
    """Rotation-invariant scalar quantities ranked by SBC.

    Parameters
    ----------
    model : str
    values : dict of str to ndarray
        Either a prior draw (:func:`draw_prior`) with no sample axis, or posterior draws
        with one leading sample axis ``(S, ...)`` (e.g. chains and draws flattened).
    settings : SBCSettings

    Returns
    -------
    dict of str to ndarray
        Name (0-based indices, e.g. ``"Sigma[0,1]"``) to an array of shape ``(S,)``
        (``()`` for a prior draw). pln/nbln: ``mu[g], d[g], Sigma[g,h] (g <= h),
        corr[g,h] (g < h)``, ``eta[c]`` and ``x[c,g]`` of the tracked cells and genes,
        nbln adds ``r[g]``; nbvcp: ``m[g], r[g], eta[c]``; lnm: ``mu_alr[j], d_alr[j],
        Sigma_alr[j,k], corr_alr[j,k], m_T, r_T, y[c,j]``, lnmvcp adds ``eta[c]``.
        The loadings (``W``, ``W_alr``) are identified only up to rotation and are
        left out (as :data:`scribe_stan.compare.NOT_IDENTIFIED`).
    """
    _check_model(model)
    nc, ng = settings.n_cells_tracked, settings.n_genes_tracked
    out = {}

    def vec(name, arr):
        for i in range(arr.shape[-1]):
            out[f"{name}[{i}]"] = arr[..., i]

    def mat(name, arr, strict):
        n = arr.shape[-1]
        for i in range(n):
            for j in range(i + (1 if strict else 0), n):
                out[f"{name}[{i},{j}]"] = arr[..., i, j]

    def cells(name, arr):
        for c in range(min(nc, arr.shape[-2])):
            for g in range(min(ng, arr.shape[-1])):
                out[f"{name}[{c},{g}]"] = arr[..., c, g]

    if model == "nbvcp":
        vec("m", values["m"])
        vec("r", values["r"])
    elif model in ("pln", "nbln"):
        vec("mu", values["mu"])
        vec("d", values["d"])
        mat("Sigma", values["Sigma"], False)
        mat("corr", _corr(values["Sigma"]), True)
        if model == "nbln":
            vec("r", values["r"])
        cells("x", values["x"])
    else:
        vec("mu_alr", values["mu_alr"])
        vec("d_alr", values["d_alr"])
        mat("Sigma_alr", values["Sigma_alr"], False)
        mat("corr_alr", _corr(values["Sigma_alr"]), True)
        out["m_T"] = np.asarray(values["m_T"], dtype=float)
        out["r_T"] = np.asarray(values["r_T"], dtype=float)
        cells("y", values["y"])
    if model != "lnm":
        eta = values["eta"]
        for c in range(min(nc, eta.shape[-1])):
            out[f"eta[{c}]"] = eta[..., c]
    return out


def ranks_of_truth(truth_q, post_q, L):
    """Rank of each true value among ``L`` evenly thinned posterior draws.

    Parameters
    ----------
    truth_q : dict of str to float
        True value per quantity (:func:`quantities` of the prior draw).
    post_q : dict of str to ndarray (S,)
        Posterior draws per quantity, chains concatenated (``S >= L``).
    L : int

    Returns
    -------
    dict of str to int
        ``#{draws < truth}`` among the kept draws, in ``0 .. L``; draws equal to the
        truth (not expected for continuous quantities) count as below with
        probability 1/2 each.

    Raises
    ------
    ValueError
        Fewer than ``L`` draws.
    """
    out = {}
    for name, draws in post_q.items():
        draws = np.asarray(draws).reshape(-1)
        if draws.size < L:
            raise ValueError(f"{name}: {draws.size} draws < L = {L}")
        keep = draws[:: draws.size // L][:L]
        t = float(truth_q[name])
        out[name] = int(np.sum(keep < t)) + int(np.floor(np.sum(keep == t) / 2))
    return out


def pit_from_ranks(ranks, L, rng):
    """Randomized PIT values ``(rank + U) / (L + 1)``: Uniform(0, 1) when ranks are uniform.

    Parameters
    ----------
    ranks : array of int in ``0 .. L`` (any shape)
    L : int
    rng : numpy.random.Generator

    Returns
    -------
    ndarray of float, same shape.

    Raises
    ------
    ValueError
        A rank outside ``0 .. L``.
    """
    ranks = np.asarray(ranks, dtype=float)
    if np.any((ranks < 0) | (ranks > L)):
        raise ValueError(f"ranks must lie in 0 .. {L}")
    return (ranks + rng.uniform(size=ranks.shape)) / (L + 1)


# --------------------------------------------------------------------------------------
# ECDF-difference simultaneous bands (Säilynoja, Bürkner & Vehtari 2022, via arviz_stats)
# --------------------------------------------------------------------------------------


def ecdf_band(n, prob=0.99, n_simulations=2000, seed=214):
    """Simultaneous band for the ECDF of ``n`` independent Uniform(0, 1) values.

    Thin wrapper of :func:`arviz_stats.ecdf_utils.ecdf_pit` (the simulation method of
    Säilynoja et al. 2022): the ECDF stays inside the band at every evaluation point
    with probability ``prob`` under uniformity.

    Parameters
    ----------
    n : int, number of PIT values (simulations).
    prob : float in (0, 1), simultaneous coverage.
    n_simulations : int, simulations used to calibrate the band.
    seed : int

    Returns
    -------
    eval_points, lower, upper : ndarray of shape (n + 1,)
        ``0, 1/n, ..., 1`` and the band's ECDF bounds there.
    """
    from arviz_stats.ecdf_utils import ecdf_pit

    rng = np.random.default_rng(seed)
    x, _, lower, upper = ecdf_pit(np.linspace(0, 1, n), prob, n_simulations, rng=rng)
    return x, lower, upper


def ecdf_band_test(pit, band):
    """Whether the ECDF of ``pit`` leaves a simultaneous band.

    Parameters
    ----------
    pit : (n,) PIT values in [0, 1].
    band : tuple from :func:`ecdf_band` with the same ``n``.

    Returns
    -------
    dict
        ``flagged`` (bool), ``max_abs_diff`` (max |ECDF - uniform CDF| on the band's
        grid), ``n_outside`` (grid points outside the band).
    """
    from arviz_stats.ecdf_utils import compute_ecdf

    x, lower, upper = band
    pit = np.asarray(pit, dtype=float)
    if x.size != pit.size + 1:
        raise ValueError(f"band is for {x.size - 1} values, got {pit.size}")
    ecdf = compute_ecdf(pit, x)
    outside = (ecdf < lower - 1e-12) | (ecdf > upper + 1e-12)
    return {"flagged": bool(outside.any()), "max_abs_diff": float(np.max(np.abs(ecdf - x))),
            "n_outside": int(outside.sum())}


def calibration_table(pit, prob=0.99, n_simulations=2000):
    """Per-quantity ECDF band test and a second uniformity p-value.

    Parameters
    ----------
    pit : pandas.DataFrame
        One column per quantity, one row per simulation (NaN rows are dropped per
        column).
    prob : float
        Simultaneous band probability.

    Returns
    -------
    pandas.DataFrame
        Index: quantity. Columns ``n`` (simulations), ``flagged``, ``max_abs_diff``,
        ``n_outside``, ``pot_c_p`` (the p-value of arviz_stats' ``uniformity_test``,
        method ``pot_c``, reported alongside; the flag uses the band only), ``mean_pit``
        (0.5 under calibration; below: truth tends to sit low in the posterior).
    """
    from arviz_stats.base import array_stats

    rows, bands = {}, {}
    for name in pit.columns:
        v = pit[name].dropna().to_numpy()
        if v.size < 2:
            continue
        if v.size not in bands:
            bands[v.size] = ecdf_band(v.size, prob, n_simulations)
        res = ecdf_band_test(v, bands[v.size])
        p_value = array_stats.uniformity_test(v, method="pot_c")[0]
        rows[name] = {"n": int(v.size), **res, "pot_c_p": float(np.asarray(p_value)),
                      "mean_pit": float(v.mean())}
    return pd.DataFrame.from_dict(rows, orient="index")


# --------------------------------------------------------------------------------------
# One simulation: NUTS ranks and the Laplace check
# --------------------------------------------------------------------------------------


def _laplace_check(model, truth, settings, seed, globals="point"):
    """Laplace fit of the simulated counts; PIT of the true per-cell latents.

    ``globals``: the globals of the Laplace draws, at their MAP (``"point"``) or drawn
    from their Gaussian (``"laplace"``, pln and nbln: nested draws).
    """
    import anndata

    import scribe_stan

    counts = truth["counts"]
    N, G = counts.shape
    keep = counts.sum(axis=1) > 0  # the public fit refuses zero-library cells
    cell_names = np.array([f"c{i}" for i in range(N)])
    gene_names = np.array([f"g{j}" for j in range(G)])
    info = {"cells_used": int(keep.sum()), "genes_used": 0, "error": None}
    kwargs = dict(model=model, method="laplace", rank=settings.K,
                  library_size=np.exp(truth["log_lib"][keep]), M0=float(np.exp(settings.log_M0)),
                  sigma_M=settings.sigma_M, seed=seed, progress=False)
    if model in ("lnm", "lnmvcp"):
        kwargs["reference_gene"] = gene_names[LNM_REF]
    adata = anndata.AnnData(counts[keep].astype(np.float64))
    adata.obs_names, adata.var_names = cell_names[keep], gene_names
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = scribe_stan.fit(adata, **kwargs)
            tree = fit.to_datatree(draws=settings.laplace_draws,
                                   **({} if globals == "point" else {"globals": globals}))
    except Exception as exc:  # recorded, not hidden: the study reports failed fits
        info["error"] = f"{type(exc).__name__}: {exc}"
        return info, {}
    post = tree["posterior"]
    genes = [str(g) for g in post["gene"].values]
    info["genes_used"] = len(genes)
    info["cells_converged"] = int(np.sum(fit.converged))
    rows = np.flatnonzero(keep)
    pits = {}
    if "eta" in post:
        draws = post["eta"].values.reshape(-1, rows.size)
        pits["eta"] = (np.mean(draws < truth["eta"][rows], axis=0), rows, None)
    if model in ("pln", "nbln"):
        cols = np.array([int(g[1:]) for g in genes])
        draws = post["x"].values.reshape(-1, rows.size, cols.size)
        pits["x"] = (np.mean(draws < truth["x"][np.ix_(rows, cols)], axis=0), rows, cols)
    elif model in ("lnm", "lnmvcp"):
        alr = [str(g) for g in post["gene_alr"].values]
        # column of the truth's y (reference LNM_REF left out) for each fitted ALR gene
        cols = np.array([int(g[1:]) - (1 if int(g[1:]) > LNM_REF else 0) for g in alr])
        draws = post["y"].values.reshape(-1, rows.size, cols.size)
        pits["y"] = (np.mean(draws < truth["y"][np.ix_(rows, cols)], axis=0), rows, cols)
    return info, pits


def run_simulation(model, settings, seed):
    """One SBC simulation: prior draw, counts, NUTS ranks, Laplace PIT values.

    Parameters
    ----------
    model : str
    settings : SBCSettings
    seed : int
        Seeds the simulation, the sampler and the Laplace draws.

    Returns
    -------
    dict
        ``ranks`` (quantity -> int in ``0 .. L``), ``n_rejected``, ``divergences``,
        ``treedepth_hits`` (transitions at ``max_depth``), ``max_rhat`` and
        ``min_ess_bulk`` over the ranked quantities (all draws), ``nuts_time_s``,
        ``laplace`` (cells/genes used, error or None, time) and ``laplace_pit``
        (latent -> list of (cell, gene or -1, PIT) for every fitted element),
        ``wall_time_s``.
    """
    from arviz_stats.base import array_stats

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    truth, n_rejected = simulate(model, settings, rng)
    data = stan_data(model, truth, settings)
    draws = stan.sample(model, data, backend=settings.backend, chains=settings.chains,
                        draws=settings.draws, warmup=settings.warmup, seed=seed,
                        adapt_delta=settings.adapt_delta, max_depth=settings.max_depth)
    n_total = settings.chains * settings.draws
    flat = {k: v.reshape(n_total, *v.shape[2:]) for k, v in draws.posterior.items()}
    post_q = quantities(model, flat, settings)
    truth_q = quantities(model, truth, settings)
    ranks = ranks_of_truth(truth_q, post_q, settings.L)
    chains = np.stack([v.reshape(settings.chains, settings.draws) for v in post_q.values()],
                      axis=-1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rhat = array_stats.rhat(chains, chain_axis=0, draw_axis=1)
        ess = array_stats.ess(chains, chain_axis=0, draw_axis=1, method="bulk")
    out = {
        "seed": int(seed),
        "ranks": ranks,
        "n_rejected": int(n_rejected),
        "divergences": int(np.sum(draws.sample_stats["diverging"])),
        "treedepth_hits": int(np.sum(draws.sample_stats["tree_depth"] >= settings.max_depth)),
        "max_rhat": float(np.nanmax(rhat)),
        "min_ess_bulk": float(np.nanmin(ess)),
        "nuts_time_s": float(draws.wall_time_s),
        "zero_cells": int(np.sum(truth["counts"].sum(axis=1) == 0)),
        "zero_genes": int(np.sum(truth["counts"].sum(axis=0) == 0)),
        "stan_hash": draws.stan_hash,
        "versions": draws.versions,
    }
    if settings.laplace_draws > 0:
        out["laplace"], out["laplace_pit"] = _timed_laplace_check(model, truth, settings,
                                                                  seed)
    out["wall_time_s"] = time.perf_counter() - t0
    return out


def _timed_laplace_check(model, truth, settings, seed, globals="point"):
    """:func:`_laplace_check` with its time; PITs as latent -> [(cell, gene or -1, pit)]."""
    t1 = time.perf_counter()
    info, pits = _laplace_check(model, truth, settings, seed, globals)
    info["time_s"] = time.perf_counter() - t1
    items = {}
    for name, (pv, rows, cols) in pits.items():
        if cols is None:
            items[name] = [(int(c), -1, float(p)) for c, p in zip(rows, pv)]
        else:
            items[name] = [(int(rows[i]), int(cols[j]), float(pv[i, j]))
                           for i in range(rows.size) for j in range(cols.size)]
    return info, items


#: Globals of the Laplace draws (:func:`laplace_study`): MAP or drawn from their Gaussian.
GLOBALS = ("point", "laplace")
PIT_COLUMNS = ["sim", "latent", "cell", "gene", "pit"]


def laplace_study(model, seeds, settings, *, globals="point", progress=None):
    """The Laplace check alone, on the simulations of an SBC study (no NUTS).

    Simulation ``s`` is re-drawn from ``numpy.random.default_rng(s)`` exactly as in
    :func:`run_simulation`, so a stored study's seeds give the same counts and truth,
    and the Laplace variants (point globals, nested draws) are compared on the same data.

    Parameters
    ----------
    model : {"pln", "nbln", "nbvcp", "lnm", "lnmvcp"}
    seeds : iterable of int
        Simulation seeds (``SBCResult.sims["seed"]`` of a stored study).
    settings : SBCSettings
        The study's settings (sizes, capture prior, rejection rules, Laplace draws).
    globals : {"point", "laplace"}
        Globals of the Laplace draws: the MAP, or draws from their Gaussian (the fits'
        ``to_datatree(globals=...)``).
    progress : callable, optional
        Called as ``progress(i, info)`` after each simulation.

    Returns
    -------
    pit : pandas.DataFrame
        Columns :data:`PIT_COLUMNS` (as ``SBCResult.laplace_pit``).
    sims : pandas.DataFrame
        One row per seed: cells and genes used, error (or None), time.

    Raises
    ------
    ValueError
        Unknown model or ``globals`` (the allowed values are named).
    """
    _check_model(model)
    if globals not in GLOBALS:
        raise ValueError(f"globals={globals!r} is not a choice of the Laplace draws; "
                         f"allowed: {GLOBALS}")
    pit_rows, sim_rows = [], []
    for i, s in enumerate(int(s) for s in seeds):
        truth, _ = simulate(model, settings, np.random.default_rng(s))
        info, items = _timed_laplace_check(model, truth, settings, s, globals)
        sim_rows.append({"seed": s, **{k: info.get(k) for k in
                                       ("cells_used", "genes_used", "error", "time_s")}})
        pit_rows += [(s, name, c, g, p) for name, rows in items.items() for c, g, p in rows]
        if progress is not None:
            progress(i, info)
    return pd.DataFrame(pit_rows, columns=PIT_COLUMNS), pd.DataFrame(sim_rows)


def coverage_table(pit):
    """Coverage of central 50 % / 90 % intervals per latent from PIT rows.

    Parameters
    ----------
    pit : pandas.DataFrame
        Columns :data:`PIT_COLUMNS`.

    Returns
    -------
    pandas.DataFrame
        Index ``latent``; columns ``n`` (elements), ``coverage_50``, ``coverage_90``,
        ``mean_pit`` (nominal 0.5, 0.9, 0.5).
    """
    if pit.empty:
        return pd.DataFrame(columns=["n", "coverage_50", "coverage_90", "mean_pit"])
    dev = np.abs(pit["pit"] - 0.5)
    frame = pit.assign(c50=dev <= 0.25, c90=dev <= 0.45)
    return frame.groupby("latent").agg(n=("pit", "size"), coverage_50=("c50", "mean"),
                                       coverage_90=("c90", "mean"), mean_pit=("pit", "mean"))


# --------------------------------------------------------------------------------------
# A whole study
# --------------------------------------------------------------------------------------


@dataclass
class SBCResult:
    """Outcome of :func:`run_sbc`.

    Attributes
    ----------
    model : str
    settings : SBCSettings
    ranks : pandas.DataFrame
        One row per simulation (index: simulation seed), one column per quantity,
        ranks in ``0 .. L``.
    sims : pandas.DataFrame
        Per-simulation diagnostics (rejections, divergences, tree-depth hits, max R-hat,
        min bulk ESS, times, Laplace cells/genes used and error).
    laplace_pit : pandas.DataFrame
        Columns ``sim, latent, cell, gene, pit``: PIT of the truth among Laplace draws
        for every fitted per-cell latent element (``gene = -1`` for eta).
    wall_time_s : float
    versions : dict
    stan_hash : str
    """

    model: str
    settings: SBCSettings
    ranks: pd.DataFrame
    sims: pd.DataFrame
    laplace_pit: pd.DataFrame
    wall_time_s: float
    versions: dict = field(default_factory=dict)
    stan_hash: str = ""

    def pit(self, seed=0):
        """Randomized PIT values of the NUTS ranks (:func:`pit_from_ranks`), a DataFrame."""
        rng = np.random.default_rng(seed)
        return pd.DataFrame(pit_from_ranks(self.ranks.to_numpy(), self.settings.L, rng),
                            index=self.ranks.index, columns=self.ranks.columns)

    def calibration(self, prob=0.99, seed=0):
        """:func:`calibration_table` of the NUTS ranks."""
        return calibration_table(self.pit(seed), prob)

    def laplace_coverage(self):
        """Coverage of central 50 % / 90 % Laplace intervals per latent (a DataFrame).

        Columns ``n`` (elements), ``coverage_50``, ``coverage_90``, ``mean_pit``; the
        nominal values are 0.5, 0.9 and 0.5.
        """
        return coverage_table(self.laplace_pit)

    def laplace_tracked_pit(self):
        """Laplace PIT of the per-cell latents NUTS tracks (same names as ``ranks``).

        Returns
        -------
        pandas.DataFrame, one row per simulation (NaN where the Laplace fit did not
        cover the element).
        """
        lp = self.laplace_pit
        s = self.settings
        names = {}
        for c in range(s.n_cells_tracked):
            names[("eta", c, -1)] = f"eta[{c}]"
            for g in range(s.n_genes_tracked):
                names[("x", c, g)] = f"x[{c},{g}]"
                names[("y", c, g)] = f"y[{c},{g}]"
        if lp.empty:
            return pd.DataFrame(index=self.ranks.index)
        key = list(zip(lp["latent"], lp["cell"], lp["gene"]))
        sel = lp.assign(name=[names.get(k) for k in key]).dropna(subset=["name"])
        return sel.pivot(index="sim", columns="name", values="pit").reindex(self.ranks.index)

    def well_mixed(self, max_rhat=1.05, min_ess=None):
        """Seeds of simulations whose NUTS run mixed: R-hat < ``max_rhat``, bulk ESS >= L.

        A diagnostic split, not an SBC: selecting simulations on sampler outcomes can
        itself bend the rank distribution. If flags vanish on the well-mixed subset and
        the flagged simulations are those with poor mixing, the flags point to the
        sampler (too few effective draws for L) rather than to the program.
        """
        min_ess = self.settings.L if min_ess is None else min_ess
        s = self.sims
        return s.index[(s["max_rhat"] < max_rhat) & (s["min_ess_bulk"] >= min_ess)]

    def summary(self, prob=0.99):
        """JSON-ready dict: settings, timings, flags, Laplace coverage."""
        cal = self.calibration(prob)
        good = self.well_mixed()
        good_cal = (calibration_table(self.pit().loc[good], prob) if len(good) >= 2
                    else pd.DataFrame(columns=["flagged"]))
        lap_cal = calibration_table(self.laplace_tracked_pit(), prob)
        sims = self.sims
        flagged = cal.index[cal["flagged"]].tolist() if len(cal) else []
        return {
            "model": self.model,
            "settings": asdict(self.settings),
            "n_sims": int(len(self.ranks)),
            "stan_hash": self.stan_hash,
            "versions": self.versions,
            "wall_time_s": self.wall_time_s,
            "wall_time_per_sim_s": {"mean": float(sims["wall_time_s"].mean()),
                                    "median": float(sims["wall_time_s"].median()),
                                    "max": float(sims["wall_time_s"].max())},
            "rejected_draws": int(sims["n_rejected"].sum()),
            "rejection_rate": float(sims["n_rejected"].sum()
                                    / (sims["n_rejected"].sum() + len(sims))),
            "nuts": {"sims_with_divergences": int((sims["divergences"] > 0).sum()),
                     "total_divergences": int(sims["divergences"].sum()),
                     "sims_with_treedepth_hits": int((sims["treedepth_hits"] > 0).sum()),
                     "sims_max_rhat_above_1.01": int((sims["max_rhat"] > 1.01).sum()),
                     "median_min_ess_bulk": float(sims["min_ess_bulk"].median())},
            "well_mixed_subset": {
                "criterion": f"max R-hat < 1.05 and min bulk ESS >= L = {self.settings.L}",
                "n_sims": int(len(good)),
                "flagged": good_cal.index[good_cal["flagged"].astype(bool)].tolist(),
                "note": "diagnostic split only (selection on sampler outcomes)"},
            "band_prob": prob,
            "n_quantities": int(len(cal)),
            "expected_false_flags": float((1 - prob) * len(cal)),
            "flagged": flagged,
            "per_quantity": cal.to_dict(orient="index"),
            "laplace": {
                "sims_failed": int(sims["laplace_error"].notna().sum())
                if "laplace_error" in sims else 0,
                "coverage": self.laplace_coverage().to_dict(orient="index"),
                "flagged": lap_cal.index[lap_cal["flagged"]].tolist() if len(lap_cal) else [],
                "per_quantity": lap_cal.to_dict(orient="index"),
            },
        }


def load_result(directory, model=None):
    """:class:`SBCResult` from a folder written by ``validation/run_sbc.py``.

    Parameters
    ----------
    directory : path
        Holds ``ranks.csv``, ``sims.csv``, ``laplace_pit.csv`` and ``sbc.json``.
    model : str, optional (default: the JSON's model)

    Returns
    -------
    SBCResult
    """
    import json
    from pathlib import Path

    d = Path(directory)
    meta = json.loads((d / "sbc.json").read_text())
    ranks = pd.read_csv(d / "ranks.csv", index_col="sim")
    sims = pd.read_csv(d / "sims.csv")
    sims = sims.set_index("seed", drop=False)
    lap = pd.read_csv(d / "laplace_pit.csv")
    return SBCResult(model=model or meta["model"], settings=SBCSettings(**meta["settings"]),
                     ranks=ranks, sims=sims, laplace_pit=lap, wall_time_s=meta["wall_time_s"],
                     versions=meta["versions"], stan_hash=meta["stan_hash"])


def run_sbc(model, n_sims=100, *, settings=None, seed=0, progress=None, time_budget_s=None):
    """Run an SBC study of ``stan/<model>.stan`` (and the Laplace check).

    Parameters
    ----------
    model : {"pln", "nbln", "nbvcp", "lnm", "lnmvcp"}
    n_sims : int
        Number of simulations.
    settings : SBCSettings, optional
        Sizes and sampler settings (default :class:`SBCSettings`; lnm needs ``G >= 3``).
    seed : int
        Simulation ``i`` uses seed ``seed * 100_000 + i``.
    progress : callable, optional
        Called as ``progress(i, sim_result)`` after each simulation.
    time_budget_s : float, optional
        Start no new simulation after this much wall time (fewer than ``n_sims`` are
        then returned; ``len(result.ranks)`` says how many).

    Returns
    -------
    SBCResult

    Raises
    ------
    ValueError
        Unknown model, bad settings.
    """
    _check_model(model)
    settings = settings or SBCSettings()
    t0 = time.perf_counter()
    rank_rows, sim_rows, lap_rows = {}, [], []
    versions, stan_hash = {}, ""
    for i in range(n_sims):
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            break
        s = seed * 100_000 + i
        res = run_simulation(model, settings, s)
        versions, stan_hash = res["versions"], res["stan_hash"]
        rank_rows[s] = res["ranks"]
        row = {k: res[k] for k in ("seed", "n_rejected", "divergences", "treedepth_hits",
                                   "max_rhat", "min_ess_bulk", "nuts_time_s", "zero_cells",
                                   "zero_genes", "wall_time_s")}
        if "laplace" in res:
            lap = res["laplace"]
            row.update(laplace_cells=lap["cells_used"], laplace_genes=lap["genes_used"],
                       laplace_error=lap["error"], laplace_time_s=lap["time_s"])
            for latent, items in res["laplace_pit"].items():
                lap_rows += [(s, latent, c, g, p) for c, g, p in items]
        sim_rows.append(row)
        if progress is not None:
            progress(i, res)
    ranks = pd.DataFrame.from_dict(rank_rows, orient="index")
    ranks.index.name = "sim"
    return SBCResult(model=model, settings=settings, ranks=ranks,
                     sims=pd.DataFrame(sim_rows).set_index("seed", drop=False),
                     laplace_pit=pd.DataFrame(lap_rows, columns=PIT_COLUMNS),
                     wall_time_s=time.perf_counter() - t0, versions=versions,
                     stan_hash=stan_hash)


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def _facets(n, col_wrap, **kwargs):
    """A grid of small panels for ``n`` quantities, ``col_wrap`` per row: (fig, axes)."""
    import matplotlib.pyplot as plt

    ncol = min(col_wrap, n)
    nrow = int(np.ceil(n / ncol))
    return plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 1.8 * nrow), squeeze=False, **kwargs)


def plot_rank_histograms(ranks, L, *, flagged=(), bins=20, title=None, col_wrap=6):
    """Rank histograms relative to uniform, with each bin's pointwise 99 % range (matplotlib).

    Parameters
    ----------
    ranks : pandas.DataFrame, simulations x quantities, ranks in ``0 .. L``.
    L : int
    flagged : collection of str, quantities drawn in red.
    bins : int, histogram bins over ``0 .. L``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = list(ranks.columns)
    fig, axes = _facets(len(names), col_wrap)
    # integer bin edges: L + 1 rank values rarely split evenly, so heights are counts
    # divided by the expected count of each bin (1 = uniform)
    edges = np.unique(np.round(np.linspace(0, L + 1, bins + 1)).astype(int))
    width = np.diff(edges)
    for ax, name in zip(axes.flat, names):
        r = ranks[name].dropna().to_numpy()
        counts = np.histogram(r, bins=edges - 0.5)[0]
        expected = r.size * width / (L + 1)
        lo = stats.binom.ppf(0.005, r.size, width / (L + 1)) / expected
        hi = stats.binom.ppf(0.995, r.size, width / (L + 1)) / expected
        ax.fill_between(edges - 0.5, np.append(lo, lo[-1]), np.append(hi, hi[-1]),
                        step="post", color="0.85", lw=0)
        ax.axhline(1.0, color="0.5", lw=0.8)
        ax.bar(edges[:-1] - 0.5, counts / expected, width=width, align="edge",
               color="C3" if name in flagged else "C0")
        ax.set_title(name, fontsize=8, color="C3" if name in flagged else "black")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.remove()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_ecdf_differences(pit, *, prob=0.99, flagged=None, title=None, col_wrap=6):
    """ECDF-difference plots (ECDF minus uniform CDF) with the simultaneous band.

    The band is :func:`ecdf_band` (arviz_stats' implementation of Säilynoja et al.
    2022). Drawn with matplotlib: ``arviz_plots.plot_ecdf_pit(method="envelope")`` 1.3.2
    fails on a plain Dataset (it passes a DataArray to ``numpy.linspace``).

    Parameters
    ----------
    pit : pandas.DataFrame, simulations x quantities, PIT values in [0, 1].
    prob : float, simultaneous band probability.
    flagged : collection of str, optional
        Quantities drawn in red; default: those whose ECDF leaves the band.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from arviz_stats.ecdf_utils import compute_ecdf

    names = list(pit.columns)
    fig, axes = _facets(len(names), col_wrap, sharex=True, sharey=True)
    bands = {}
    for ax, name in zip(axes.flat, names):
        v = pit[name].dropna().to_numpy()
        if v.size < 2:
            ax.set_title(name, fontsize=8)
            continue
        if v.size not in bands:
            bands[v.size] = ecdf_band(v.size, prob)
        x, lower, upper = bands[v.size]
        diff = compute_ecdf(v, x) - x
        bad = (ecdf_band_test(v, bands[v.size])["flagged"] if flagged is None
               else name in flagged)
        ax.fill_between(x, lower - x, upper - x, step="post", color="0.85", lw=0)
        ax.axhline(0, color="0.5", lw=0.6)
        ax.step(x, diff, where="post", color="C3" if bad else "C0", lw=1)
        ax.set_title(name, fontsize=8, color="C3" if bad else "black")
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.remove()
    if title:
        fig.suptitle(f"{title} ({100 * prob:g} % simultaneous band)", fontsize=10)
    fig.tight_layout()
    return fig
