"""Posterior predictive replicated counts at five levels, for Laplace and HMC fits.

Levels (from the fit's own noise to a fully generative test):

``map``
    Latents at their per-cell modes, observation noise only (Laplace fits).
``laplace``
    Latents drawn from each cell's Laplace Gaussian, then observation noise. For
    pln/nbln the log-rates are drawn from the Gaussian *conditional on eta at its mode*
    (covariance ``A^{-1}``, the x-block of the negative Hessian inverted), which leaves
    out the spread along the flat capture direction ``(x + a, eta + a)``; lnmvcp holds
    eta at its mode as well. nbvcp's only latent is eta, with no flat direction (its
    mean expression is global), so its eta is drawn from its 1-D Gaussian truncated at
    0. For an HMC fit this level is the exact per-cell posterior predictive that the
    Laplace level approximates (the Stan program's ``y_rep``).
``per_cell``
    Fresh latents from the fitted population (``x ~ N(mu, Sigma)``, ``y ~ N(mu_alr,
    Sigma_alr)``), each cell's capture at its posterior mode (HMC: its posterior draw).
    Models with a latent besides eta and a per-cell capture: pln, nbln, lnmvcp.
``library_anchored``
    Fresh latents, totals from the data. lnm/lnmvcp: the multinomial total is the
    observed library size over the fitted genes. pln/nbln/nbvcp: the capture of each
    cell is set so that its expected library size equals the observed one,
    ``eta_c = log sum_g E[exp(x_g)] - log L_c`` with ``E[exp(x_g)] = exp(mu_g +
    Sigma_gg / 2)`` (nbvcp: ``exp(m_g)``).
``marginal``
    Fresh latents and fresh capture ``eta_c ~ Normal(log M0 - log L_c, sigma_M)``
    truncated at 0 (lnm: totals from its NB): the honest generative test of the model.

Globals are the point estimates (Laplace), or, for HMC, ``draws`` posterior draws thinned
evenly over the chains. A Laplace fit with ``globals="laplace"`` draws one set of globals
per replicated data set from their Laplace Gaussian (the fit's ``globals_posterior()``),
used at every level but ``map`` (refused): at level ``laplace`` each cell's latents are
then drawn from its Laplace Gaussian *at those globals* (nested draws: pln/nbln ``(x,
eta)`` jointly, nbvcp eta, lnm y and lnmvcp ``(y, eta)``, lnm totals from the drawn
``(m_T, r_T)``), at the population levels the fresh latents come from the drawn
population (lnm's ``low_rank`` mode: ``y = mu + W z``, no residual ``d``, as with point
globals), and at ``per_cell`` the capture stays at its mode at the MAP.

Observation noise is Poisson (pln), NegBinomial2 as a gamma-Poisson draw (nbln, nbvcp,
lnm totals) and multinomial (lnm composition; drawn for a gene subset by sequential
conditional binomials, which gives the exact marginal of those genes without forming the
other genes' counts).
"""

from __future__ import annotations

import numpy as np
from scipy import special, stats

from scribe_stan import _validate, convert
from scribe_stan.fits.base import Fit, fitted_gene_index
from scribe_stan.models import lnm as lnm_model
from scribe_stan.models import pln

LEVELS = ("map", "laplace", "marginal", "library_anchored", "per_cell")
_MAX_ELEMENTS = 2 * 10**8  # draws * cells * genes of one replicated-counts array
_LOG_MEAN_MAX = 20.7  # exp(20.7) ~ 1e9: keeps Poisson/NB draws finite
_BLOCK = 3 * 10**7  # Gaussian variates per block (lnm latents over all genes)


# ----------------------------------------------------------------------------- noise


def _observe(rng, log_mean, r=None):
    """Poisson (``r=None``) or NegBinomial2(exp(log_mean), r) counts, int64."""
    mean = np.exp(np.minimum(log_mean, _LOG_MEAN_MAX))
    if r is None:
        return rng.poisson(mean)
    return rng.poisson(rng.gamma(r, mean / r))


