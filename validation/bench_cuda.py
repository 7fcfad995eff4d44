"""Benchmark: pln Laplace fit on the GPU (``device="cuda"``), with the CPU for comparison.

Simulated pln cells x 2000 genes, rank K = 16 (SPEC target on one H100: 1,000,000 cells,
full fit <= 60 s). Prints one JSON object with

* ``gpu.fit_wall_s``: full fit (``fit_laplace(..., device="cuda")``), after an untimed
  warm-up fit on a few cells that compiles the kernels;
* ``gpu.estep_cells_per_s``: one E-step (per-cell Newton from the data-driven start at
  the fitted globals) and its Newton iterations;
* ``gpu.bandwidth``: achieved DRAM bandwidth estimate of that E-step against the card's
  peak. Traffic model (a lower bound, stated so it can be checked): every Newton
  iteration streams the cell's counts once and its log-rates ``x`` in and out
  (``3 G`` values); the per-block scratch and ``W`` are assumed to stay in L2. Peak is
  ``2 x memory clock x bus width`` from the device attributes, or the vendor figure
  from :data:`PEAK_GBPS` by name;
* ``gpu.transfers``: host <-> device copies of the fit (``scribe_stan.laplace.cuda.TRANSFERS``:
  counts, bytes, largest single copy each way) and the bytes per objective evaluation;
  the modes stay on the device, so these are the counts once plus O(N + G K) a call;
* ``cpu``: the same fit and E-step with the CPU kernels on ``--cpu-cells`` cells (the
  largest size run on the CPU), and the speed-ups per cell (both scale linearly in N).

Counts are generated in chunks of ``--chunk`` cells (host memory: the (N, G) matrix the
solver holds plus one chunk). Runs under ``NUMBA_ENABLE_CUDASIM=1`` on tiny sizes to
check the script end to end (timings then mean nothing).

    python validation/bench_cuda.py                      # 1e6 cells, on a GPU
    NUMBA_ENABLE_CUDASIM=1 python validation/bench_cuda.py --cells 6 --genes 12 \
        --rank 2 --cpu-cells 6 --max-iter 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from scribe_stan.laplace import device as dev
from scribe_stan.laplace.solver import LaplaceProblem, fit_laplace
from scribe_stan.models import pln

#: Peak DRAM bandwidth (GB/s) by device-name fragment, from the vendors' data sheets
#: (NVIDIA H100 datasheet: SXM5 3.35 TB/s, PCIe 2.0 TB/s; H200 datasheet: 4.8 TB/s).
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0}


def simulate_counts(N, G, K, *, seed=0, chunk=100_000, lib_target=2000.0):
    """pln counts (N, G) float64 drawn in chunks, with their generating globals.

    Globals come from :func:`scribe_stan.models.pln.simulate`; each chunk draws its
    cells' capture losses, latents and Poisson counts, so only one chunk of latents
    is in memory at a time.
    """
    truth = pln.simulate(1, G, K, seed=seed, lib_target=lib_target)
    rng = np.random.default_rng(seed + 1)
    counts = np.empty((N, G))
    center = truth["log_M0"] - np.log(lib_target)
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        eta = np.abs(center + truth["sigma_M"] * rng.standard_normal(n))
        x = (truth["mu"] + rng.standard_normal((n, K)) @ truth["W"].T
             + np.sqrt(truth["d"]) * rng.standard_normal((n, G)))
        counts[start:start + n] = rng.poisson(np.exp(x - eta[:, None]))
    counts[:, counts.sum(axis=0) == 0] = 1.0  # keep every gene observed
    return counts, truth, np.full(N, np.log(lib_target))


def peak_bandwidth_gbps():
    """(peak GB/s, source) of the current CUDA device; (None, reason) if unknown."""
    from numba import cuda

    devc = cuda.get_current_device()
    clock_khz = getattr(devc, "MEMORY_CLOCK_RATE", None)
    bus_bits = getattr(devc, "GLOBAL_MEMORY_BUS_WIDTH", None)
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "device attributes"
    name = getattr(devc, "name", "CUDA simulator")
    name = name.decode() if isinstance(name, bytes) else str(name)
    for key, val in PEAK_GBPS.items():
        if key in name:
            return val, f"table ({key})"
    return None, f"unknown device {name!r}"


def run(counts, K, log_lib, truth, device, dtype, max_iter):
    """Full fit and one timed E-step; returns a dict of timings (and, on the device, the
    fit's host <-> device traffic)."""
    if device == "cuda":
        from scribe_stan.laplace import cuda as gpu

        gpu.reset_transfers()
    t0 = time.perf_counter()
    sol = fit_laplace(counts, K, log_lib=log_lib, log_M0=truth["log_M0"],
                      sigma_M=truth["sigma_M"], max_iter=max_iter, device=device, dtype=dtype)
    fit_s = time.perf_counter() - t0
    out = {}
    if device == "cuda":  # the fit's traffic, one-time placement of counts and modes included
        out["transfers"] = dict(gpu.TRANSFERS)
        out["transfers"]["bytes_per_evaluation"] = (
            (gpu.TRANSFERS["to_device_bytes"] + gpu.TRANSFERS["to_host_bytes"]) / sol.n_eval)
    problem = LaplaceProblem(counts, log_lib=log_lib, log_M0=truth["log_M0"],
                             sigma_M=truth["sigma_M"], device=device, dtype=dtype)
    t0 = time.perf_counter()
    modes = problem.modes(sol.mu, sol.W, sol.d)
    estep_s = time.perf_counter() - t0
    N = counts.shape[0]
    return out | {"cells": N, "fit_wall_s": fit_s, "outer_iterations": sol.n_iter,
                  "objective_evaluations": sol.n_eval, "objective": sol.objective,
                  "cells_converged": int(sol.modes.converged.sum()), "estep_s": estep_s,
                  "estep_cells_per_s": N / estep_s,
                  "estep_newton_iterations": int(modes.n_iter.sum())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--cpu-cells", type=int, default=20_000,
                    help="cells of the CPU comparison run (0: skip)")
    ap.add_argument("--dtype", choices=dev.DTYPES, default="float64")
    ap.add_argument("--max-iter", type=int, default=1000, help="outer L-BFGS iterations")
    ap.add_argument("--chunk", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    ok, reason = dev.cuda_status()
    if not ok:
        raise SystemExit(f"bench_cuda needs a GPU or NUMBA_ENABLE_CUDASIM=1: {reason}")
    out = {"device": reason, "genes": args.genes, "rank": args.rank, "dtype": args.dtype}
    # warm-up: compile the kernels outside the timings
    warm, wtruth, wlib = simulate_counts(4, args.genes, args.rank, seed=args.seed + 7)
    fit_laplace(warm, args.rank, log_lib=wlib, max_iter=1, device="cuda", dtype=args.dtype)

    counts, truth, log_lib = simulate_counts(args.cells, args.genes, args.rank, seed=args.seed,
                                             chunk=args.chunk)
    gpu = run(counts, args.rank, log_lib, truth, "cuda", args.dtype, args.max_iter)
    item = 4 if args.dtype == "float32" else 8
    bytes_moved = 3.0 * args.genes * item * gpu["estep_newton_iterations"]
    achieved = bytes_moved / gpu["estep_s"] / 1e9
    peak, source = peak_bandwidth_gbps()
    gpu["bandwidth"] = {"achieved_gbps_lower_bound": achieved, "peak_gbps": peak,
                        "peak_source": source,
                        "fraction_of_peak": None if peak is None else achieved / peak}
    out["gpu"] = gpu
    del counts
    if args.cpu_cells:
        c_counts, c_truth, c_lib = simulate_counts(args.cpu_cells, args.genes, args.rank,
                                                   seed=args.seed, chunk=args.chunk)
        run(c_counts[:4], args.rank, c_lib[:4], c_truth, "cpu", "float64", 1)  # JIT warm-up
        cpu = run(c_counts, args.rank, c_lib, c_truth, "cpu", "float64", args.max_iter)
        out["cpu"] = cpu
        out["speedup_estep_per_cell"] = gpu["estep_cells_per_s"] / cpu["estep_cells_per_s"]
        out["speedup_fit_per_cell"] = ((cpu["fit_wall_s"] / cpu["cells"])
                                       / (gpu["fit_wall_s"] / gpu["cells"]))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
