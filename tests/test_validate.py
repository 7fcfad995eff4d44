"""Input checks at the boundary: bad input raises clear errors, data stays untouched."""

import copy
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scribe_stan._validate import (
    CountsInput,
    check_choice,
    check_positive,
    check_rank,
    counts_from_anndata,
    counts_from_array,
)

FORMATS = ["dense", "csr", "csc", "coo"]  # plain arrays
AD_FORMATS = ["dense", "csr", "csc"]  # AnnData (0.13) stores no COO


def as_format(X, fmt):
    X = np.asarray(X)
    return {"dense": lambda a: a.copy(), "csr": sp.csr_matrix, "csc": sp.csc_matrix,
            "coo": sp.coo_matrix}[fmt](X)


def good_counts(dtype=np.int32):
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, size=(6, 5)).astype(dtype)
    X[:, 0] += 1  # every cell has a count
    return X


def make_adata(X, fmt, layer=None):
    X = as_format(X, fmt)
    n, g = X.shape
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n)])
    var = pd.DataFrame(index=[f"gene{j}" for j in range(g)])
    if layer is None:
        return ad.AnnData(X=X, obs=obs, var=var)
    a = ad.AnnData(X=np.zeros((n, g), dtype=np.float32), obs=obs, var=var)
    a.layers[layer] = X
    a.uns["note"] = {"k": [1, 2]}
    return a


def to_dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def assert_same_matrix(a, b):
    assert type(a) is type(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    if sp.issparse(a):
        assert a.format == b.format
        if a.format == "coo":
            for attr in ("row", "col", "data"):
                np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
        else:
            for attr in ("data", "indices", "indptr"):
                np.testing.assert_array_equal(getattr(a, attr), getattr(b, attr))
    else:
        np.testing.assert_array_equal(a, b)


def assert_same_adata(a, b):
    if a.X is None:
        assert b.X is None
    else:
        assert_same_matrix(a.X, b.X)
    assert set(a.layers.keys()) == set(b.layers.keys())
    for k in a.layers.keys():
        if k is not None:
            assert_same_matrix(a.layers[k], b.layers[k])
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)
    assert list(a.uns.keys()) == list(b.uns.keys())
    assert repr(dict(a.uns)) == repr(dict(b.uns))
    assert list(a.obsm.keys()) == list(b.obsm.keys())
    assert list(a.varm.keys()) == list(b.varm.keys())


def call_untouched(adata, **kw):
    """Call counts_from_anndata and check the input is unchanged (also on error)."""
    before = copy.deepcopy(adata)
    try:
        return counts_from_anndata(adata, **kw)
    finally:
        assert_same_adata(adata, before)


# ---------------------------------------------------------------------------
# valid input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", AD_FORMATS)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.float32, np.float64])
def test_valid_roundtrip_exact(fmt, dtype):
    X = good_counts(dtype)
    adata = make_adata(X, fmt)
    res = call_untouched(adata)
    assert isinstance(res, CountsInput)
    assert res.counts.dtype == np.int64
    assert res.counts.flags.c_contiguous
    np.testing.assert_array_equal(res.counts, X.astype(np.int64))
    assert list(res.obs_names) == list(adata.obs_names)
    assert list(res.var_names) == list(adata.var_names)
    assert len(res.dropped_genes) == 0
    assert res.gene_mask.dtype == bool and res.gene_mask.all()
    assert res.n_cells == 6 and res.n_genes == 5
    np.testing.assert_array_equal(res.library_size, X.sum(axis=1))


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_layer_is_read(fmt):
    X = good_counts()
    adata = make_adata(X, fmt, layer="counts")
    res = call_untouched(adata, layer="counts")
    np.testing.assert_array_equal(res.counts, X)


def test_result_is_new_array_not_a_view():
    X = good_counts(np.int64)  # already int64 C-contiguous: the easy case to get wrong
    adata = ad.AnnData(X)
    res = counts_from_anndata(adata)
    assert not np.shares_memory(res.counts, adata.X)
    res.counts[:] = -7
    np.testing.assert_array_equal(adata.X, X)
    res2 = counts_from_array(X)
    assert not np.shares_memory(res2.counts, X)


