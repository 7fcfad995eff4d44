"""Chunks of cells that read their own counts and keep their own modes: the worker side
of the chunked Laplace fit (:mod:`scribe_stan.distributed`).

A :class:`ChunkGroup` holds several chunks of consecutive cells (:class:`ChunkState`),
each built from its rows of a counts store (an AnnData zarr store or a backed h5ad,
read with AnnData's backed sparse reader, or a zarr/HDF5 dense array). Every call takes
only the globals and returns only sums over the group's cells: the Laplace value and
gradient, the Laplace-EM sufficient statistics and the preconditioner's Fisher blocks,
computed by the same chunk kernels as the in-process :class:`LaplaceProblem`
(:class:`scribe_stan.laplace.batched.CellChunk`, :func:`solver.chunk_fisher_sums`).
The class has no Dask in it: the Dask executor runs it as an actor on a worker, the
in-process executor calls it directly.

Modes, the big state (n x G per chunk), are kept in one of four ways (``modes=``):

- ``"memory"``: float64 in the worker's memory (what the in-process fit does);
- ``"float32"``: float32 in memory (half the memory; each solve starts from the
  rounded warm start, converted to float64 for the Newton step);
- ``"zarr"`` / ``"zarr32"``: out of core, in two zarr arrays (N, G) of float64 /
  float32 in the output store, read and written by the chunk at each solve.

The warm-start protocol of :mod:`scribe_stan.laplace.driver` (keep / restore) is a
double buffer: two slots per chunk, ``cur`` (the last solve) and ``kept`` (the last
kept); a solve writes into the slot that is not ``kept``, ``keep`` and ``restore`` move
pointers only (no copy of the modes, in memory or on disk).
"""

from __future__ import annotations

import os

import numpy as np
from scipy import sparse, special

from scribe_stan.laplace import batched
from scribe_stan.models import pln

#: How modes are kept between outer iterations (module docstring).
MODE_STORAGE = ("memory", "float32", "zarr", "zarr32")
#: Where the counts are kept: read once and held ("memory"), or re-read at each call.
COUNTS_STORAGE = ("memory", "store")


# ---------------------------------------------------------------- counts stores


def _open(path):
    """(root, kind) of a counts store: a zarr group (``.zarr`` directory) or h5py File."""
    path = os.fspath(path)
    if path.endswith(".h5ad") or path.endswith(".h5"):
        import h5py

        return h5py.File(path, "r"), "h5"
    import zarr

    return zarr.open_group(path, mode="r", use_consolidated=False), "zarr"


def store_shape(path, key="X"):
    """(N, G) of the counts ``key`` (``"X"`` or ``"layers/NAME"``) in a store.

    Raises
    ------
    FileNotFoundError, KeyError (no such store or key), ValueError (not 2-dimensional).
    """
    if not os.path.exists(os.fspath(path)):
        raise FileNotFoundError(f"no counts store at {os.fspath(path)!r} (allowed: an "
                                "AnnData .zarr directory or .h5ad file)")
    root, _ = _open(path)
    if key not in root:
        raise KeyError(f"counts {key!r} not in {os.fspath(path)!r} (allowed: 'X' or "
                       "'layers/<name>')")
    node = root[key]
    shape = node.attrs["shape"] if "shape" in node.attrs else node.shape
    if len(shape) != 2:
        raise ValueError(f"counts {key!r} must be 2-dimensional (cells x genes); got {shape}")
    return int(shape[0]), int(shape[1])


def read_rows(path, lo, hi, key="X"):
    """Rows ``lo:hi`` of the counts ``key`` as a float64 CSR matrix (sorted, no zeros).

    Sparse counts (AnnData's ``csr_matrix`` encoding) are read through
    :func:`anndata.io.sparse_dataset`, which reads only the requested rows; dense ones
    by slicing the array.
    """
    root, _ = _open(path)
    node = root[key]
    enc = node.attrs.get("encoding-type", "array")
    if enc in ("csr_matrix", "csc_matrix"):
        from anndata.io import sparse_dataset

        block = sparse_dataset(node)[lo:hi]
    else:
        block = np.asarray(node[lo:hi])
    csr = sparse.csr_matrix(block, dtype=np.float64, copy=True)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.sort_indices()
    return csr