def _multinomial_subset(rng, totals, log_rho, idx):
    """Counts of genes ``idx`` from Multinomial(totals, exp(log_rho)), exactly marginal.

    ``log_rho`` (..., G) log proportions; ``totals`` (...) integers. Sequential
    conditional binomials over ``idx`` only.
    """
    left = np.asarray(totals, dtype=np.int64).copy()
    mass = np.ones(left.shape)
    out = np.empty(left.shape + (idx.size,), np.int64)
    for j, g in enumerate(idx):
        p = np.exp(log_rho[..., g])
        q = np.clip(p / np.maximum(mass, 1e-300), 0.0, 1.0)
        out[..., j] = rng.binomial(left, q)
        left -= out[..., j]
        mass = np.maximum(mass - p, 0.0)
    return out


def _population_gaussian(rng, mu, W, d, n_cells, draws):
    """Fresh ``mu + W z + sqrt(d) e`` (draws, N, G); globals (S, G), (S, G, K), (S, G)
    with S = draws or 1 (one set of globals for every draw)."""
    z = rng.standard_normal((draws, n_cells, W.shape[-1]))
    W = np.broadcast_to(W, (draws,) + W.shape[1:])
    return (mu[:, None, :] + np.einsum("snk,sgk->sng", z, W)
            + np.sqrt(d)[:, None, :] * rng.standard_normal((draws, n_cells, mu.shape[-1])))


def _capture_prior_draws(rng, a, sigma_M, draws):
    """eta from its prior TruncNormal(a_c, sigma_M) on [0, inf), shape (draws, N)."""
    return stats.truncnorm.rvs(-a / sigma_M, np.inf, loc=a, scale=sigma_M,
                               size=(draws, a.size), random_state=rng)


def _anchored_eta(log_mean_rates, totals):
    """Capture with expected library size = observed: ``log sum exp(log_mean) - log L``.

    ``log_mean_rates`` (S, G) log E[exp(x_g)]; totals (N,) -> (S, N) (floored at 0 for
    an all-zero cell, which has no total to anchor to).
    """
    return (special.logsumexp(log_mean_rates, axis=-1)[:, None]
            - np.log(np.maximum(totals, 1.0))[None, :])


# ----------------------------------------------------------------------------- globals


def _thin(arr, draws):
    """(chain, draw, ...) -> (draws, ...) evenly thinned over all chains and draws."""
    flat = np.asarray(arr).reshape((-1,) + np.shape(arr)[2:])
    take = np.linspace(0, flat.shape[0] - 1, draws).round().astype(int)
    return flat[take]


def _fit_kind(fit):
    """("laplace" | "hmc", family) with family in {"lognormal", "nbvcp", "lnm"}."""
    from scribe_stan import specs

    if not isinstance(fit, Fit):
        raise TypeError(f"posterior_predictive takes a fit from scribe_stan.fit; got "
                        f"{type(fit).__name__}")
    if fit.method == "hmc" and fit.program != fit.model:
        raise ValueError(f"posterior_predictive needs a full-joint HMC fit (globals "
                         f"sampled); got program {fit.program!r}. Use the Laplace fit "
                         "it was conditioned on instead.")
    return fit.method, specs.get(fit.model).family


def _globals(fit, solver, family, draws, globals_="point", rng=None, level=None, idx=None):
    """Globals with a leading draw axis: 1 for Laplace at the MAP, ``draws`` for HMC and
    for Laplace with ``globals_="laplace"`` (:func:`_drawn_globals`)."""
    if solver == "laplace" and globals_ == "laplace":
        return _drawn_globals(fit, family, level, draws, rng, idx)
    if solver == "laplace":
        one = lambda v: None if v is None else np.asarray(v, float)[None]  # noqa: E731
        if family == "lognormal":
            return {"mu": one(fit.mu), "W": one(fit.W), "d": one(fit.d), "r": one(fit.r)}
        if family == "nbvcp":
            return {"m": one(fit.m), "r": one(fit.r)}
        return {"mu": one(fit.mu_alr), "W": one(fit.W_alr), "d": one(fit.d_alr),
                "m_T": np.array([fit.m_T]), "r_T": np.array([fit.r_T])}
    post = fit.draws.posterior
    keys = {"lognormal": ("mu", "W", "d"), "nbvcp": ("m",),
            "lnm": ("mu_alr", "W_alr", "d_alr", "m_T", "r_T")}[family]
    out = {k.removesuffix("_alr"): _thin(post[k], draws) for k in keys}
    if family != "lnm":
        out["r"] = (_thin(post["r"], draws) if "r" in post
                    else _thin(np.exp(post["log_r"]), draws) if "log_r" in post else None)
    out["eta"] = _thin(post["eta"], draws) if "eta" in post else None
    return out


