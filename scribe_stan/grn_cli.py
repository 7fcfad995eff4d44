"""``scribe-stan grn``: infer a network from a fitted .h5ad and prior edge tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  scribe-stan fit pbmc_donor_a --model pln --rank 10 --out pbmc_pln.h5ad
  scribe-stan grn pbmc_pln.h5ad --prior edges.csv --method lyapunov --out grn.csv
  scribe-stan grn pbmc_pln.h5ad --prior a.csv b.csv --support soft --method ridge \\
      --out grn.csv --h5ad-out pbmc_grn.h5ad --figure grn.png

INPUT is the .h5ad written by 'scribe-stan fit --out' (or fit.to_anndata), which carries
the modes, globals and counts the inference needs, or a fit saved by
'scribe-stan fit --save-fit' (or fit.save): a directory, read with ss.load_fit.
--prior takes CSV edge tables (columns regulator/tf, target, optional confidence or
weight in (0, 1] or letters A-E, optional sign/mor); several are combined (noisy-or).
Prior genes not among the fitted genes are counted in the JSON line.
"""


def add_parser(sub, formatter):
    """Register the ``grn`` subcommand on an argparse subparsers object."""
    from scribe_stan.grn_infer import INPUTS, METHODS, SUPPORTS

    p = sub.add_parser("grn", help="GRN inference from a fitted .h5ad with prior edges",
                       description="Infer a regulator -> target network from a fit's "
                                   "latents.\n\n" + EXAMPLES, formatter_class=formatter)
    p.add_argument("input", metavar="INPUT", help="output of scribe-stan fit --out (.h5ad), "
                                                  "or a fit saved with --save-fit")
    p.add_argument("--prior", nargs="+", default=None, metavar="EDGES.csv",
                   help="prior edge tables (CSV, .csv.gz)")
    p.add_argument("--levels", default=None,
                   help="keep only these confidence letters, e.g. ABCD")
    p.add_argument("--method", default="lyapunov", help="one of " + ", ".join(METHODS))
    p.add_argument("--support", default="hard", help="one of " + ", ".join(SUPPORTS))
    p.add_argument("--input-kind", dest="input_kind", default="latent",
                   help="one of " + ", ".join(INPUTS))
    p.add_argument("--genes", type=int, default=None,
                   help="network on the GENES highest-mean fitted genes (default: the "
                        "prior's genes)")
    p.add_argument("--key", default=None, help="fit key in the h5ad (default: found)")
    p.add_argument("--alpha", type=float, default=None, help="penalty (method default)")
    p.add_argument("--out", required=True, metavar="EDGES.csv",
                   help="edge table CSV; J (if any) goes to EDGES.J.csv")
    p.add_argument("--h5ad-out", dest="h5ad_out", default=None,
                   help="also write a copy of INPUT with uns['grn']")
    p.add_argument("--figure", default=None, help="network figure of the top edges (.png)")
    p.add_argument("--top", type=int, default=30, help="edges in the figure")
    p.add_argument("--force", action="store_true", help="overwrite outputs")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_grn)
    return p


def cmd_grn(args) -> int:
    """Run ``scribe-stan grn``: check the outputs, read the fit and priors, infer the
    network, write the edge table (and h5ad / figure when asked). Returns the exit code."""
    import warnings

    from scribe_stan import cli_io, grn_infer, grn_prior
    from scribe_stan._validate import check_choice

    check_choice("method", args.method, grn_infer.METHODS)
    check_choice("support", args.support, grn_infer.SUPPORTS)
    check_choice("input kind", args.input_kind, grn_infer.INPUTS)
    outs = [Path(args.out)] + [Path(p) for p in (args.h5ad_out, args.figure) if p]
    for o in outs:
        cli_io.check_writable(o, "output", force=args.force)
    prior = None
    if args.prior:
        srcs = [grn_prior.read_prior(p, levels=args.levels) for p in args.prior]
        prior = grn_prior.combine_priors(*srcs)
    source = adata = None
    if Path(args.input).is_dir():  # a saved fit (zarr directory)
        import anndata
        import pandas as pd

        from scribe_stan.fits import load_fit

        source = load_fit(args.input)
        adata = anndata.AnnData(source.data.counts.astype(float),
                                obs=pd.DataFrame(index=source.obs_names.astype(str)),
                                var=pd.DataFrame(index=source.var_names.astype(str)))
    else:
        source = adata = cli_io.load_input(args.input)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = grn_infer.infer_grn(source, prior=prior, method=args.method, genes=args.genes,
                                  support=args.support, input=args.input_kind,
                                  alpha=args.alpha, key=args.key)
    written = res.to_csv(args.out)
    if args.h5ad_out:
        res.to_anndata(adata).write_h5ad(args.h5ad_out)
        written.append(Path(args.h5ad_out))
    if args.figure:
        fig = res.plot(top=args.top)
        fig.savefig(args.figure, dpi=120)
        written.append(Path(args.figure))
    summary = {"method": res.method, "support": res.support, "input": res.input,
               "genes": len(res.genes), "regulators": len(res.regulators),
               "candidate_edges": len(res.edges),
               "unknown_prior_genes": len(res.unknown_genes),
               "wall_time_s": round(res.info["wall_time_s"], 3),
               "written": [str(w) for w in written]}
    if "n_iter" in res.info:
        summary.update(n_iter=res.info["n_iter"], converged=res.info["success"])
    print(json.dumps(summary), file=sys.stdout)
    return 0
