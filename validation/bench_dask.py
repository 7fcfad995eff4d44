"""Benchmark: the chunked Laplace fit on a Dask LocalCluster (scribe_stan.distributed).

Counts are simulated from the pln model at PBMC-like depth as in
``validation/bench_scale.py`` (2000 genes, K = 16 by default, ``lib_target=1900``,
``mu_spread=1.1``, about 530 stored counts per cell) and written block by block into an
AnnData zarr store (CSR ``X``; the N x G matrix is never formed). Sub-commands, each
printing one JSON object (also saved under ``validation/out/``):

- ``store``: write the simulated store (``--cells``, ``--path``).
- ``iterations``: ``--iterations`` outer L-BFGS iterations (no Laplace-EM start) through
  a LocalCluster of ``--workers`` single-threaded workers with the modes kept as
  ``--modes``: wall per iteration, Newton iterations per evaluation, bytes sent to and
  received from the workers per iteration, peak RSS per worker, and the full-fit wall
  extrapolated from ``--full-iterations`` (the outer iteration count of a full fit).
- ``modes``: the same few iterations in process for each way of keeping the modes
  (memory float64, float32, zarr, zarr32): Newton iterations and wall per evaluation.
- ``compare``: the same fit (``--max-iter``, ``--em-iterations``) by the local executor
  (``fit_laplace`` on the counts in memory, ``NUMBA_NUM_THREADS=--workers`` threads) and
  through the cluster: wall and CPU seconds of each (the cluster's: client plus
  workers), their ratios, and the objectives (to convergence with the default
  ``--max-iter 1000``). On a shared machine the CPU ratio is the fairer overhead.

The local executor and the cluster use the same number of cores (threads vs
single-threaded workers). The machine may be shared: state the load with the figures.

    python validation/bench_dask.py store --cells 1000000 --path /tmp/cells_1m.zarr
    python validation/bench_dask.py iterations --store /tmp/cells_1m.zarr --iterations 5
    python validation/bench_dask.py compare --cells 100000 --max-iter 3 --em-iterations 1
    python validation/bench_dask.py compare --cells 200000            # to convergence
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
ENV1 = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1"}


def simulate_store(path, N, G=2000, K=16, *, seed=0, block=5000, lib_target=1900.0,
                   mu_spread=1.1, sigma_M=0.3):
    """Write N simulated PBMC-like cells as an AnnData zarr store with CSR ``X``."""
    import anndata as ad
    import pandas as pd
    import zarr
    from scipy import sparse, stats

    from scribe_stan.models import pln

    shutil.rmtree(path, ignore_errors=True)
    rng = np.random.default_rng(seed)
    mu, W, d, eta_center = pln.benchmark_globals(G, K, rng, lib_target=lib_target,
                                                  mu_spread=mu_spread)
    ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(N)]),
               var=pd.DataFrame(index=[f"g{j}" for j in range(G)])).write_zarr(path)
    root = zarr.open_group(path, mode="a", use_consolidated=False)
    X = root.create_group("X")
    X.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                    "shape": [N, G]})
    data = X.create_array("data", shape=(0,), chunks=(1 << 22,), dtype="float32")
    indices = X.create_array("indices", shape=(0,), chunks=(1 << 22,), dtype="int32")
    indptr = np.zeros(N + 1, np.int64)
    t0 = time.perf_counter()
    for lo in range(0, N, block):
        n = min(N, lo + block) - lo
        eta = stats.truncnorm.rvs(-eta_center / sigma_M, np.inf, loc=eta_center,
                                  scale=sigma_M, size=n, random_state=rng)
        x = mu + rng.standard_normal((n, K)) @ W.T + np.sqrt(d) * rng.standard_normal((n, G))
        u = sparse.csr_matrix(rng.poisson(np.exp(x - eta[:, None])).astype(np.float32))
        empty = np.flatnonzero(np.diff(u.indptr) == 0)
        if empty.size:  # a cell needs a count: give it one in its highest-rate gene
            u = sparse.lil_matrix(u)
            for c in empty:
                u[c, int(np.argmax(x[c]))] = 1.0
            u = sparse.csr_matrix(u)
        data.append(u.data)
        indices.append(u.indices.astype(np.int32))
        indptr[lo + 1:lo + n + 1] = indptr[lo] + u.indptr[1:]
    X.create_array("indptr", data=indptr, chunks=(1 << 20,))
    zarr.consolidate_metadata(path)
    return {"cells": N, "genes": G, "rank_true": K, "nnz": int(indptr[-1]),
            "nnz_per_cell": indptr[-1] / N, "seconds": time.perf_counter() - t0,
            "path": path, "bytes_on_disk": _du(path)}


def _du(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _cluster(workers):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=":0", env=ENV1)
    return cluster, Client(cluster)


def _cpu_seconds():
    """User + system CPU seconds of this process."""
    import resource

    return sum(resource.getrusage(resource.RUSAGE_SELF)[:2])


def _workers_cpu(client):
    """{worker: CPU seconds} of the cluster's worker processes."""
    return client.run(_cpu_seconds)


