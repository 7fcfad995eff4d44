"""``scribe-stan fit STORE --scheduler ADDRESS|local:N``: the chunked Laplace fit of a
counts store on a Dask cluster, from the main command line (:mod:`scribe_stan.cli`).

    scribe-stan fit cells.zarr --scheduler local:2 --rank 16 --modes zarr32 \\
        --checkpoint fit.ckpt.npz

``--scheduler local:N`` starts a ``LocalCluster`` of N single-threaded worker processes
(``--threads-per-worker`` to change), ``--scheduler ADDRESS`` (e.g.
``tcp://10.0.0.1:8786``) connects to a running scheduler. Per-cell outputs go to the
store (group ``scribe_stan/<model>``, or ``--out OUT.zarr``), with the globals and the
summary; stdout gets a one-line JSON summary. The fit itself is
``scribe_stan.fit(store, client=...)`` (:func:`scribe_stan.api.fit`,
:func:`scribe_stan.distributed.fit_distributed`).

:func:`add_arguments` adds this fit's options to the ``fit`` parser (their defaults are
None so that :func:`given` can tell which were set), :func:`run` runs it from the parsed
arguments.
"""

from __future__ import annotations

import json

from scribe_stan.laplace.workers import COUNTS_STORAGE, MODE_STORAGE

#: Environment of LocalCluster workers: one thread each for Numba and BLAS.
WORKER_ENV = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "MKL_NUM_THREADS")


#: The ``fit`` options of the chunked fit (argparse destinations).
CHUNKED_ARGS = ("scheduler", "threads_per_worker", "chunk_cells", "modes", "counts_storage",
                "checkpoint", "checkpoint_every", "resume_from", "x_dtype")


def add_arguments(p):
    """Add the chunked-fit options to the ``scribe-stan fit`` parser (defaults None:
    unset; the defaults that apply are those of
    :func:`scribe_stan.distributed.fit_distributed`, named in the help)."""
    g = p.add_argument_group("chunked fit of a counts store (with --scheduler)")
    g.add_argument("--scheduler", default=None, metavar="ADDRESS|local:N",
                   help="fit INPUT, an AnnData .zarr store or .h5ad file, in chunks of cells "
                        "on a Dask cluster: a scheduler address (tcp://host:8786), or "
                        "local:N for a LocalCluster of N worker processes; pln and nbln")
    g.add_argument("--threads-per-worker", dest="threads_per_worker", type=int, default=None,
                   help="threads per worker of a local:N cluster (default 1)")
    g.add_argument("--chunk-cells", dest="chunk_cells", type=int, default=None,
                   help="cells per chunk (default: about 4M count elements)")
    g.add_argument("--modes", default=None, choices=MODE_STORAGE,
                   help="where the per-cell modes live between iterations: float64 or "
                        "float32 in worker memory, or out of core in the zarr store "
                        "(default memory)")
    g.add_argument("--counts", dest="counts_storage", default=None, choices=COUNTS_STORAGE,
                   help="hold each chunk's counts on its worker, or re-read them per call "
                        "(default memory)")
    g.add_argument("--checkpoint", default=None, metavar="PATH.npz",
                   help="save the globals here every --checkpoint-every iterations")
    g.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=None,
                   help="outer iterations between checkpoints (default 10)")
    g.add_argument("--resume-from", dest="resume_from", default=None, metavar="PATH.npz",
                   help="continue a fit from this checkpoint")
    g.add_argument("--x-dtype", dest="x_dtype", default=None,
                   choices=("float32", "float64"),
                   help="type of the modes x written to the store (default float32)")
    return p


def connect(scheduler, *, threads_per_worker=1):
    """``(client, cluster)`` for ``--scheduler``: ``local:N`` starts a LocalCluster of
    N worker processes (cluster returned to close), an address connects (cluster None).

    Raises
    ------
    ValueError: ``local:N`` with N < 1 or not an integer.
    """
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


def given(args):
    """The chunked-fit options set on the command line (names as ``--option``)."""
    return [f"--{name.replace('_', '-')}" for name in CHUNKED_ARGS
            if getattr(args, name, None) is not None]


def run(args):
    """Run the chunked fit from parsed ``scribe-stan fit`` arguments (``--scheduler``
    set); prints the JSON summary; returns 0."""
    import scribe_stan as ss

    options = {name: getattr(args, name) for name in CHUNKED_ARGS
               if name not in ("scheduler", "threads_per_worker")
               and getattr(args, name, None) is not None}
    if "counts_storage" in options:
        options["counts"] = options.pop("counts_storage")
    if args.loadings_prior is not None:
        options["loadings_prior"] = args.loadings_prior
    if args.out is not None:
        options["out"] = args.out
    client, cluster = connect(args.scheduler, threads_per_worker=args.threads_per_worker or 1)
    try:
        fit = ss.fit(args.input, client=client, model=args.model, rank=args.rank,
                     layer=args.layer, M0=args.M0, sigma_M=args.sigma_M, seed=args.seed,
                     tol=args.tol, max_iter=args.max_iter, progress=not args.quiet,
                     **options)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(json.dumps({"command": "fit", "input": args.input, **fit.summary()}))
    return 0
