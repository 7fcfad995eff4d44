"""The chunked Laplace fit on a Dask LocalCluster against the in-process fit_laplace.

The reference is :func:`scribe_stan.laplace.solver.fit_laplace` on the counts in memory
(the local executor); the distributed fit reads the same counts from a zarr store on its
workers. Two single-threaded worker processes; the cluster is shared by the module and
the worker-kill test runs last on its own cluster.
"""

import os
import signal

import numpy as np
import pytest
from scipy import sparse

import scribe_stan as ss
from scribe_stan.distributed import fit_distributed, load_checkpoint, write_store
from scribe_stan.laplace.solver import fit_laplace
from scribe_stan.models import pln

distributed = pytest.importorskip("distributed")

N, G, K = 600, 40, 3
CHUNK = 128
WORKER_ENV = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def _cluster():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", env=WORKER_ENV)
    return cluster, distributed.Client(cluster)


@pytest.fixture(scope="module")
def client():
    cluster, client = _cluster()
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def sim():
    return pln.simulate(N, G, K, seed=3, lib_target=300.0)


@pytest.fixture(scope="module")
def reference(sim):
    return fit_laplace(sim["counts"], K)


def _store(tmp_path, sim, dense):
    counts = sim["counts"] if dense else sparse.csr_matrix(sim["counts"])
    return write_store(counts, str(tmp_path / "cells.zarr"), chunk_cells=CHUNK)


def _rel(a, b):
    return abs(a - b) / abs(b)


