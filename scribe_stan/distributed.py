"""The pln / nbln Laplace fit beyond one machine: chunks of cells on a Dask cluster.

The outer problem is a map-reduce over cells: each chunk needs only the globals
(G x (K + 2) numbers) and returns its Laplace value, gradient, Laplace-EM statistics or
Fisher blocks (the same size), so the traffic of an outer iteration does not grow with
the number of cells. :func:`fit_distributed` runs the same outer optimization as the
in-process :func:`scribe_stan.laplace.solver.fit_laplace`
(:func:`~scribe_stan.laplace.solver.optimize_problem`: Laplace-EM start, then L-BFGS-B
with the per-gene block preconditioner, :mod:`scribe_stan.laplace.driver`) on a
:class:`ChunkedProblem`, which sums through an executor:

- :class:`DaskExecutor`: the chunks live in :class:`~scribe_stan.laplace.workers.ChunkGroup`
  actors on the workers of a ``dask.distributed`` cluster (one group per worker). Each
  group reads its own rows of the counts from the store (an AnnData zarr store or a
  backed h5ad; nothing of the counts passes through the client) and keeps the chunks'
  counts, modes and warm starts across outer iterations; only the globals go out and
  only the sums come back.
- :class:`InProcessExecutor`: the same groups in this process (no cluster).

Modes, the big state (N x G), are kept in memory (float64, or float32 warm starts) or
out of core in the output zarr store (``modes=``, :mod:`scribe_stan.laplace.workers`).

Faults: when a worker is lost, the calls on its group fail; its chunks are re-created
on the surviving (or restarted) workers from the store, with cold-started modes, and
the call is repeated for them at the same globals, so the evaluation in progress is
completed and the fit continues to the same optimum (within the outer tolerance: the
cold-started cells' modes are the same optimum of the same per-cell problem). The
globals are checkpointed every ``checkpoint_every`` iterations; ``resume_from=``
continues a fit from a checkpoint (L-BFGS restarts there with a fresh memory and a
renewed preconditioner, the modes start cold).

Results at scale: each group writes its cells' modes ``x`` (float32 by default), ``eta``,
``converged``, ``n_iter`` and ``at_bound`` into the output zarr store, chunk by chunk;
only the globals and the convergence counts come back to the client
(:class:`DistributedFit`).

Plan for 10 million cells on 50 workers
---------------------------------------
Measured per-chunk costs (``validation/bench_dask.py``, PBMC-like simulated cells, 2000
genes, K = 16, about 600 stored counts per cell; JSON in ``validation/out/``):

- compute: one evaluation (Newton from the warm start, then the exact value and
  gradient) costs about 1.4 ms of one core per cell when cells take 2-3 Newton steps
  (100,000 cells in about 70 s on 2 cores, ``bench_estep``/``bench_scale``; 0.9-1.8 ms
  per cell measured here in single-threaded chunk groups on a machine loaded 3-5x
  over its 2 cores). An outer iteration is 1.05-2 evaluations (about 2 in the first
  iterations, 1.04 over a whole PBMC fit), plus one solve and a Fisher pass at each
  (re)start of L-BFGS. Warm starts cost 1-3 Newton steps per cell and evaluation,
  a cold start about 6 (cells of a re-created chunk pay that once).
- modes kept as float32 (``"float32"``, ``"zarr32"``) change the objective by about
  2e-15 relative and cost +0.02-0.06 Newton steps per cell only in the re-solves at
  unchanged globals; out of core (``"zarr"``) each evaluation reads and writes the
  chunk's modes (n x G x 8 bytes each way), which did not show in the wall time at
  20,000 cells (noise of a loaded machine larger than the I/O).
- traffic: per call each group receives the globals, G (K + 2) x 8 bytes = 288 kB,
  and returns the same (the Fisher pass: G (K + 1)^2 x 8 = 4.6 MB, at restarts
  only); keep / restore ride on the next call.
- memory per worker: the counts at 8 bytes per stored count (float32 values, int32
  genes): about 4.8 kB per cell; the modes 32 kB per cell in float64, doubled by the
  warm-start double buffer in memory (64 kB; float32: 32 kB); out of core only one
  chunk's working set (about 10 n x G float64 temporaries: 0.3 GB at 2000 cells).
  Measured out of core ("zarr", 2 workers, 20,000 cells): peak RSS 0.69 GB per worker,
  of which about 0.05 GB counts, the rest the interpreter, Numba, Dask and one chunk's
  temporaries; so about 0.65 GB + 4.8 kB per cell: 3.1 GB per worker for 1M cells on
  2 workers. Measured on the 1M store ("zarr32", 2 workers, 500 chunks of 2000
  cells, 606 stored counts per cell): 3.15 GB per worker; 5 outer iterations (11
  evaluations, the first cold) in 6818 s, median 690 s per iteration, i.e. about
  1.2 ms of one core per cell and evaluation, modes read and written included;
  4.9 MB moved per iteration (Fisher pass included).

10M cells on 50 single-threaded workers (200,000 cells each): about 200 s of compute
per evaluation per worker (1.4 ms x 200,000 / 1 core, all workers in parallel), so
3.5-7 minutes per outer iteration, and about 18 hours for a fit of 230 iterations and
10 Laplace-EM steps (4-thread workers, or 200 workers, divide this by 4). Traffic per
iteration: 50 x 2 x 288 kB = 29 MB, under a second on a 1 Gbit/s network; the client's
L-BFGS (20 correction pairs of 36,000 globals) takes milliseconds. Memory per worker:
counts 1.0 GB; modes out of core ("zarr": 3.2 GB per worker on its local disk, read and
written each evaluation: 6.4 GB of I/O, about 10-15 s at 500 MB/s, 5 % of the
evaluation; "zarr32" half) with a peak RSS of about 1.7 GB per worker; float32 modes in
memory 6.4 GB (double-buffered), float64 in memory 12.8 GB (too much for an 8 GB
worker). Recommended: ``modes="zarr32"`` on worker-local disk (or "float32" on 16 GB
workers), ``chunk_cells`` 2000, checkpoints every 10 iterations (a restart from a
checkpoint costs one cold solve, about 6 Newton steps per cell instead of 2-3).

Usage::

    from dask.distributed import Client, LocalCluster
    from scribe_stan.distributed import fit_distributed, write_store
    write_store(adata, "cells.zarr", chunk_cells=2000)      # once: AnnData zarr store
    client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
    fit = fit_distributed("cells.zarr", client=client, rank=16, modes="zarr",
                          checkpoint="cells.ckpt.npz")   # or scribe_stan.fit(..., client=)
    fit.mu, fit.W, fit.d, fit.n_converged, fit.out      # per-cell outputs in fit.out

or from the shell: ``scribe-stan fit cells.zarr --scheduler local:2 --rank 16``
(:mod:`scribe_stan.dask_cli`).
"""