def _drawn_globals(fit, family, level, draws, rng, idx):
    """``draws`` sets of globals from the Laplace fit's Gaussian (``globals_posterior()``).

    Level ``laplace``: nested draws, each cell's latents drawn at each set of globals and
    kept under ``"nested"`` (pln/nbln: ``x`` of the genes ``idx`` and ``eta``; nbvcp:
    ``eta``). lnm/lnmvcp draw theirs with the latents block by block in
    :func:`_replicate_lnm` (``{"nested": None}`` here): ``y`` spans every gene. Other
    levels: the globals alone (no per-cell work). lnm's low-rank mode has no ``d``:
    zeros, the population ``y = mu + W z`` of that mode, as with point globals.
    """
    nested = None
    if level == "laplace":
        if family == "lnm":
            return {"nested": None}
        post = fit.globals_posterior()
        if family == "lognormal":
            from scribe_stan.laplace.nested import nested_draws

            nested = smp = nested_draws(fit.solution, post, draws, rng, genes=idx)
        else:
            from scribe_stan.laplace.nbvcp_nested import nested_draws

            nested = smp = nested_draws(fit.solution, post, draws, rng)
    else:
        smp = fit._draw_globals(draws, rng)
    if family == "nbvcp":
        glob = {"m": smp["m"], "r": np.exp(smp["log_r"])}
    elif family == "lognormal":
        glob = {"mu": smp["mu"], "W": smp["W"], "d": smp["d"],
                "r": None if smp["log_r"] is None else np.exp(smp["log_r"])}
    else:
        glob = {"mu": smp["mu"], "W": smp["W"],
                "d": np.zeros_like(smp["mu"]) if smp["d"] is None else smp["d"],
                "m_T": np.exp(smp["log_m_T"]), "r_T": np.exp(smp["log_r_T"])}
    if nested is not None:
        glob["nested"] = nested
    return glob


def _eta_mode(fit, solver, family, glob, draws):
    """Per-cell capture at its mode (Laplace) or posterior draw (HMC), (S, N); or None."""
    if solver == "hmc":
        return glob["eta"]
    if family == "lnm":
        return None if fit.eta_hat is None else fit.eta_hat[None]
    return fit.eta_hat[None]


# ----------------------------------------------------------------------------- levels


def _check_level(level, solver, family, model):
    _validate.check_choice("level", level, LEVELS)
    if level == "map" and solver == "hmc":
        raise ValueError("level='map' needs point estimates; an HMC fit has posterior draws. "
                         "Use level='laplace' (the per-cell posterior predictive) or a "
                         f"population level; allowed for HMC: {LEVELS[1:]}")
    if level == "per_cell" and family == "nbvcp":
        raise ValueError("level='per_cell' does not apply to nbvcp: its only latent is eta, "
                         "so fresh latents at the fitted capture are level 'map' (Laplace) "
                         "or 'laplace' (HMC)")
    if level == "per_cell" and model == "lnm":
        raise ValueError("level='per_cell' does not apply to lnm: it has no per-cell capture "
                         "(fresh latents with its total model are level 'marginal'); "
                         "lnmvcp has one")


