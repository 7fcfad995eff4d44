"""Simulation-based calibration of the full-joint Stan programs (and the Laplace check).

For each model: ``--sims`` simulations of :func:`scribe_stan.sbc.run_simulation` (prior
draw -> counts -> NUTS on ``stan/<model>.stan`` -> rank of the truth among L thinned
draws; Laplace fit of the same counts -> PIT of the true per-cell latents). Stored under
``validation/sbc/<study>/``, where the study is the model name, or ``<model>-<suffix>``
with ``--study <suffix>`` (a replication with another seed, other settings):

* ``ranks.csv``: one row per simulation (seed), one column per quantity (ranks 0..L);
* ``sims.csv``: per-simulation diagnostics (rejections, divergences, tree-depth hits,
  R-hat, bulk ESS, times, Laplace cells/genes used and errors);
* ``laplace_pit.csv``: PIT of the truth among Laplace draws per latent element;
* ``sbc.json``: settings, seed, versions, Stan hash, wall times, the per-quantity ECDF
  band test (flags), Laplace coverage of central 50 %/90 % intervals.

Figures: ``validation/figures/sbc-<study>-ranks.png`` (rank histograms),
``sbc-<study>-ecdf.png`` (ECDF differences with the simultaneous band) and
``sbc-<study>-laplace-ecdf.png`` (the same for the Laplace PIT of tracked latents).

Usage (prints the JSON summaries; run nice'd, one model at a time on a small machine)::

    python validation/run_sbc.py pln nbvcp --sims 100 [--cells 20 --genes 5 --rank 1]
        [--chains 2 --warmup 1000 --draws 500 --L 100 --max-total 1e4 --min-total 0]
        [--all-genes-detected]
        [--max-minutes 30] [--seed 0] [--study SUFFIX]

``--laplace-only GLOBALS`` (``point`` or ``laplace``) re-runs only the Laplace check on
the stored study's simulations (same seeds, so the same counts and truth; no NUTS) with
the globals at their MAP or drawn from their Gaussian (nested draws), and
writes ``laplace_<GLOBALS>_pit.csv`` and ``laplace_<GLOBALS>.json`` (coverage of the
central 50 %/90 % intervals, times) beside the study::

    python validation/run_sbc.py pln nbln --laplace-only laplace

``--resummarize`` rebuilds ``sbc.json`` and the figures from the stored CSVs without
sampling. ``--max-minutes`` stops starting new simulations after that much wall time per model;
the JSON then records how many were run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from scribe_stan import sbc  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "sbc"
FIGURES = ROOT / "figures"
BAND_PROB = 0.99


def run_laplace_only(model, args):
    """The Laplace check alone on a stored study's simulations (``--laplace-only``)."""
    study = model + (f"-{args.study}" if args.study else "")
    out = OUT / study
    stored = sbc.load_result(out, model)
    seeds = stored.sims["seed"].to_numpy()[: args.sims]
    t0 = time.perf_counter()

    def progress(i, info):
        print(f"[{study} laplace-only {args.laplace_only}] sim {i + 1}/{len(seeds)}: "
              f"{info['time_s']:.1f} s{' ' + info['error'] if info['error'] else ''}",
              file=sys.stderr, flush=True)

    pit, sims = sbc.laplace_study(model, seeds, stored.settings, globals=args.laplace_only,
                                  progress=progress)
    pit.to_csv(out / f"laplace_{args.laplace_only}_pit.csv", index=False)
    summary = {"model": model, "study": study, "globals": args.laplace_only,
               "n_sims": int(len(seeds)), "sims_failed": int(sims["error"].notna().sum()),
               "time_per_sim_s": {"median": float(sims["time_s"].median()),
                                  "max": float(sims["time_s"].max())},
               "coverage": sbc.coverage_table(pit).to_dict(orient="index"),
               "command": " ".join(["python", "validation/run_sbc.py", *sys.argv[1:]]),
               "total_wall_time_s": time.perf_counter() - t0}
    (out / f"laplace_{args.laplace_only}.json").write_text(
        json.dumps(summary, indent=1, default=_json_default) + "\n")
    return summary