from __future__ import annotations

import os
import pickle
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from scribe_stan.laplace import batched, em, solver, workers
from scribe_stan.laplace.workers import COUNTS_STORAGE, MODE_STORAGE
from scribe_stan.models import loadings, pln

#: Models the distributed fit runs.
MODELS = ("pln", "nbln")
#: Output arrays written per cell.
OUTPUTS = ("x", "eta", "converged", "n_iter", "at_bound")
#: Floating types of the written modes ``x``.
X_DTYPES = ("float32", "float64")
#: Errors of a call on an actor whose worker is gone.
_LOST = (OSError, RuntimeError, EnvironmentError)


# ---------------------------------------------------------------- executors


class InProcessExecutor:
    """Runs one :class:`~scribe_stan.laplace.workers.ChunkGroup` with every chunk in
    this process (the chunked fit without a cluster)."""

    name = "in-process"

    def __init__(self):
        self.group = None
        self.stats = {"calls": 0, "bytes_out": 0, "bytes_in": 0, "recoveries": 0}

    def start(self, source, bounds, settings, out, group):
        self.group = workers.ChunkGroup(source, dict(enumerate(bounds)), settings, out, group)

    def call(self, method, *args, **kwargs):
        """``[result]`` of ``group.method(*args, **kwargs)``."""
        self.stats["calls"] += 1
        return [getattr(self.group, method)(*args, **kwargs)]

    def close(self):
        self.group = None


@dataclass
class _Entry:
    worker: str
    actor: object
    ids: list