def test_view_and_backed_input(tmp_path):
    X = good_counts()
    full = make_adata(np.vstack([X, X]), "csr")
    before = copy.deepcopy(full)
    view = full[:6]
    res = counts_from_anndata(view)
    np.testing.assert_array_equal(res.counts, X)
    assert_same_adata(full, before)
    for fmt in ("csr", "dense"):
        path = tmp_path / f"x_{fmt}.h5ad"
        make_adata(X, fmt).write_h5ad(path)
        backed = ad.read_h5ad(path, backed="r")
        res = counts_from_anndata(backed)
        np.testing.assert_array_equal(res.counts, X)
        backed.file.close()


def test_coo_duplicates_are_summed():
    # two stored entries at (0, 0): -1 + 3 = 2 is a valid count
    M = sp.coo_matrix((np.array([-1, 3, 1, 1]), (np.array([0, 0, 1, 1]),
                                                  np.array([0, 0, 0, 1]))), shape=(2, 2))
    res = counts_from_array(M)
    np.testing.assert_array_equal(res.counts, [[2, 0], [1, 1]])


# ---------------------------------------------------------------------------
# all-zero genes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_all_zero_genes_dropped_with_warning(fmt):
    X = good_counts()
    X[:, [1, 3]] = 0
    adata = make_adata(X, fmt)
    with pytest.warns(UserWarning, match=r"Dropping 2 all-zero genes of 5") as rec:
        res = call_untouched(adata)
    msg = str(rec[0].message)
    assert "'gene1'" in msg and "'gene3'" in msg
    assert list(res.dropped_genes) == ["gene1", "gene3"]
    np.testing.assert_array_equal(res.gene_mask, [True, False, True, False, True])
    assert list(res.var_names) == ["gene0", "gene2", "gene4"]
    np.testing.assert_array_equal(res.counts, X[:, [0, 2, 4]])
    assert res.counts.flags.c_contiguous


def test_warning_lists_only_first_few_genes():
    X = np.zeros((3, 20), dtype=int)
    X[:, :2] = 1
    with pytest.warns(UserWarning, match=r"Dropping 18 all-zero genes of 20") as rec:
        counts_from_array(X)
    assert "..." in str(rec[0].message)


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_too_few_genes_after_dropping(fmt):
    X = np.zeros((3, 4), dtype=int)
    X[:, 2] = 5
    adata = make_adata(X, fmt)
    with pytest.warns(UserWarning, match="Dropping 3"):
        with pytest.raises(ValueError, match=r"only 1 gene with nonzero counts.*at least 2"):
            call_untouched(adata)


# ---------------------------------------------------------------------------
# bad counts
# ---------------------------------------------------------------------------


BAD_VALUES = [
    # (value, how many, expected text)
    (np.nan, 2, r"2 NaN entries"),
    (np.inf, 1, r"1 infinite entry"),
    (-np.inf, 2, r"2 infinite entries"),
    (-3.0, 2, r"2 negative entries"),
    (1.5, 3, r"3 non-integer \(fractional\) entries"),
    (1e30, 1, r"1 too large for int64 entry"),
]