def _load():
    return os.getloadavg()


def _summary(fit, iterations_only=False):
    st = fit.stats
    calls = max(st["calls"], 1)
    it = st["iteration_seconds"]
    per_iter_calls = calls / max(fit.n_iter if iterations_only else len(it) or 1, 1)
    return {
        "objective": fit.objective, "n_iter": fit.n_iter, "n_eval": fit.n_eval,
        "em_iterations": fit.em_iterations, "success": fit.success,
        "cells_converged": fit.n_converged, "cells": fit.n_cells,
        "wall_s": fit.wall_time_s,
        "iteration_seconds": it,
        "median_iteration_s": float(np.median(it)) if it else None,
        "newton_iter_per_cell_per_eval": [n / fit.n_cells for n in
                                          st["newton_iter_per_eval"]],
        "bytes_out_per_call": st["bytes_out"] / calls,
        "bytes_in_per_call": st["bytes_in"] / calls,
        "calls": st["calls"], "calls_per_iteration": per_iter_calls,
        "bytes_per_iteration": (st["bytes_out"] + st["bytes_in"]) / calls * per_iter_calls,
        "peak_rss_per_worker_gb": [r / 1e9 for r in st["peak_rss_per_group"]],
        "recoveries": st["recoveries"], "n_chunks": st["n_chunks"],
        "chunk_cells": st["chunk_cells"], "modes": st["modes"], "counts": st["counts"],
    }


def cmd_store(args):
    return simulate_store(args.path, args.cells, args.genes, args.rank, seed=args.seed)


def cmd_iterations(args):
    from scribe_stan.distributed import fit_distributed

    cluster, client = _cluster(args.workers)
    try:
        load0 = _load()
        fit = fit_distributed(args.store, client=client, rank=args.rank, modes=args.modes,
                              counts=args.counts, max_iter=args.iterations, em_iterations=0,
                              chunk_cells=args.chunk_cells, out=args.out)
    finally:
        client.close()
        cluster.close()
    res = {"bench": "iterations", "store": args.store, "workers": args.workers,
           "rank": args.rank, "load_before": load0, "load_after": _load(),
           **_summary(fit, iterations_only=True)}
    per_iter = res["median_iteration_s"]
    res["full_iterations_assumed"] = args.full_iterations
    res["full_fit_wall_extrapolated_h"] = (per_iter * (args.full_iterations + 10) / 3600
                                           if per_iter else None)
    return res


def cmd_modes(args):
    from scribe_stan.distributed import fit_distributed

    store = args.store
    out = {"bench": "modes", "store": store, "rank": args.rank, "iterations": args.iterations,
           "load_before": _load(), "runs": {}}
    for modes in args.modes_list:
        fit = fit_distributed(store, rank=args.rank, modes=modes, max_iter=args.iterations,
                              em_iterations=0, chunk_cells=args.chunk_cells, out=args.out)
        s = _summary(fit, iterations_only=True)
        out["runs"][modes] = {k: s[k] for k in (
            "objective", "n_iter", "n_eval", "wall_s", "iteration_seconds",
            "median_iteration_s", "newton_iter_per_cell_per_eval", "peak_rss_per_worker_gb")}
    out["load_after"] = _load()
    return out


_LOCAL = r"""
import json, resource, sys, time
import numpy as np
from scipy import sparse
from scribe_stan.laplace import workers
from scribe_stan.laplace.solver import fit_laplace
store, K, max_iter, em_it = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
N, G = workers.store_shape(store)
counts = workers.read_rows(store, 0, N)
t0 = time.perf_counter()
sol = fit_laplace(counts, K, max_iter=max_iter, em_iterations=em_it)
print(json.dumps({"objective": sol.objective, "n_iter": sol.n_iter, "n_eval": sol.n_eval,
                  "success": sol.success, "wall_s": time.perf_counter() - t0,
                  "cells_converged": int(sol.modes.converged.sum()),
                  "mu": sol.mu.tolist(), "d": sol.d.tolist(),
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}))
"""


