"""Regenerate ``validation/REPORT.md`` and its figures: Laplace against stored NUTS.

For every reference pair (:mod:`references`) the Laplace fit is run again (seconds) and
compared with the stored NUTS reference (no re-sampling):

* per-cell latents (``x``, ``y``, ``eta``): standardized mean difference (SMD), sd ratio
  and the share of NUTS draws inside the Laplace 90% central interval
  (:func:`scribe_stan.compare` on the stored thinned draws; SMD and sd ratio use the NUTS
  mean and sd over *all* draws from the stored summary, so thinning adds no Monte Carlo
  error to them);
* globals (Sigma / correlation entries, or m and r for nbvcp): the Laplace point
  estimate's SMD against NUTS and whether it lies in the NUTS 90% interval;
* both Laplace variants: the globals at their MAP (``globals="point"``) and
  drawn from their Gaussian approximation (``globals="laplace"``, nested draws), each
  against the full NUTS reference and against NUTS conditional on the Laplace globals
  (run here, 4 x (500 + 500), not stored; skipped with ``--reduced``); the nested
  variant's globals (mu, d, r, Sigma) against NUTS by sd ratio;
* the Laplace objective against Stan's embedded Laplace (pln, nbln), per cell, at the
  fitted globals and capture modes;
* wall times of both fits;
* agreement by count depth: genes split at the median of their mean count.

Decision: the point-globals Laplace posteriors are conditional on point estimates of
the globals, while the full NUTS reference integrates over them; sd ratios below 1 there
partly measure the global uncertainty that the point variant leaves out, by design, and
the comparison with conditional NUTS isolates the per-cell Gaussian.

    python validation/make_report.py            # all pairs -> validation/REPORT.md
    python validation/make_report.py --reduced  # CI: two pairs, fewer draws
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import references  # noqa: E402
import scribe_stan as ss  # noqa: E402
from scribe_stan import nuts, stan  # noqa: E402
from scribe_stan.models import nbln, pln  # noqa: E402

HERE = Path(__file__).resolve().parent
PROB = 0.9
LATENTS = ("x", "y", "eta")
GLOBALS = ("Sigma", "corr", "corr_clr", "m", "r")
#: Globals whose posterior sds the nested variant is compared on (rotation-invariant).
NESTED_GLOBALS = ("mu", "log_d", "log_r", "Sigma", "m", "mu_clr", "Sigma_clr", "m_T",
                  "log_r_T")
#: Positive globals compared on the log scale (``log_<name>``): the Gaussians live there,
#: and NUTS's natural-scale sd of a weakly determined dispersion is its tail's.
LOG_SCALE = ("d", "r", "r_T")
#: NUTS conditional on the Laplace globals (models with a conditional program).
CONDITIONAL_MODELS = ("pln", "nbln", "lnm", "lnmvcp")
CONDITIONAL_SAMPLER = {"chains": 4, "draws": 500, "warmup": 500, "adapt_delta": 0.95,
                       "seed": 1}
REDUCED_PAIRS = ("grn-pln", "pbmc20-nbvcp")


def agreement(laplace_tree, ref_draws, ref_summary, var_names, *, prob=PROB):
    """Element-wise Laplace-vs-NUTS table with NUTS moments from all draws.

    Parameters
    ----------
    laplace_tree : xarray.DataTree
        Laplace posterior.
    ref_draws : xarray.Dataset
        Thinned NUTS posterior (``chain, draw, ...``).
    ref_summary : pandas.DataFrame
        :func:`arviz_stats.summary` of the NUTS posterior over all draws, indexed by
        element labels such as ``"x[c0, g1]"``, with columns ``mean`` and ``sd``.
        Elements missing from it keep the thinned-draw moments.
    var_names : sequence of str
    prob : float
        Central-interval mass for coverage.

    Returns
    -------
    pandas.DataFrame
        :func:`scribe_stan.compare` ``detail=True`` columns, with ``hmc_mean``,
        ``hmc_sd``, ``smd`` and ``sd_ratio`` recomputed from ``ref_summary``.
    """
    table = ss.compare(laplace_tree, ref_draws, var_names=list(var_names), prob=prob,
                       detail=True)
    labels = table.index.get_level_values("element")
    full = ref_summary.reindex(labels)
    known = full["mean"].notna().to_numpy()
    table.loc[known, "hmc_mean"] = full["mean"].to_numpy()[known]
    table.loc[known, "hmc_sd"] = full["sd"].to_numpy()[known]
    with np.errstate(divide="ignore", invalid="ignore"):
        table["smd"] = (table["laplace_mean"] - table["hmc_mean"]) / table["hmc_sd"]
        table["sd_ratio"] = np.where(table["point_estimate"], np.nan,
                                     table["laplace_sd"] / table["hmc_sd"])
    return table


def with_log_scale(posterior):
    """``posterior`` (Dataset) with ``log_<v>`` added for each ``v`` of :data:`LOG_SCALE`."""
    return posterior.assign({f"log_{v}": np.log(posterior[v]) for v in LOG_SCALE
                             if v in posterior.data_vars})


def summarize(detail):
    """Per-quantity mean |SMD|, max |SMD|, median sd ratio, mean coverage, n."""
    g = detail.groupby(level="quantity", sort=False)
    return pd.DataFrame({"n": g.size(), "mean_abs_smd": g["smd"].apply(lambda s: s.abs().mean()),
                         "max_abs_smd": g["smd"].apply(lambda s: s.abs().max()),
                         "median_sd_ratio": g["sd_ratio"].median(),
                         "coverage": g["coverage"].mean()})


def element_gene(label):
    """Gene name of a per-cell element label ``"x[cell, gene]"`` (None for ``eta``)."""
    inner = label[label.index("[") + 1:-1].split(", ")
    return inner[1] if len(inner) == 2 else None


def depth_bins(detail, gene_mean, *, n_bins=2):
    """Agreement of per-cell latents by gene depth (quantile bins of the mean count).

    Parameters
    ----------
    detail : DataFrame from :func:`agreement` (rows of per-cell, per-gene quantities).
    gene_mean : pandas.Series, mean count per gene (index: gene names).
    n_bins : int, quantile bins (2: below / above the median).

    Returns
    -------
    pandas.DataFrame
        One row per bin: ``genes``, ``mean_count`` range, ``mean_abs_smd``,
        ``median_sd_ratio``, ``coverage``.
    """
    genes = pd.Series([element_gene(e) for e in detail.index.get_level_values("element")],
                      index=detail.index)
    rows = detail[genes.notna().to_numpy()]
    genes = genes[genes.notna()]
    bins = pd.qcut(gene_mean.rank(method="first"), n_bins, labels=False)
    b = bins.reindex(genes.to_numpy()).to_numpy()
    out = []
    for k in range(n_bins):
        sub = rows[b == k]
        members = bins.index[bins == k]
        out.append({"bin": ("low", "high")[k] if n_bins == 2 else k, "genes": len(members),
                    "mean_count": f"{gene_mean[members].min():.2g}-{gene_mean[members].max():.2g}",
                    "mean_abs_smd": sub["smd"].abs().mean(),
                    "median_sd_ratio": sub["sd_ratio"].median(),
                    "coverage": sub["coverage"].mean()})
    return pd.DataFrame(out)


def embedded_laplace(fit):
    """Max relative difference of our per-cell Laplace value from Stan's embedded one.

    At the fit's globals and capture modes (pln: ``stan/pln_laplace.stan``, nbln:
    ``stan/nbln_laplace.stan``); None for models without an embedded program.
    """
    if fit.model not in ("pln", "nbln"):
        return None
    data, P = fit.data, fit.solution.problem
    cap = {"log_M0": data.log_M0, "sigma_M": data.sigma_M, "log_lib": data.log_lib}
    eta = np.array(fit.eta_hat)
    if fit.model == "pln":
        sd = pln.laplace_stan_data(data.counts, fit.mu, fit.W, fit.d, eta, **cap)
        ours = P.log_marginal(fit.mu, fit.W, fit.d, eta=eta)
    else:
        sd = nbln.laplace_stan_data(data.counts, fit.mu, fit.W, fit.d, fit.log_r, eta, **cap)
        ours = P.log_marginal(fit.mu, fit.W, fit.d, log_r=fit.log_r, eta=eta)
    theirs = stan.fixed_param(f"{fit.model}_laplace", sd)["log_marginal"].reshape(-1)
    return float(np.max(np.abs(ours - theirs) / np.abs(theirs)))


def evaluate(pair, *, draws=1000, conditional=True):
    """Laplace fit of ``pair`` compared with its stored NUTS reference (dict of results).

    With ``conditional``, NUTS conditional on the Laplace globals is run too
    (:data:`CONDITIONAL_MODELS`) and both Laplace variants are compared with it.
    """
    record, summary, ref = references.load(pair)
    adata, fit_args, _, _ = references.load_data(pair)
    t0 = time.perf_counter()
    fit = ss.fit(adata, method="laplace", progress=False, **fit_args)
    wall = time.perf_counter() - t0
    tree = fit.to_datatree(draws=draws, seed=0)
    post = tree["posterior"]
    latents = [v for v in LATENTS if v in post.data_vars and v in ref.data_vars]
    globs = [v for v in GLOBALS if v in post.data_vars and v in ref.data_vars]
    lat = agreement(tree, ref, summary, latents)
    glo = agreement(tree, ref, summary, globs)
    counts = tree["observed_data"]["counts"]
    gene_mean = pd.Series(counts.values.mean(axis=0), index=counts["gene"].values.astype(str))
    out = {"pair": pair, "record": record, "fit": fit, "laplace_wall_s": wall, "ref": ref,
           "converged": f"{int(fit.converged.sum())}/{fit.converged.size}",
           "latent": lat, "globals": glo, "gene_mean": gene_mean,
           "depth": depth_bins(lat, gene_mean) if "x" in latents or "y" in latents else None,
           "embedded_rel_diff": embedded_laplace(fit)}
    trees = {"point": tree}
    t0 = time.perf_counter()
    trees["laplace"] = fit.to_datatree(draws=draws, seed=0, globals="laplace")
    out["nested_wall_s"] = time.perf_counter() - t0
    gpost = fit.globals_posterior()
    out["nested_gradients"] = gpost.n_gradients
    nested = trees["laplace"].copy()
    nested["posterior"] = with_log_scale(nested["posterior"].to_dataset())
    log_ref = with_log_scale(ref)
    nglob = [v for v in NESTED_GLOBALS if v in log_ref.data_vars
             and v in nested["posterior"].data_vars]
    out["nested_globals"] = agreement(nested, log_ref, summary, nglob)
    variants = {("full", v): agreement(t, ref, summary, latents) for v, t in trees.items()}
    if conditional and fit.model in CONDITIONAL_MODELS:
        t0 = time.perf_counter()
        cond = ss.fit(adata, method="hmc", conditional_on=fit, progress=False,
                      **fit_args, **CONDITIONAL_SAMPLER).to_datatree()
        out["conditional_wall_s"] = time.perf_counter() - t0
        cpost = cond["posterior"].to_dataset()
        csum = references.summary_table(cond, latents)
        out["conditional_diagnostics"] = {
            "max_rhat": float(csum["r_hat"].max()),
            "min_ess_bulk": float(csum["ess_bulk"].min()),
            "divergences": int(cond["sample_stats"]["diverging"].values.sum())}
        for v, t in trees.items():
            variants[("conditional", v)] = agreement(t, cpost, csum, latents)
    out["variants"] = variants
    return out


def variant_rows(res):
    """Rows (pair, quantity, globals, reference, metrics) of every Laplace variant."""
    rows = []
    for (reference, variant), table in res["variants"].items():
        for q, row in summarize(table).iterrows():
            rows.append({"pair": res["pair"], "quantity": q, "globals": variant,
                         "reference NUTS": reference, **row.drop("n").to_dict()})
    return rows


def figure(res, path):
    """Three panels: |SMD| and sd ratio of per-cell latents against gene depth; globals."""
    lat, glo, gm = res["latent"], res["globals"], res["gene_mean"]
    genes = [element_gene(e) for e in lat.index.get_level_values("element")]
    has_gene = np.array([g is not None for g in genes])
    depth = np.array([gm[g] if g is not None else np.nan for g in genes])
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8), layout="constrained")
    if has_gene.any():
        ax[0].scatter(depth[has_gene], lat["smd"].abs()[has_gene], s=4, alpha=0.3)
        ax[1].scatter(depth[has_gene], lat["sd_ratio"][has_gene], s=4, alpha=0.3)
        for a in ax[:2]:
            a.set_xscale("log")
            a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            a.set_xlabel("gene mean count")
    else:  # eta only: against the cell's capture mode
        eta = lat.loc["eta"]
        ax[0].scatter(eta["hmc_mean"], eta["smd"].abs(), s=6)
        ax[1].scatter(eta["hmc_mean"], eta["sd_ratio"], s=6)
        for a in ax[:2]:
            a.set_xlabel("NUTS mean of eta")
    ax[0].axhline(0.1, color="k", ls=":", lw=1)
    ax[0].set_ylabel("|SMD| per-cell latent")
    ax[1].axhspan(0.9, 1.1, color="0.9")
    ax[1].set_ylabel("sd ratio (Laplace / NUTS)")
    g = glo[~glo.index.get_level_values("element").str.startswith("corr")
            | (glo["hmc_sd"] > 0)]
    order = np.argsort(g["hmc_mean"].to_numpy())
    lo = g["hmc_mean"].to_numpy() - 1.645 * g["hmc_sd"].to_numpy()
    hi = g["hmc_mean"].to_numpy() + 1.645 * g["hmc_sd"].to_numpy()
    idx = np.arange(len(g))
    ax[2].vlines(idx, lo[order], hi[order], color="0.6", lw=1, label="NUTS mean ± 1.645 sd")
    ax[2].plot(idx, g["laplace_mean"].to_numpy()[order], ".", color="C3", ms=3,
               label="Laplace estimate")
    ax[2].set_xlabel(f"global entries ({', '.join(dict.fromkeys(g.index.get_level_values(0)))})"
                     ", sorted")
    ax[2].legend(fontsize=7)
    fig.suptitle(f"{res['pair']}: Laplace vs NUTS")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(df):
    return df.to_markdown(floatfmt=".3g") if hasattr(df, "to_markdown") else df.to_string()


def _verdict(res):
    """Plain-language lines on where Laplace is worse, from the numbers."""
    lines = []
    lat = summarize(res["latent"])
    for q, row in lat.iterrows():
        bad = []
        if row["mean_abs_smd"] > 0.1:
            bad.append(f"mean |SMD| {row['mean_abs_smd']:.2f} > 0.1")
        if not 0.9 <= row["median_sd_ratio"] <= 1.1:
            bad.append(f"median sd ratio {row['median_sd_ratio']:.2f} outside [0.9, 1.1]")
        if abs(row["coverage"] - PROB) > 0.05:
            bad.append(f"coverage {row['coverage']:.2f} vs nominal {PROB}")
        if bad:
            lines.append(f"`{q}`: " + "; ".join(bad) + ".")
    depth = res["depth"]
    if depth is not None and len(depth) == 2:
        lo, hi = depth.iloc[0], depth.iloc[1]
        worse = lo["mean_abs_smd"] > hi["mean_abs_smd"]
        lines.append(
            f"Low-count genes (mean {lo['mean_count']}) vs high-count genes (mean "
            f"{hi['mean_count']}): mean |SMD| {lo['mean_abs_smd']:.3f} vs "
            f"{hi['mean_abs_smd']:.3f}, median sd ratio {lo['median_sd_ratio']:.2f} vs "
            f"{hi['median_sd_ratio']:.2f}, coverage {lo['coverage']:.2f} vs "
            f"{hi['coverage']:.2f}; Laplace is "
            f"{'worse' if worse else 'not worse'} at low counts by this measure.")
    glo = res["globals"]
    inside = glo["coverage"].mean()
    lines.append(f"Globals: {inside:.0%} of the Laplace point estimates lie inside the NUTS "
                 f"{PROB:.0%} intervals (mean |SMD| {glo['smd'].abs().mean():.2f}).")
    return lines


def chain_disagreement(ref, name):
    """Element of ``name`` whose chain means differ most (stored draws): label, means."""
    means = ref[name].mean("draw")
    spread = means.std("chain")
    flat = int(np.nanargmax(spread.values))
    idx = np.unravel_index(flat, spread.shape)
    sel = {d: means[d].values[i] for d, i in zip(spread.dims, idx)}
    label = f"{name}[{', '.join(str(v) for v in sel.values())}]"
    return label, means.sel(sel).values


def chain_split_sds(res):
    """Largest distance of a chain mean from the median chain mean, in within-chain sds
    (:func:`scribe_stan.nuts.chain_split`): from the record, or for a reference stored
    before that check, from its stored thinned draws."""
    split = res["record"]["diagnostics"].get("chain_split")
    if split is None:
        import xarray as xr

        split = nuts.chain_split(xr.DataTree.from_dict({"posterior": res["ref"]}))
    sds = split["max_split_sds"]
    if split.get("lp_split_sds"):
        sds = max(sds, max(split["lp_split_sds"]))
    return sds


def write_report(results, out_dir, *, reduced, missing=()):
    """Write ``REPORT.md`` and ``figures/<pair>.png`` under ``out_dir``.

    ``missing``: pairs without a stored reference, listed as not generated.
    """
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    diag_rows, lat_rows, time_rows, var_rows, nglob_rows, cond_rows = [], [], [], [], [], []
    body = []
    for res in results:
        var_rows += variant_rows(res)
        if "nested_globals" in res:
            for q, row in summarize(res["nested_globals"]).iterrows():
                nglob_rows.append({"pair": res["pair"], "quantity": q, **row.to_dict()})
        if "conditional_diagnostics" in res:
            cond_rows.append({"pair": res["pair"], **res["conditional_diagnostics"],
                              "wall (s)": res["conditional_wall_s"]})
        rec, d = res["record"], res["record"]["diagnostics"]
        failed = [k for k, ok in d["checks"].items() if not ok]
        diag_rows.append({"pair": res["pair"], "passed": "PASS" if d["passed"] else "FAIL",
                          "failed checks": ", ".join(failed) or "-",
                          "max R-hat": d["max_rhat"], "worst R-hat": d["worst_rhat"],
                          "min bulk ESS": d["min_ess_bulk"], "min tail ESS": d["min_ess_tail"],
                          "divergences": d["divergences"], "min E-BFMI": d["min_ebfmi"],
                          "chain split (sds)": chain_split_sds(res),
                          "starts": rec["sampler"].get("init", "random"),
                          "metric": rec["sampler"].get("metric", "diag_e")})
        for q, row in summarize(res["latent"]).iterrows():
            lat_rows.append({"pair": res["pair"], "quantity": q, **row.to_dict()})
        time_rows.append({"pair": res["pair"], "NUTS sampling (s)": rec["sampling_wall_s"],
                          "NUTS chains x draws": f"{rec['sampler']['chains']} x "
                                                 f"{rec['sampler']['draws']}",
                          "Laplace fit (s)": res["laplace_wall_s"],
                          "nested draws incl. Gaussian (s)": res.get("nested_wall_s"),
                          "globals' Hessian (gradients)": res.get("nested_gradients"),
                          "Laplace cells converged": res["converged"],
                          "embedded Laplace max rel. diff": res["embedded_rel_diff"]})
        fig = f"figures/{res['pair']}.png"
        figure(res, out_dir / fig)
        sections = [f"### {res['pair']}", "",
                    f"NUTS: {rec['program']}.stan (sha256 {rec['stan_hash'][:12]}), "
                    f"{rec['backend']}, seed {rec['sampler']['seed']}, diagnostics "
                    f"{'PASS' if d['passed'] else 'FAIL: ' + ', '.join(failed)}.", "",
                    *_rhat_note(res), *[f"- {line}" for line in _verdict(res)], "",
                    "Globals (Laplace point estimate against NUTS):", "",
                    _fmt(summarize(res["globals"]).drop(columns="median_sd_ratio")
                         .rename(columns={"coverage": "inside NUTS 90%"})), ""]
        if res["depth"] is not None:
            sections += ["Per-cell latents by gene depth (split at the median mean count):",
                         "", _fmt(res["depth"].set_index("bin")), ""]
        sections += [f"![{res['pair']}]({fig})", ""]
        body += sections
    head = [
        "# Laplace vs NUTS validation report", "",
        "Generated by `python validation/make_report.py"
        + (" --reduced`" if reduced else "`") + " from the stored NUTS references in "
        "`validation/references/` (regenerate those with `python validation/references.py`). "
        f"Data: `grn` = `scribe_stan.grn.simulate_grn` with {references.GRN_RECIPE}, fitted "
        f"with K = {references.RANK['grn']}; `pbmc20` = first {references.PBMC_RECIPE['cells']} "
        f"PBMC cells x their {references.PBMC_RECIPE['genes']} highest-mean genes, K = "
        f"{references.RANK['pbmc20']}.", "",
        "Metrics: SMD = (Laplace mean - NUTS mean) / NUTS sd; sd ratio = Laplace sd / NUTS "
        f"sd; coverage = share of NUTS draws inside the Laplace {PROB:.0%} central interval "
        f"(nominal {PROB}). Unless stated (section \"Laplace with the globals' "
        "uncertainty\"), the Laplace per-cell posteriors are conditional on point "
        "estimates of the globals; the NUTS reference integrates over them, so sd ratios "
        "below 1 include the global uncertainty that this variant leaves out.", "",
        "## NUTS reference diagnostics", "",
        "Checks: R-hat < 1.01, bulk and tail ESS >= 100 per chain, no divergences, "
        "E-BFMI > 0.2 (over all stored quantities; loadings W are excluded as they are "
        "identified only up to rotation), and no chain split: no chain's mean of `lp` or "
        "of an identified quantity (mu, d, r, Sigma, x, eta, ...) lies more than "
        f"{nuts.LP_SPLIT_SDS:g} within-chain sds from the median chain mean "
        "(`scribe_stan.nuts.chain_split`; for references stored before that check, "
        "computed from the stored thinned draws, without `lp`). `starts`: Stan's random "
        "inits or the Laplace fit (`scribe_stan.nuts.laplace_inits`).", "",
        _fmt(pd.DataFrame(diag_rows).set_index("pair")), "",
        *([f"Not generated yet (no stored reference): {', '.join(missing)}.", ""]
          if missing else []),
        "## Per-cell latents", "", _fmt(pd.DataFrame(lat_rows).set_index(["pair", "quantity"])),
        "", *nested_section(var_rows, nglob_rows, cond_rows),
        "## Wall times and the Laplace objective", "",
        "`embedded Laplace max rel. diff`: our per-cell Laplace log marginal against Stan's "
        "`laplace_marginal_*` at the fitted globals and capture modes (pln, nbln only).", "",
        _fmt(pd.DataFrame(time_rows).set_index("pair")), "", "## Pairs", ""]
    # hand-written sections kept across regenerations (e.g. GRN inference)
    extra = [p.read_text() for p in sorted((HERE / "report_sections").glob("*.md"))] \
        if (HERE / "report_sections").is_dir() else []
    (out_dir / "REPORT.md").write_text("\n".join(head + body + sbc_section(out_dir) + extra))


def nested_section(var_rows, nglob_rows, cond_rows):
    """Markdown lines: both Laplace variants against full and conditional NUTS."""
    if not var_rows:
        return []
    lines = [
        "## Laplace with the globals' uncertainty (nested draws)", "",
        "`globals`: `point` = the Laplace draws at the MAP of the globals (the default "
        "of `to_datatree`); `laplace` = each draw first draws the globals from their "
        "Gaussian approximation at the MAP of the Laplace objective and takes one Newton "
        "step per cell there (`to_datatree(globals=\"laplace\")`, "
        "`scribe_stan.laplace.nested`, `lnm_globals`, `nbvcp_nested`). "
        "`reference NUTS`: `full` = the "
        "stored full-joint reference; `conditional` = NUTS of the per-cell latents "
        "conditional on the Laplace globals (run by this script, "
        f"{CONDITIONAL_SAMPLER['chains']} x ({CONDITIONAL_SAMPLER['warmup']} + "
        f"{CONDITIONAL_SAMPLER['draws']})). Targets (issue 20) for `laplace` against "
        "`full`: median sd ratio in [0.85, 1.15], coverage in [0.85, 0.95], mean |SMD| "
        "<= 0.1; `point` against `conditional` measures the per-cell Gaussian alone.", "",
        _fmt(pd.DataFrame(var_rows).set_index(["pair", "quantity", "globals",
                                                "reference NUTS"])), ""]
    if nglob_rows:
        lines += ["Globals drawn from their Gaussian against the full NUTS reference "
                  "(target: median sd ratio in [0.8, 1.25]; rotation-invariant entries "
                  "only; d, r and r_T on the log scale, where their Gaussians live and "
                  "where the NUTS sds are not those of a heavy right tail; their NUTS "
                  "moments come from the stored thinned draws):", "", _fmt(pd.DataFrame(nglob_rows).set_index(["pair", "quantity"])),
                  ""]
    if cond_rows:
        lines += ["Conditional NUTS runs (diagnostics over x, eta / y):", "",
                  _fmt(pd.DataFrame(cond_rows).set_index("pair")), ""]
    return lines


SBC_ROOT = HERE / "sbc"


def _pct(v):
    return f"{100 * v:.0f}%"


def _data_conditions(settings):
    """The data-only redraw conditions of an SBC study, e.g. ``1e+02 - 1e+04``."""
    low, high = settings.get("min_total", 0.0), settings["max_total"]
    text = f"{low:.0e} - {high:.0e}" if low else f"<= {high:.0e}"
    return text + (", all genes detected" if settings.get("all_genes_detected") else "")


def sbc_section(out_dir, sbc_root=SBC_ROOT):
    """Markdown lines of the SBC section from the stored ``validation/sbc/<study>/sbc.json``.

    A model's studies are ``<model>/`` and any ``<model>-<suffix>/`` (replications).

    Reads the stored results only (``python validation/run_sbc.py`` makes them); figures
    are copied next to ``REPORT.md`` when ``out_dir`` is not ``validation/``.
    """
    import json
    import shutil

    from scribe_stan import sbc

    lines = ["## Simulation-based calibration (SBC)", "",
             "Generated by `python validation/run_sbc.py` (stored in `validation/sbc/<study>/`; "
             "method in `scribe_stan/sbc.py`). Per simulation: parameters from the Stan "
             "program's prior, counts through the model (redrawn unless the largest cell "
             "total lies in `cell totals` and, where stated, every gene has a count: "
             "conditions on the data only, which leave every posterior and so the ranks' "
             "uniformity unchanged), NUTS on the full-joint program, rank "
             "of the truth among L thinned draws (Talts et al. 2018, arXiv:1804.06788). A "
             "quantity is **flagged** when the ECDF of its (randomized) ranks leaves the "
             "simultaneous band (Säilynoja, Bürkner & Vehtari 2022, Stat. Comput. 32:32) of "
             "the stated probability; about (1 - prob) x quantities false flags are expected "
             "for a calibrated model. Laplace: the same counts fitted with "
             "`scribe_stan.fit(method=\"laplace\")`; coverage of its central 50% / 90% "
             "intervals of the per-cell latents by their true values (nominal 50% / 90%). "
             "Reading the flags: SBC tests the program and the sampler together. Spikes at "
             "ranks 0 and L together with R-hat > 1.01, low bulk ESS (below L) or tree-depth "
             "saturation mean the chains gave too few effective draws (Talts et al. 2018, "
             "section 5), which flags every quantity whatever the program; a shifted or "
             "one-sided ECDF in well-mixed simulations points to the program or the prior "
             "sampler. The diagnostic split below reruns the band test on the well-mixed "
             "simulations only.",
             ""]
    rows, cover, notes = [], [], []
    studies = []
    for model in sbc.MODELS:
        found = sorted(p.parent.name for p in sbc_root.glob(f"{model}*/sbc.json")
                       if p.parent.name == model or p.parent.name.startswith(f"{model}-"))
        if not found:
            notes.append(f"- **{model}**: not run (no `validation/sbc/{model}/sbc.json`).")
        studies += found
    for study in studies:
        r = json.loads((sbc_root / study / "sbc.json").read_text())
        st, nuts = r["settings"], r["nuts"]
        rows.append({
            "study": study, "seed": r.get("seed"), "sims": r["n_sims"],
            "N x G x K": f"{st['N']} x {st['G']} x {st['K']}",
            "chains x (warmup + draws)": f"{st['chains']} x ({st['warmup']} + {st['draws']})",
            "L": st["L"], "s / sim (median)": r["wall_time_per_sim_s"]["median"],
            "cell totals": _data_conditions(st), "rejected draws": r["rejected_draws"],
            "sims w/ divergences": nuts["sims_with_divergences"],
            "sims w/ max tree depth": nuts["sims_with_treedepth_hits"],
            "sims R-hat > 1.01": nuts["sims_max_rhat_above_1.01"],
            "median min bulk ESS": nuts["median_min_ess_bulk"],
            "quantities": r["n_quantities"],
            "expected false flags": r["expected_false_flags"],
            "flagged": len(r["flagged"])})
        runs = [("point (with NUTS)", r["laplace"]["coverage"])]
        for variant in ("point", "laplace"):  # run_sbc.py --laplace-only: same simulations
            path = sbc_root / study / f"laplace_{variant}.json"
            if path.exists():
                runs.append((variant, json.loads(path.read_text())["coverage"]))
        for variant, coverage in runs:
            for latent, c in coverage.items():
                cover.append({"study": study, "latent": latent, "globals": variant,
                              "elements": c["n"], "coverage 50%": c["coverage_50"],
                              "coverage 90%": c["coverage_90"], "mean PIT": c["mean_pit"]})
        pq = r["per_quantity"]
        if r["flagged"]:
            detail = ", ".join(f"`{q}` (mean rank/L {pq[q]['mean_pit']:.2f}, max |ECDF diff| "
                               f"{pq[q]['max_abs_diff']:.2f})" for q in r["flagged"])
            notes.append(f"- **{study}**: {len(r['flagged'])} of {r['n_quantities']} NUTS "
                         f"quantities flagged at band probability {r['band_prob']} "
                         f"(expected by chance: {r['expected_false_flags']:.1f}): {detail}.")
        else:
            notes.append(f"- **{study}**: no NUTS quantity flagged ({r['n_quantities']} "
                         f"quantities, band probability {r['band_prob']}).")
        wm = r.get("well_mixed_subset")
        if wm and (r["flagged"] or wm["flagged"]):
            notes.append(f"  Diagnostic split ({wm['criterion']}; {wm['note']}): "
                         f"{wm['n_sims']} simulations, {len(wm['flagged'])} flagged"
                         + (f" ({', '.join(f'`{q}`' for q in wm['flagged'])})."
                            if wm["flagged"] else "."))
        lap_flag = r["laplace"]["flagged"]
        notes.append(f"  Laplace PIT of the tracked latents: "
                     + (f"flagged {', '.join(f'`{q}`' for q in lap_flag)}." if lap_flag
                        else "none flagged.")
                     + (f" Laplace fits failed in {r['laplace']['sims_failed']} simulations."
                        if r["laplace"]["sims_failed"] else ""))
        for kind in ("ranks", "ecdf", "laplace-ecdf"):
            fig = HERE / "figures" / f"sbc-{study}-{kind}.png"
            if fig.exists():
                if Path(out_dir).resolve() != HERE:
                    shutil.copy(fig, Path(out_dir) / "figures" / fig.name)
                notes.append(f"  ![sbc {study} {kind}](figures/{fig.name})")
    if rows:
        lines += ["NUTS runs:", "", _fmt(pd.DataFrame(rows).set_index("study")), ""]
    if cover:
        lines += ["Laplace coverage of the true per-cell latents. `globals`: `point (with "
                  "NUTS)` = the Laplace check run beside NUTS when the study was made; "
                  "`point` and `laplace` = `python validation/run_sbc.py MODEL "
                  "--laplace-only point|laplace` on the same simulations with the current "
                  "code, the globals at their MAP or drawn from their Gaussian (nested "
                  "draws). Target (issue 20) with the globals' uncertainty: 90% "
                  "coverage in [0.85, 0.95].", "",
                  _fmt(pd.DataFrame(cover).set_index(["study", "latent", "globals"])), ""]
    lines += ["Flags:", "", *notes, ""]
    return lines


def _rhat_note(res):
    d = res["record"]["diagnostics"]
    if d["checks"]["rhat_lt_1.01"]:
        return []
    label, means = chain_disagreement(res["ref"], d["worst_rhat"])
    return [f"- NUTS chains disagree (R-hat {d['max_rhat']:.2f}): chain means of {label} "
            f"are {', '.join(f'{m:.2f}' for m in means)}; the reference is not a reliable "
            "posterior for this pair and the comparison below is shown for completeness.",]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Regenerate validation/REPORT.md.")
    parser.add_argument("--reduced", action="store_true",
                        help=f"CI mode: pairs {REDUCED_PAIRS}, 300 Laplace draws")
    parser.add_argument("--out", default=str(HERE), help="output folder (default validation/)")
    parser.add_argument("--pairs", nargs="*", default=None)
    args = parser.parse_args(argv)
    pairs = args.pairs or (REDUCED_PAIRS if args.reduced else references.PAIRS)
    missing = [p for p in pairs if not (references.ROOT / p / "reference.json").exists()]
    if args.pairs and missing:
        raise FileNotFoundError(f"no stored reference for {missing}; run "
                                f"`python validation/references.py {' '.join(missing)}`")
    results = []
    for pair in pairs:
        if pair not in missing:
            results.append(evaluate(pair, draws=300 if args.reduced else 1000,
                                    conditional=not args.reduced))
            print(f"{pair}: done", flush=True)
    write_report(results, args.out, reduced=args.reduced, missing=missing)


if __name__ == "__main__":
    sys.exit(main())