# ---------------------------------------------------------------- one chunk


class _Slots:
    """Double buffer of one chunk's modes (see the module docstring)."""

    def __init__(self, kind, n, G, x0, arrays=None, lo=0):
        self.kind = kind
        self.lo, self.hi = lo, lo + n
        self.arrays = arrays  # two zarr arrays (zarr kinds)
        dtype = np.float32 if kind in ("float32", "zarr32") else np.float64
        self.dtype = dtype
        if arrays is None:
            self.x = [np.asarray(x0, dtype=dtype), None]
        else:
            self.x = [None, None]
            arrays[0][self.lo:self.hi] = x0.astype(dtype)
        self.cur = self.kept = 0

    def load(self):
        """The current modes as a writable float64 (n, G) array for a solve."""
        if self.kind == "memory":
            if self.cur == self.kept:  # solve into the other slot, the kept one stays
                other = 1 - self.kept
                if self.x[other] is None:
                    self.x[other] = self.x[self.kept].copy()
                else:
                    np.copyto(self.x[other], self.x[self.kept])
                self.cur = other
            return self.x[self.cur]
        if self.arrays is None:
            return self.x[self.cur].astype(np.float64)
        return np.asarray(self.arrays[self.cur][self.lo:self.hi], dtype=np.float64)

    def peek(self):
        """The current modes (float64, read-only use)."""
        if self.kind == "memory":
            return self.x[self.cur]
        return self.load()

    def store(self, x):
        """Make ``x`` (from :meth:`load`, after a solve) the current modes."""
        if self.kind == "memory":
            return  # solved in place in slot ``cur``
        target = self.cur if self.cur != self.kept else 1 - self.kept
        if self.arrays is None:
            if self.x[target] is None:
                self.x[target] = np.empty(x.shape, self.dtype)
            self.x[target][:] = x
        else:
            self.arrays[target][self.lo:self.hi] = x.astype(self.dtype)
        self.cur = target

    def nbytes(self):
        return sum(0 if v is None else v.nbytes for v in self.x)