def _lognormal_laplace_x(fit, idx, draws, rng):
    """x (draws, N, Gs) from each cell's Gaussian conditional on eta at its mode.

    ``A^{-1} = diag(1/B) + (h W) M^{-1} (h W)'`` (Woodbury; see
    :mod:`scribe_stan.laplace.cpu`), so ``x_hat + eps / sqrt(B) + h (W L_M^{-T} xi)``
    has covariance ``A^{-1}`` on any gene subset.
    """
    v = fit.x_hat - fit.eta_hat[:, None]
    m = np.exp(np.minimum(v, _LOG_MEAN_MAX))
    u = fit.data.counts
    if fit.r is None:
        lam = m
    else:
        phi = 1.0 / fit.r
        lam = m * (1.0 + phi * u) / (1.0 + phi * m) ** 2
    W, d = fit.W, fit.d
    h = 1.0 / (1.0 + lam * d)
    inv_B = d * h
    K = W.shape[1]
    M = ((lam * h) @ (W[:, :, None] * W[:, None, :]).reshape(-1, K * K)).reshape(-1, K, K)
    L = np.linalg.cholesky(M + np.eye(K))
    N = u.shape[0]
    xi = rng.standard_normal((N, K, draws))
    t = np.linalg.solve(np.swapaxes(L, 1, 2), xi)  # L^{-T} xi, (N, K, draws)
    low = np.einsum("gk,nks->sng", W[idx], t) * h[None][..., idx]
    eps = rng.standard_normal((draws, N, idx.size)) * np.sqrt(inv_B[:, idx])[None]
    return fit.x_hat[None][..., idx] + eps + low


def _replicate_lognormal(fit, solver, level, glob, idx, draws, rng):
    """(draws, N, Gs) replicated counts and (draws, N) capture used, pln / nbln."""
    N = len(fit.obs_names)
    r = None if glob["r"] is None else glob["r"][:, None, idx]
    if solver == "hmc" and level == "laplace":
        return _thin(fit.draws.posterior["y_rep"], draws)[..., idx], glob["eta"]
    if level == "map":
        eta = np.broadcast_to(fit.eta_hat, (draws, N))
        return _observe(rng, np.broadcast_to((fit.x_hat - fit.eta_hat[:, None])[:, idx],
                                             (draws, N, idx.size)), r), eta
    if level == "laplace" and "nested" in glob:  # (x, eta) drawn jointly at each global draw
        x, eta = glob["nested"]["x"], glob["nested"]["eta"]  # x of the genes idx
        return _observe(rng, x - eta[..., None], r), eta
    if level == "laplace":
        eta = np.broadcast_to(fit.eta_hat, (draws, N))
        x = _lognormal_laplace_x(fit, idx, draws, rng)
        return _observe(rng, x - fit.eta_hat[None, :, None], r), eta
    x = _population_gaussian(rng, glob["mu"][:, idx], glob["W"][:, idx], glob["d"][:, idx],
                             N, draws)
    if level == "per_cell":
        eta = np.broadcast_to(_eta_mode(fit, solver, "lognormal", glob, draws), (draws, N))
    elif level == "library_anchored":
        log_mean = glob["mu"] + 0.5 * (np.sum(glob["W"] ** 2, axis=-1) + glob["d"])
        eta = np.broadcast_to(_anchored_eta(log_mean, fit.data.counts.sum(axis=1)),
                              (draws, N))
    else:
        eta = _capture_prior_draws(rng, pln.capture_prior_mean(fit.data.log_lib,
                                                               fit.data.log_M0),
                                   fit.data.sigma_M, draws)
    return _observe(rng, x - eta[..., None], r), eta


def _replicate_nbvcp(fit, solver, level, glob, idx, draws, rng):
    """(draws, N, Gs) replicated counts and (draws, N) capture used, nbvcp."""
    N = len(fit.obs_names)
    if solver == "hmc" and level == "laplace":
        return _thin(fit.draws.posterior["y_rep"], draws)[..., idx], glob["eta"]
    if level == "map":
        eta = np.broadcast_to(fit.eta_hat, (draws, N))
    elif level == "laplace" and "nested" in glob:  # eta drawn at each global draw
        eta = glob["nested"]["eta"]
    elif level == "laplace":
        mean, sd = fit.eta_hat, fit.eta_sd
        eta = stats.truncnorm.rvs(-mean / sd, np.inf, loc=mean, scale=sd, size=(draws, N),
                                  random_state=rng)
    elif level == "library_anchored":
        eta = np.broadcast_to(_anchored_eta(glob["m"], fit.data.counts.sum(axis=1)),
                              (draws, N))
    else:
        eta = _capture_prior_draws(rng, pln.capture_prior_mean(fit.data.log_lib,
                                                               fit.data.log_M0),
                                   fit.data.sigma_M, draws)
    m = np.broadcast_to(glob["m"][:, None, idx], (draws, N, idx.size))
    r = np.broadcast_to(glob["r"][:, None, idx], (draws, N, idx.size))
    return _observe(rng, m - eta[..., None], r), eta


