"""Benchmark: one outer evaluation (E-step + exact value and gradient) on the PBMC data.

At the moment start of a pln fit (K=10 by default) and at globals perturbed from it (as
between two outer iterations), times the batched path (chunks of cells, BLAS products;
``scribe_stan.laplace.batched``) and the per-cell Numba kernels (``cpu.newton_all`` and
``cpu.laplace_value_grad``, the reference the batched path is tested against) in one
process, alternating, median of ``--reps``. Reports the Newton and value/gradient times
of each, their ratio, and the achieved GFLOP/s of the batched path's three BLAS products
(``M``, ``q`` and the log-det gradient term) measured on their own.

    python validation/bench_estep.py --reps 5 --rank 10
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np

import scribe_stan as ss
from scribe_stan.laplace import batched, cpu, solver


def _time(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=10)
    args = parser.parse_args(argv)
    adata = ss.datasets.pbmc_donor_a()
    P = solver.LaplaceProblem(adata.X)
    N, G = P.shape
    mu, W, d = solver.initial_globals(P.csr, P.a, args.rank)
    dense = P.csr.toarray()
    inv_r = np.zeros(G)
    const = P.lik_constants() + P._const_eta
    rng = np.random.default_rng(0)
    P.modes(mu, W, d)
    x0, e0 = P.x.copy(), P.eta.copy()
    times = {k: [] for k in ("batched_newton", "batched_value_grad", "per_cell_newton",
                             "per_cell_value_grad")}
    newton_iters = []
    for rep in range(args.reps + 1):  # the first repetition compiles and is dropped
        mu2 = mu + 0.02 * rng.standard_normal(G)
        W2 = W * (1 + 0.02 * rng.standard_normal(W.shape))
        glob = (mu2, W2, d, inv_r, solver.pair_products(W2), solver.shared_factor(W2, d))
        P.x[:], P.eta[:] = x0, e0
        t_bn = _time(lambda: P.modes(mu2, W2, d))
        newton_iters.append(float(P.n_iter.mean()))
        t_bv = _time(lambda: P._value_grad(mu2, W2, d, inv_r, const, False, True, False))
        x, e = x0.copy(), e0.copy()
        t_pn = _time(lambda: cpu.newton_all(dense, P.a, P.sigma, *glob, x, e, False,
                                            P.newton_tol, P.max_newton, numba.get_num_threads()))
        t_pv = _time(lambda: cpu.laplace_value_grad(dense, const, P.a, P.sigma, *glob, x, e,
                                                    False, True, numba.get_num_threads(),
                                                    False))
        if rep:
            for k, t in zip(times, (t_bn, t_bv, t_pn, t_pv)):
                times[k].append(t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    # the batched path's BLAS products, on their own
    gl = batched.Globals.build(mu, W, d, inv_r)
    w = np.abs(rng.standard_normal((N, G)))
    P_ = gl.pairs.shape[1]
    Mp = np.abs(rng.standard_normal((N, P_)))
    flops = 3 * 2.0 * N * G * P_
    t_blas = np.median([_time(lambda: (w @ gl.pairs, Mp @ gl.pairs.T, w.T @ Mp))
                        for _ in range(args.reps)])
    print(json.dumps({
        "benchmark": "pbmc_donor_a-pln-estep", "rank": args.rank, "cells": N, "genes": G,
        "cpu_count": os.cpu_count(), "threads": numba.get_num_threads(), "reps": args.reps,
        "mean_newton_iterations": float(np.mean(newton_iters[1:])),
        "median_s": med,
        "evaluation_s": {"batched": med["batched_newton"] + med["batched_value_grad"],
                         "per_cell": med["per_cell_newton"] + med["per_cell_value_grad"]},
        "ratio_per_cell_over_batched": {
            "newton": med["per_cell_newton"] / med["batched_newton"],
            "value_grad": med["per_cell_value_grad"] / med["batched_value_grad"]},
        "blas_products_gflops": flops / t_blas / 1e9,
        "runs": times,
    }, indent=1))


if __name__ == "__main__":
    main()
