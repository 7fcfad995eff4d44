"""Benchmark: nbvcp Laplace fit on the bundled PBMC data (2896 cells x 2000 genes).

Prints one JSON object: wall time of the fit (the Numba kernels are compiled, or loaded
from their cache, by a warm-up fit on a small slice first), peak RSS of the process,
final objective, outer iterations, cells whose Newton step converged.

    .venv/bin/python validation/bench_nbvcp.py [--tol 1e-10]

``--tol`` is the outer L-BFGS-B relative objective tolerance (default: that of
``scribe_stan.fit``).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import time

import numba

import scribe_stan as ss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float,
                        default=inspect.signature(ss.fit).parameters["tol"].default)
    tol = parser.parse_args().tol
    adata = ss.datasets.pbmc_donor_a()
    ss.fit(adata[:50, :100].copy(), model="nbvcp", method="laplace", progress=False)
    t0 = time.perf_counter()
    fit = ss.fit(adata, model="nbvcp", method="laplace", tol=tol, progress=False)
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    moments = fit.posterior_moments()
    wall_moments = time.perf_counter() - t1
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    json.dump({
        "data": "pbmc_donor_a", "model": "nbvcp", "method": "laplace",
        "cells": int(adata.n_obs), "genes": int(len(fit.var_names)),
        "threads": numba.get_num_threads(), "tol": tol,
        "wall_time_s": round(wall, 3),
        "posterior_moments_wall_time_s": round(wall_moments, 3),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "objective": fit.objective, "outer_iterations": fit.n_iter,
        "optimizer_success": bool(fit.success),
        "cells_converged": int(fit.converged.sum()),
        "m_sd_median": float(sorted(moments["m"][1])[len(fit.var_names) // 2]),
    }, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
