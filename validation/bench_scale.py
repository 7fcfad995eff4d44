"""Benchmark: pln Laplace fit time and memory against the number of cells.

Counts are simulated from the pln model (2000 genes, K=16 by default) at PBMC-like depth:
the library size of the shipped PBMC data over its 2000 genes has median 1899 (10-90 %:
1275-2813) and the log gene means spread with sd 1.13, so ``lib_target=1900`` and
``mu_spread=1.1``. Cells are simulated in blocks straight into a CSR matrix (the dense
N x G matrix is never formed). Each size runs in a fresh process (its own peak RSS),
after one untimed run that fills Numba's cache. Prints one JSON object with per-size
wall time of the fit, time per objective evaluation, iterations, peak RSS, and the
log-log slopes of wall time and of time per evaluation against cells.

    python validation/bench_scale.py --cells 10000 30000 100000 --rank 16
    python validation/bench_scale.py --cells 10000 30000 --max-iter 50   # quicker
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
import numpy as np
from scipy import sparse, stats
from scribe_stan.laplace.solver import fit_laplace
from scribe_stan.models import pln

N, G, K, max_iter, seed = (int(a) for a in sys.argv[1:6])
lib_target, mu_spread, sigma_M = 1900.0, 1.1, 0.3
rng = np.random.default_rng(seed)
t0 = time.perf_counter()
mu, W, d, eta_center = pln.benchmark_globals(G, K, rng, lib_target=lib_target,
                                              mu_spread=mu_spread)
blocks = []
for lo in range(0, N, 5000):
    n = min(N, lo + 5000) - lo
    eta = stats.truncnorm.rvs(-eta_center / sigma_M, np.inf, loc=eta_center, scale=sigma_M,
                              size=n, random_state=rng)
    x = mu + rng.standard_normal((n, K)) @ W.T + np.sqrt(d) * rng.standard_normal((n, G))
    blocks.append(sparse.csr_matrix(rng.poisson(np.exp(x - eta[:, None])).astype(np.float64)))
counts = sparse.vstack(blocks, format="csr")
del blocks, x
counts = counts[np.asarray(counts.sum(axis=1)).ravel() > 0]
sim_s = time.perf_counter() - t0
t0 = time.perf_counter()
sol = fit_laplace(counts, K, log_lib=np.full(counts.shape[0], np.log(lib_target)),
                  sigma_M=sigma_M, max_iter=max_iter)
wall = time.perf_counter() - t0
print(json.dumps({
    "cells": int(counts.shape[0]), "genes": G, "rank": K, "nonzero_fraction":
    counts.nnz / (counts.shape[0] * G), "simulate_s": sim_s, "wall_s": wall,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    "objective": sol.objective, "em_iterations": sol.em_iterations,
    "outer_iterations": sol.n_iter, "objective_evaluations": sol.n_eval,
    "s_per_evaluation": wall / max(sol.n_eval + sol.em_iterations, 1),
    "optimizer_success": sol.success, "cells_converged": int(sol.modes.converged.sum()),
}))
"""


def run_once(N, G, K, max_iter, seed):
    out = subprocess.run([sys.executable, "-c", _ONE_RUN, str(N), str(G), str(K),
                          str(max_iter), str(seed)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loglog_slope(x, y):
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[10000, 30000, 100000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-iter", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_once(500, args.genes, args.rank, 2, args.seed)  # fill Numba's cache (untimed)
    runs = []
    for N in args.cells:
        runs.append(run_once(N, args.genes, args.rank, args.max_iter, args.seed))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    cells = [r["cells"] for r in runs]
    out = {"benchmark": "pln-laplace-scale", "cpu_count": os.cpu_count(),
           "max_iter": args.max_iter, "runs": runs,
           "target": {"cells": 100000, "wall_s": 900, "peak_rss_gb": 8, "slope": 1.1}}
    if len(runs) > 1:
        out["loglog_slope_wall"] = loglog_slope(cells, [r["wall_s"] for r in runs])
        out["loglog_slope_s_per_evaluation"] = loglog_slope(
            cells, [r["s_per_evaluation"] for r in runs])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