def _lnm_latents(fit, solver, level, glob, draws, rng, start, stop):
    """ALR latents y (stop - start, N, D) for draws ``start:stop``."""
    N = len(fit.obs_names)
    S = stop - start
    if level == "map":
        return np.broadcast_to(fit.y_hat, (S, N, fit.y_hat.shape[1]))
    if level == "laplace":
        return fit.composition.problem.sample(fit.mu_alr, fit.W_alr, fit.composition.d, S,
                                              rng)["y"]
    sl = slice(start, stop) if glob["mu"].shape[0] > 1 else slice(0, 1)
    return _population_gaussian(rng, glob["mu"][sl], glob["W"][sl], glob["d"][sl], N, S)


def _lnm_totals(fit, solver, level, glob, draws, rng):
    """(draws, N) totals and (draws, N) capture (zeros for lnm)."""
    N = len(fit.obs_names)
    observed = fit.data.counts.sum(axis=1)
    if level == "library_anchored":
        return np.broadcast_to(observed, (draws, N)), np.zeros((draws, N))
    if fit.model == "lnm":
        eta = np.zeros((draws, N))
    elif level == "marginal":
        eta = _capture_prior_draws(rng, pln.capture_prior_mean(fit.data.log_lib,
                                                               fit.data.log_M0),
                                   fit.data.sigma_M, draws)
    else:
        eta = np.broadcast_to(_eta_mode(fit, solver, "lnm", glob, draws), (draws, N))
    log_mean = np.log(glob["m_T"])[:, None] - eta
    r_T = glob["r_T"][:, None]
    return _observe(rng, log_mean, r_T), eta


def _log_rho(y, ref):
    """Log proportions (..., G) of ALR latents y (..., G - 1)."""
    lg = lnm_model.logits(y, ref)
    return lg - special.logsumexp(lg, axis=-1, keepdims=True)


def _lnm_nested_block(fit, n, idx, rng):
    """(n, N, Gs) counts and (n, N) capture from n nested draws: the globals, each
    cell's y (and eta, lnmvcp) at them, then totals from the drawn ``(m_T, r_T)``."""
    from scribe_stan.laplace.lnm_globals import nested_draws

    smp = nested_draws(fit.composition, fit.totals, fit.globals_posterior(), n, rng)
    eta = np.zeros(smp["y"].shape[:2]) if smp["eta"] is None else smp["eta"]
    totals = _observe(rng, smp["log_m_T"][:, None] - eta, np.exp(smp["log_r_T"])[:, None])
    return _multinomial_subset(rng, totals, _log_rho(smp["y"], fit.ref), idx), eta


def _replicate_lnm(fit, solver, level, glob, idx, draws, rng):
    """(draws, N, Gs) replicated counts and (draws, N) capture used, lnm / lnmvcp."""
    if solver == "hmc" and level == "laplace":
        eta = glob["eta"] if glob["eta"] is not None else np.zeros((draws, len(fit.obs_names)))
        return _thin(fit.draws.posterior["y_rep"], draws)[..., idx], eta
    N, G = fit.data.counts.shape
    block = max(1, min(draws, _BLOCK // (N * G)))
    if "nested" in glob:  # latents over all genes: drawn with their globals per block
        parts = [_lnm_nested_block(fit, min(block, draws - start), idx, rng)
                 for start in range(0, draws, block)]
        return (np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]))
    totals, eta = _lnm_totals(fit, solver, level, glob, draws, rng)
    out = np.empty((draws, N, idx.size), np.int64)
    for start in range(0, draws, block):
        stop = min(draws, start + block)
        y = _lnm_latents(fit, solver, level, glob, draws, rng, start, stop)
        out[start:stop] = _multinomial_subset(rng, totals[start:stop],
                                              _log_rho(y, fit.ref), idx)
    return out, eta


