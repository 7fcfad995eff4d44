"""Benchmark of GRN inference with prior knowledge on simulated networks (JSON + figure).

Networks from :func:`scribe_stan.grn.simulate_grn`; each data set is fitted once by the
Laplace solver (pln or nbln, rank = regulators), then every method infers the network
from the fitted latents and from log-normalized counts, with no prior and with priors
of given quality (recall of true edges x false edges per true edge, plus a shuffled
prior), hard and soft. Metrics: BEELINE's AUPRC, AUPRC ratio, EPR, sign accuracy
(:mod:`scribe_stan.grn_eval`). Timing: the Lyapunov estimator on a 100-gene network
from 5000 cells, and the ridge path on 2000 genes with 100 regulators.

    python validation/bench_grn_inference.py --out validation/out/grn     # default grid
    python validation/bench_grn_inference.py --quick                      # CI-sized
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import time
import warnings

import numpy as np
import pandas as pd

import scribe_stan as ss
from scribe_stan import grn, grn_eval, grn_infer

METHODS = ("lyapunov", "partial_correlation", "ridge", "correlation")


#: Seed of the shuffled prior's gene permutation (fixed, independent of the case seed and
#: of how many other priors were drawn before it).
SHUFFLE_SEED = 20190401


def run_case(model, G, N, density, seed, recalls, falses, inputs, max_iter, sweep=True):
    """Fit one simulated data set and score every method (and, with ``sweep``, every prior).

    Returns a list of dicts, one per (prior, method, input, support), with the BEELINE
    metrics of :func:`scribe_stan.grn_eval.edge_metrics` and the inference wall time.
    """
    n_reg = max(2, G // 10)
    adata, truth = grn.simulate_grn(N, G, model=model, rank=n_reg, seed=seed,
                                    density=density, lib_target=50.0 * G)
    genes = list(adata.var_names)
    te = truth["edges"].assign(regulator=lambda f: [genes[i] for i in f.regulator],
                               target=lambda f: [genes[i] for i in f.target])
    t0 = time.perf_counter()
    fit = ss.fit(adata, model=model, rank=n_reg, progress=False,
                 library_size=adata.obs["library_size"].to_numpy())
    fit_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    priors = {"none": None}
    for rc in (recalls if sweep else ()):
        for fp in falses:
            if rc == 0 and fp == 0:
                continue
            priors[f"r{rc}_f{fp}"] = grn_eval.simulated_prior(
                truth["edges"], genes, recall=rc, false_per_true=fp, rng=rng)
    if sweep:
        priors["shuffled"] = grn_eval.simulated_prior(
            truth["edges"], genes, recall=1, false_per_true=0, shuffle=True,
            rng=np.random.default_rng(SHUFFLE_SEED))
    rows = []
    case = dict(model=model, G=G, N=N, density=density, seed=seed, n_true=len(te),
                fit_s=round(fit_s, 2))
    for pname, prior in priors.items():
        if prior is None and pname != "none":
            continue
        rec = dict(case, prior=pname)
        if prior is not None:
            m = grn_eval.edge_metrics(prior.edges.assign(score=prior.edges.confidence), te, genes)
            rows.append(dict(rec, method="prior", input="-", support="-", **m, time_s=0.0))
        for method in METHODS + ("random",):
            for inp in (inputs if method != "random" else ("latent",)):
                for sup in (("hard", "soft") if prior is not None else ("hard",)):
                    t1 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = grn_infer.infer_grn(fit, prior=prior, method=method, genes=genes,
                                                  support=sup, input=inp, max_iter=max_iter,
                                                  regulators=genes if sup == "soft" else None)
                    m = grn_eval.edge_metrics(res.edges, te, genes)
                    rows.append(dict(rec, method=method, input=inp, support=sup, **m,
                                     time_s=round(time.perf_counter() - t1, 3)))
    return rows


def timing_lyapunov(G=100, N=5000, seed=0, max_iter=3000):
    """Lyapunov estimator on a 100-gene network from 5000 cells (no prior: all 9900 pairs).

    The pln Laplace fit is timed separately (``fit_s``); ``infer_s`` is the estimator
    (latent moments with the posterior covariance term, then L-BFGS-B to convergence or
    ``max_iter``).
    """
    adata, truth = grn.simulate_grn(N, G, model="pln", rank=10, seed=seed, density=0.1,
                                    lib_target=50.0 * G)
    t0 = time.perf_counter()
    fit = ss.fit(adata, model="pln", rank=10, progress=False,
                 library_size=adata.obs["library_size"].to_numpy())
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    res = grn_infer.infer_grn(fit, method="lyapunov", max_iter=max_iter)
    inf_s = time.perf_counter() - t1
    genes = list(adata.var_names)
    te = truth["edges"].assign(regulator=lambda f: [genes[i] for i in f.regulator],
                               target=lambda f: [genes[i] for i in f.target])
    return {"G": G, "N": N, "fit_s": round(fit_s, 2), "infer_s": round(inf_s, 2),
            "max_iter": max_iter, "n_iter": res.info["n_iter"],
            "success": res.info["success"],
            **{k: v for k, v in grn_eval.edge_metrics(res.edges, te, genes).items()}}


def timing_ridge(G=2000, R=100, N=5000, K=10, seed=0):
    """Ridge path on a synthetic pln latent source (timing of the inference step only)."""
    rng = np.random.default_rng(seed)
    W = 0.3 * rng.standard_normal((G, K))
    d = rng.uniform(0.1, 0.3, G)
    mu = rng.normal(0.0, 1.0, G)
    x = mu + rng.standard_normal((N, K)) @ W.T + np.sqrt(d) * rng.standard_normal((N, G))
    src = grn_infer.LatentSource(model="pln", genes=pd.Index([f"g{i}" for i in range(G)]),
                                 obs_names=pd.Index([f"c{i}" for i in range(N)]), x=x,
                                 counts=rng.poisson(np.exp(x)), log_lib=np.full(N, 8.0),
                                 mu=mu, W=W, d=d, eta=np.zeros(N), a=np.zeros(N),
                                 sigma=np.ones(N))
    prior = pd.DataFrame({"regulator": [f"g{i}" for i in rng.integers(0, R, 3000)],
                          "target": [f"g{i}" for i in rng.integers(0, G, 3000)]})
    orig = grn_infer.latent_source
    grn_infer.latent_source = lambda fit, key=None: src
    try:
        out = {}
        for bags in (0, 10):
            t0 = time.perf_counter()
            res = grn_infer.infer_grn(object(), prior=prior, method="ridge", support="soft",
                                      n_bags=bags)
            out[f"n_bags={bags}_s"] = round(time.perf_counter() - t0, 2)
    finally:
        grn_infer.latent_source = orig
    return {"G": G, "regulators": len(res.regulators), "N": N, **out}


def summarize(df):
    """Gain in AUPRC ratio over no prior, per method/input/support and prior quality."""
    base = (df[df.prior == "none"].groupby(["model", "G", "N", "density", "seed", "method", "input"])
            ["auprc_ratio"].mean().rename("none"))
    d = df[df.prior != "none"].join(base, on=["model", "G", "N", "density", "seed", "method",
                                                   "input"])
    d["gain"] = d["auprc_ratio"] - d["none"]
    return (d.groupby(["method", "input", "support", "prior"])[["auprc_ratio", "gain", "epr",
                                                               "sign_accuracy"]]
            .mean().reset_index())


def figure(summary, path):
    """Bars of the AUPRC ratio (left) and its gain over no prior (right) per prior quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary[(summary.input.isin(["latent", "-"]))]
    priors = sorted(s.prior.unique(), key=lambda p: (p == "shuffled", p))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    keys = [("lyapunov", "soft"), ("lyapunov", "hard"), ("ridge", "soft"), ("ridge", "hard"),
            ("partial_correlation", "soft"), ("prior", "-")]
    w = 0.8 / len(keys)
    for ax, col, lab in zip(axes, ("auprc_ratio", "gain"),
                            ("AUPRC ratio (latent input)", "gain over no prior")):
        for i, (m, sup) in enumerate(keys):
            sel = s[(s.method == m) & (s.support == sup)].set_index("prior").reindex(priors)
            ax.bar(np.arange(len(priors)) + i * w, sel[col], width=w, label=f"{m} {sup}")
        ax.set_xticks(np.arange(len(priors)) + 0.4, priors, rotation=45, ha="right")
        ax.set_ylabel(lab)
        ax.axhline(0, color="black", lw=0.5)
    axes[0].set_title("prior recall (r) x false edges per true edge (f)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="validation/out/grn")
    ap.add_argument("--quick", action="store_true", help="one small case (CI size)")
    ap.add_argument("--genes", type=int, nargs="+", default=[20],
                    help="prior sweep: genes")
    ap.add_argument("--cells", type=int, nargs="+", default=[1000],
                    help="prior sweep: cells")
    ap.add_argument("--models", nargs="+", default=["pln", "nbln"])
    ap.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--scale-genes", type=int, nargs="+", default=[20, 50, 100],
                    help="no-prior grid (pln, first density, first seed): genes")
    ap.add_argument("--scale-cells", type=int, nargs="+", default=[500, 2000],
                    help="no-prior grid: cells")
    ap.add_argument("--recalls", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--falses", type=float, nargs="+", default=[0, 1, 3])
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--figures", default=str(pathlib.Path(__file__).parent / "figures"))
    a = ap.parse_args(argv)
    if a.quick:
        a.genes, a.cells, a.recalls, a.falses = [12], [300], [0.5, 1.0], [0, 1]
        a.models, a.densities, a.seeds, a.scale_genes, a.scale_cells = (["pln"], [0.3], [0],
                                                                        [], [])
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = []
    for model in a.models:
        for G in a.genes:
            for N in a.cells:
                for dens in a.densities:
                    for seed in a.seeds:
                        rows += [dict(r, grid="sweep") for r in run_case(
                            model, G, N, dens, seed, a.recalls, a.falses,
                            ("latent", "lognorm"), a.max_iter)]
    scale_rows = []
    for G in a.scale_genes:
        for N in a.scale_cells:
            scale_rows += [dict(r, grid="scale") for r in run_case(
                "pln", G, N, a.densities[0], a.seeds[0], (), (), ("latent", "lognorm"),
                a.max_iter, sweep=False)]
    if scale_rows:
        pd.DataFrame(scale_rows).to_csv(out / "grn_scale_runs.csv", index=False)
    df = pd.DataFrame(rows)
    df.to_csv(out / "grn_runs.csv", index=False)
    summary = summarize(df)
    summary.to_csv(out / "grn_summary.csv", index=False)
    fig_dir = pathlib.Path(a.figures)
    fig_dir.mkdir(parents=True, exist_ok=True)
    fig_path = figure(summary, fig_dir / ("grn_prior_sweep_quick.png" if a.quick
                                          else "grn_prior_sweep.png"))
    result = {"settings": vars(a), "n_runs": len(df),
              "no_prior": df[df.prior == "none"].groupby(["model", "method", "input"])
              [["auprc_ratio", "epr", "sign_accuracy"]].mean().round(3).reset_index()
              .to_dict("records"),
              "summary": summary.round(3).to_dict("records"), "figure": str(fig_path)}
    if scale_rows:
        sc = pd.DataFrame(scale_rows)
        result["scale_no_prior"] = (sc.groupby(["G", "N", "method", "input"])
                                    [["auprc_ratio", "epr", "sign_accuracy", "time_s",
                                      "fit_s"]].mean().round(3).reset_index()
                                    .to_dict("records"))
    if not a.no_timing and not a.quick:
        result["timing_lyapunov_100_genes_5000_cells"] = timing_lyapunov(max_iter=a.max_iter)
        result["timing_ridge_2000_genes_100_regulators"] = timing_ridge()
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)
    (out / "grn_bench.json").write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: result[k] for k in result if k not in ("summary",)}, default=float))


if __name__ == "__main__":
    main()