@pytest.mark.parametrize(("dense", "modes"), [(True, "memory"), (False, "zarr")])
def test_dask_fit_matches_local_executor(client, sim, reference, tmp_path, dense, modes):
    store = _store(tmp_path, sim, dense)
    if dense:
        fit = fit_distributed(store, client=client, rank=K, chunk_cells=CHUNK, modes=modes)
    else:  # the public entry: ss.fit(store, client=...)
        fit = ss.fit(store, client=client, rank=K, chunk_cells=CHUNK, modes=modes,
                     progress=False)
    assert fit.success and fit.converged
    assert fit.stats["executor"] == "dask" and fit.stats["n_chunks"] == 5
    assert _rel(fit.objective, reference.objective) < 1e-8
    for got, want in ((fit.mu, reference.mu), (fit.W, reference.W), (fit.d, reference.d)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # per-cell outputs were written by the workers, chunk by chunk
    np.testing.assert_allclose(fit.read("x"), reference.modes.x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fit.read("eta"), reference.modes.eta, atol=1e-6)
    assert fit.read("converged").all()
    # traffic: globals out and sums back, never per-cell arrays
    per_call = (fit.stats["bytes_out"] + fit.stats["bytes_in"]) / fit.stats["calls"]
    assert per_call < 40 * G * (K + 2) * 8 * 2 + 50_000


@pytest.mark.parametrize("modes", ["float32", "zarr32"])
def test_compact_warm_starts_reach_the_same_optimum(sim, reference, tmp_path, modes):
    # in-process executor: the same chunk groups without a cluster
    store = _store(tmp_path, sim, dense=False)
    fit = fit_distributed(store, rank=K, chunk_cells=CHUNK, modes=modes)
    assert fit.success and fit.converged
    assert _rel(fit.objective, reference.objective) < 1e-8
    np.testing.assert_allclose(fit.W, reference.W, rtol=1e-5, atol=1e-5)


def test_resume_from_checkpoint_matches_uninterrupted(sim, reference, tmp_path):
    store = _store(tmp_path, sim, dense=False)
    ckpt = str(tmp_path / "fit.ckpt.npz")
    first = fit_distributed(store, rank=K, chunk_cells=CHUNK, max_iter=8, checkpoint=ckpt,
                            checkpoint_every=4)
    assert not first.success and first.n_iter == 8
    theta, n_iter = load_checkpoint(ckpt, model="pln", G=G, K=K, loadings_prior="normal")
    assert n_iter == 8 and theta.size == G * (K + 2)
    resumed = fit_distributed(store, rank=K, chunk_cells=CHUNK, resume_from=ckpt)
    assert resumed.success and resumed.converged and resumed.em_iterations == 0
    assert resumed.n_iter > 8
    assert _rel(resumed.objective, reference.objective) < 1e-7
    np.testing.assert_allclose(resumed.mu, reference.mu, atol=2e-3)
    np.testing.assert_allclose(resumed.W @ resumed.W.T, reference.W @ reference.W.T,
                               atol=5e-3)
    with pytest.raises(ValueError, match="rank|K"):
        fit_distributed(store, rank=K + 1, resume_from=ckpt)


def test_bad_arguments_name_the_allowed_values(sim, tmp_path):
    import anndata as ad

    store = _store(tmp_path, sim, dense=False)
    with pytest.raises(ValueError, match="allowed.*pln"):
        fit_distributed(store, model="lnm")
    with pytest.raises(ValueError, match="allowed.*memory"):
        fit_distributed(store, modes="disk")
    with pytest.raises(ValueError, match="1 <= rank"):
        fit_distributed(store, rank=G)
    with pytest.raises(ValueError, match="chunk_cells"):
        fit_distributed(store, chunk_cells=0)
    with pytest.raises(FileNotFoundError, match="zarr"):
        fit_distributed(str(tmp_path / "missing.zarr"))
    with pytest.raises(KeyError, match="layers"):
        fit_distributed(store, key="layers/raw")
    # through ss.fit: what the chunked fit does not do is refused before any work
    with pytest.raises(ValueError, match="genes=.*allowed: genes=None"):
        ss.fit(store, genes=10)
    with pytest.raises(ValueError, match="allowed.*'cpu'"):
        ss.fit(store, device="cuda")
    with pytest.raises(ValueError, match="model.*allowed.*nbln"):
        ss.fit(store, model="nbvcp")
    with pytest.raises(TypeError, match="mode.*allowed: modes"):
        ss.fit(store, mode="full")
    with pytest.raises(TypeError, match="write_store"):
        ss.fit(ad.AnnData(sim["counts"].astype(np.float32)), client=object())


def test_worker_killed_mid_fit_recovers(sim, reference, tmp_path):
    store = _store(tmp_path, sim, dense=False)
    cluster, client = _cluster()
    try:
        pids = client.run(os.getpid)
        victim = sorted(pids)[0]
        killed = []

        def kill(theta, value, n_iter):
            if n_iter == 3 and not killed:
                os.kill(pids[victim], signal.SIGKILL)
                killed.append(n_iter)

        with pytest.warns(RuntimeWarning, match="worker.*lost"):
            fit = fit_distributed(store, client=client, rank=K, chunk_cells=CHUNK,
                                  iteration_callback=kill)
    finally:
        client.close()
        cluster.close()
    assert killed == [3]
    assert fit.stats["recoveries"] >= 1 and fit.stats["lost_chunks"] >= 2
    assert fit.success and fit.converged
    assert _rel(fit.objective, reference.objective) < 1e-7
    np.testing.assert_allclose(fit.mu, reference.mu, atol=2e-3)
    assert fit.read("converged").all()


def test_cli_fits_a_store_on_a_scheduler(client, sim, reference, tmp_path, capsys):
    import json

    import zarr

    from scribe_stan import cli, dask_cli

    store = _store(tmp_path, sim, dense=False)
    ckpt = str(tmp_path / "cli.ckpt.npz")
    address = client.scheduler.address  # --scheduler ADDRESS: a running cluster
    assert cli.main(["fit", store, "--scheduler", address, "--rank", str(K),
                     "--chunk-cells", str(CHUNK), "--modes", "float32", "--checkpoint", ckpt,
                     "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["cells_converged"] == N and summary["success"]
    assert summary["executor"] == "dask" and summary["out"] == store
    assert _rel(summary["objective"], reference.objective) < 1e-8
    group = zarr.open_group(store, mode="r", use_consolidated=False)["scribe_stan/pln"]
    np.testing.assert_allclose(group["mu"][:], reference.mu, atol=1e-5)
    assert group.attrs["n_converged"] == N and os.path.exists(ckpt)
    with pytest.raises(ValueError, match="local:N"):
        dask_cli.connect("local:zero")
    for bad, says in ((["--rank", "0"], "rank"), (["--genes", "10"], "--genes do not apply"),
                      (["--model", "lnm"], "allowed.*pln")):
        assert cli.main(["fit", store, "--scheduler", address, "--quiet", *bad]) == 2
        assert says.split(".*")[0] in capsys.readouterr().err
    # the chunked options without --scheduler are refused, naming it
    assert cli.main(["fit", store, "--modes", "zarr", "--out", str(tmp_path / "o.h5ad")]) == 2
    assert "--modes apply to the chunked fit" in capsys.readouterr().err


def test_backed_h5ad_store_in_process(sim, reference, tmp_path):
    import anndata as ad

    path = str(tmp_path / "cells.h5ad")
    ad.AnnData(sparse.csr_matrix(sim["counts"].astype(np.float32))).write_h5ad(path)
    fit = ss.fit(ad.read_h5ad(path, backed="r"), rank=K, chunk_cells=CHUNK, progress=False)
    assert fit.stats["executor"] == "in-process" and fit.summary()["cells"] == N
    assert fit.out == str(tmp_path / "cells.scribe_stan.zarr")
    assert _rel(fit.objective, reference.objective) < 1e-8
    np.testing.assert_allclose(fit.read("eta"), reference.modes.eta, atol=1e-6)


def test_nbln_chunked_matches_fit_laplace(sim, tmp_path):
    # a few outer iterations from the same start: the same path up to summation order
    store = _store(tmp_path, sim, dense=False)
    ref = fit_laplace(sim["counts"], K, model="nbln", max_iter=12)
    fit = fit_distributed(store, model="nbln", rank=K, chunk_cells=CHUNK, max_iter=12)
    assert fit.n_iter == ref.n_iter
    assert _rel(fit.objective, ref.objective) < 1e-8
    np.testing.assert_allclose(fit.log_r, ref.log_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fit.W, ref.W, rtol=1e-6, atol=1e-6)
