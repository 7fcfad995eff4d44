"""DoRothEA held-out-edge check of GRN inference on real PBMC data (JSON).

Protocol (PMF-GRN's validation; Skok Gibbs et al. 2024, Genome Biology 25:88): DoRothEA
levels A-D (``../shared/data/dorothea_hs.csv.gz``) restricted to the 2000 highest-mean
genes; the genes of the network are the prior's genes among them (regulators and
targets). A pln Laplace fit (rank 10, library sizes over all genes) on those genes only,
then 20% of each TF's prior targets hidden (:func:`scribe_stan.grn_eval.holdout_prior`,
``n_splits`` random splits), inference with the kept edges as a *soft* prior (a hard
prior would give the hidden edges no chance) and with no prior, and the hidden edges
ranked among each TF's non-prior pairs: AUPRC ratio with a 95% bootstrap interval over
TFs (:func:`scribe_stan.grn_eval.holdout_auprc`). The Lyapunov estimator (dense, slowest)
runs on ``pbmc_donor_a`` only unless ``--lyapunov-all``. Data sets: ``pbmc_donor_a`` and each
cell type of ``pbmc_sorted_reference`` with at least ``--min-cells`` cells.

    python validation/grn_dorothea_holdout.py --out validation/out/grn_dorothea.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import time
import warnings

import anndata
import numpy as np
import pandas as pd

import scribe_stan as ss
from scribe_stan import grn_eval, grn_infer, grn_prior

DATA = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "data"
#: (method, input) pairs scored; lyapunov only where the network has <= 400 genes
METHODS = (("ridge", "latent"), ("ridge", "lognorm"), ("correlation", "latent"),
           ("correlation", "lognorm"), ("lyapunov", "latent"))


def network_genes(adata, prior, n_top=2000):
    """The prior's genes among the ``n_top`` highest-mean genes of ``adata``."""
    mean = np.asarray(adata.X.mean(axis=0)).ravel()
    top = adata.var_names[np.argsort(-mean, kind="stable")[:n_top]]
    m, _ = prior.match(list(top), warn=False)
    genes = sorted(set(m["regulator"]) | set(m["target"]))
    return genes, m


def run_dataset(name, adata, prior, *, rank, n_splits, seed, max_iter, fit_iter,
                genes_from=None, lyapunov=True):
    """Fit ``adata`` on the network genes and score every method on ``n_splits`` splits.

    ``genes_from``: the AnnData whose 2000 highest-mean genes define the network (default
    ``adata``; the sorted reference's cell types share the whole reference's genes).
    """
    genes, matched = network_genes(adata if genes_from is None else genes_from, prior)
    lib = np.asarray(adata.X.sum(axis=1)).ravel().astype(float)
    sub = adata[:, genes].copy()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ss.fit(sub, model="pln", rank=rank, library_size=lib, progress=False,
                     max_iter=fit_iter)
    fit_s = time.perf_counter() - t0
    # genes with no count in these cells are dropped by the fit (with a warning): the
    # network and its prior edges are restricted to the fitted genes
    genes = [g for g in genes if g in set(fit.var_names)]
    matched = matched[matched["regulator"].isin(genes) & matched["target"].isin(genes)]
    local = grn_prior.GrnPrior(matched.drop(columns=["reg_idx", "tgt_idx"])
                               .reset_index(drop=True), prior.sources)
    rng = np.random.default_rng(seed)
    rows = []
    no_prior = {}  # the no-prior ranking does not depend on the split: inferred once
    for split in range(n_splits):
        kept, hidden = grn_eval.holdout_prior(local, fraction=0.2, rng=rng)
        for method, inp in METHODS:
            if method == "lyapunov" and (not lyapunov
                                         or len(genes) > grn_infer.MAX_DENSE_GENES):
                continue
            for pname, pr in (("soft", kept), ("none", None)):
                t1 = time.perf_counter()
                if pname == "none" and (method, inp) in no_prior:
                    res = no_prior[(method, inp)]
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = grn_infer.infer_grn(
                            fit, prior=pr, method=method, input=inp, genes=genes,
                            regulators=local.regulators, support="soft",
                            max_iter=max_iter)
                    if pname == "none":
                        no_prior[(method, inp)] = res
                h = grn_eval.holdout_auprc(res.edges, hidden, kept, genes, n_boot=500,
                                           rng=np.random.default_rng(seed + split))
                rows.append({"data": name, "cells": adata.n_obs, "genes": len(genes),
                             "prior_edges": len(local), "tfs": len(local.regulators),
                             "split": split, "method": method, "input": inp,
                             "prior": pname, **h, "infer_s": round(time.perf_counter() - t1, 2),
                             "fit_s": round(fit_s, 1),
                             "fit_converged_share": float(np.mean(fit.converged))})
        print(json.dumps(rows[-1], default=float), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="validation/out/grn_dorothea.json")
    ap.add_argument("--rank", type=int, default=10)
    ap.add_argument("--splits", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=300, help="lyapunov iterations")
    ap.add_argument("--fit-iter", type=int, default=200, help="Laplace outer iterations")
    ap.add_argument("--min-cells", type=int, default=100)
    ap.add_argument("--cell-types", nargs="*", default=None)
    ap.add_argument("--lyapunov-all", action="store_true",
                    help="lyapunov on every cell type too (default: pbmc_donor_a only)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    prior = grn_prior.read_prior(DATA / "dorothea_hs.csv.gz", levels="ABCD")
    rows = []
    donor = anndata.read_h5ad(DATA / "pbmc_donor_a.h5ad")
    rows += run_dataset("pbmc_donor_a", donor, prior, rank=a.rank, n_splits=a.splits,
                        seed=a.seed, max_iter=a.max_iter, fit_iter=a.fit_iter)
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    ref = anndata.read_h5ad(DATA / "pbmc_sorted_reference.h5ad")
    counts = ref.obs["cell_type"].value_counts()
    types = a.cell_types or [t for t, n in counts.items() if n >= a.min_cells]
    for ct in types:
        rows += run_dataset(f"sorted_{ct}", ref[ref.obs["cell_type"] == ct].copy(), prior,
                            rank=a.rank, n_splits=a.splits, seed=a.seed,
                            max_iter=a.max_iter, fit_iter=a.fit_iter, genes_from=ref,
                            lyapunov=a.lyapunov_all)
        pd.DataFrame(rows).to_csv(pathlib.Path(a.out).with_suffix(".partial.csv"),
                                  index=False)
    df = pd.DataFrame(rows)
    summary = (df.groupby(["data", "method", "input", "prior"])
               .agg(cells=("cells", "first"), genes=("genes", "first"),
                    tfs=("tfs", "first"), n_hidden=("n_hidden", "mean"),
                    auprc_ratio=("auprc_ratio", "mean"), ratio_low=("ratio_low", "mean"),
                    ratio_high=("ratio_high", "mean"), fit_s=("fit_s", "first"))
               .round(3).reset_index())
    out = {"settings": vars(a), "summary": summary.to_dict("records"),
           "runs": df.round(4).to_dict("records"),
           "wall_time_s": round(time.perf_counter() - t0, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}
    path = pathlib.Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=float))
    print(json.dumps({k: out[k] for k in ("summary", "wall_time_s", "peak_rss_gb")},
                     default=float))


if __name__ == "__main__":
    main()
