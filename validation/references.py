"""Reference posteriors: a small posteriordb of our own, keyed ``<data>-<model>``.

Each pair is a data recipe (GRN simulation or a PBMC subset) and a model; its NUTS
reference (full joint Stan program) is stored under ``validation/references/<pair>/``:

* ``reference.json``: provenance (data recipe, fit arguments, sampler settings, seed,
  Stan program and hash, versions, wall time) and diagnostics with pass/fail checks;
* ``summary.csv``: :func:`arviz_stats.summary` of every stored quantity over all draws;
* ``draws.nc``: the stored quantities thinned to ``THIN_DRAWS`` draws per chain
  (float32, NetCDF3), enough for interval coverage without re-sampling.

Data recipes (decisions): ``grn``: :func:`scribe_stan.grn.simulate_grn` with 100 cells,
12 genes, one regulator (rank 1), seed 2, edge probability 0.8 and strengths 0.8-1.5,
design library size 150 (mean counts per gene 1-50); the same network and latents for
every model, counts through that model's channel. Fitted with K = 1: with two
regulators at the default strengths the second program sat at noise level, was weakly
identified, and NUTS on pln with K = 2 failed (R-hat 1.29 on Sigma, bulk ESS 11; that
was with the earlier lower-triangular loadings, before W was left unconstrained).
``pbmc20``: the first 100 cells of :func:`scribe_stan.datasets.pbmc_donor_a` and their
20 highest-mean genes (library sizes over all 2000 genes feed the capture prior),
fitted with K = 2. nbvcp has no rank.

Checks (Vehtari et al. 2021, Bayesian Analysis 16:667, doi:10.1214/20-BA1221; Betancourt
2016, arXiv:1604.00695 for E-BFMI): rank-normalized split R-hat < 1.01, bulk and tail
ESS >= 100 per chain, no divergent transitions, E-BFMI > 0.2 in every chain. They run
over every stored quantity except the loadings (identified only up to rotation, so
their R-hat is meaningless). A failing pair is kept and reported as failing.

Sampler (:data:`SAMPLER`, :data:`SAMPLER_BY_MODEL`, :data:`SAMPLER_BY_PAIR`): NUTS with the adapted diagonal
metric (pystan offers no dense one), adapt_delta 0.95, seed 1, 4 chains; nbvcp
1000 warmup + 1000 draws, the other models 1000 + 3000: their slowest quantities
(Sigma and correlations of the PBMC genes with the smallest residual variance d) reach
about 40-90 bulk ESS per 1000 draws, too few for the 100-per-chain check at 500.

Parameterizations that made the chains mix (all in ``stan/functions/``):

* nbvcp samples its capture gauge (m and every eta_c shifted together) as one
  coordinate, ``eta_level`` (``nbvcp_capture_jacobian``): with one box-constrained eta
  per cell that ridge moved all cells at once and NUTS crossed it by a slow random walk
  (max R-hat 1.19 / 1.08 before, 1.004 after).
* pln and nbln sample the captured log-rates ``x - eta`` (which the counts see) with
  eta integrated out of its prior, and eta's quantile given them, whose posterior is
  exactly uniform (``capture.stanfunctions``). pbmc20-pln at 4 x (500 + 500): worst bulk
  ESS 23 (eta, R-hat 1.12) -> 77 (Sigma, R-hat 1.05), mu ESS 25 -> 346. Sampled as
  (innovations of x, eta), per cell only the priors split ``x_c - eta_c`` between x_c
  and eta_c, a ridge across every cell's coordinates.
* pln and nbln whiten ``x - eta`` by the exact posterior of an augmented Gaussian
  model in which each count is replaced by its working response and weight at a log
  rate blending ``log(u + 1/2)`` with the log-rate's prior (``capture_working_log_rate``,
  ``capture_whitened_latent_lp``): per cell and gene, non-centred where
  the counts say little against d and centred where they pin the log-rate; mu is
  sampled as its level plus sum-to-zero deviations, because the capture ridge (mu and
  every eta shifted together) is then one direction of mu. Before, non-centred
  innovations had to follow every move of the globals: SPEC's NUTS target (200 PBMC
  cells x 20 genes, K = 2, 4 x (1000 + 1000), Laplace starts) took 5099 s at tree depth
  9 with R-hat 1.057 on Sigma and 33 divergences; whitened, 529 s (cmdstanpy, two
  chains per core) at tree depth 6.2, R-hat 1.005 on Sigma and 1.006 over everything,
  min bulk / tail ESS 844 / 1117, no divergences, E-BFMI 0.94 (393 s with 500 warmup
  iterations). The four pln/nbln references, re-run with it, pass every check
  (sampling 113-523 s, against 349-6720 s). Expanded at ``log(u + 1/2)`` alone, a zero
  count of a near-silent gene got weight 1/2, far above its information, and SBC's
  prior-drawn genes diverged in 68 % of simulations; blended, the references pass as
  before (R-hat <= 1.003, no divergences) and SBC's pln divergences vanish. With warmup
  started from the Laplace fit's metric (``nuts.laplace_metric``) 300 warmup iterations
  suffice for SPEC's target: 237 s, R-hat 1.008 on Sigma (the references keep Stan's
  unit metric and 1000 warmup iterations).
* lnmvcp samples eta_c's quantile in a Gaussian approximation of its conditional
  given (m_T, r_T), which removes both the (m_T, eta) gauge and the funnel of eta's
  spread in r_T (pbmc20: r_T bulk ESS 24 -> 2141, eta 81 -> 2850 at 4 x 500).

Tried and dropped: the level of ``x - eta`` along ``(1, ..., 1)`` sampled centred so
that mu's common shift was one coordinate (superseded by the whitening); the nbvcp
coordinates in pln and nbln (they fixed mu but made Sigma, x and eta worse); centring
x or y everywhere (E-BFMI 0.10-0.11, a funnel with the small d of the PBMC genes);
W's rotation fixed by K pivot genes (the pivot block lower
triangular with a positive diagonal, the greedy QR pivots of the Laplace W, and the
Jacobian ``prod_i L_ii^(K-i)`` times vol O(K) that keeps Sigma's prior exactly):
SPEC's pln NUTS target (200 x 20, K = 2, Laplace starts) went from mean tree depth 8.98
to 8.50 with R-hat 1.08 on Sigma and 12 divergences, and grn-pln (K = 1) from R-hat
1.005 to 1.016, so the rotation is not what makes the trajectories long; nbln with
each gene's overdispersion ``t = expm1(d) + 1/r`` and latent share ``s = expm1(d) / t``
sampled instead of ``(d, log r)`` (priors unchanged, Jacobian ``-log1m(s) - log1p(s t)``,
parity test passed): grn-nbln from Laplace starts still failed, R-hat 1.026 (r), bulk /
tail ESS 130 / 280, 26 divergences (3 before), E-BFMI 0.18 (0.19 before), so the low
E-BFMI is not the curvature of the d-r ridge alone.
pbmc20-pln at 4 x (1000 + 7000) with adapt_delta 0.99 (5865 s of sampling): chain 2 of 4
stayed in a second mode (or a region it could not leave) for all 7000 draws, with mu
about 4.7 lower on every gene and one loadings column carrying that level (diagonal of
Sigma about 9 instead of 0.2), so R-hat 1.60 and bulk ESS 7 (the other three chains
agree with the stored 1000 + 3000 run). The stored run is kept; a run that samples this
posterior honestly would need starts checked against that mode (e.g. from the Laplace
fit) or more chains.

Regenerate (on 2 shared cores 0.3-12 minutes of sampling per pair; pbmc20-lnmvcp is the slowest)::

    python validation/references.py               # all pairs
    python validation/references.py grn-pln       # some pairs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import arviz_stats as azs
import numpy as np
import pandas as pd
import xarray as xr

import scribe_stan as ss
from scribe_stan import grn, nuts, stan

ROOT = Path(__file__).resolve().parent / "references"
DATA = ("grn", "pbmc20")
MODELS = ("pln", "nbln", "nbvcp", "lnm", "lnmvcp")
PAIRS = tuple(f"{d}-{m}" for d in DATA for m in MODELS)
GRN_RECIPE = {"n_cells": 100, "n_genes": 12, "rank": 1, "seed": 2, "lib_target": 150.0,
              "density": 0.8, "edge_range": (0.8, 1.5)}
PBMC_RECIPE = {"cells": 100, "genes": 20}
RANK = {"grn": 1, "pbmc20": 2}
SAMPLER = {"chains": 4, "draws": 3000, "warmup": 1000, "adapt_delta": 0.95, "seed": 1}
#: Per-model changes to :data:`SAMPLER`. nbvcp mixes well (bulk ESS > 1000 per 1000 draws
#: on every quantity), so 1000 draws pass every check. pln and nbln start every chain
#: from the Laplace fit (:func:`hmc_fit`): with Stan's random starts one pbmc20-pln chain
#: of a 4 x (1000 + 7000) run stayed in a second mode for all its draws.
SAMPLER_BY_MODEL = {"nbvcp": {"draws": 1000}, "pln": {"init": "laplace"},
                    "nbln": {"init": "laplace"}}
#: Per-pair changes, applied after :data:`SAMPLER_BY_MODEL` (none at present; see the
#: module docstring for the longer pbmc20-pln run that was tried).
SAMPLER_BY_PAIR = {}
THIN_DRAWS = 25  # per chain: 100 stored draws per element
#: Stored quantities (rotation-invariant or per-cell); W and its variants are left out.
STORED = ("mu", "d", "r", "m", "Sigma", "corr", "x", "eta", "mu_clr", "Sigma_clr",
          "corr_clr", "y", "m_T", "r_T")
CHECKS = {"max_rhat": 1.01, "min_ess_bulk_per_chain": 100, "min_ess_tail_per_chain": 100,
          "divergences": 0, "min_ebfmi": 0.2}


def sampler_settings(pair):
    """:data:`SAMPLER` with the changes of :data:`SAMPLER_BY_MODEL` and
    :data:`SAMPLER_BY_PAIR` for ``pair``."""
    _, model = check_pair(pair)
    return SAMPLER | SAMPLER_BY_MODEL.get(model, {}) | SAMPLER_BY_PAIR.get(pair, {})


def check_pair(pair):
    """Split ``"<data>-<model>"``; raise ``ValueError`` listing :data:`PAIRS` if unknown."""
    if pair not in PAIRS:
        raise ValueError(f"unknown reference pair {pair!r}; allowed: {', '.join(PAIRS)}")
    return tuple(pair.split("-"))


def load_data(pair):
    """AnnData and fit arguments of a pair (same for Laplace and NUTS).

    Returns
    -------
    adata : anndata.AnnData
    fit_args : dict
        ``model``, ``rank``, ``genes`` and ``library_size`` for :func:`scribe_stan.fit`.
    recipe : dict
        JSON-able description of the data.
    truth : dict or None
        The GRN truth (:func:`scribe_stan.grn.simulate_grn`), None for PBMC.
    """
    data, model = check_pair(pair)
    if data == "grn":
        r = GRN_RECIPE
        adata, truth = grn.simulate_grn(r["n_cells"], r["n_genes"], model=model,
                                        **{k: v for k, v in r.items()
                                           if k not in ("n_cells", "n_genes")})
        args = {"library_size": adata.obs["library_size"].to_numpy(), "genes": None}
        recipe = {"generator": "scribe_stan.grn.simulate_grn", "model": model, **r}
    else:
        adata = ss.datasets.pbmc_donor_a()[: PBMC_RECIPE["cells"]].copy()
        truth = None
        args = {"library_size": None, "genes": PBMC_RECIPE["genes"]}
        recipe = {"source": "scribe_stan.datasets.pbmc_donor_a", **PBMC_RECIPE,
                  "subset": "first cells; highest-mean genes among them; library sizes "
                            "over all genes"}
    return adata, {"model": model, "rank": RANK[data], **args}, recipe, truth


def diagnostics(tree):
    """ArviZ diagnostics of an HMC tree and their pass/fail against :data:`CHECKS`.

    Parameters
    ----------
    tree : xarray.DataTree
        HMC tree with ``posterior`` and ``sample_stats`` (``diverging``, ``energy``).

    Returns
    -------
    dict
        ``max_rhat``, ``min_ess_bulk``, ``min_ess_tail`` (over every element of the
        :data:`STORED` quantities present; constant elements such as the unit diagonal
        of ``corr`` are ignored), ``worst_rhat`` (the quantity holding the max),
        ``divergences``, ``min_ebfmi`` (over chains), ``checks`` (name -> bool) and
        ``passed``.
    """
    names = [v for v in STORED if v in tree["posterior"].data_vars]
    chains = tree["posterior"].sizes["chain"]

    def extreme(ds, fn):
        vals = {k: np.asarray(v.values, float).ravel() for k, v in ds.data_vars.items()}
        return {k: float(fn(v)) for k, v in vals.items() if np.isfinite(v).any()}

    rhat = extreme(_dataset(azs.rhat(tree, var_names=names)), np.nanmax)
    ess_b = extreme(_dataset(azs.ess(tree, var_names=names, method="bulk")), np.nanmin)
    ess_t = extreme(_dataset(azs.ess(tree, var_names=names, method="tail")), np.nanmin)
    out = {"max_rhat": max(rhat.values()), "worst_rhat": max(rhat, key=rhat.get),
           "min_ess_bulk": min(ess_b.values()), "min_ess_tail": min(ess_t.values()),
           "divergences": int(tree["sample_stats"]["diverging"].values.sum()),
           "min_ebfmi": float(np.min(_dataset(azs.bfmi(tree))["energy"].values))}
    out["checks"] = {
        "rhat_lt_1.01": out["max_rhat"] < CHECKS["max_rhat"],
        "ess_bulk_ge_100_per_chain": out["min_ess_bulk"] >= CHECKS["min_ess_bulk_per_chain"] * chains,
        "ess_tail_ge_100_per_chain": out["min_ess_tail"] >= CHECKS["min_ess_tail_per_chain"] * chains,
        "no_divergences": out["divergences"] == CHECKS["divergences"],
        "ebfmi_gt_0.2": out["min_ebfmi"] > CHECKS["min_ebfmi"]}
    split = nuts.chain_split(tree)
    out["chain_split"] = split
    out["checks"]["no_chain_split"] = not split["split"]
    out["passed"] = all(out["checks"].values())
    return out


def hmc_fit(adata, fit_args, sampler):
    """NUTS on the full-joint program of a pair, with the starts ``sampler`` asks for.

    ``sampler`` holds :func:`scribe_stan.stan.sample` settings (``chains``, ``draws``,
    ``warmup``, ``adapt_delta``, ``seed``; optionally ``backend``, ``metric``) and
    ``init``: ``"random"`` (Stan's uniform(-2, 2) on the
    unconstrained scale, through :func:`scribe_stan.fit`) or ``"laplace"`` (pln, nbln:
    each chain starts at the Laplace MAP of the globals and its own draw of every
    cell's Laplace Gaussian, :func:`scribe_stan.nuts.laplace_inits`).

    Returns
    -------
    fit : scribe_stan.fits.HmcFit (``settings["init"]`` records Laplace starts)
    extra : dict
        ``laplace_wall_s`` (the Laplace fit that made the starts) when ``init`` is
        ``"laplace"``.
    """
    sampler = dict(sampler)
    init = sampler.pop("init", "random")
    if init == "random":
        return ss.fit(adata, method="hmc", progress=False, **fit_args, **sampler), {}
    if init != "laplace":
        raise ValueError(f"unknown init {init!r}; allowed: random, laplace")
    t0 = time.perf_counter()
    lap = ss.fit(adata, method="laplace", progress=False, **fit_args)
    extra = {"laplace_wall_s": time.perf_counter() - t0}
    return ss.fit(adata, method="hmc", progress=False, init_from=lap, **fit_args,
                  **sampler), extra


def summary_table(tree, names):
    """:func:`arviz_stats.summary` of each quantity in ``names``, concatenated.

    One call per variable: arviz-stats 1.3.3 mislabels the elements of a multi-variable
    summary when variables share a dim in different positions (e.g. ``x (cell, gene)``
    beside ``Sigma (gene, gene_2)``: ``x[c0, g1]`` got the value of ``x[c1, g0]``).
    """
    return pd.concat([azs.summary(tree, var_names=[v]) for v in names])


def _dataset(obj):
    return obj.to_dataset() if hasattr(obj, "to_dataset") else obj


def run(pair, root=ROOT):
    """Run the NUTS reference of ``pair`` and store it under ``root/<pair>/``.

    Returns
    -------
    dict
        The provenance and diagnostics written to ``reference.json``.
    """
    adata, fit_args, recipe, _ = load_data(pair)
    t0 = time.perf_counter()
    sampler = sampler_settings(pair)
    fit, extra = hmc_fit(adata, fit_args, sampler)
    total = time.perf_counter() - t0
    tree = fit.to_datatree()
    diag = diagnostics(tree)
    post = tree["posterior"].to_dataset()
    names = [v for v in STORED if v in post.data_vars]
    out = root / pair
    out.mkdir(parents=True, exist_ok=True)
    summary_table(tree, names).to_csv(out / "summary.csv")
    step = max(1, post.sizes["draw"] // THIN_DRAWS)
    thin = post[names].isel(draw=slice(step - 1, None, step)).astype("float32")
    thin.attrs = {}
    thin.to_netcdf(out / "draws.nc", engine="scipy")
    draws = fit.draws
    record = {
        "pair": pair, "data": recipe,
        "fit_args": {k: v for k, v in fit_args.items() if k != "library_size"}
        | {"library_size": "design value from the recipe" if recipe.get("lib_target")
           else "all genes of the cell"},
        "program": draws.program, "stan_hash": draws.stan_hash,
        "stan_hash_current": stan.program_hash(draws.program), "backend": draws.backend,
        "sampler": {**draws.config, "seed": draws.seed,
                    "init": sampler.get("init", "random")},
        "versions": draws.versions,
        "sampling_wall_s": draws.wall_time_s, "total_wall_s": total, **extra,
        "stored": {"summary": "summary.csv (all draws)",
                   "draws": f"draws.nc ({thin.sizes['draw']} draws per chain, float32)",
                   "quantities": names},
        "diagnostics": diag,
    }
    (out / "reference.json").write_text(json.dumps(record, indent=1, default=_json))
    return record


def _json(obj):
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(type(obj).__name__)


def load(pair, root=ROOT):
    """Stored reference of ``pair``: (record dict, summary DataFrame, thinned Dataset).

    Raises
    ------
    FileNotFoundError
        The reference was never generated (the message names the command).
    """
    check_pair(pair)
    path = Path(root) / pair
    if not (path / "reference.json").exists():
        raise FileNotFoundError(f"no stored reference for {pair!r} under {path}; run "
                                f"`python validation/references.py {pair}`")
    record = json.loads((path / "reference.json").read_text())
    summary = pd.read_csv(path / "summary.csv", index_col=0)
    with xr.open_dataset(path / "draws.nc", engine="scipy") as ds:
        draws = ds.load()
    return record, summary, draws


def main(argv=None):
    parser = argparse.ArgumentParser(description="Run and store NUTS reference posteriors.")
    parser.add_argument("pairs", nargs="*", default=list(PAIRS), help=f"any of {PAIRS}")
    parser.add_argument("--root", default=str(ROOT),
                        help="where to store the references (default validation/references)")
    args = parser.parse_args(argv)
    for pair in args.pairs:
        check_pair(pair)
    for pair in args.pairs:
        rec = run(pair, root=Path(args.root))
        d = rec["diagnostics"]
        print(f"{pair}: {'PASS' if d['passed'] else 'FAIL'} rhat {d['max_rhat']:.3f} "
              f"({d['worst_rhat']}) ess {d['min_ess_bulk']:.0f}/{d['min_ess_tail']:.0f} "
              f"div {d['divergences']} ebfmi {d['min_ebfmi']:.2f} "
              f"{rec['sampling_wall_s']:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