@pytest.mark.parametrize("fmt", AD_FORMATS)
@pytest.mark.parametrize("value,count,text", BAD_VALUES)
def test_bad_values_raise(fmt, value, count, text):
    X = good_counts(np.float64)
    cells = [(1, 2), (3, 4), (5, 1)][:count]
    for c, g in cells:
        X[c, g] = value
    adata = make_adata(X, fmt)
    with pytest.raises(ValueError, match=text) as exc:
        call_untouched(adata)
    msg = str(exc.value)
    assert "adata.X" in msg and "finite, non-negative integer counts" in msg
    assert "first at cell 'cell1', gene 'gene2'" in msg


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_negative_integers_raise(fmt):
    X = good_counts(np.int32)
    X[0, 1] = -1
    with pytest.raises(ValueError, match=r"1 negative entry \(first at cell 'cell0', gene 'gene1': -1\)"):
        call_untouched(make_adata(X, fmt))


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_several_problems_reported_together(fmt):
    X = good_counts(np.float64)
    X[0, 0] = np.nan
    X[1, 1] = -2.0
    X[2, 2] = 0.25
    with pytest.raises(ValueError) as exc:
        call_untouched(make_adata(X, fmt))
    msg = str(exc.value)
    for text in ("1 NaN entry", "1 negative entry", "1 non-integer (fractional) entry"):
        assert text in msg


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_bad_values_in_layer_name_the_layer(fmt):
    X = good_counts(np.float64)
    X[2, 3] = np.nan
    adata = make_adata(X, fmt, layer="raw")
    with pytest.raises(ValueError, match=r"adata\.layers\['raw'\].*1 NaN entry"):
        call_untouched(adata, layer="raw")


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_zero_library_cells_raise(fmt):
    X = good_counts()
    X[[1, 4]] = 0
    with pytest.raises(ValueError) as exc:
        call_untouched(make_adata(X, fmt))
    msg = str(exc.value)
    assert "2 cells with zero library size" in msg
    assert "'cell1', 'cell4'" in msg
    assert "filter" in msg


@pytest.mark.parametrize("fmt", AD_FORMATS)
def test_empty_matrix_raises(fmt):
    for shape in [(0, 5), (5, 0)]:
        X = np.zeros(shape, dtype=np.int32)
        with pytest.raises(ValueError, match=re.escape(f"adata.X is empty (shape {shape})")):
            call_untouched(make_adata(X, fmt))


@pytest.mark.parametrize("dtype", [bool, np.complex128])
def test_non_numeric_dtype_raises(dtype):
    X = good_counts().astype(dtype)
    with pytest.raises(ValueError, match=rf"dtype {np.dtype(dtype)}.*allowed: integer"):
        counts_from_array(X)


def test_not_anndata_raises_typeerror():
    with pytest.raises(TypeError, match=r"adata must be an anndata.AnnData; got ndarray"):
        counts_from_anndata(good_counts())


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_unknown_layer_lists_available(fmt):
    adata = make_adata(good_counts(), fmt, layer="counts")
    adata.layers["spliced"] = adata.layers["counts"].copy()
    with pytest.raises(ValueError) as exc:
        call_untouched(adata, layer="raw")
    msg = str(exc.value)
    assert "Unknown layer 'raw'" in msg
    assert "'counts'" in msg and "'spliced'" in msg


def test_unknown_layer_without_layers():
    adata = make_adata(good_counts(), "dense")
    with pytest.raises(ValueError, match=r"Unknown layer 'raw'; available layers: none"):
        call_untouched(adata, layer="raw")


def test_x_none_points_to_layers():
    X = good_counts()
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(6)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(5)]))
    adata.layers["counts"] = X
    with pytest.raises(ValueError, match=r"adata.X is None.*'counts'"):
        call_untouched(adata)
    np.testing.assert_array_equal(call_untouched(adata, layer="counts").counts, X)


