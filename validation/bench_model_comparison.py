"""Benchmark: PSIS-LOO model comparison and PPC figures on the bundled PBMC data.

Fits pln, nbvcp, nbln (cascade from the nbvcp fit, as recommended) and lnm / lnmvcp
(Laplace, rank K) on the same cells and genes, ranks them with
:func:`scribe_stan.compare_models` and prints JSON: the ELPD table (elpd, se,
elpd_diff, dse, p = plug-in correction), the Pareto-k summary of each model's
per-cell importance weights, fit wall times and the wall time of each model's LOO and
of the whole comparison. A PPC figure per model (level ``marginal``: fresh latents and
capture, the generative test) is saved as ``validation/out/ppc_<model>.png``.

    python validation/bench_model_comparison.py [--cells N] [--genes G] [--rank 10]
        [--draws 200] [--models pln nbln nbvcp lnm lnmvcp]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import warnings

import numpy as np

import scribe_stan as ss

OUT = pathlib.Path(__file__).resolve().parent / "out"


def pareto_k_summary(elpd):
    k = np.asarray(elpd.pareto_k)
    return {"good_k": round(elpd.good_k, 3), "k_max": float(k.max()),
            "k_median": float(np.median(k)), "frac_k_above_good_k": float(np.mean(k > elpd.good_k)),
            "n_k_above_0.7": int(np.sum(k > 0.7)), "n_k_above_1": int(np.sum(k > 1.0))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=None, help="first N cells (default all)")
    parser.add_argument("--genes", type=int, default=None,
                        help="highest-mean G genes (default all 2000)")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--draws", type=int, default=200, help="IS draws per cell")
    parser.add_argument("--ppc-draws", type=int, default=50)
    parser.add_argument("--models", nargs="+", default=["pln", "nbln", "nbvcp", "lnm"])
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)

    adata = ss.datasets.pbmc_donor_a()
    if args.cells is not None:
        adata = adata[:args.cells].copy()
    common = {"genes": args.genes, "progress": False}
    fits, fit_wall, failed = {}, {}, {}
    t0 = time.perf_counter()
    nbvcp = ss.fit(adata, model="nbvcp", **common)
    fit_wall["nbvcp"] = time.perf_counter() - t0
    for model in args.models:
        if model == "nbvcp":
            fits[model] = nbvcp
            continue
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                extra = {"informative_priors_from": nbvcp} if model == "nbln" else {}
                fits[model] = ss.fit(adata, model=model, rank=args.rank, **common, **extra)
        except Exception as exc:  # noqa: BLE001  (report and go on with the others)
            failed[model] = f"{type(exc).__name__}: {exc}"
            continue
        fit_wall[model] = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = ss.compare_models(fits, draws=args.draws, seed=0)
    compare_wall = time.perf_counter() - t0
    loos = table.attrs["loo"]

    ppc = {}
    for name, fit in fits.items():
        t0 = time.perf_counter()
        tree = ss.posterior_predictive(fit, level="marginal", draws=args.ppc_draws,
                                       genes=20, seed=0)
        fig = ss.plot_ppc(tree, genes=4, pairs=3)
        path = OUT / f"ppc_{name}.png"
        fig.savefig(path, dpi=80)
        ppc[name] = {"figure": str(path.relative_to(OUT.parent.parent)),
                     "wall_s": round(time.perf_counter() - t0, 2)}

    N, G = fits[next(iter(fits))].data.counts.shape
    result = {
        "data": "pbmc_donor_a", "cells": int(N), "genes": int(G), "rank": args.rank,
        "is_draws": args.draws, "nbln": "cascade from nbvcp (freeze r, eta)",
        "compare_wall_s": round(compare_wall, 2),
        "table": {name: {k: (None if not np.isfinite(v) else round(float(v), 3))
                         for k, v in row.items()
                         if k in ("rank", "elpd", "se", "elpd_diff", "dse", "p", "weight",
                                  "k_max", "frac_k_high", "n_globals", "wall_s")}
                  for name, row in table.iterrows()},
        "pareto_k": {name: pareto_k_summary(res) for name, res in loos.items()},
        "elpd_per_cell": {name: round(res.elpd / N, 3) for name, res in loos.items()},
        # how far importance sampling moved the Laplace value (nats per cell)
        "is_minus_laplace": {name: {"median_abs": float(np.median(np.abs(d))),
                                    "max_abs": float(np.max(np.abs(d))),
                                    "sum": float(np.sum(d))}
                             for name, ds in table.attrs["log_predictive"].items()
                             for d in [(ds["elpd"] - ds["laplace"]).values]},
        "fit_wall_s": {k: round(v, 2) for k, v in fit_wall.items()},
        "ppc": ppc, "failed": failed,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