class ChunkState:
    """One chunk of consecutive cells ``lo:hi`` of a counts store, with its modes.

    Parameters
    ----------
    source : str, path of the counts store (:func:`read_rows`);  key : its counts key.
    lo, hi : int, the chunk's rows.
    log_M0, sigma_M : float, capture prior (:class:`scribe_stan.laplace.solver.LaplaceProblem`);
        library sizes are the row sums of the stored counts.
    newton_tol, max_newton : per-cell Newton stopping rule.
    modes : one of :data:`MODE_STORAGE`;  state : (2,) zarr arrays (N, G) for the
        out-of-core kinds, else None.
    counts : one of :data:`COUNTS_STORAGE`.

    The modes start cold: ``eta`` at the capture prior's location clipped at 0 and
    ``x = log(u + 1/2) + eta`` (the data-driven start of the in-process problem).
    """

    def __init__(self, source, lo, hi, *, key="X", log_M0=np.log(pln.M0_DEFAULT),
                 sigma_M=pln.SIGMA_M_DEFAULT, newton_tol=1e-10, max_newton=100,
                 modes="memory", state=None, counts="memory"):
        self.source, self.key, self.lo, self.hi = source, key, int(lo), int(hi)
        self.newton_tol, self.max_newton = float(newton_tol), int(max_newton)
        csr = read_rows(source, lo, hi, key)
        self.G = csr.shape[1]
        n = csr.shape[0]
        log_lib = np.log(np.asarray(csr.sum(axis=1)).reshape(-1))
        self.a = pln.capture_prior_mean(log_lib, float(log_M0))
        self.sigma = np.full(n, float(sigma_M))
        rows = np.repeat(np.arange(n), np.diff(csr.indptr))
        self.lgam = -np.bincount(rows, weights=special.gammaln(csr.data + 1.0), minlength=n)
        self.const_eta = (-0.5 * np.log(2 * np.pi * self.sigma**2)
                          - special.log_ndtr(self.a / self.sigma) + 0.5 * np.log(2 * np.pi))
        # held compactly (counts are integers: float32 is exact below 2^24; int32 gene
        # indices): 8 bytes per stored count instead of 12, widened per call
        self._csr = None if counts != "memory" else sparse.csr_matrix(
            (csr.data.astype(np.float32 if _exact32(csr.data) else np.float64),
             csr.indices.astype(np.int32), csr.indptr), shape=csr.shape)
        self._nb = None  # (log_r, constants) of the last NB call
        eta0 = np.maximum(self.a, 0.0)
        self.eta = [eta0, eta0.copy()]
        self.x = _Slots(modes, n, self.G, self._start(csr, np.arange(n), eta0),
                        arrays=state, lo=self.lo)
        self.n_iter = np.zeros(n, np.int64)
        self.converged = np.zeros(n, bool)
        self.at_bound = np.zeros(n, bool)

    def __len__(self):
        return self.hi - self.lo

    def csr(self):
        """The chunk's counts (n, G) CSR: held, or read again from the store."""
        if self._csr is None:
            return read_rows(self.source, self.lo, self.hi, self.key)
        held = self._csr
        return sparse.csr_matrix((held.data.astype(np.float64), held.indices, held.indptr),
                                 shape=held.shape)

    @staticmethod
    def _start(csr, cells, eta):
        """Data-driven start ``log(u + 1/2) + eta`` of the rows ``cells`` (m, G)."""
        sub = csr[cells]
        start = np.full((cells.size, csr.shape[1]), np.log(0.5))
        start[np.repeat(np.arange(cells.size), np.diff(sub.indptr)), sub.indices] = \
            np.log(sub.data + 0.5)
        return start + eta[cells, None]

    def lik_constants(self, log_r):
        """Per-cell z-independent log-likelihood terms (n,) (as
        :meth:`LaplaceProblem.lik_constants`)."""
        if log_r is None:
            return self.lgam
        if self._nb is not None and np.array_equal(self._nb[0], log_r):
            return self._nb[1]
        csr = self.csr()
        rows = np.repeat(np.arange(len(self)), np.diff(csr.indptr))
        lr = log_r[csr.indices]
        r = np.exp(lr)
        nb = special.gammaln(csr.data + r) - special.gammaln(r) - csr.data * lr
        value = self.lgam + np.bincount(rows, weights=nb, minlength=len(self))
        self._nb = (np.array(log_r), value)
        return value

    def lik_constants_grad(self, log_r):
        """Gradient of ``sum(lik_constants(log_r))`` in log_r over the chunk (G,)."""
        csr = self.csr()
        r = np.exp(log_r)[csr.indices]
        u = csr.data
        terms = r * (special.digamma(u + r) - special.digamma(r)) - u
        return np.bincount(csr.indices, weights=terms, minlength=self.G)

    # -------------------------------------------------- the warm-start double buffer

    def keep(self):
        self.x.kept = self.x.cur

    def restore(self):
        self.x.cur = self.x.kept

    def solve(self, gl):
        """Newton from the current modes at the globals ``gl`` (:class:`batched.Globals`),
        with a data-driven restart for the cells that fail (the rule of
        :meth:`LaplaceProblem.modes`); the new modes become current.

        Returns
        -------
        (csr, x, chunk): the counts, the float64 modes (n, G) and the
        :class:`batched.CellChunk` on them, for the caller's next step.
        """
        csr = self.csr()
        src = self.x.cur
        target = src if src != self.x.kept else 1 - self.x.kept
        if target != src:  # eta follows x's slots
            self.eta[target][:] = self.eta[src]
        eta = self.eta[target]
        x = self.x.load()
        chunk = batched.CellChunk(csr, self.a, self.sigma, x, eta)
        n_iter, conv, bound = chunk.newton(gl, False, self.newton_tol, self.max_newton)
        if not conv.all():
            bad = np.flatnonzero(~conv)
            eta[bad] = np.maximum(self.a[bad], 0.0)
            x[bad] = self._start(csr, bad, eta)
            it, ok, bd = chunk.newton(gl, False, self.newton_tol, self.max_newton, bad)
            n_iter[bad] += it
            conv[bad], bound[bad] = ok, bd
        self.x.store(x)
        self.n_iter, self.converged, self.at_bound = n_iter, conv, bound
        return csr, x, chunk

    def current(self):
        """(x (n, G) float64, eta (n,)) current modes."""
        return self.x.peek(), self.eta[self.x.cur]


