"""Benchmark: first-call Numba compilation of the pln Laplace fit (README command 1).

A tiny fit (the first 50 PBMC cells, their 30 highest-mean genes, K=10) costs next to
nothing beyond compiling and loading the kernels, so its wall time in a fresh process is
the compilation overhead of the main job's first call. Compilation runs on one thread,
so on a machine shared with other work the fit's process CPU time (``cpu_s``) is the
steadier figure. Each run is a fresh Python process:

- ``cold``: an empty ``NUMBA_CACHE_DIR``, so every kernel the fit calls is compiled;
- ``warm``: a second process on the cache the cold run filled (on-disk cache loading).

Each run reports the fit's wall time, the import time of the package, and per kernel
(dispatcher) the time spent in Numba's compile events and the number of signatures it
compiled (a kernel compiled twice is a duplicate type specialization). With ``--before
PATH`` the same runs alternate with a second source tree (for example ``git archive`` of
an earlier commit unpacked into PATH), put first on ``PYTHONPATH``, so the ratio comes
from one session of the machine. Prints one JSON object with the medians.

    python validation/bench_compile.py --runs 3
    python validation/bench_compile.py --runs 3 --before /tmp/scribe-main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_ONE_RUN = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
from numba.core import event
import scribe_stan as ss
t_import = time.perf_counter() - t0
cells, genes, rank = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
adata = ss.datasets.pbmc_donor_a()[:cells]
X = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
adata = adata[:, np.argsort(-X.mean(axis=0), kind="stable")[:genes]].copy()
t1, c1 = time.perf_counter(), time.process_time()
with event.install_recorder("numba:compile") as rec:
    fit = ss.fit(adata, model="pln", method="laplace", rank=rank, progress=False)
wall, cpu = time.perf_counter() - t1, time.process_time() - c1
# Inclusive time of each top-level compile (callees compiled inside it are not counted
# separately), keyed by the dispatcher's qualified name.
kernels, depth, start = {}, 0, 0.0
for ts, ev in rec.buffer:
    if ev.is_start:
        depth += 1
        if depth == 1:
            start = ts
    else:
        depth -= 1
        if depth == 0:
            disp = ev.data["dispatcher"]
            name = f"{disp.py_func.__module__}.{disp.py_func.__qualname__}"
            k = kernels.setdefault(name, {"compile_s": 0.0, "signatures": 0})
            k["compile_s"] += ts - start
            k["signatures"] = len(disp.signatures)
print(json.dumps({"source": ss.__file__, "wall_s": wall, "cpu_s": cpu, "import_s": t_import,
                  "outer_iterations": fit.n_iter, "objective": fit.objective, "kernels": kernels}))
"""


def run_once(cells, genes, rank, cache_dir, source=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join([source, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # -P: the working directory stays off sys.path, so PYTHONPATH picks the source tree
    out = subprocess.run([sys.executable, "-P", "-c", _ONE_RUN, str(cells), str(genes), str(rank)],
                         check=False, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"run failed (source {source or 'installed'}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs):
    """Medians over runs of the walls and of each kernel's compile time."""
    names = sorted({k for r in runs for k in r["kernels"]})
    return {
        "median_wall_s": float(np.median([r["wall_s"] for r in runs])),
        "median_cpu_s": float(np.median([r["cpu_s"] for r in runs])),
        "median_import_s": float(np.median([r["import_s"] for r in runs])),
        "median_compile_s": float(np.median([sum(k["compile_s"] for k in r["kernels"].values())
                                             for r in runs])),
        "kernels": {n: {"median_compile_s": float(np.median(
                            [r["kernels"].get(n, {"compile_s": 0.0})["compile_s"] for r in runs])),
                        "signatures": max(r["kernels"].get(n, {"signatures": 0})["signatures"]
                                          for r in runs)}
                    for n in names},
        "runs": runs,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cells", type=int, default=50)
    parser.add_argument("--genes", type=int, default=30)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--before", default=None,
                        help="a second source tree to measure alternately (its parent of "
                             "scribe_stan/), reported under 'before'")
    args = parser.parse_args(argv)
    trees = {"after": None} if args.before is None else {"before": args.before, "after": None}
    runs = {t: {"cold": [], "warm": []} for t in trees}
    for _ in range(args.runs):
        for tree, source in trees.items():
            with tempfile.TemporaryDirectory() as cache:
                for kind in ("cold", "warm"):
                    run = run_once(args.cells, args.genes, args.rank, cache, source)
                    runs[tree][kind].append(run)
                    print(json.dumps({"tree": tree, "kind": kind, **run}), file=sys.stderr,
                          flush=True)  # progress, and the runs so far if a later one fails
    out = {"benchmark": "pbmc_donor_a-pln-laplace-compile", "cells": args.cells,
           "genes": args.genes, "rank": args.rank, "runs_each": args.runs,
           "cpu_count": os.cpu_count()}
    for tree in trees:
        out[tree] = {kind: summary(r) for kind, r in runs[tree].items()}
    if args.before is not None:
        out["ratio_after_over_before"] = {
            f"{kind}_{what}": out["after"][kind][f"median_{what}_s"]
            / out["before"][kind][f"median_{what}_s"]
            for kind in ("cold", "warm") for what in ("wall", "cpu")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
