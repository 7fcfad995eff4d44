"""Command line of the chunked (Dask) Laplace fit of a counts store.

    python -m scribe_stan.dask_cli fit STORE.zarr --scheduler local:2 --rank 16 \\
        --modes zarr --checkpoint fit.ckpt.npz

``--scheduler local:N`` starts a ``LocalCluster`` of N single-threaded worker processes
(``--threads-per-worker`` to change), ``--scheduler ADDRESS`` (e.g.
``tcp://10.0.0.1:8786``) connects to a running scheduler, and no ``--scheduler`` runs
the chunks in this process. Per-cell outputs go to the store (group
``scribe_stan/<model>``, or ``--out OUT.zarr``), with the globals and the summary;
stdout gets a one-line JSON summary.

For the main ``scribe-stan`` command: :func:`add_arguments` adds the options of this
fit to an existing ``fit`` parser (they do not clash with its options), and
:func:`run` runs it from the parsed arguments (it reads ``input``, ``model``,
``rank``, ``layer``, ``out``, ``tol``, ``max_iter``, ``M0``, ``sigma_M``, ``seed``,
``loadings_prior``, ``quiet`` where present); :func:`add_parser` adds a whole
sub-command.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from scribe_stan.laplace.workers import COUNTS_STORAGE, MODE_STORAGE
from scribe_stan.models import loadings, pln

#: Environment of LocalCluster workers: one thread each for Numba and BLAS.
WORKER_ENV = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "MKL_NUM_THREADS")


def add_arguments(p):
    """Add the chunked-fit options to an argparse parser (e.g. ``scribe-stan fit``)."""
    p.add_argument("--scheduler", default=None, metavar="ADDRESS|local:N",
                   help="Dask scheduler address, or local:N for a LocalCluster of N "
                        "worker processes (default: chunks in this process)")
    p.add_argument("--threads-per-worker", dest="threads_per_worker", type=int, default=1,
                   help="threads per worker of a local:N cluster")
    p.add_argument("--chunk-cells", dest="chunk_cells", type=int, default=None,
                   help="cells per chunk (default: about 4M count elements)")
    p.add_argument("--modes", default="memory", choices=MODE_STORAGE,
                   help="where the per-cell modes live between iterations: float64 or "
                        "float32 in worker memory, or out of core in the zarr store")
    p.add_argument("--counts", dest="counts_storage", default="memory",
                   choices=COUNTS_STORAGE,
                   help="hold each chunk's counts on its worker, or re-read them per call")
    p.add_argument("--checkpoint", default=None, metavar="PATH.npz",
                   help="save the globals here every --checkpoint-every iterations")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=10)
    p.add_argument("--resume-from", dest="resume_from", default=None, metavar="PATH.npz",
                   help="continue a fit from this checkpoint")
    p.add_argument("--x-dtype", dest="x_dtype", default="float32",
                   choices=("float32", "float64"), help="type of the written modes x")
    return p


def _add_common(p):
    p.add_argument("input", metavar="STORE", help="AnnData .zarr store or .h5ad file of "
                   "raw counts (cells x genes; every gene is modelled)")
    p.add_argument("--model", default="pln", choices=("pln", "nbln"))
    p.add_argument("--rank", type=int, default=10, help="latent rank K")
    p.add_argument("--layer", default=None, help="counts in layers[LAYER] (default X)")
    p.add_argument("--out", default=None, metavar="OUT.zarr",
                   help="zarr store of the outputs (default: the input store when zarr)")
    p.add_argument("--tol", type=float, default=1e-8, help="relative objective tolerance")
    p.add_argument("--max-iter", dest="max_iter", type=int, default=1000)
    p.add_argument("--loadings-prior", dest="loadings_prior", choices=loadings.PRIORS,
                   default="normal")
    p.add_argument("--M0", type=float, default=pln.M0_DEFAULT, help="capture prior M0")
    p.add_argument("--sigma-M", dest="sigma_M", type=float, default=pln.SIGMA_M_DEFAULT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")


def add_parser(subparsers, name="fit"):
    """Add the sub-command ``name`` (all options) to an argparse sub-parsers object."""
    p = subparsers.add_parser(name, help="Laplace fit of a counts store on a Dask cluster")
    _add_common(p)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m scribe_stan.dask_cli",
                                     description=__doc__.split("\n\n")[0])
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def connect(scheduler, *, threads_per_worker=1):
    """``(client, cluster)`` for ``--scheduler``: ``local:N`` starts a LocalCluster of
    N worker processes (cluster returned to close), an address connects (cluster None),
    None gives ``(None, None)``.

    Raises
    ------
    ValueError: ``local:N`` with N < 1 or not an integer.
    """
    if scheduler is None:
        return None, None
    from distributed import Client, LocalCluster

    if scheduler.startswith("local"):
        try:
            n = int(scheduler.split(":", 1)[1]) if ":" in scheduler else 1
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"--scheduler {scheduler!r}: allowed 'local:N' with N >= 1 "
                             "workers, or a scheduler address such as tcp://host:8786")
        env = {k: str(threads_per_worker) for k in WORKER_ENV}
        cluster = LocalCluster(n_workers=n, threads_per_worker=threads_per_worker,
                               processes=True, dashboard_address=":0", env=env)
        return Client(cluster), cluster
    return Client(scheduler), None


def run(args):
    """Run the chunked fit from parsed arguments; prints the JSON summary; returns 0."""
    from scribe_stan.distributed import fit_distributed

    def g(name, default=None):  # an option absent or None (a parser's unset default)
        value = getattr(args, name, None)
        return default if value is None else value

    if g("checkpoint_every", 10) < 1:
        raise SystemExit("--checkpoint-every must be >= 1")
    layer = g("layer")
    client, cluster = connect(g("scheduler"), threads_per_worker=g("threads_per_worker", 1))
    progress = None
    try:
        if not g("quiet", False):
            from tqdm.auto import tqdm

            progress = tqdm(desc="outer iterations", file=sys.stderr)
        fit = fit_distributed(
            args.input, client=client, model=g("model", "pln"), rank=g("rank", 10),
            key="X" if layer is None else f"layers/{layer}", out=g("out"),
            chunk_cells=g("chunk_cells"), modes=g("modes", "memory"),
            counts=g("counts_storage", "memory"), log_M0=float(np.log(g("M0",
                                                                      pln.M0_DEFAULT))),
            sigma_M=g("sigma_M", pln.SIGMA_M_DEFAULT),
            loadings_prior=g("loadings_prior", "normal"), tol=g("tol", 1e-8),
            max_iter=g("max_iter", 1000), seed=g("seed", 0), checkpoint=g("checkpoint"),
            checkpoint_every=g("checkpoint_every", 10), resume_from=g("resume_from"),
            x_dtype=g("x_dtype", "float32"), progress=progress)
    finally:
        if progress is not None:
            progress.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    print(json.dumps({"model": fit.model, "objective": fit.objective, "n_iter": fit.n_iter,
                      "success": fit.success, "cells_converged": fit.n_converged,
                      "cells": fit.n_cells, "wall_time_s": round(fit.wall_time_s, 3),
                      "executor": fit.stats["executor"],
                      "recoveries": fit.stats["recoveries"], "out": fit.out,
                      "group": fit.group}))
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