# ---------------------------------------------------------------- a group of chunks


def _rss():
    """(current, peak) resident set size of this process in bytes."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        with open("/proc/self/statm") as f:
            cur = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux
        cur = peak
    return cur, peak


def _open_arrays(out, group, names):
    import zarr

    root = zarr.open_group(os.fspath(out), mode="r+", use_consolidated=False)
    return [root[f"{group}/{name}"] for name in names]


class ChunkGroup:
    """Several chunks of cells on one worker: the unit the executors call.

    Every method that computes takes the globals ``mu`` (G,), ``W`` (G, K), ``d`` (G,),
    ``log_r`` ((G,) or None: Poisson) and returns only sums over the group's cells (and
    counts of cells), never per-cell arrays. ``pending`` ("keep", "restore" or None) is
    a warm-start step the driver asked for after the previous evaluation, applied first
    (it travels with the next call instead of costing a round trip of its own).

    Parameters
    ----------
    source : str, counts store (:func:`read_rows`);  bounds : {chunk_id: (lo, hi)}.
    settings : dict of :class:`ChunkState` keyword arguments (``key``, ``log_M0``,
        ``sigma_M``, ``newton_tol``, ``max_newton``, ``modes``, ``counts``).
    out : str, optional, the output zarr store and ``group`` in it; the out-of-core modes
        live in its arrays ``state/x0`` and ``state/x1``.
    """

    def __init__(self, source, bounds, settings, out=None, group=None):
        self.source, self.settings, self.out, self.group = source, dict(settings), out, group
        self.chunks = {}
        self.token = None
        self.seconds = 0.0
        self.add(bounds)

    def add(self, bounds):
        """Build (cold-started) chunks ``{chunk_id: (lo, hi)}``; returns their ids."""
        state = None
        if self.settings.get("modes", "memory") in ("zarr", "zarr32"):
            state = _open_arrays(self.out, self.group, ("state/x0", "state/x1"))
        for cid, (lo, hi) in bounds.items():
            self.chunks[int(cid)] = ChunkState(self.source, lo, hi, state=state,
                                               **self.settings)
        self.token = None
        return sorted(self.chunks)

    def ids(self):
        return sorted(self.chunks)

    def _apply(self, pending):
        if pending == "keep":
            for st in self.chunks.values():
                st.keep()
        elif pending == "restore":
            for st in self.chunks.values():
                st.restore()
        elif pending is not None:
            raise ValueError(f"pending={pending!r}; allowed: 'keep', 'restore', None")

    def _summary(self, t0):
        import time

        dt = time.perf_counter() - t0
        self.seconds += dt
        sts = self.chunks.values()
        return {"n_cells": sum(len(s) for s in sts),
                "n_unconverged": int(sum((~s.converged).sum() for s in sts)),
                "newton_iter": int(sum(s.n_iter.sum() for s in sts)),
                "seconds": dt, "rss": _rss()}

    def keep(self):
        self._apply("keep")

    def restore(self):
        self._apply("restore")

    def solve(self, mu, W, d, log_r, token, pending=None):
        """Modes of every cell at the globals; returns the summary counts (dict)."""
        import time

        t0 = time.perf_counter()
        self._apply(pending)
        gl = batched.Globals.build(mu, W, d, _inv_r(log_r, len(mu)))
        for st in self.chunks.values():
            st.solve(gl)
        self.token = token
        return self._summary(t0)

    def value_grad(self, mu, W, d, log_r, want_grad, want_grad_r, token, pending=None):
        """Modes at the globals, then the Laplace log marginal and its gradient summed
        over the group's cells.

        Returns
        -------
        dict: ``value`` (float), ``g_mu`` (G,), ``g_W`` (G, K), ``g_d`` (G,), ``g_log_r``
        (G,) (with the NB constants' part when ``want_grad_r``), and the summary counts.
        """
        import time

        t0 = time.perf_counter()
        self._apply(pending)
        G, K = np.shape(W)
        gl = batched.Globals.build(mu, W, d, _inv_r(log_r, G))
        total = {"value": 0.0, "g_mu": np.zeros(G), "g_W": np.zeros((G, K)),
                 "g_d": np.zeros(G), "g_log_r": np.zeros(G)}
        for st in self.chunks.values():
            _, _, chunk = st.solve(gl)
            const = st.lik_constants(log_r) + st.const_eta
            value, *grads = chunk.value_grad(gl, const, False, want_grad, want_grad_r)
            total["value"] += float(value.sum())
            for key, g in zip(("g_mu", "g_W", "g_d", "g_log_r"), grads):
                total[key] += g
            if want_grad_r:
                total["g_log_r"] += st.lik_constants_grad(log_r)
        self.token = token
        return {**total, **self._summary(t0)}

    def fisher(self, mu, W, d, log_r, token, pending=None):
        """:func:`solver.chunk_fisher_sums` over the group's cells at the modes of the
        globals (solved first unless the last solve had this ``token``): ``(A, info_d,
        info_r)``."""
        from scribe_stan.laplace.solver import chunk_fisher_sums

        self._apply(pending)
        if token != self.token:
            self.solve(mu, W, d, log_r, token)
        parts = ((*st.current(), None if log_r is None else st.csr())
                 for st in self.chunks.values())
        return chunk_fisher_sums(parts, mu, W, d, log_r)

    def em_statistics(self, mu, W, d, log_r, token, pending=None):
        """Modes at the globals, then the Laplace-EM statistics summed over the group
        (:meth:`batched.CellChunk.em_statistics`), with the summary counts under
        ``"summary"``."""
        import time

        from scribe_stan.laplace import em

        t0 = time.perf_counter()
        self._apply(pending)
        gl = batched.Globals.build(mu, W, d, _inv_r(log_r, len(mu)))
        parts = []
        for st in self.chunks.values():
            _, _, chunk = st.solve(gl)
            parts.append(chunk.em_statistics(gl, False))
        self.token = token
        stats = em.reduce_statistics(parts)
        stats["summary"] = self._summary(t0)
        return stats

    def write_outputs(self, names=("x", "eta", "converged", "n_iter", "at_bound"),
                      pending=None):
        """Write each chunk's current modes and Newton diagnostics into the output
        store's arrays ``group/<name>`` at the chunk's rows; returns the cells written."""
        self._apply(pending)
        arrays = dict(zip(names, _open_arrays(self.out, self.group, names)))
        n = 0
        for st in self.chunks.values():
            x, eta = st.current()
            values = {"x": x, "eta": eta, "converged": st.converged, "n_iter": st.n_iter,
                      "at_bound": st.at_bound}
            for name, arr in arrays.items():
                arr[st.lo:st.hi] = np.asarray(values[name], dtype=arr.dtype)
            n += len(st)
        return n

    def memory(self):
        """Bytes of modes held in memory, and the process's (current, peak) RSS."""
        return {"modes_bytes": int(sum(st.x.nbytes() + 2 * st.eta[0].nbytes
                                       for st in self.chunks.values())),
                "rss": _rss()}


def _exact32(values):
    """Whether float32 holds these counts exactly (integers below 2^24)."""
    return values.size == 0 or float(np.max(values)) < 2.0**24


def _inv_r(log_r, G):
    if log_r is None:
        return np.zeros(G)
    return np.ascontiguousarray(np.exp(-np.asarray(log_r, dtype=np.float64)))