class DaskExecutor:
    """Chunk groups as Dask actors, one per worker, re-created on loss.

    Parameters
    ----------
    client : ``distributed.Client``.
    recover_timeout : float, seconds to wait for a live worker after a loss.

    Attributes
    ----------
    stats : dict, ``calls``, ``bytes_out`` / ``bytes_in`` (pickled arguments sent to and
        results received from the actors, summed), ``recoveries`` (groups re-created),
        ``lost_chunks``.
    """

    name = "dask"

    def __init__(self, client, *, recover_timeout=60.0):
        self.client = client
        self.recover_timeout = float(recover_timeout)
        self.entries = []
        self.stats = {"calls": 0, "bytes_out": 0, "bytes_in": 0, "recoveries": 0,
                      "lost_chunks": 0}

    def _workers(self):
        return list(self.client.scheduler_info(n_workers=-1)["workers"])

    def _spawn(self, assignment):
        """Actors for ``{worker: [chunk ids]}``, created in parallel."""
        from scribe_stan.laplace.workers import ChunkGroup

        futures = []
        for w, ids in assignment.items():
            if not ids:
                continue
            b = {i: self.bounds[i] for i in ids}
            futures.append((w, ids, self.client.submit(
                ChunkGroup, self.source, b, self.settings, self.out, self.group,
                workers=[w], allow_other_workers=False, actor=True, pure=False)))
        return [_Entry(w, f.result(), list(ids)) for w, ids, f in futures]

    def start(self, source, bounds, settings, out, group):
        """Create the groups: contiguous blocks of chunks, one block per worker."""
        self.source, self.bounds, self.settings = source, list(bounds), dict(settings)
        self.out, self.group = out, group
        ws = self._workers()
        if not ws:
            raise RuntimeError("the Dask cluster has no workers")
        n = len(self.bounds)
        assignment = {w: list(range(i * n // len(ws), (i + 1) * n // len(ws)))
                      for i, w in enumerate(ws)}
        self.entries = self._spawn(assignment)

    def _alive(self, worker, wait):
        """Whether ``worker`` is still in the cluster after up to ``wait`` seconds."""
        t0 = time.perf_counter()
        while True:
            if worker not in self._workers():
                return False
            if time.perf_counter() - t0 > wait:
                return True
            time.sleep(0.2)

    def _recover(self, lost):
        """Re-create the chunks of the ``lost`` entries on the live workers (cold)."""
        t0 = time.perf_counter()
        while not self._workers():
            if time.perf_counter() - t0 > self.recover_timeout:
                raise RuntimeError("all Dask workers were lost and none came back within "
                                   f"{self.recover_timeout:.0f} s")
            time.sleep(0.5)
        ws = self._workers()
        ids = sorted(i for e in lost for i in e.ids)
        load = {w: 0 for w in ws}
        for e in self.entries:
            if e.worker in load:
                load[e.worker] += len(e.ids)
        assignment = {w: [] for w in ws}
        for i in ids:  # to the least loaded worker
            w = min(load, key=load.get)
            assignment[w].append(i)
            load[w] += 1
        fresh = self._spawn(assignment)
        self.stats["recoveries"] += len(fresh)
        self.stats["lost_chunks"] += len(ids)
        warnings.warn(f"{len(lost)} Dask worker(s) lost; their {len(ids)} chunk(s) of cells "
                      f"were re-created on {len(fresh)} worker(s) from the store with "
                      "cold-started modes", RuntimeWarning, stacklevel=3)
        return fresh

    def call(self, method, *args, **kwargs):
        """Results of ``group.method(*args, **kwargs)`` on every group (a list, one per
        group), re-creating the groups of lost workers and repeating the call on them."""
        self.stats["calls"] += 1
        size = len(pickle.dumps((args, kwargs), protocol=5))
        pending = list(self.entries)
        results = []
        for _attempt in range(10):
            futures = []
            for e in pending:
                try:
                    futures.append((e, getattr(e.actor, method)(*args, **kwargs)))
                except _LOST as err:
                    futures.append((e, err))
                self.stats["bytes_out"] += size
            lost = []
            for e, f in futures:
                try:
                    if isinstance(f, Exception):
                        raise f
                    r = f.result()
                except _LOST:
                    if self._alive(e.worker, wait=5.0):
                        raise
                    lost.append(e)
                    continue
                self.stats["bytes_in"] += len(pickle.dumps(r, protocol=5))
                results.append(r)
            if not lost:
                return results
            self.entries = [e for e in self.entries if e not in lost]
            pending = self._recover(lost)
            self.entries += pending
        raise RuntimeError(f"{method}: workers kept failing after 10 recoveries")

    def close(self):
        self.entries = []


# ---------------------------------------------------------------- the problem


class ChunkedProblem:
    """The pln / nbln Laplace problem over chunks run by an executor.

    Implements what :func:`scribe_stan.laplace.solver.optimize_problem` needs of a
    problem: ``log_marginal`` (the Laplace value, as per-group sums, and the summed
    gradient), ``em_statistics``, ``modes`` and ``fisher_sums`` (the preconditioner,
    :func:`~scribe_stan.laplace.solver.block_scaling`) and the warm-start protocol
    (``keep_modes``, ``restore_modes``, ``unconverged_fraction``). Keep and restore
    travel with the next call.

    Parameters
    ----------
    executor : :class:`InProcessExecutor` or :class:`DaskExecutor` (started).
    shape : (N, G).
    """

    def __init__(self, executor, shape):
        self.executor = executor
        self.shape = tuple(shape)
        self._token = 0
        self._pending = None
        self.n_unconverged = 0
        self.newton_iter = []  # total Newton iterations of each evaluation
        self.eval_seconds = []  # wall of each call that solved, client side
        self.peak_rss = {}

    def _call(self, method, *args):
        pending, self._pending = self._pending, None
        t0 = time.perf_counter()
        out = self.executor.call(method, *args, pending=pending)
        self.eval_seconds.append(time.perf_counter() - t0)
        return out

    def _note(self, summaries):
        self.n_unconverged = sum(s["n_unconverged"] for s in summaries)
        self.newton_iter.append(sum(s["newton_iter"] for s in summaries))
        for i, s in enumerate(summaries):
            self.peak_rss[i] = max(self.peak_rss.get(i, 0), s["rss"][1])

    @staticmethod
    def _check_eta(eta):
        if eta is not None:
            raise ValueError("held capture losses (eta=...) are not supported by the "
                             "chunked fit (allowed: eta=None)")

    def log_marginal(self, mu, W, d, *, log_r=None, eta=None, grad=False, grad_log_r=True):
        """As :meth:`LaplaceProblem.log_marginal`, except that ``value`` holds the sums
        over each group's cells (n_groups,), not one value per cell."""
        self._check_eta(eta)
        mu, W, d = (np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))
        self._token += 1
        want_r = bool(grad and grad_log_r and log_r is not None)
        parts = self._call("value_grad", mu, W, d, log_r, bool(grad), want_r, self._token)
        self._note(parts)
        value = np.array([p["value"] for p in parts])
        if not grad:
            return value
        g = {k: sum(p[k] for p in parts) for k in ("g_mu", "g_W", "g_d", "g_log_r")}
        if log_r is None:
            return value, g["g_mu"], g["g_W"], g["g_d"]
        return value, g["g_mu"], g["g_W"], g["g_d"], (g["g_log_r"] if want_r else None)

    def modes(self, mu, W, d, *, log_r=None, eta=None):
        """Newton for every cell at the globals, on the workers (returns None: the modes
        stay there; :meth:`write_outputs` writes them to the store)."""
        self._check_eta(eta)
        self._token += 1
        self._note(self._call("solve", *self._globals(mu, W, d), log_r, self._token))

    def fisher_sums(self, mu, W, d, log_r=None):
        """As :meth:`LaplaceProblem.fisher_sums`, summed over the groups."""
        parts = self._call("fisher", *self._globals(mu, W, d), log_r, self._token)
        return tuple(sum(p[i] for p in parts) for i in range(3))

    def em_statistics(self, mu, W, d, *, log_r=None, eta=None):
        """As :meth:`LaplaceProblem.em_statistics`, summed over the groups."""
        self._check_eta(eta)
        self._token += 1
        parts = self._call("em_statistics", *self._globals(mu, W, d), log_r, self._token)
        self._note([p.pop("summary") for p in parts])
        return em.reduce_statistics(parts)

    @staticmethod
    def _globals(mu, W, d):
        return tuple(np.ascontiguousarray(v, dtype=np.float64) for v in (mu, W, d))

    def keep_modes(self):
        self._pending = "keep"

    def restore_modes(self):
        self._pending = "restore"

    def unconverged_fraction(self):
        return self.n_unconverged / self.shape[0]

    def write_outputs(self):
        """Each group writes its cells' outputs into the store; returns cells written."""
        return sum(self._call("write_outputs"))


# ---------------------------------------------------------------- stores


def write_store(counts, path, *, chunk_cells=None, overwrite=False):
    """Write counts as an AnnData zarr store that the workers read chunk by chunk.

    Parameters
    ----------
    counts : AnnData (its ``X``) or an (N, G) array / scipy sparse matrix of counts.
    path : str, the ``.zarr`` directory to create.
    chunk_cells : int, optional, cells per stored chunk of a dense ``X`` (default
        :func:`scribe_stan.laplace.batched.chunk_bounds`'s chunk size).
    overwrite : bool, replace an existing store.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is False.
    """
    import anndata as ad
    from scipy import sparse

    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists (pass overwrite=True to replace it)")
    adata = counts if isinstance(counts, ad.AnnData) else ad.AnnData(
        counts if sparse.issparse(counts) else np.asarray(counts))
    if chunk_cells is None:
        chunk_cells = batched.chunk_bounds(*adata.shape)[0][1]
    if sparse.issparse(adata.X):
        adata.X = sparse.csr_matrix(adata.X)
        adata.write_zarr(path)
    else:
        adata.write_zarr(path, chunks=(int(chunk_cells), adata.shape[1]))
    return path


def _output_location(store, out, model):
    """(out store path, group) of the per-cell outputs."""
    store = os.fspath(store)
    if out is not None:
        return os.fspath(out), f"scribe_stan/{model}"
    if os.path.isdir(store):
        return store, f"scribe_stan/{model}"
    stem = store[:-5] if store.endswith(".h5ad") else store
    return stem + ".scribe_stan.zarr", f"scribe_stan/{model}"


def _create_outputs(out, group, N, G, chunk_cells, x_dtype, modes):
    import zarr

    root = zarr.open_group(out, mode="a", use_consolidated=False)
    if group in root:
        del root[group]
    g = root.require_group(group)
    rows = (int(chunk_cells),)
    g.create_array("x", shape=(N, G), chunks=(int(chunk_cells), G), dtype=x_dtype)
    g.create_array("eta", shape=(N,), chunks=rows, dtype="float64")
    g.create_array("converged", shape=(N,), chunks=rows, dtype="bool")
    g.create_array("n_iter", shape=(N,), chunks=rows, dtype="int64")
    g.create_array("at_bound", shape=(N,), chunks=rows, dtype="bool")
    if modes in ("zarr", "zarr32"):
        st = g.require_group("state")
        dtype = "float64" if modes == "zarr" else "float32"
        for name in ("x0", "x1"):  # raw: modes hardly compress, and are rewritten often
            st.create_array(name, shape=(N, G), chunks=(int(chunk_cells), G), dtype=dtype,
                            compressors=None)
    return g


def _write_globals(out, group, mu, W, d, log_r, attrs):
    """The fitted globals (small) and the fit's summary (attributes) into the group."""
    import zarr

    g = zarr.open_group(out, mode="a", use_consolidated=False)[group]
    for name, value in (("mu", mu), ("W", W), ("d", d)) + (
            (("log_r", log_r),) if log_r is not None else ()):
        g.create_array(name, data=np.asarray(value, dtype=np.float64), overwrite=True)
    g.attrs.update(attrs)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path, theta, *, model, G, K, n_iter, objective, loadings_prior):
    """Write the optimizer vector and what it belongs to (``.npz``, atomically)."""
    path = os.fspath(path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, theta=np.asarray(theta, dtype=np.float64), model=model, G=G, K=K,
             n_iter=n_iter, objective=objective, loadings_prior=loadings_prior)
    os.replace(tmp, path)


