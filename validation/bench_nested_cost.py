"""Benchmark: the cost of Laplace draws that carry the globals' uncertainty (nested
Laplace) against draws at the point globals, on PBMC (pln, K=10 by default).

One converged pln Laplace fit of the bundled PBMC data (saved to
``validation/out/nested_fit_k<rank>.zarr`` and reused by later runs). Then, in one
process: ``to_datatree(draws, genes=..., globals="point")``; the globals' Gaussian
(``fit.globals_posterior()``: Lanczos low rank at this size, counted separately:
it is built once per fit and cached); and ``to_datatree(draws, globals="laplace")``,
whose draws move every cell's mode by one Newton step at each drawn set of globals
(at this size with each cell's Hessian held at the MAP: ``nested_draws``'s
``curvature="auto"``). Prints JSON: walls, the ratio of nested to point draws (with
and without the one-off Gaussian), Newton evaluations, and the Issue-20 target
(ratio <= 3) for both ratios.

    python validation/bench_nested_cost.py --draws 100 --rank 10 --genes 20
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import scribe_stan as ss
from scribe_stan.laplace.nested import NEWTON_STEPS_DEFAULT

OUT = Path(__file__).parent / "out"


def _fit(rank):
    path = OUT / f"nested_fit_k{rank}.zarr"
    if path.exists():
        return ss.load_fit(path), str(path), None
    t0 = time.perf_counter()
    fit = ss.fit(ss.datasets.pbmc_donor_a(), model="pln", rank=rank, progress=False)
    wall = time.perf_counter() - t0
    OUT.mkdir(exist_ok=True)
    fit.save(path)
    return fit, str(path), wall


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--genes", type=int, default=20, help="genes stored in the trees")
    parser.add_argument("--lanczos-rank", dest="lanczos_rank", type=int, default=None)
    args = parser.parse_args(argv)
    fit, path, fit_wall = _fit(args.rank)
    kw = {"genes": args.genes, "seed": 1}
    _, point_s = _timed(lambda: fit.to_datatree(args.draws, globals="point", **kw))
    post, gauss_s = _timed(lambda: fit.globals_posterior(rank=args.lanczos_rank))
    _, nested_s = _timed(lambda: fit.to_datatree(args.draws, globals="laplace", **kw))
    ratio = (nested_s + gauss_s) / point_s
    print(json.dumps({
        "benchmark": f"nested-laplace-cost-pbmc-pln-k{args.rank}",
        "fit": path, "fit_wall_s": fit_wall, "fit_converged": bool(fit.success),
        "cells": len(fit.obs_names), "genes": len(fit.var_names), "draws": args.draws,
        "tree_genes": args.genes,
        "point_draws_s": point_s, "globals_gaussian_s": gauss_s,
        "nested_draws_s": nested_s, "newton_steps_per_draw": NEWTON_STEPS_DEFAULT,
        "ratio_with_gaussian": ratio, "ratio_draws_only": nested_s / point_s,
        "target_ratio": 3.0, "meets_target_draws_only": nested_s / point_s <= 3.0,
        "meets_target_with_gaussian": ratio <= 3.0,
        "gaussian": {"method": post.method, "n_gradients": int(post.n_gradients),
                     "eigenpairs": int(post.lam.size), "n_floored": int(post.n_floored),
                     "n_unconverged": int(post.n_unconverged)},
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


if __name__ == "__main__":
    main()