def cmd_compare(args):
    from scribe_stan.distributed import fit_distributed
    from scribe_stan.laplace import workers

    store = args.store
    made = None
    if store is None:
        store = os.path.join(args.workdir, f"cells_{args.cells}x{args.genes}_k{args.rank}.zarr")
        if not os.path.exists(store):
            made = simulate_store(store, args.cells, args.genes, args.rank, seed=args.seed)
    env = {**os.environ, **{k: str(args.workers) for k in ENV1}}
    load0 = _load()
    proc = subprocess.run([sys.executable, "-c", _LOCAL, store, str(args.rank),
                           str(args.max_iter), str(args.em_iterations)],
                          capture_output=True, text=True, env=env, check=True)
    local = json.loads(proc.stdout.strip().splitlines()[-1])
    cluster, client = _cluster(args.workers)
    try:
        cpu0, wcpu0 = _cpu_seconds(), _workers_cpu(client)
        t0 = time.perf_counter()
        # the local fit starts from initial_globals on every cell: so does this one
        n_cells = workers.store_shape(store)[0]
        fit = fit_distributed(store, client=client, rank=args.rank, modes=args.modes,
                              max_iter=args.max_iter, em_iterations=args.em_iterations,
                              chunk_cells=args.chunk_cells, out=args.out,
                              init_cells=n_cells)
        wall = time.perf_counter() - t0
        wcpu = _workers_cpu(client)
        dask_cpu = {"client_cpu_s": _cpu_seconds() - cpu0,
                    "workers_cpu_s": [wcpu[w] - wcpu0.get(w, 0.0) for w in wcpu]}
    finally:
        client.close()
        cluster.close()
    dask = {**_summary(fit), **dask_cpu}
    dask_cpu_total = dask_cpu["client_cpu_s"] + sum(dask_cpu["workers_cpu_s"])
    mu_l, d_l = np.array(local.pop("mu")), np.array(local.pop("d"))
    return {"bench": "compare", "store": store, "simulated": made, "workers": args.workers,
            "rank": args.rank, "max_iter": args.max_iter, "em_iterations": args.em_iterations,
            "load_before": load0, "load_after": _load(), "local": local, "dask": dask,
            "dask_wall_with_setup_s": wall,
            "wall_ratio_dask_over_local": dask["wall_s"] / local["wall_s"],
            "cpu_ratio_dask_over_local": dask_cpu_total / local["cpu_s"],
            "objective_rel_diff": abs(fit.objective - local["objective"])
            / abs(local["objective"]),
            "max_abs_diff_mu": float(np.max(np.abs(fit.mu - mu_l))),
            "max_abs_diff_d": float(np.max(np.abs(fit.d - d_l)))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--rank", type=int, default=16)
        q.add_argument("--genes", type=int, default=2000)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--workers", type=int, default=2)
        q.add_argument("--chunk-cells", dest="chunk_cells", type=int, default=None)
        q.add_argument("--out", default=None, help="output zarr store (default: the store)")
        q.add_argument("--tag", default="")

    q = sub.add_parser("store")
    common(q)
    q.add_argument("--cells", type=int, default=1_000_000)
    q.add_argument("--path", required=True)
    q = sub.add_parser("iterations")
    common(q)
    q.add_argument("--store", required=True)
    q.add_argument("--iterations", type=int, default=5)
    q.add_argument("--modes", default="zarr")
    q.add_argument("--counts", default="memory")
    q.add_argument("--full-iterations", dest="full_iterations", type=int, default=230,
                   help="outer iterations of a full fit, for the extrapolation (PBMC "
                        "K=10: 220-230)")
    q = sub.add_parser("modes")
    common(q)
    q.add_argument("--store", required=True)
    q.add_argument("--iterations", type=int, default=5)
    q.add_argument("--modes-list", dest="modes_list", nargs="+",
                   default=["memory", "float32", "zarr", "zarr32"])
    q = sub.add_parser("compare")
    common(q)
    q.add_argument("--cells", type=int, default=100_000)
    q.add_argument("--store", default=None)
    q.add_argument("--workdir", default="/tmp")
    q.add_argument("--max-iter", dest="max_iter", type=int, default=1000)
    q.add_argument("--em-iterations", dest="em_iterations", type=int, default=10)
    q.add_argument("--modes", default="memory")
    args = p.parse_args(argv)
    res = {"store": cmd_store, "iterations": cmd_iterations, "modes": cmd_modes,
           "compare": cmd_compare}[args.cmd](args)
    res["conditions"] = {"cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
                         "note": "2-core machine shared with other sessions"}
    text = json.dumps(res)
    print(text)
    os.makedirs(OUT, exist_ok=True)
    name = f"bench_dask_{args.cmd}{('_' + args.tag) if args.tag else ''}.json"
    with open(os.path.join(OUT, name), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