# ---------------------------------------------------------------------------
# counts_from_array
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_from_array_roundtrip_and_untouched(fmt):
    X = good_counts()
    M = as_format(X, fmt)
    before = copy.deepcopy(M)
    res = counts_from_array(M, obs_names=list("abcdef"), var_names=list("vwxyz"))
    assert_same_matrix(M, before)
    np.testing.assert_array_equal(res.counts, X)
    assert list(res.obs_names) == list("abcdef")
    assert list(res.var_names) == list("vwxyz")
    res = counts_from_array(M)
    assert list(res.obs_names) == [str(i) for i in range(6)]
    assert list(res.var_names) == [str(j) for j in range(5)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_from_array_bad_values_untouched(fmt):
    X = good_counts(np.float64)
    X[0, 0] = np.nan
    M = as_format(X, fmt)
    before = copy.deepcopy(M)
    with pytest.raises(ValueError, match=r"counts must hold .*1 NaN entry \(first at cell '0', gene '0'"):
        counts_from_array(M)
    assert_same_matrix(M, before)
    np.testing.assert_array_equal(to_dense(M), to_dense(before))


def test_counts_from_array_shape_errors():
    with pytest.raises(ValueError, match=r"counts must be 2-D .*got shape \(5,\)"):
        counts_from_array(np.ones(5, dtype=int))
    with pytest.raises(ValueError, match=r"obs_names has length 2 but counts has 6 rows"):
        counts_from_array(good_counts(), obs_names=["a", "b"])
    with pytest.raises(ValueError, match=r"var_names has length 3 but counts has 5 columns"):
        counts_from_array(good_counts(), var_names=["a", "b", "c"])


def test_counts_from_array_accepts_lists():
    res = counts_from_array([[1, 2], [3, 0]])
    np.testing.assert_array_equal(res.counts, [[1, 2], [3, 0]])


# ---------------------------------------------------------------------------
# scalar checks
# ---------------------------------------------------------------------------


def test_check_choice():
    assert check_choice("model", "pln", ["pln", "nbln"]) == "pln"
    with pytest.raises(ValueError, match=r"Unknown model 'foo'; allowed: 'pln', 'nbln'"):
        check_choice("model", "foo", ["pln", "nbln"])
    with pytest.raises(ValueError, match=r"Unknown backend 'PYSTAN'; allowed: 'auto'"):
        check_choice("backend", "PYSTAN", ("auto", "cmdstanpy", "pystan"))
    with pytest.raises(ValueError, match=r"Unknown device \['cpu'\]"):
        check_choice("device", ["cpu"], {"cpu", "cuda"})


def test_check_rank():
    assert check_rank(1, 2) == 1
    assert check_rank(np.int64(10), 2000) == 10
    for K, G in [(0, 10), (-1, 10), (10, 10), (11, 10)]:
        with pytest.raises(ValueError, match=rf"rank K={K} is out of range for G={G} genes; allowed: 1 <= K < G"):
            check_rank(K, G)
    for K in (2.0, True, "3", None):
        with pytest.raises(TypeError, match=r"rank K must be an integer"):
            check_rank(K, 10)
    with pytest.raises(TypeError, match=r"number of genes G must be an integer"):
        check_rank(2, 10.0)


def test_check_positive():
    assert check_positive("sigma_M", 1) == 1.0
    assert check_positive("M0", np.float32(5000.0)) == 5000.0
    for bad in (0, -1.0, np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match=r"sigma_M must be a positive finite number; got"):
            check_positive("sigma_M", bad)
    for bad in ("1", None, True, [1.0]):
        with pytest.raises(TypeError, match=r"M0 must be a positive finite number"):
            check_positive("M0", bad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_from_array_bad_input_per_format(fmt):
    """The checks run through counts_from_array for every format, COO included."""
    X = good_counts(np.float64)
    X[0, 1] = -1.0
    X[2, 3] = 0.5
    with pytest.raises(ValueError, match=r"1 negative entry.*1 non-integer"):
        counts_from_array(as_format(X, fmt))
    Z = good_counts()
    Z[3] = 0
    with pytest.raises(ValueError, match=r"1 cell with zero library size.*'3'"):
        counts_from_array(as_format(Z, fmt))
    Z = good_counts()
    Z[:, 4] = 0
    with pytest.warns(UserWarning, match=r"Dropping 1 all-zero gene of 5 from counts.*'4'"):
        res = counts_from_array(as_format(Z, fmt))
    np.testing.assert_array_equal(res.counts, Z[:, :4])
    with pytest.raises(ValueError, match=r"counts is empty"):
        counts_from_array(as_format(np.zeros((0, 3), dtype=int), fmt))


def test_sparse_array_types_accepted():
    X = good_counts()
    for cls in (sp.csr_array, sp.csc_array, sp.coo_array):
        np.testing.assert_array_equal(counts_from_array(cls(X)).counts, X)
    adata = ad.AnnData(sp.csr_array(X))
    np.testing.assert_array_equal(call_untouched(adata).counts, X)
