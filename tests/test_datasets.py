"""The real dataset shipped inside the package."""

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from scribe_stan import datasets

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "scribe_stan" / "data" / "pbmc_donor_a.h5ad"
SHARED = ROOT.parent / "shared" / "data" / "pbmc_donor_a.h5ad"


@pytest.fixture(scope="module")
def adata():
    return datasets.pbmc_donor_a()


def test_shape_and_counts(adata):
    assert adata.shape == (2896, 2000)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.int32
    assert adata.X.data.min() >= 0
    lib = np.asarray(adata.X.sum(axis=1)).ravel()
    assert lib.min() > 0
    assert np.all(np.asarray(adata.X.sum(axis=0)).ravel() > 0)
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert adata.obs_names[0].startswith("frozen_pbmc_donor_a_")


def test_fresh_object_each_call(adata):
    other = datasets.pbmc_donor_a()
    assert other is not adata
    assert other.X is not adata.X
    other.X.data[:] = 0
    assert adata.X.data.max() > 0


def test_provenance(adata):
    src = adata.uns["source"]
    for text in ("Zheng et al. 2017", "14049", "MUDAN", "pbmcA.rda", "GPL-3", "2000 genes",
                 "highest mean"):
        assert text in src
    doc = datasets.pbmc_donor_a.__doc__
    for text in ("Zheng", "Nature Communications 8:14049", "10.1038/ncomms14049",
                 "GemCode (v1)", "JEFworks/MUDAN", "pbmcA.rda", "GPL-3",
                 "2000 genes with the highest", "all 2896 cells"):
        assert text in doc


def test_shipped_file_size():
    assert SHIPPED.is_file()
    assert SHIPPED.stat().st_size <= 5 * 1024 * 1024


def test_genes_are_top_mean_genes_of_shared_file(adata):
    if not SHARED.is_file():
        pytest.skip(f"{SHARED} not present")
    import anndata as ad

    full = ad.read_h5ad(SHARED)
    assert list(full.obs_names) == list(adata.obs_names)
    # exact integer totals (mean = total / n_cells) avoid float round-off at ties
    mean = np.asarray(full.X.sum(axis=0, dtype=np.int64)).ravel()
    kept = full.var_names.get_indexer(adata.var_names)
    assert np.all(kept >= 0)
    assert np.all(np.diff(kept) > 0)  # original order
    dropped = np.setdiff1d(np.arange(full.n_vars), kept)
    assert mean[kept].min() >= mean[dropped].max()
    # same rule as validation/make_pbmc_subset.py (stable ties), and counts unchanged
    order = np.argsort(-mean, kind="stable")
    np.testing.assert_array_equal(np.sort(order[:2000]), kept)
    assert (full.X[:, kept] != adata.X).nnz == 0
