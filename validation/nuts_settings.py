"""Experiment: NUTS on one reference pair with chosen starts, metric and warmup.

Runs the full-joint program of a pln/nbln pair (:mod:`validation.references` data
recipes) and prints JSON: wall times, the reference checks
(:func:`references.diagnostics`), the chain-split check
(:func:`scribe_stan.nuts.chain_split`), step size and tree depth per chain.

    python validation/nuts_settings.py pbmc20-pln --init laplace --backend cmdstanpy \
        --metric dense_e --draws 1000 --warmup 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import references


def run(adata, fit_args, *, chains=4, draws=1000, warmup=1000, seed=1, adapt_delta=0.95,
        backend="pystan", metric="diag_e", init="random", max_depth=10):
    """NUTS on a pair (:func:`references.hmc_fit`): (JSON-able results, tree)."""
    sampler = {"chains": chains, "draws": draws, "warmup": warmup, "seed": seed,
               "adapt_delta": adapt_delta, "backend": backend, "init": init}
    if metric != "diag_e":
        sampler["metric"] = metric
    if max_depth != 10:
        sampler["max_depth"] = max_depth
    cpu0 = os.times()
    hmc, extra = references.hmc_fit(adata, fit_args, sampler)
    cpu1 = os.times()
    extra["chains_cpu_s"] = (cpu1.children_user + cpu1.children_system
                             - cpu0.children_user - cpu0.children_system)
    extra["load_average_1min"] = os.getloadavg()[0]
    draws_ = hmc.draws
    tree = hmc.to_datatree()
    st = draws_.sample_stats
    out = {"model": fit_args["model"], "backend": draws_.backend, "metric": metric,
           "init": init, "chains": chains, "draws": draws, "warmup": warmup,
           "adapt_delta": adapt_delta, "seed": seed, "sampling_wall_s": draws_.wall_time_s,
           **extra,
           "diagnostics": references.diagnostics(tree),
           "step_size": np.asarray(st["step_size"])[:, -1].tolist(),
           "mean_tree_depth": np.asarray(st["tree_depth"]).mean(axis=1).tolist(),
           "max_depth_hits": int((np.asarray(st["tree_depth"]) >= max_depth).sum()),
           "mean_leapfrog": np.asarray(st["n_steps"]).mean(axis=1).tolist()}
    return out, tree


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pair")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--adapt-delta", type=float, default=0.95)
    p.add_argument("--backend", default="pystan")
    p.add_argument("--metric", default="diag_e")
    p.add_argument("--init", choices=("random", "laplace"), default="random")
    p.add_argument("--max-depth", type=int, default=10)
    args = p.parse_args(argv)
    adata, fit_args, _, _ = references.load_data(args.pair)
    out, _ = run(adata, fit_args, chains=args.chains, draws=args.draws, warmup=args.warmup,
                 seed=args.seed, adapt_delta=args.adapt_delta, backend=args.backend,
                 metric=args.metric, init=args.init, max_depth=args.max_depth)
    print(json.dumps({"pair": args.pair, **out}, default=references._json))


if __name__ == "__main__":
    main()