def load_checkpoint(path, *, model, G, K, loadings_prior):
    """``(theta, n_iter)`` of a checkpoint, checked against the fit it resumes.

    Raises
    ------
    FileNotFoundError; ValueError if the model, genes, rank or loadings prior differ.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    with np.load(path) as f:
        got = {"model": str(f["model"]), "G": int(f["G"]), "K": int(f["K"]),
               "loadings_prior": str(f["loadings_prior"])}
        want = {"model": model, "G": G, "K": K, "loadings_prior": loadings_prior}
        bad = {k: (got[k], want[k]) for k in got if got[k] != want[k]}
        if bad:
            raise ValueError(f"checkpoint {path!r} does not match this fit: "
                             + ", ".join(f"{k} {a!r} (checkpoint) != {b!r} (fit)"
                                         for k, (a, b) in bad.items()))
        return np.array(f["theta"]), int(f["n_iter"])


# ---------------------------------------------------------------- the fit


@dataclass
class DistributedFit:
    """Result of :func:`fit_distributed`: the globals and summaries; per-cell outputs
    stay in the store.

    Attributes
    ----------
    model : {"pln", "nbln"};  mu : (G,);  W : (G, K);  d : (G,);  log_r : (G,) or None.
    objective : float, the Laplace objective at the returned globals.
    n_iter : int, outer L-BFGS iterations (counting those before a resumed checkpoint);
    n_eval : int, evaluations of this run;  em_iterations : int;  success : bool;
    message : str;  history : list of objective values per iteration of this run.
    n_cells : int;  n_converged : int, cells whose Newton step converged at the end.
    out : str, the zarr store, and ``group`` in it, with the per-cell arrays ``x`` (N,
        G), ``eta``, ``converged``, ``n_iter``, ``at_bound`` (N,).
    wall_time_s : float;  stats : dict, executor traffic, recoveries, Newton iterations
        and wall of each evaluation, peak RSS per group.
    """

    model: str
    mu: np.ndarray
    W: np.ndarray
    d: np.ndarray
    log_r: np.ndarray | None
    objective: float
    n_iter: int
    n_eval: int
    em_iterations: int
    success: bool
    message: str
    n_cells: int
    n_converged: int
    out: str
    group: str
    history: list = field(default_factory=list)
    wall_time_s: float = 0.0
    stats: dict = field(default_factory=dict)

    method = "laplace"

    @property
    def converged(self):
        """Whether every cell converged (a bool, not per cell: those are in the store)."""
        return self.n_converged == self.n_cells

    def summary(self):
        """Headline figures, JSON-ready (the keys of :meth:`scribe_stan.fits.Fit.summary`
        where they apply, plus the executor's)."""
        return {"model": self.model, "method": self.method, "cells": self.n_cells,
                "genes": int(self.mu.shape[0]), "rank": int(self.W.shape[1]),
                "objective": float(self.objective), "n_iter": int(self.n_iter),
                "success": bool(self.success), "cells_converged": int(self.n_converged),
                "wall_time_s": round(self.wall_time_s, 3),
                "executor": self.stats.get("executor"),
                "recoveries": self.stats.get("recoveries"), "out": self.out,
                "group": self.group}

    def read(self, name, rows=slice(None)):
        """Per-cell output ``name`` (one of :data:`OUTPUTS`) for ``rows``, read from the
        store (mind the size of ``x`` at scale)."""
        import zarr

        if name not in OUTPUTS:
            raise ValueError(f"name={name!r}; allowed: {OUTPUTS}")
        root = zarr.open_group(self.out, mode="r", use_consolidated=False)
        return np.asarray(root[f"{self.group}/{name}"][rows])


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {allowed}")


def _initial_globals(store, key, bounds, K, log_M0, init_cells, seed):
    """:func:`solver.initial_globals` from up to ``init_cells`` cells of evenly spaced
    chunks, read on the client (all cells when N <= init_cells)."""
    from scipy import sparse

    sizes = np.array([hi - lo for lo, hi in bounds])
    n_take = max(1, int(np.searchsorted(np.cumsum(sizes), init_cells, side="right")))
    pick = np.unique(np.linspace(0, len(bounds) - 1, min(n_take, len(bounds))).round()
                     .astype(int))
    csr = sparse.vstack([workers.read_rows(store, *bounds[i], key) for i in pick],
                        format="csr")
    a = pln.capture_prior_mean(np.log(np.asarray(csr.sum(axis=1)).reshape(-1)),
                               float(log_M0))
    return solver.initial_globals(csr, a, K, seed=seed)


def fit_distributed(store, *, client=None, model="pln", rank=10, key="X", out=None,
                    chunk_cells=None, modes="memory", counts="memory",
                    log_M0=np.log(pln.M0_DEFAULT), sigma_M=pln.SIGMA_M_DEFAULT,
                    loadings_prior="normal", tol=1e-8, max_iter=1000, newton_tol=1e-10,
                    em_iterations=None, init=None, init_cells=50_000, seed=0,
                    checkpoint=None, checkpoint_every=10, resume_from=None,
                    x_dtype="float32", max_unconverged=0.01, progress=None,
                    iteration_callback=None):
    """Fit pln / nbln by the exact Laplace objective with the cells in chunks on workers.

    The same outer optimization as :func:`scribe_stan.laplace.solver.fit_laplace`
    (Laplace-EM start, L-BFGS-B with the block preconditioner) over the chunks of a
    counts store; see the module docstring for where each piece runs.

    Parameters
    ----------
    store : str, an AnnData ``.zarr`` store or ``.h5ad`` file with raw counts (cells x
        genes; every gene is modelled, library sizes are the row sums).
    client : ``distributed.Client``, optional
        Run the chunks as actors on its workers; None runs them in this process.
    model : {"pln", "nbln"}.
    rank : int, latent rank K (1 <= K < genes).
    key : str, the counts in the store: ``"X"`` or ``"layers/<name>"``.
    out : str, optional
        Zarr store of the per-cell outputs (group ``scribe_stan/<model>``); default the
        counts store itself when it is a zarr directory, else ``<stem>.scribe_stan.zarr``.
    chunk_cells : int, optional, cells per chunk (default
        :func:`scribe_stan.laplace.batched.chunk_bounds`: about 4M count elements).
    modes : one of :data:`scribe_stan.laplace.workers.MODE_STORAGE`
        ``"memory"`` (float64, as the in-process fit), ``"float32"`` (compact warm
        starts), ``"zarr"`` / ``"zarr32"`` (out of core in the output store).
    counts : one of :data:`scribe_stan.laplace.workers.COUNTS_STORAGE`
        Hold each chunk's counts on its worker, or re-read them at every call.
    log_M0, sigma_M : capture prior (:class:`scribe_stan.laplace.solver.LaplaceProblem`).
    loadings_prior, tol, max_iter, newton_tol, em_iterations, max_unconverged, seed :
        as :func:`~scribe_stan.laplace.solver.fit_laplace`.
    init : tuple (mu, W, d[, log_r]), optional
        Start; default :func:`~scribe_stan.laplace.solver.initial_globals` on up to
        ``init_cells`` cells of evenly spaced chunks (all cells when fewer: then the
        same start as ``fit_laplace``).
    checkpoint : str, optional, ``.npz`` path: the globals are saved there every
        ``checkpoint_every`` outer iterations and at the end.
    resume_from : str, optional, a checkpoint to start from (skips the Laplace-EM start;
        must match model, genes, rank and loadings prior).
    x_dtype : {"float32", "float64"}, type of the written modes ``x``.
    progress : tqdm-like object, optional;  iteration_callback : callable ``(theta,
        value, n_iter)``, optional, after each outer iteration (after the checkpoint).

    Returns
    -------
    DistributedFit

    Raises
    ------
    ValueError
        Unknown model, modes, counts or x_dtype; rank outside ``1..G-1``;
        ``tol <= 0``, ``max_iter < 1``, ``chunk_cells < 1``, ``checkpoint_every < 1``,
        ``init_cells < 1``; a checkpoint of another fit.
    FileNotFoundError, KeyError
        No store, no such counts key, no such checkpoint.
    """
    t0 = time.perf_counter()
    _check_choice("model", model, MODELS)
    _check_choice("modes", modes, MODE_STORAGE)
    _check_choice("counts", counts, COUNTS_STORAGE)
    _check_choice("x_dtype", x_dtype, X_DTYPES)
    loadings_prior = loadings.check_prior(loadings_prior)
    store = os.fspath(store)
    N, G = workers.store_shape(store, key)
    K = int(rank)
    if not 1 <= K < G:
        raise ValueError(f"rank={rank} must satisfy 1 <= rank < genes ({G})")
    if not tol > 0:
        raise ValueError(f"tol={tol} must be > 0")
    for name, v in (("max_iter", max_iter), ("checkpoint_every", checkpoint_every),
                    ("init_cells", init_cells)) + ((("chunk_cells", chunk_cells),)
                                                   if chunk_cells is not None else ()):
        if int(v) < 1:
            raise ValueError(f"{name}={v} must be >= 1")
    bounds = batched.chunk_bounds(N, G, chunk_cells)
    chunk_cells = bounds[0][1] - bounds[0][0]
    layout = solver.OuterLayout(G, K, model, loadings_prior=loadings_prior)
    theta0, done_before = None, 0
    if resume_from is not None:
        theta0, done_before = load_checkpoint(resume_from, model=model, G=G, K=K,
                                              loadings_prior=loadings_prior)
    out_path, group = _output_location(store, out, model)
    _create_outputs(out_path, group, N, G, chunk_cells, x_dtype, modes)
    if init is None and theta0 is None:
        init = _initial_globals(store, key, bounds, K, log_M0, init_cells, seed)
    executor = InProcessExecutor() if client is None else DaskExecutor(client)
    settings = {"key": key, "log_M0": float(log_M0), "sigma_M": float(sigma_M),
                "newton_tol": float(newton_tol), "modes": modes, "counts": counts}
    executor.start(store, bounds, settings, out_path, group)
    problem = ChunkedProblem(executor, (N, G))
    iter_wall = []
    last = [time.perf_counter()]

    def on_iteration(theta, value, n_iter):
        now = time.perf_counter()
        iter_wall.append(now - last[0])
        last[0] = now
        total = done_before + n_iter
        if checkpoint is not None and total % int(checkpoint_every) == 0:
            save_checkpoint(checkpoint, theta, model=model, G=G, K=K, n_iter=total,
                            objective=value, loadings_prior=loadings_prior)
        if iteration_callback is not None:
            iteration_callback(theta, value, total)

    try:
        res, em_done = solver.optimize_problem(
            problem, layout, init, tol=tol, max_iter=max_iter, progress=progress,
            max_unconverged=max_unconverged, em_iterations=em_iterations, theta0=theta0,
            callback=on_iteration)
        mu, W, d, log_r = layout.unpack(res.theta)
        final, _ = solver.objective(problem, res.theta, layout)
        problem.write_outputs()
        if checkpoint is not None:
            save_checkpoint(checkpoint, res.theta, model=model, G=G, K=K,
                            n_iter=done_before + res.n_iter, objective=final,
                            loadings_prior=loadings_prior)
    finally:
        executor.close()
    n_conv = N - problem.n_unconverged
    _write_globals(out_path, group, mu, W, d, log_r, {
        "model": model, "rank": K, "objective": float(final),
        "n_iter": int(done_before + res.n_iter), "success": bool(res.success),
        "n_cells": int(N), "n_converged": int(n_conv), "store": store, "key": key,
        "log_M0": float(log_M0), "sigma_M": float(sigma_M),
        "loadings_prior": loadings_prior})
    if n_conv < N:
        warnings.warn(f"{N - n_conv} of {N} cells did not converge in the per-cell Newton "
                      "step; see the store's 'converged'.", RuntimeWarning, stacklevel=2)
    stats = {"executor": executor.name, **executor.stats,
             "newton_iter_per_eval": problem.newton_iter,
             "call_seconds": problem.eval_seconds, "iteration_seconds": iter_wall,
             "peak_rss_per_group": [problem.peak_rss[i] for i in sorted(problem.peak_rss)],
             "n_chunks": len(bounds), "chunk_cells": chunk_cells, "modes": modes,
             "counts": counts}
    return DistributedFit(model=model, mu=mu.copy(), W=W.copy(), d=d.copy(),
                          log_r=None if log_r is None else np.array(log_r), objective=final,
                          n_iter=done_before + res.n_iter, n_eval=res.n_eval,
                          em_iterations=em_done, success=res.success, message=res.message,
                          n_cells=N, n_converged=int(n_conv), out=out_path, group=group,
                          history=res.history, wall_time_s=time.perf_counter() - t0,
                          stats=stats)
