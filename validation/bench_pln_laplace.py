"""Benchmark: pln Laplace fit on the bundled PBMC data (2896 cells x 2000 genes).

Each run is a fresh Python process (so its peak RSS is its own); Numba's on-disk cache
is warmed by one untimed run first, so the figures exclude JIT compilation. Prints one
JSON object: per-run wall time, peak RSS, objective, iterations, and their medians.

    python validation/bench_pln_laplace.py --runs 3 --rank 10
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

_ONE_RUN = r"""
import json, resource, sys, time
import numba
import scribe_stan as ss
rank, tol, genes = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
adata = ss.datasets.pbmc_donor_a()
t0 = time.perf_counter()
fit = ss.fit(adata, model="pln", method="laplace", rank=rank, tol=tol, progress=False,
             genes=None if genes == "all" else int(genes))
wall = time.perf_counter() - t0
print(json.dumps({
    "wall_s": wall,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    "objective": fit.objective,
    "outer_iterations": fit.n_iter,
    "objective_evaluations": fit.solution.n_eval,
    "optimizer_success": fit.success,
    "optimizer_message": fit.message,
    "cells_converged": int(fit.converged.sum()),
    "cells": int(fit.converged.size),
    "genes": len(fit.var_names),
    "mean_newton_iterations_last_estep": float(fit.n_newton.mean()),
    "threads": numba.get_num_threads(),
}))
"""


def run_once(rank, tol, genes):
    out = subprocess.run([sys.executable, "-c", _ONE_RUN, str(rank), str(tol), str(genes)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-8)
    parser.add_argument("--genes", default="all", help="'all' or a number of top-mean genes")
    args = parser.parse_args(argv)
    run_once(args.rank, args.tol, 50)  # warm the Numba cache (untimed)
    runs = [run_once(args.rank, args.tol, args.genes) for _ in range(args.runs)]
    print(json.dumps({
        "benchmark": "pbmc_donor_a-pln-laplace",
        "rank": args.rank,
        "tol": args.tol,
        "cpu_count": os.cpu_count(),
        "runs": runs,
        "median_wall_s": float(np.median([r["wall_s"] for r in runs])),
        "median_peak_rss_gb": float(np.median([r["peak_rss_gb"] for r in runs])),
        "target": {"wall_s": 20, "peak_rss_gb": 2},
    }, indent=1))


if __name__ == "__main__":
    main()
