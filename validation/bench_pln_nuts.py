"""Benchmark: NUTS on the full pln program, 200 cells x 20 genes, K=2.

``--data pbmc``: the first ``--cells`` cells and the ``--genes`` highest-mean genes of
the bundled PBMC data (library sizes over all genes feed the capture prior).
``--data sim``: counts simulated from the pln model itself
(:func:`scribe_stan.models.pln.simulate`, library sizes of about 1000). Prints JSON
with wall time (sampling and build), R-hat and ESS over the Sigma entries and over every
posterior quantity, divergences and E-BFMI, with pass/fail against the targets.

``--init laplace`` starts each chain from the Laplace fit (the MAP of the globals and
its own draw of every cell's Laplace Gaussian, :func:`scribe_stan.nuts.laplace_inits`);
``--backend cmdstanpy --metric dense_e`` adapts a dense metric (CmdStan only);
``--init-metric laplace`` starts warmup from the Laplace fit's diagonal metric
(:func:`scribe_stan.nuts.laplace_metric`, CmdStan only), so that a short ``--warmup``
can do. The JSON
also gives the chains' CPU time (``chains_cpu_s``: user + system time of the sampler's
child processes; meaningful for cmdstanpy, whose chains are child processes that exit,
not for pystan's persistent worker pool) and the chain-split check
(:func:`scribe_stan.nuts.chain_split`).

    python validation/bench_pln_nuts.py --cells 200 --genes 20 --rank 2
    python validation/bench_pln_nuts.py --init laplace --backend cmdstanpy --metric dense_e
    python validation/bench_pln_nuts.py --init laplace --init-metric laplace --warmup 200 \
        --backend cmdstanpy
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import anndata
import arviz_stats as azs
import numpy as np

import scribe_stan as ss
from scribe_stan import nuts
from scribe_stan.cli import hmc_diagnostics
from scribe_stan.models import pln

sys.path.insert(0, str(Path(__file__).resolve().parent))
import references


def diagnostics(tree):
    """The CLI's R-hat / ESS / divergence summary plus the minimum E-BFMI over chains."""
    return {**hmc_diagnostics(tree), "min_ebfmi": float(azs.bfmi(tree)["energy"].values.min())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=200)
    parser.add_argument("--genes", type=int, default=20)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", choices=("pbmc", "sim"), default="pbmc")
    parser.add_argument("--init", choices=("random", "laplace"), default="random")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--metric", choices=("diag_e", "dense_e"), default="diag_e")
    parser.add_argument("--init-metric", choices=("unit", "laplace"), default="unit",
                        help="diagonal metric warmup starts from (laplace: needs --init "
                             "laplace and cmdstanpy; scribe_stan.nuts.laplace_metric)")
    parser.add_argument("--adapt-delta", type=float, default=0.9)
    args = parser.parse_args(argv)
    if args.data == "pbmc":
        adata, library_size = ss.datasets.pbmc_donor_a()[: args.cells].copy(), None
        name = f"pbmc_donor_a_{args.cells}x{args.genes}-pln-nuts"
    else:
        sim = pln.simulate(args.cells, args.genes, args.rank, seed=args.seed,
                           lib_target=1000.0)
        adata, library_size = anndata.AnnData(sim["counts"]), np.exp(sim["log_lib"])
        name = f"sim_{args.cells}x{args.genes}_k{args.rank}-pln-nuts"
    t0 = time.perf_counter()
    cpu0 = os.times()
    fit_args = {"model": "pln", "rank": args.rank, "genes": args.genes,
                "library_size": library_size}
    sampler = {"chains": args.chains, "draws": args.draws, "warmup": args.warmup,
               "seed": args.seed, "adapt_delta": args.adapt_delta, "backend": args.backend,
               "init": args.init}
    if args.metric != "diag_e":
        sampler["metric"] = args.metric
    if args.init_metric != "unit":
        sampler["init_metric"] = args.init_metric
    hmc, extra = references.hmc_fit(adata, fit_args, sampler)
    cpu1 = os.times()
    total = time.perf_counter() - t0
    tree = hmc.to_datatree()
    diag = diagnostics(tree)
    split = nuts.chain_split(tree)
    depth = hmc.draws.sample_stats["tree_depth"]
    print(json.dumps({
        "benchmark": name,
        "backend": hmc.draws.backend,
        "chains": args.chains, "draws": args.draws, "warmup": args.warmup,
        "adapt_delta": args.adapt_delta, "init": args.init,
        "metric": hmc.draws.config.get("metric", "diag_e"),
        "initial_metric": hmc.draws.config.get("initial_metric", "unit"),
        "sampling_wall_s": hmc.draws.wall_time_s,
        "build_wall_s": hmc.draws.config.get("build_time_s"),
        "total_wall_s": total, **extra,
        "chains_cpu_s": (cpu1.children_user + cpu1.children_system
                         - cpu0.children_user - cpu0.children_system),
        "load_average_1min": os.getloadavg()[0],
        "mean_tree_depth": float(np.mean(depth)),
        **diag,
        "chain_split": split,
        "pass": {"wall_le_300s": hmc.draws.wall_time_s <= 300,
                 "rhat_sigma_lt_1.01": diag["max_rhat_Sigma"] < 1.01,
                 "no_divergences": diag["divergences"] == 0,
                 "no_chain_split": not split["split"]},
    }, indent=1))


if __name__ == "__main__":
    main()
