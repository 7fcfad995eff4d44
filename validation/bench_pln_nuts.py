"""Benchmark: NUTS on the full pln program, 200 cells x 20 genes, K=2.

``--data pbmc``: the first ``--cells`` cells and the ``--genes`` highest-mean genes of
the bundled PBMC data (library sizes over all genes feed the capture prior).
``--data sim``: counts simulated from the pln model itself
(:func:`scribe_stan.models.pln.simulate`, library sizes of about 1000). Prints JSON
with wall time (sampling and build), R-hat and ESS over the Sigma entries and over every
posterior quantity, divergences and E-BFMI, with pass/fail against the targets.

    python validation/bench_pln_nuts.py --cells 200 --genes 20 --rank 2
"""

from __future__ import annotations

import argparse
import json
import time

import anndata
import arviz_stats as azs
import numpy as np

import scribe_stan as ss
from scribe_stan.cli import hmc_diagnostics
from scribe_stan.models import pln


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
    hmc = ss.fit(adata, model="pln", method="hmc", rank=args.rank, genes=args.genes,
                 library_size=library_size,
                 chains=args.chains, draws=args.draws, warmup=args.warmup, seed=args.seed,
                 progress=False)
    total = time.perf_counter() - t0
    diag = diagnostics(hmc.to_datatree())
    print(json.dumps({
        "benchmark": name,
        "backend": hmc.draws.backend,
        "chains": args.chains, "draws": args.draws, "warmup": args.warmup,
        "adapt_delta": hmc.settings["adapt_delta"],
        "sampling_wall_s": hmc.draws.wall_time_s,
        "build_wall_s": hmc.draws.config.get("build_time_s"),
        "total_wall_s": total,
        **diag,
        "pass": {"wall_le_300s": hmc.draws.wall_time_s <= 300,
                 "rhat_sigma_lt_1.01": diag["max_rhat_Sigma"] < 1.01,
                 "no_divergences": diag["divergences"] == 0},
    }, indent=1))


if __name__ == "__main__":
    main()
