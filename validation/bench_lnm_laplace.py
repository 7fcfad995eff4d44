"""Benchmark: lnm Laplace on the bundled PBMC data, K = 10; prints JSON.

Reports wall time, peak RSS and per-cell Newton iterations of the lnm fit, and compares
its CLR correlation structure with pln's: pln's log-rate covariance is taken to CLR
coordinates with the centring matrix ``C = I - 11'/G`` (the CLR of ``x`` removes each
cell's mean log-rate, which is also what cancels the capture), and the two G x G
correlation matrices are compared through the Pearson correlation of their
off-diagonal entries. pln's fit takes minutes; ``--skip-pln`` leaves it out.

Usage: python validation/bench_lnm_laplace.py [--rank 10] [--model lnm] [--max-iter N]
       [--skip-pln]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np
import pandas as pd

import scribe_stan as ss
from scribe_stan import convert
from scribe_stan.laplace import lnm_solver


def _cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _pln_globals(adata, rank, cache):
    """pln's (W, d, var_names, info), from ``cache`` when it exists, else fitted (and cached)."""
    if cache and os.path.exists(cache):
        z = np.load(cache)
        return z["W"], z["d"], z["var_names"], json.loads(str(z["info"]))
    t1 = time.perf_counter()
    fit = ss.fit(adata, model="pln", rank=rank, progress=False)
    info = {"wall_time_s": round(time.perf_counter() - t1, 2),
            "cells_converged": int(fit.converged.sum())}
    names = np.asarray(fit.var_names, dtype=str)
    if cache:
        np.savez(cache, W=fit.W, d=fit.d, var_names=names, info=json.dumps(info))
    return fit.W, fit.d, names, info


def _cold_start_newton(fit):
    """Per-cell Newton iterations from the data start at the moment-start globals (the
    fit's first evaluation; later ones are warm-started and take one or two)."""
    comp = fit.composition
    prob = lnm_solver.CompositionProblem(fit.data.counts, fit.ref, mode=comp.problem.mode)
    mu, W, d = lnm_solver.initial_composition(prob, comp.W.shape[1])
    prob.modes(mu, W, d if comp.d is not None else None)
    n = prob.n_iter
    return {"mean": float(n.mean()), "median": float(np.median(n)), "max": int(n.max())}


def _offdiag(m):
    return m[np.triu_indices(m.shape[0], k=1)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--model", default="lnm", choices=["lnm", "lnmvcp"])
    parser.add_argument("--mode", default="full", choices=["full", "low_rank"])
    parser.add_argument("--max-iter", type=int, default=1000, help="outer L-BFGS iterations")
    parser.add_argument("--skip-pln", action="store_true")
    parser.add_argument("--pln-cache", default=None,
                        help="npz with pln's W, d, var_names: read if present, else written "
                             "after fitting pln")
    parser.add_argument("--pln-only", action="store_true",
                        help="only fit pln and write --pln-cache (run it beside the lnm fit)")
    args = parser.parse_args()

    adata = ss.datasets.pbmc_donor_a()
    if args.pln_only:
        _pln_globals(adata, args.rank, args.pln_cache)
        return
    t0, c0 = time.perf_counter(), _cpu_s()
    fit = ss.fit(adata, model=args.model, rank=args.rank, mode=args.mode,
                 max_iter=args.max_iter, progress=True)  # tqdm on stderr
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    n_newton = fit.n_newton
    out = {
        "benchmark": f"pbmc_donor_a-{args.model}-laplace",
        "cells": int(adata.n_obs), "genes": int(fit.var_names.size), "rank": args.rank,
        "mode": args.mode, "reference_gene": fit.reference_gene,
        "wall_time_s": round(wall, 2), "cpu_time_s": round(cpu, 2),
        "peak_rss_gb": round(_peak_rss_gb(), 3),
        "objective": fit.objective, "composition_objective": fit.composition.objective,
        "outer_iterations": fit.composition.n_iter, "objective_evaluations": fit.composition.n_eval,
        "optimizer_success": fit.success, "cells_converged": int(fit.converged.sum()),
        "newton_iterations_cold_start": _cold_start_newton(fit),
        "newton_iterations_last_evaluation": {
            "mean": float(n_newton.mean()), "median": float(np.median(n_newton)),
            "max": int(n_newton.max())},
        "m_T": fit.m_T, "r_T": fit.r_T,
    }
    if not args.skip_pln:
        W, d, names, pln_info = _pln_globals(adata, args.rank, args.pln_cache)
        G = names.size
        C = np.eye(G) - 1.0 / G
        Sigma_pln = W @ W.T + np.diag(d)
        corr_pln_clr = convert.corr_from_cov(C @ Sigma_pln @ C)
        corr_pln = convert.corr_from_cov(Sigma_pln)
        pos = pd.Index(names).get_indexer(fit.var_names)
        corr_lnm = fit.corr_clr
        a = _offdiag(corr_lnm)
        out["pln"] = {
            **pln_info,
            "corr_offdiag_pearson_lnm_clr_vs_pln_clr": float(np.corrcoef(
                a, _offdiag(corr_pln_clr[np.ix_(pos, pos)]))[0, 1]),
            "corr_offdiag_pearson_lnm_clr_vs_pln_lograte": float(np.corrcoef(
                a, _offdiag(corr_pln[np.ix_(pos, pos)]))[0, 1]),
            "corr_offdiag_mean_abs_diff_clr": float(np.mean(np.abs(
                a - _offdiag(corr_pln_clr[np.ix_(pos, pos)])))),
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