def run_model(model, args):
    settings = sbc.SBCSettings(N=args.cells, G=args.genes, K=args.rank, chains=args.chains,
                               warmup=args.warmup, draws=args.draws, L=args.L,
                               adapt_delta=args.adapt_delta, max_total=args.max_total,
                               min_total=args.min_total,
                               all_genes_detected=args.all_genes_detected)
    study = model + (f"-{args.study}" if args.study else "")
    out = OUT / study
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def progress(i, res):
        print(f"[{study}] sim {i + 1}/{args.sims}: {res['wall_time_s']:.1f} s, "
              f"divergences {res['divergences']}, max R-hat {res['max_rhat']:.3f}",
              file=sys.stderr, flush=True)

    if args.resummarize:  # stored simulations only: new summary and figures
        old = json.loads((out / "sbc.json").read_text())
        res = sbc.load_result(out, model)
        settings = res.settings
        summary = res.summary(BAND_PROB)
        summary.update({k: old[k] for k in ("seed", "sims_requested", "stopped_by_budget",
                                            "command", "total_wall_time_s") if k in old})
    else:
        res = sbc.run_sbc(model, args.sims, settings=settings, seed=args.seed,
                          progress=progress,
                          time_budget_s=60 * args.max_minutes if args.max_minutes else None)
        res.ranks.to_csv(out / "ranks.csv")
        res.sims.to_csv(out / "sims.csv", index=False)
        res.laplace_pit.to_csv(out / "laplace_pit.csv", index=False)
        summary = res.summary(BAND_PROB)
        summary.update(seed=args.seed, sims_requested=args.sims,
                       stopped_by_budget=len(res.ranks) < args.sims,
                       command=" ".join(["python", "validation/run_sbc.py", *sys.argv[1:]]),
                       total_wall_time_s=time.perf_counter() - t0)
    (out / "sbc.json").write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")

    FIGURES.mkdir(exist_ok=True)
    title = (f"SBC {study}: {len(res.ranks)} sims, N={settings.N}, G={settings.G}, "
             f"K={settings.K}, L={settings.L}")
    fig = sbc.plot_rank_histograms(res.ranks, settings.L, flagged=summary["flagged"],
                                   title=title)
    fig.savefig(FIGURES / f"sbc-{study}-ranks.png", dpi=90)
    plt.close(fig)
    fig = sbc.plot_ecdf_differences(res.pit(), prob=BAND_PROB, flagged=summary["flagged"],
                                    title=title)
    fig.savefig(FIGURES / f"sbc-{study}-ecdf.png", dpi=90)
    plt.close(fig)
    lap = res.laplace_tracked_pit().dropna(axis=1, how="all")
    if lap.shape[1] and lap.dropna().shape[0] >= 2:
        fig = sbc.plot_ecdf_differences(lap, prob=BAND_PROB,
                                        title=f"Laplace PIT of tracked latents, {study}")
        fig.savefig(FIGURES / f"sbc-{study}-laplace-ecdf.png", dpi=90)
        plt.close(fig)
    return summary


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(type(o))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=list(sbc.MODELS), choices=sbc.MODELS)
    p.add_argument("--sims", type=int, default=100)
    p.add_argument("--cells", type=int, default=20)
    p.add_argument("--genes", type=int, default=5)
    p.add_argument("--rank", type=int, default=1)
    defaults = sbc.SBCSettings()
    p.add_argument("--chains", type=int, default=defaults.chains)
    p.add_argument("--warmup", type=int, default=defaults.warmup)
    p.add_argument("--draws", type=int, default=defaults.draws)
    p.add_argument("--L", type=int, default=defaults.L)
    p.add_argument("--adapt-delta", type=float, default=defaults.adapt_delta)
    p.add_argument("--max-total", type=float, default=defaults.max_total,
                   help="redraw simulations whose largest per-cell total exceeds this")
    p.add_argument("--min-total", type=float, default=defaults.min_total,
                   help="redraw simulations in which no cell reaches this total")
    p.add_argument("--all-genes-detected", action="store_true",
                   help="redraw simulations in which a gene has no count in any cell")
    p.add_argument("--study", default="",
                   help="suffix of the study name: results go to validation/sbc/<model>-<study>/ "
                        "(e.g. a replication with another --seed) instead of <model>/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--resummarize", action="store_true",
                   help="rebuild sbc.json and figures from the stored CSVs (no sampling)")
    p.add_argument("--laplace-only", choices=("point", "laplace"), default=None,
                   help="re-run only the Laplace check on the stored study's simulations, "
                        "with the globals at their MAP (point) or drawn from their "
                        "Gaussian (laplace)")
    args = p.parse_args(argv)
    if args.laplace_only:
        out = {m: run_laplace_only(m, args) for m in args.models}
        print(json.dumps({m: {k: s[k] for k in ("n_sims", "sims_failed", "coverage")}
                          for m, s in out.items()}, indent=1, default=_json_default))
        return
    with contextlib.redirect_stdout(sys.stderr):  # pystan's build messages
        summaries = {m: run_model(m, args) for m in args.models}
    brief = {m: {"n_sims": s["n_sims"], "flagged": s["flagged"],
                 "expected_false_flags": s["expected_false_flags"],
                 "wall_time_per_sim_s": s["wall_time_per_sim_s"],
                 "laplace_coverage": s["laplace"]["coverage"]} for m, s in summaries.items()}
    print(json.dumps(brief, indent=1, default=_json_default))


if __name__ == "__main__":
    main()
