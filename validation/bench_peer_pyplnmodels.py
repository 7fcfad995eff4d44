"""Benchmark: scribe-stan pln Laplace against pyPLNmodels PlnPCA on the shipped PBMC data.

pyPLNmodels (Chiquet, Mariadassou & Robin; Batardiere et al. 2024, JOSS 9:6969,
doi:10.21105/joss.06969) is the PLN package people use today. Its PlnPCA fits the same
Poisson log-normal model with a rank-``K`` covariance by variational inference (Adam on
the ELBO); ours is the Laplace MAP of ``Sigma = W W' + diag(d)`` with a capture prior.
Both estimate the latent log-normal covariance, so their correlation matrices should be
close: this script reports the Pearson correlation of their off-diagonal entries and the
mean absolute difference.

pyPLNmodels is never a dependency of the package: the script installs it into its own
virtual environment (``--venv``, created on first use with ``--python``; its torch CPU
wheels may need an older interpreter than ours, e.g. Python 3.11). Runs alternate,
ours then theirs, each in a fresh process of this process group, so both see the same
machine load; the wall time is the fit's (data loading and imports excluded), and each
process reports its own peak RSS. Ours runs once untimed first so that Numba's cache is
filled (compilation is measured by ``bench_pln_laplace.py``). pyPLNmodels gets the
per-cell offsets ``log`` library size (its ``compute_offsets_method="logsum"``), the
nearest match to our capture model, and its default stopping rule (400 iterations or a
relative ELBO change below 1e-6).

    python validation/bench_peer_pyplnmodels.py --runs 2 --python ~/.pyenv/versions/3.11.7/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

_OURS = r"""
import json, resource, sys, time
import numpy as np
import scribe_stan as ss
rank, genes, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
adata = ss.datasets.pbmc_donor_a()
t0 = time.perf_counter()
fit = ss.fit(adata, model="pln", rank=rank, progress=False,
             genes=None if genes == "all" else int(genes))
wall = time.perf_counter() - t0
np.save(out, fit.Sigma)
print(json.dumps({"wall_s": wall, "peak_rss_gb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1e6, "objective": fit.objective,
    "iterations": fit.n_iter, "converged": bool(fit.success)}))
"""

_THEIRS = r"""
import json, resource, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
from pyPLNmodels import PlnPCA
rank, counts_path, out, maxiter = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
counts = np.load(counts_path)
t0 = time.perf_counter()
model = PlnPCA(counts, rank=rank, compute_offsets_method="logsum")
model.fit(maxiter=maxiter)
wall = time.perf_counter() - t0
np.save(out, np.asarray(model.covariance))
iters = len(model._elbo_criterion_monitor.elbo_list)  # one ELBO per iteration
print(json.dumps({"wall_s": wall, "peak_rss_gb": resource.getrusage(
    resource.RUSAGE_SELF).ru_maxrss / 1e6, "iterations": iters,
    "maxiter": maxiter}))
"""

PEER_REQUIREMENTS = ["pyPLNmodels==1.0.10", "setuptools<81"]  # pkg_resources: gone in 81


def ensure_peer_venv(venv, python):
    """Create ``venv`` with ``python`` and install pyPLNmodels there (once)."""
    py = os.path.join(venv, "bin", "python")
    probe = [py, "-c", "import pyPLNmodels"]
    if os.path.exists(py) and subprocess.run(probe, check=False, capture_output=True).returncode == 0:
        return py
    subprocess.run([python, "-m", "venv", venv], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return py


def _run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def correlation(cov):
    sd = np.sqrt(np.diag(cov))
    return cov / np.outer(sd, sd)


def compare_correlations(a, b):
    """Agreement of two G x G correlation matrices over their off-diagonal entries."""
    off = ~np.eye(a.shape[0], dtype=bool)
    ca, cb = correlation(a)[off], correlation(b)[off]
    return {"pearson_offdiag": float(np.corrcoef(ca, cb)[0, 1]),
            "mean_abs_diff": float(np.mean(np.abs(ca - cb))),
            "max_abs_diff": float(np.max(np.abs(ca - cb)))}


def median(runs, key):
    return float(np.median([r[key] for r in runs]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--genes", default="all", help="'all' or a number of top-mean genes")
    parser.add_argument("--maxiter", type=int, default=400, help="pyPLNmodels iterations")
    parser.add_argument("--venv", default=os.path.join("validation", "out", "peer-venv"))
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the peer venv (needs a torch CPU wheel)")
    args = parser.parse_args(argv)

    import scribe_stan as ss

    peer_py = ensure_peer_venv(args.venv, args.python)
    adata = ss.datasets.pbmc_donor_a()
    if args.genes != "all":  # the same genes ss.fit(genes=n) picks: top mean expression
        order = np.argsort(-np.asarray(adata.X.mean(axis=0)).ravel(), kind="stable")
        adata = adata[:, np.sort(order[: int(args.genes)])]
    counts = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    ours, theirs, agreement = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = os.path.join(tmp, "counts.npy")
        np.save(counts_path, counts.astype(np.float64))
        s_ours, s_theirs = os.path.join(tmp, "ours.npy"), os.path.join(tmp, "theirs.npy")
        _run([sys.executable, "-c", _OURS, str(args.rank), "50", s_ours])  # Numba cache
        for _ in range(args.runs):
            ours.append(_run([sys.executable, "-c", _OURS, str(args.rank), args.genes, s_ours]))
            theirs.append(_run([peer_py, "-c", _THEIRS, str(args.rank), counts_path, s_theirs,
                                str(args.maxiter)]))
            agreement.append(compare_correlations(np.load(s_ours), np.load(s_theirs)))
    result = {
        "benchmark": "pbmc_donor_a pln: scribe-stan Laplace vs pyPLNmodels PlnPCA",
        "rank": args.rank, "cells": int(counts.shape[0]), "genes": int(counts.shape[1]),
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()[0],
        "scribe_stan": {"runs": ours, "median_wall_s": median(ours, "wall_s"),
                        "median_peak_rss_gb": median(ours, "peak_rss_gb")},
        "pyplnmodels": {"runs": theirs, "median_wall_s": median(theirs, "wall_s"),
                        "median_peak_rss_gb": median(theirs, "peak_rss_gb")},
        "wall_ratio_ours_over_theirs": median(ours, "wall_s") / median(theirs, "wall_s"),
        "correlation_agreement": agreement,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
