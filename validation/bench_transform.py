"""Benchmark: ``fit.transform`` of 10,000 new PBMC-like cells at K=10.

The globals come from a pln Laplace fit of the bundled PBMC data (``--rank`` 10, all
non-zero genes, at most ``--fit-max-iter`` outer iterations: transform's cost does not
depend on how far the globals were optimized). The fit is saved to
``validation/out/transform_fit_k<rank>.zarr`` and reused by later runs
(``ss.load_fit``). New cells are simulated from the fitted model: log-rates
``x ~ N(mu, W W' + diag(d))``, library sizes resampled from PBMC's, capture loss from
the capture prior, Poisson counts. Each timed call solves every new cell's Newton from
its cold start at the fitted globals and its Laplace log marginal; the first call
(which loads the compiled kernels) is reported separately from the median of
``--reps`` more. Prints JSON: walls, cells per second, peak RSS, Newton iterations,
converged cells.

    python validation/bench_transform.py --cells 10000 --reps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import anndata
import numpy as np
from scipy import stats

import scribe_stan as ss
from scribe_stan.models import pln

OUT = Path(__file__).parent / "out"


def _globals_fit(rank, max_iter):
    path = OUT / f"transform_fit_k{rank}.zarr"
    if path.exists():
        return ss.load_fit(path), str(path), None
    t0 = time.perf_counter()
    fit = ss.fit(ss.datasets.pbmc_donor_a(), model="pln", rank=rank, max_iter=max_iter,
                 progress=False)
    wall = time.perf_counter() - t0
    OUT.mkdir(exist_ok=True)
    fit.save(path)
    return fit, str(path), wall


def _new_cells(fit, n, seed):
    """Counts of ``n`` cells simulated from the fit's globals and PBMC's library sizes."""
    rng = np.random.default_rng(seed)
    G, K = fit.W.shape
    x = fit.mu + rng.standard_normal((n, K)) @ fit.W.T + np.sqrt(fit.d) * rng.standard_normal(
        (n, G))
    log_lib = rng.choice(fit.data.log_lib, size=n)
    a = pln.capture_prior_mean(log_lib, fit.data.log_M0)
    s = fit.data.sigma_M
    eta = stats.truncnorm.rvs(-a / s, np.inf, loc=a, scale=s, size=n, random_state=rng)
    counts = rng.poisson(np.exp(np.minimum(x - eta[:, None], 20.0)))
    keep = counts.sum(axis=1) > 0
    adata = anndata.AnnData(counts[keep].astype(np.float32))
    adata.var_names = list(fit.var_names)
    adata.obs_names = [f"new{i}" for i in range(int(keep.sum()))]
    return adata


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=10_000)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--fit-max-iter", dest="fit_max_iter", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    fit, path, fit_wall = _globals_fit(args.rank, args.fit_max_iter)
    adata = _new_cells(fit, args.cells, args.seed)
    walls = []
    for _ in range(args.reps + 1):
        t0 = time.perf_counter()
        new = fit.transform(adata)
        walls.append(time.perf_counter() - t0)
    steady = float(np.median(walls[1:])) if args.reps else walls[0]
    print(json.dumps({
        "benchmark": f"transform-pbmc-pln-k{args.rank}",
        "fit": path, "fit_wall_s": fit_wall, "genes": len(fit.var_names),
        "cells": adata.n_obs, "rank": args.rank,
        "first_call_s": walls[0], "walls_s": walls[1:], "median_s": steady,
        "cells_per_s": adata.n_obs / steady, "target_s": 10.0, "meets_target": steady <= 10.0,
        "newton_iterations_median": float(np.median(new.n_newton)),
        "newton_iterations_max": int(np.max(new.n_newton)),
        "cells_converged": int(new.converged.sum()),
        "objective": new.objective,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


if __name__ == "__main__":
    main()