def posterior_predictive(fit, *, level="marginal", draws=100, genes=None, seed=0,
                         globals="point"):
    """Replicated counts of a fit at one predictive level, as an ArviZ DataTree.

    Parameters
    ----------
    fit : LaplaceFit, NbvcpFit, LnmLaplaceFit, HmcFit or LnmHmcFit
        From :func:`scribe_stan.fit` (HMC: the full-joint program).
    level : {"map", "laplace", "marginal", "library_anchored", "per_cell"}
        See the module docs. HMC fits have no ``map``; ``per_cell`` does not apply to
        nbvcp and lnm.
    draws : int >= 1
        Replicated data sets (HMC: posterior draws, thinned evenly).
    genes : None, int or list of str
        Genes whose counts are replicated: all fitted genes (default), the ``n``
        highest-mean ones, or those names. Totals and captures always involve all
        fitted genes.
    seed : int
    globals : {"point", "laplace"}
        Laplace fits: globals at the MAP (default) or drawn from their Laplace Gaussian
        (the fit's ``globals_posterior()``, built once per fit), one set per replicated
        data set (see the module docs); at level ``laplace`` each cell's latents are
        then drawn from its Gaussian at those globals (nested draws: one Newton step
        per cell from its MAP mode for pln/nbln/lnm's y, a converged 1-D Newton for
        eta), and level ``map`` is refused. HMC fits take only "point" (their globals
        are posterior draws).

    Returns
    -------
    xarray.DataTree
        ``posterior_predictive["counts"]`` (chain=1, draw, cell, gene) int64,
        ``observed_data["counts"]`` (cell, gene), ``posterior["eta"]`` (chain, draw,
        cell), the capture loss used (zeros for lnm), attrs ``level``, ``model``,
        ``solver``, ``seed``, ``draws``. ArviZ's PPC plots
        (:func:`arviz_plots.plot_ppc_dist`) apply directly.

    Raises
    ------
    ValueError
        Unknown level (the message lists the allowed ones), a level that does not
        apply to the model or fit type, ``draws < 1``, unknown genes,
        ``draws * cells * genes`` above 2e8, or ``globals="laplace"`` for an HMC fit
        or at level ``map``.
    TypeError
        Not a fit from :func:`scribe_stan.fit`.
    """
    solver, family = _fit_kind(fit)
    _check_level(level, solver, family, fit.model)
    if not isinstance(draws, (int, np.integer)) or isinstance(draws, bool) or draws < 1:
        raise ValueError(f"draws must be a positive integer; got {draws!r}")
    idx = fitted_gene_index(fit, genes)
    N = len(fit.obs_names)
    if draws * N * idx.size > _MAX_ELEMENTS:
        raise ValueError(f"draws*cells*genes = {draws}*{N}*{idx.size} exceeds "
                         f"{_MAX_ELEMENTS:.0e}; pass genes=<int or names> or fewer draws.")
    _validate.check_choice("globals", globals, ("point", "laplace"))
    if globals == "laplace" and not (solver == "laplace" and level != "map"):
        raise ValueError("globals='laplace' applies to Laplace fits (method='laplace') at "
                         f"levels {LEVELS[1:]}; got a {solver} {fit.model} fit at level "
                         f"{level!r}; allowed here: globals='point'"
                         + (" (an HMC fit's globals are its posterior draws)"
                            if solver == "hmc" else ""))
    rng = np.random.default_rng(seed)
    glob = _globals(fit, solver, family, int(draws), globals, rng, level, idx)
    replicate = {"lognormal": _replicate_lognormal, "nbvcp": _replicate_nbvcp,
                 "lnm": _replicate_lnm}[family]
    counts, eta = replicate(fit, solver, level, glob, idx, int(draws), rng)
    return convert.build_datatree(
        posterior={"eta": np.asarray(eta, float)[None]},
        posterior_predictive={"counts": np.asarray(counts, np.int64)[None]},
        observed_data={"counts": fit.data.counts[:, idx]},
        cell_names=fit.obs_names, gene_names=fit.var_names[idx], n_factors=0,
        attrs={"level": level, "model": fit.model, "solver": solver, "seed": int(seed),
               "draws": int(draws), "globals": globals})
