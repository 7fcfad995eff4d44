"""Command-line interface: ``scribe-stan fit | transform | hmc | validate | grn`` (also
``python -m scribe_stan``).

Every subcommand reads an ``.h5ad`` file of raw UMI counts (cells x genes, in ``.X`` or a
``--layer``), or the literal ``pbmc_donor_a`` for the real data shipped in the package
(:func:`scribe_stan.datasets.pbmc_donor_a`). The input file is only read, never written.

* ``fit``: Laplace fit of any model at any scale. Writes ``fit.to_anndata(adata)`` to
  ``--out`` and a DataTree of Laplace draws on a few genes (lnm, lnmvcp: all fitted
  genes) next to it (zarr), and prints a one-line JSON summary with the model's own
  quantities. Existing outputs are kept unless ``--force``. ``--save-fit`` also saves the
  fit itself (:meth:`scribe_stan.fits.Fit.save`).
* ``transform``: a saved Laplace fit applied to new cells (``fit.transform``): their
  per-cell results in a copy of the new cells' ``.h5ad``.
* ``hmc``: Stan NUTS (full joint posterior) on the highest-mean genes of (optionally) the
  first cells. Writes ``OUTDIR/hmc.tree.zarr``, ``OUTDIR/diagnostics.json`` and
  ``OUTDIR/stan.log`` (Stan's own output), and prints the diagnostics (R-hat,
  bulk/tail ESS, divergences, wall time).
* ``validate``: Laplace vs Stan on one small subset: Laplace fit, full-joint NUTS,
  and NUTS of the per-cell latents conditional on the Laplace globals; saves (and, unless
  ``--quiet``, prints on stderr) :func:`scribe_stan.compare` tables and a
  :func:`scribe_stan.plot_comparison` figure.

stdout holds only the one-line JSON summary of each command (progress, Stan's messages
and tables go to stderr; ``--quiet`` silences them). Bad input (missing file, unknown
model/backend/layer, invalid counts, duplicated names, rank out of range, an output
path that exists or cannot be written, CmdStan or a GPU asked for but missing, ...) is
detected before the work starts and prints one line ``scribe-stan: error: ...`` to
stderr, with exit status 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path

from scribe_stan import __version__, _validate, dask_cli
from scribe_stan import specs
from scribe_stan.api import DEFAULT_RANK, check_device
from scribe_stan.api import fit as _api_fit
from scribe_stan.cli_io import DATASETS
from scribe_stan.cli_io import check_writable as _check_writable
from scribe_stan.cli_io import load_input as _load
from scribe_stan.fits.base import check_tree_size
from scribe_stan.fits.hmc import hmc_diagnostics
from scribe_stan.models import loadings
from scribe_stan.stan import BACKENDS, resolve_backend

__all__ = ["main", "build_parser", "hmc_diagnostics"]

PROG = "scribe-stan"
_MODELS = specs.names()


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-wrapped examples; append a default unless the help names one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.option_strings
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _data_name(path: str) -> str:
    return path if path in DATASETS else Path(path).stem


def _check_choices(args) -> None:
    """Model, backend and device: known names, and usable on this machine."""
    _validate.check_choice("model", args.model, _MODELS)
    try:
        if hasattr(args, "backend"):
            _validate.check_choice("backend", args.backend, BACKENDS)
            resolve_backend(args.backend)
        if hasattr(args, "device"):
            check_device(args.device, args.model)
    except RuntimeError as exc:  # CmdStan or a GPU missing: bad input for this machine
        raise ValueError(str(exc)) from exc
    if not specs.get(args.model).latent_rank:
        if args.rank is not None:
            raise ValueError(f"--rank does not apply to --model {args.model} (no latent "
                             "factors); leave it out")
    elif args.rank is None:
        args.rank = args.default_rank


def _check_laplace_args(args) -> None:
    _validate.check_positive_int("--max-iter", args.max_iter)
    _validate.check_positive("--tol", args.tol)


def _write_tree(tree, path: Path) -> Path:
    """Save a DataTree as zarr (any suffix but ``.nc``) or netCDF (``.nc``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".nc":
        try:
            tree.to_netcdf(path)
        except (ValueError, ImportError) as exc:
            raise ValueError(
                f"cannot write netCDF {str(path)!r} ({exc}); install h5netcdf or netCDF4, "
                "or give a .zarr path"
            ) from exc
    else:
        if path.exists():
            import shutil

            shutil.rmtree(path) if path.is_dir() else path.unlink()
        import warnings

        with warnings.catch_warnings():  # zarr 3 notes consolidated metadata is an extension
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            tree.to_zarr(path, mode="w")
    return path


def _round(d: dict, digits: int = 4) -> dict:
    """Floats rounded for printing; NaN/inf (undefined diagnostics) become JSON null."""
    def one(v):
        if isinstance(v, float):
            return round(v, digits) if math.isfinite(v) else None
        return v

    return {k: one(v) for k, v in d.items()}


def _print_json(d: dict) -> None:
    print(json.dumps(_round(d), default=str, allow_nan=False), flush=True)


# --------------------------------------------------------------------------------------
# subcommands
# --------------------------------------------------------------------------------------


def _parse_tree_genes(value: str):
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return n


_TREE_GENES_DEFAULT = 20
_DRAWS_DEFAULT = 100


def cmd_fit(args) -> int:
    """``scribe-stan fit``: Laplace fit, results to a new .h5ad and a DataTree."""
    import scribe_stan as ss

    _check_choices(args)
    if args.scheduler is not None:
        return _fit_chunked(args)
    if dask_cli.given(args):
        raise ValueError(f"{', '.join(dask_cli.given(args))} apply to the chunked fit of a "
                         "store; add --scheduler ADDRESS|local:N")
    if args.out is None:
        raise ValueError("--out OUT.h5ad is required (the input file is never overwritten)")
    if args.draws is None:
        args.draws = _DRAWS_DEFAULT
    out = Path(args.out)
    if args.input not in DATASETS and out.resolve() == Path(args.input).resolve():
        raise ValueError("--out must differ from INPUT (the input file is never overwritten)")
    _check_laplace_args(args)
    if args.genes is not None:
        _validate.check_positive_int("--genes", args.genes, 2)
    if args.draws < 0:
        raise ValueError(f"--draws must be >= 0 (0: no tree); got {args.draws}")
    all_genes = specs.get(args.model).tree_all_genes
    if all_genes and args.tree_genes is not None:
        raise ValueError(f"--tree-genes does not apply to --model {args.model}: its tree holds "
                         "every fitted gene (the composition couples them); use --genes to "
                         "fit fewer genes")
    tree_genes = args.tree_genes or _TREE_GENES_DEFAULT  # a number or "all"
    tree_path = Path(args.tree) if args.tree else out.with_suffix(".tree.zarr")
    _check_writable(out, "--out", force=args.force)
    if args.save_fit:
        _check_writable(Path(args.save_fit), "--save-fit", force=False)
    if args.draws > 0:
        _check_writable(tree_path, "--tree", force=args.force)

    t0 = time.perf_counter()
    adata = _load(args.input)
    _log(args, f"[fit] {_data_name(args.input)}: {adata.n_obs} cells x {adata.n_vars} genes")
    if args.draws > 0:  # at most this many genes go into the tree: check its size now
        fitted = min(args.genes or adata.n_vars, adata.n_vars)
        check_tree_size(args.draws, adata.n_obs, fitted if all_genes or tree_genes == "all"
                        else min(tree_genes, fitted))
    t_fit = time.perf_counter()
    fit = ss.fit(adata, model=args.model, method="laplace", rank=args.rank, layer=args.layer,
                 genes=args.genes, M0=args.M0, sigma_M=args.sigma_M, seed=args.seed,
                 device=args.device, tol=args.tol, max_iter=args.max_iter,
                 progress=not args.quiet,
                 **({} if args.loadings_prior is None else
                    {"loadings_prior": args.loadings_prior}))
    fit_wall = time.perf_counter() - t_fit

    out.parent.mkdir(parents=True, exist_ok=True)
    fit.to_anndata(adata, key_added=args.key_added).write_h5ad(out)
    summary = {"command": "fit", "model": args.model, "input": args.input,
               "cells": len(fit.obs_names), "genes": len(fit.var_names),
               **fit.summary(), "fit_wall_s": fit_wall, "out": str(out)}
    if args.save_fit:
        fit.save(args.save_fit)
        summary["fit"] = str(args.save_fit)
    if args.draws > 0:
        if all_genes:
            tree = fit.to_datatree(args.draws)
        else:
            tree = fit.to_datatree(args.draws, genes=None if tree_genes == "all"
                                   else min(tree_genes, len(fit.var_names)))
        _write_tree(tree, tree_path)
        summary["tree"] = str(tree_path)
    summary["wall_s"] = time.perf_counter() - t0
    _print_json(summary)
    return 0


def _fit_chunked(args) -> int:
    """``scribe-stan fit STORE --scheduler ...``: the chunked fit on a Dask cluster, after
    refusing the options of the in-memory fit that it has no use for."""
    from scribe_stan import distributed

    _validate.check_choice("--model (with --scheduler)", args.model, distributed.MODELS)
    _check_laplace_args(args)
    unused = [flag for flag, value, unset in (
        ("--genes", args.genes, None), ("--device", args.device, "cpu"),
        ("--save-fit", args.save_fit, None), ("--tree", args.tree, None),
        ("--draws", args.draws, None), ("--tree-genes", args.tree_genes, None),
        ("--key-added", args.key_added, None), ("--force", args.force, False))
        if value != unset]
    if unused:
        raise ValueError(f"{', '.join(unused)} do not apply with --scheduler: the chunked fit "
                         "models every gene on the CPU and writes its per-cell outputs into "
                         "the store (--out OUT.zarr for another zarr store)")
    return dask_cli.run(args)


def cmd_transform(args) -> int:
    """``scribe-stan transform``: new cells at a saved Laplace fit's globals."""
    import scribe_stan as ss

    out = Path(args.out)
    if args.input not in DATASETS and out.resolve() == Path(args.input).resolve():
        raise ValueError("OUT must differ from INPUT (the input file is never overwritten)")
    _check_writable(out, "OUT", force=args.force)
    t0 = time.perf_counter()
    fit = ss.load_fit(args.fit)
    if fit.method != "laplace":
        raise ValueError(f"{args.fit} holds an HMC fit; transform needs a Laplace fit")
    adata = _load(args.input)
    _log(args, f"[transform] {_data_name(args.input)}: {adata.n_obs} cells x "
               f"{adata.n_vars} genes; {fit.model} fit on {len(fit.var_names)} genes")
    t_fit = time.perf_counter()
    new = fit.transform(adata, layer=args.layer)
    wall = time.perf_counter() - t_fit
    out.parent.mkdir(parents=True, exist_ok=True)
    new.to_anndata(adata, key_added=args.key_added).write_h5ad(out)
    summary = {"command": "transform", "fit": args.fit, "input": args.input,
               **new.summary(), "transform_wall_s": wall, "out": str(out),
               "wall_s": time.perf_counter() - t0}
    _print_json(summary)
    return 0


def _hmc_fit(adata, args, *, genes, conditional_on=None):
    import scribe_stan as ss

    return ss.fit(adata, model=args.model, method="hmc", rank=args.rank, layer=args.layer,
                  genes=genes, M0=args.M0, sigma_M=args.sigma_M, seed=args.seed,
                  backend=args.backend, chains=args.chains, draws=args.draws,
                  warmup=args.warmup, adapt_delta=args.adapt_delta,
                  progress=not args.quiet, conditional_on=conditional_on)


def _write_stan_log(path: Path, fit) -> str:
    """Save what Stan printed for an HMC fit (build, stanc warnings, messages)."""
    path.write_text(fit.draws.messages)
    return str(path)


def _check_sampler_args(args) -> None:
    _validate.check_positive_int("--genes", args.genes, 2)
    _validate.check_positive_int("--chains", args.chains)
    _validate.check_positive_int("--draws", args.draws)
    _validate.check_positive_int("--warmup", args.warmup, 0)
    if args.cells is not None:
        _validate.check_positive_int("--cells", args.cells)
    if not 0 < args.adapt_delta < 1:
        raise ValueError(f"--adapt-delta must lie in (0, 1); got {args.adapt_delta}")


def cmd_hmc(args) -> int:
    """``scribe-stan hmc``: Stan NUTS on a small gene set, tree and diagnostics."""
    _check_choices(args)
    _check_sampler_args(args)
    outdir = Path(args.out or f"hmc-{_data_name(args.input)}-{args.model}")
    _check_writable(outdir, "--out", directory=True)
    t0 = time.perf_counter()
    adata = _load(args.input, args.cells)
    _log(args, f"[hmc] {_data_name(args.input)}: {adata.n_obs} cells, {args.genes} "
               f"highest-mean genes, K={args.rank}, {args.chains} chains x {args.draws} draws")
    fit = _hmc_fit(adata, args, genes=args.genes)
    tree = fit.to_datatree()
    diag = hmc_diagnostics(tree)
    cfg = fit.draws.config
    summary = {
        "command": "hmc", "model": args.model, "program": fit.program,
        "backend": fit.draws.backend, "input": args.input,
        "cells": len(fit.obs_names), "genes": len(fit.var_names), "rank": args.rank,
        **diag, "warmup": args.warmup, "seed": args.seed,
        "build_s": cfg.get("build_time_s"), "sampling_s": fit.draws.wall_time_s,
    }
    outdir.mkdir(parents=True, exist_ok=True)
    tree_path = _write_tree(tree, outdir / "hmc.tree.zarr")
    summary["tree"] = str(tree_path)
    summary["stan_log"] = _write_stan_log(outdir / "stan.log", fit)
    summary["wall_s"] = time.perf_counter() - t0
    (outdir / "diagnostics.json").write_text(json.dumps(_round(summary), indent=2) + "\n")
    _print_json(summary)
    return 0


def cmd_validate(args) -> int:
    """``scribe-stan validate``: Laplace vs full-joint and conditional NUTS on a subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from tqdm import tqdm

    import scribe_stan as ss

    _check_choices(args)
    _check_sampler_args(args)
    _check_laplace_args(args)
    _validate.check_positive_int("--laplace-draws", args.laplace_draws)
    outdir = Path(args.out or f"validate-{_data_name(args.input)}-{args.model}")
    _check_writable(outdir, "--out", directory=True)
    t0 = time.perf_counter()
    adata = _load(args.input, args.cells)
    _log(args, f"[validate] {_data_name(args.input)}: {adata.n_obs} cells, {args.genes} "
               f"highest-mean genes, K={args.rank}")
    times, diags = {}, {}
    quantities = specs.get(args.model)  # what to compare: compare_full, compare_conditional
    steps = ["Laplace fit", "full-joint NUTS", "conditional NUTS", "compare + plot"]
    with tqdm(total=len(steps), desc="validate", unit="step", disable=args.quiet,
              file=sys.stderr) as bar:
        def step(i):
            bar.set_description(f"validate: {steps[i]}")
            return time.perf_counter()

        t = step(0)
        lap = ss.fit(adata, model=args.model, method="laplace", rank=args.rank,
                     layer=args.layer, genes=args.genes, M0=args.M0, sigma_M=args.sigma_M,
                     seed=args.seed, tol=args.tol, max_iter=args.max_iter, progress=False)
        lap_tree = lap.to_datatree(draws=args.laplace_draws)
        times["laplace_s"] = time.perf_counter() - t
        bar.update()

        t = step(1)
        full = _hmc_fit(adata, args, genes=args.genes)
        full_tree = full.to_datatree()
        diags["full"] = hmc_diagnostics(full_tree)
        times["hmc_full_s"] = time.perf_counter() - t
        bar.update()

        t = step(2)
        if quantities.compare_conditional is not None:
            cond = _hmc_fit(adata, args, genes=args.genes, conditional_on=lap)
            cond_tree = cond.to_datatree()
            diags["conditional"] = hmc_diagnostics(cond_tree)
            times["hmc_conditional_s"] = time.perf_counter() - t
        bar.update()

        t = step(3)
        pairs = {"full": (full_tree, quantities.compare_full)}
        if quantities.compare_conditional is not None:
            pairs["conditional"] = (cond_tree, quantities.compare_conditional)
        tables = {key: ss.compare(lap_tree, ref, var_names=list(names))
                  for key, (ref, names) in pairs.items()}
        details = {key: ss.compare(lap_tree, ref, var_names=list(names), detail=True)
                   for key, (ref, names) in pairs.items()}
        plot_ref = cond_tree if quantities.compare_conditional is not None else full_tree
        outdir.mkdir(parents=True, exist_ok=True)
        _write_stan_log(outdir / "stan_full.log", full)
        if quantities.compare_conditional is not None:
            _write_stan_log(outdir / "stan_conditional.log", cond)
        for key in tables:
            tables[key].to_csv(outdir / f"compare_{key}.csv")
            details[key].to_csv(outdir / f"compare_{key}_detail.csv")
        # panel titles carry cell barcodes and gene names: 3 wide panels per row
        fig = ss.plot_comparison(lap_tree, plot_ref, var_names=quantities.compare_plot, col_wrap=3,
                                 figsize=(18, 15))
        fig.savefig(outdir / "comparison.png", dpi=120, bbox_inches="tight")
        plt.close(fig)
        if args.save_trees:
            trees = {"laplace": lap_tree, "hmc": full_tree}
            if quantities.compare_conditional is not None:
                trees["hmc_conditional"] = cond_tree
            for name, tr in trees.items():
                _write_tree(tr, outdir / f"{name}.tree.zarr")
        times["compare_s"] = time.perf_counter() - t
        bar.update()

    with pd.option_context("display.width", 140, "display.max_columns", 20,
                           "display.precision", 3):  # stderr: stdout holds only the JSON line
        if "conditional" in tables:
            _log(args, "Laplace vs conditional NUTS (per-cell latents at the Laplace globals):\n"
                 + tables["conditional"].to_string() + "\n")
        _log(args, "Laplace vs full-joint NUTS (globals as point estimates"
             + (", per-cell latents" if quantities.compare_conditional is None else "") + "):\n"
             + tables["full"].to_string() + "\n")
    summary = {
        "command": "validate", "model": args.model, "input": args.input,
        "cells": len(lap.obs_names), "genes": len(lap.var_names), "rank": args.rank,
        "laplace_cells_converged": int(lap.converged.sum()),
        **{f"full_{k}": v for k, v in diags["full"].items()},
        **{f"conditional_{k}": v for k, v in diags.get("conditional", {}).items()},
        **times, "wall_s": time.perf_counter() - t0, "out": str(outdir),
    }
    (outdir / "summary.json").write_text(json.dumps(_round(summary), indent=2) + "\n")
    _print_json(summary)
    return 0


# --------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------

_INPUT_HELP = ("AnnData .h5ad file of raw UMI counts (cells x genes), or "
               "'pbmc_donor_a' for the real PBMC data shipped in the package")

_FIT_EXAMPLES = """\
Fits the globals (mu, W, d) by maximizing the exact Laplace marginal likelihood and
gives every cell a Gaussian posterior around its mode (x_hat, eta_hat). Results are
written to a copy of the input (the input file is never modified):
  obs:  <key>_eta, <key>_capture_efficiency, <key>_converged
  obsm: <key>_x (log-rate modes, cells x fitted genes)
  var:  <key>_mu, <key>_d;  varm: <key>_W;  uns: <key> (settings, objective, genes)
and an ArviZ DataTree of --draws Laplace draws on the --tree-genes highest-mean genes.

examples:
  scribe-stan fit pbmc_donor_a --model pln --rank 10 --out pbmc_pln.h5ad
  scribe-stan fit cells.h5ad --layer counts --genes 2000 --rank 16 --out fit.h5ad \\
      --tree fit_tree.zarr --draws 200 --tree-genes 50
  scribe-stan fit cells.zarr --scheduler local:2 --rank 16 --modes zarr32
      (a counts store too large for one process: chunks of cells on a Dask cluster,
      per-cell outputs written into the store; scribe_stan.distributed)
"""

_TRANSFORM_EXAMPLES = """\
Loads a fit saved with --save-fit (or fit.save), matches the fitted genes in INPUT by
name (all must be present), and solves each new cell's Laplace posterior at the fitted
globals, with the capture prior from the new cells' library sizes. Writes a copy of INPUT
with the same per-cell keys a fit writes (obs <key>_eta, <key>_converged, obsm <key>_x,
...) and prints a one-line JSON summary.

examples:
  scribe-stan fit pbmc_donor_a --genes 500 --out pbmc.h5ad --save-fit pbmc_fit.zarr
  scribe-stan transform pbmc_fit.zarr new_cells_out.h5ad new_cells.h5ad
"""

_HMC_EXAMPLES = """\
Runs Stan's NUTS on the full joint posterior (globals and per-cell latents) of the N
highest-mean genes: ground truth for small problems. Writes OUTDIR/hmc.tree.zarr (ArviZ
DataTree, same shape as the Laplace tree), OUTDIR/diagnostics.json and OUTDIR/stan.log
(Stan's build and sampling output, shown on stderr unless --quiet), and prints max
R-hat (Sigma entries and all posterior variables), min bulk/tail ESS, the number of
divergences and the wall time. The Stan program is compiled once and cached.

examples:
  scribe-stan hmc pbmc_donor_a --model pln --genes 20 --cells 200 --rank 2 --out hmc_out
  scribe-stan hmc cells.h5ad --genes 10 --chains 2 --draws 500 --backend pystan
"""

_VALIDATE_EXAMPLES = """\
On one subset (first --cells cells, --genes highest-mean genes):
  1. Laplace fit;
  2. full-joint NUTS (globals and latents);
  3. NUTS of the per-cell latents with the globals fixed at the Laplace values
     (the exact target of the per-cell Laplace approximation).
Prints compare(laplace, conditional NUTS) for x and eta and compare(laplace, full NUTS)
for Sigma and corr; writes the tables (summary and per element) as CSV, the overlaid
marginals as OUTDIR/comparison.png, OUTDIR/summary.json and Stan's output as
OUTDIR/stan_full.log and OUTDIR/stan_conditional.log.

examples:
  scribe-stan validate pbmc_donor_a --model pln --genes 20
  scribe-stan validate cells.h5ad --genes 10 --cells 100 --chains 2 --draws 500 --out val
"""


def _add_common(p, *, model=True):
    p.add_argument("input", metavar="INPUT", help=_INPUT_HELP)
    if model:
        p.add_argument("--model", default="pln",
                       help=f"count model; one of: {', '.join(_MODELS)}")
    p.add_argument("--layer", default=None,
                   help="read counts from adata.layers[LAYER] instead of adata.X")
    p.add_argument("--M0", type=float, default=_fit_default("M0"),
                   help="capture prior: median total mRNA molecules per cell")
    p.add_argument("--sigma-M", dest="sigma_M", type=float, default=_fit_default("sigma_M"),
                   help="capture prior: log-scale sd of the capture loss eta")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _fit_default(name):
    """Default of a :func:`scribe_stan.fit` argument (one source for the CLI defaults)."""
    return inspect.signature(_api_fit).parameters[name].default


def _add_laplace(p):
    p.add_argument("--tol", type=float, default=_fit_default("tol"),
                   help="relative objective tolerance of the outer L-BFGS-B")
    p.add_argument("--max-iter", dest="max_iter", type=int, default=_fit_default("max_iter"),
                   help="maximum outer (L-BFGS-B) iterations")
    p.add_argument("--loadings-prior", dest="loadings_prior", choices=loadings.PRIORS,
                   default=None,
                   help="pln/nbln loadings prior: iid normal, or columnwise shrinkage of "
                        "W_perp for adaptive rank (gaussian ARD, horseshoe, neg) "
                        "(default: normal)")


def _add_sampler(p, *, cells=None):
    p.add_argument("--genes", type=int, default=20,
                   help="number of highest-mean genes to model")
    p.add_argument("--cells", type=int, default=cells,
                   help="use only the first CELLS cells" + (" (default: all)" if cells is None else ""))
    p.add_argument("--rank", type=int, default=None,
                   help="latent rank K, 1 <= K < genes (default: 2; not for nbvcp)")
    p.set_defaults(default_rank=2)
    p.add_argument("--chains", type=int, default=4, help="NUTS chains")
    p.add_argument("--draws", type=int, default=1000, help="saved draws per chain")
    p.add_argument("--warmup", type=int, default=1000, help="warmup iterations per chain")
    p.add_argument("--adapt-delta", dest="adapt_delta", type=float, default=0.9,
                   help="target acceptance rate of step-size adaptation")
    p.add_argument("--backend", default="auto",
                   help="Stan interface: " + ", ".join(BACKENDS) + " (auto: cmdstanpy if "
                        "it finds CmdStan, through CMDSTAN or ~/.cmdstan, else pystan)")


def build_parser() -> argparse.ArgumentParser:
    """The ``scribe-stan`` argument parser (subcommands ``fit``, ``hmc``, ``validate``)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Bayesian models of single-cell RNA-seq counts: Numba Laplace "
                    "solvers at genome scale, Stan NUTS as the reference.",
        epilog="examples:\n"
               "  scribe-stan fit pbmc_donor_a --model pln --rank 10 --out pbmc_pln.h5ad\n"
               "  scribe-stan hmc pbmc_donor_a --model pln --genes 20 --cells 200 --out hmc\n"
               "  scribe-stan validate pbmc_donor_a --model pln --genes 20\n"
               "Run 'scribe-stan COMMAND --help' for the options of each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("fit", help="Laplace fit; results to a new .h5ad and a DataTree",
                       description="Laplace fit of a count model.\n\n" + _FIT_EXAMPLES,
                       formatter_class=_Formatter)
    _add_common(p)
    p.add_argument("--rank", type=int, default=None,
                   help=f"latent rank K, 1 <= K < genes (default: {DEFAULT_RANK}; not for "
                        "nbvcp, which has no latent factors)")
    p.set_defaults(default_rank=DEFAULT_RANK)
    p.add_argument("--out", default=None, metavar="OUT.h5ad",
                   help="output .h5ad: a copy of the input with the results added "
                        "(required; with --scheduler: the zarr store of the per-cell "
                        "outputs, default INPUT)")
    p.add_argument("--force", action="store_true",
                   help="overwrite --out and --tree if they exist (default: refuse)")
    p.add_argument("--genes", type=int, default=None,
                   help="model only the GENES highest-mean genes (default: all non-zero "
                        "genes)")
    p.add_argument("--device", default="cpu",
                   help="Laplace compute device: cpu, cuda (pln, nbln; needs a GPU) or auto")
    _add_laplace(p)
    p.add_argument("--key-added", dest="key_added", default=None,
                   help="prefix of the result keys in the output (default: the model name)")
    p.add_argument("--save-fit", dest="save_fit", default=None, metavar="FIT.zarr",
                   help="also save the fit itself (ss.load_fit, scribe-stan transform); "
                        "never overwritten")
    p.add_argument("--tree", default=None, metavar="PATH",
                   help="where to save the DataTree: .zarr, or .nc (needs a netCDF "
                        "backend) (default: OUT with suffix .tree.zarr)")
    p.add_argument("--draws", type=int, default=None,
                   help=f"Laplace draws in the DataTree (0: do not write a tree) "
                        f"(default: {_DRAWS_DEFAULT})")
    p.add_argument("--tree-genes", dest="tree_genes", type=_parse_tree_genes, default=None,
                   help=f"genes (highest mean) stored in the tree: a number or 'all' "
                        f"(default: {_TREE_GENES_DEFAULT}; lnm and lnmvcp trees hold every "
                        "fitted gene)")
    dask_cli.add_arguments(p)
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("transform", help="place new cells with a saved Laplace fit",
                       description="Per-cell Laplace posteriors of new cells at a saved "
                                   "fit's globals.\n\n" + _TRANSFORM_EXAMPLES,
                       formatter_class=_Formatter)
    p.add_argument("fit", metavar="FIT", help="a fit saved by 'scribe-stan fit --save-fit' "
                                              "or fit.save()")
    p.add_argument("out", metavar="OUT.h5ad",
                   help="output .h5ad: a copy of INPUT with the per-cell results added")
    p.add_argument("input", metavar="INPUT", help=_INPUT_HELP)
    p.add_argument("--layer", default=None,
                   help="read counts from adata.layers[LAYER] (default: the fit's layer, "
                        "else adata.X)")
    p.add_argument("--key-added", dest="key_added", default=None,
                   help="prefix of the result keys (default: the model name)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_transform)

    p = sub.add_parser("hmc", help="Stan NUTS on a small gene set (reference posterior)",
                       description="Stan NUTS on the full joint posterior.\n\n"
                                   + _HMC_EXAMPLES,
                       formatter_class=_Formatter)
    _add_common(p)
    _add_sampler(p)
    p.add_argument("--out", default=None, metavar="OUTDIR",
                   help="output directory (default: hmc-<data>-<model>, <data> the INPUT "
                        "file stem)")
    p.set_defaults(func=cmd_hmc)

    p = sub.add_parser("validate", help="Laplace vs full-joint and conditional NUTS",
                       description="Check the Laplace posterior against Stan NUTS.\n\n"
                                   + _VALIDATE_EXAMPLES,
                       formatter_class=_Formatter)
    _add_common(p)
    _add_sampler(p, cells=200)
    _add_laplace(p)
    p.add_argument("--laplace-draws", dest="laplace_draws", type=int, default=1000,
                   help="Laplace draws used in the comparison")
    p.add_argument("--save-trees", dest="save_trees", action="store_true",
                   help="also save the three DataTrees as OUTDIR/*.tree.zarr")
    p.add_argument("--out", default=None, metavar="OUTDIR",
                   help="output directory (default: validate-<data>-<model>)")
    p.set_defaults(func=cmd_validate)

    from scribe_stan import grn_cli

    grn_cli.add_parser(sub, _Formatter)
    return parser


def main(argv=None) -> int:
    """Run the ``scribe-stan`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status: 0 on success, 2 for bad input (the message goes to stderr as one
        line ``scribe-stan: error: ...``). Usage errors exit 2 through argparse.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
