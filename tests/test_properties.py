"""Property-based tests (hypothesis) of the input boundary, for every model.

Random count matrices (1 to 5 cells, 1 to 6 genes, integer and float dtypes, dense and
sparse, duplicated names, zero rows and columns, NaN/inf/negative/fractional entries,
counts up to 1e9) go through :func:`scribe_stan.fit` and the results through
``to_anndata`` / ``to_datatree``. Each call either raises a ``ValueError`` /
``TypeError`` from our boundary (not from numpy or a solver), whose message names one
of the problems the test planted, or returns a finite, converged result; the caller's
AnnData is never changed. The example budget is the ``ci`` profile of
``tests/conftest.py``; ``HYPOTHESIS_PROFILE=dev`` runs more.
"""

import traceback
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, note
from hypothesis import strategies as st

import scribe_stan as ss
from scribe_stan import _validate
from scribe_stan.models import MODELS

PACKAGE = Path(ss.__file__).parent
# Where a bad-input error may come from: the checks at the boundary of the public API.
BOUNDARY = {PACKAGE / name for name in ("_validate.py", "api.py", "fit_data.py", "specs/lnm.py",
                                        "specs/registry.py", "models/lnm.py")}
DTYPES = {"int32": 2**31 - 1, "int64": 2**63 - 1, "uint16": 2**16 - 1, "float32": 2**24,
          "float64": 2**53}  # largest count each holds exactly
DEFECTS = {"negative": "negative", "nan": "NaN", "inf": "infinite",
           "fraction": "non-integer"}


def snapshot(adata):
    X = adata.X
    return (X.copy(), X.dtype, type(X), list(adata.obs_names), list(adata.var_names),
            adata.obs.copy(), adata.var.copy(), dict(adata.obsm), dict(adata.uns))


def assert_unchanged(adata, snap):
    X, dtype, kind, obs, var, obs_df, var_df, obsm, uns = snap
    assert type(adata.X) is kind and adata.X.dtype == dtype
    a = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    b = X.toarray() if sp.issparse(X) else X
    np.testing.assert_array_equal(a, b)  # NaN == NaN here
    assert list(adata.obs_names) == obs and list(adata.var_names) == var
    pd.testing.assert_frame_equal(adata.obs, obs_df)
    pd.testing.assert_frame_equal(adata.var, var_df)
    assert dict(adata.obsm) == obsm and dict(adata.uns) == uns


def assert_from_boundary(exc):
    """The error was raised by our checks, not deep inside numpy or a solver."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    assert Path(frame.filename) in BOUNDARY, (
        f"{type(exc).__name__} from {frame.filename}:{frame.lineno}: {exc}")
    assert "\n" not in str(exc) and len(str(exc)) > 20


def _names(draw, prefix, n):
    names = [f"{prefix}{i}" for i in range(n)]
    if n >= 2 and draw(st.booleans()):
        i, j = draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        names[j] = names[i]
    return names


@st.composite
def count_data(draw):
    """(AnnData, problems): a random count matrix and the problems planted in it.

    ``problems`` maps a planted problem to the words its error message must contain.
    """
    n, g = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    values = np.array(draw(st.lists(st.integers(0, 6), min_size=n * g, max_size=n * g)),
                      dtype=np.float64).reshape(n, g)
    big = draw(st.sampled_from([0, 10**3, 10**6, 10**9]))
    if big:  # one extreme count
        values[draw(st.integers(0, n - 1)), draw(st.integers(0, g - 1))] = big
    dtype = draw(st.sampled_from([d for d, top in DTYPES.items() if top >= values.max()]))
    problems = {}
    defects = [d for d in DEFECTS if dtype.startswith("float") or d == "negative"]
    if not dtype.startswith("uint") and draw(st.integers(0, 3)) == 0:
        defect = draw(st.sampled_from(defects))
        values[draw(st.integers(0, n - 1)), draw(st.integers(0, g - 1))] = {
            "negative": -1.0, "nan": np.nan, "inf": np.inf, "fraction": 2.5}[defect]
        problems[defect] = DEFECTS[defect]
    obs, var = _names(draw, "cell", n), _names(draw, "gene", g)
    if len(set(obs)) < n:
        problems["dup_obs"] = "obs_names (cell names) must be unique"
    if len(set(var)) < g:
        problems["dup_var"] = "var_names (gene names) must be unique"
    if not problems:  # what the clean values imply
        if (values.sum(axis=1) == 0).any():
            problems["zero_cell"] = "zero library size"
        elif (values.sum(axis=0) > 0).sum() < 2:
            problems["genes"] = "at least 2 genes"
    X = values.astype(dtype)
    fmt = draw(st.sampled_from(["dense", "csr", "csc"]))
    X = {"dense": lambda a: a, "csr": sp.csr_matrix, "csc": sp.csc_matrix}[fmt](X)
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=obs), var=pd.DataFrame(index=var))
    return adata, problems


def note_data(adata):
    """Show the matrix and names in hypothesis' report of a failing example."""
    X = adata.X.toarray() if sp.issparse(adata.X) else adata.X
    note(f"X ({type(adata.X).__name__}, {X.dtype}) = {X.tolist()}; "
         f"obs = {list(adata.obs_names)}; var = {list(adata.var_names)}")


def fit_quietly(adata, model, rank=1, **kw):
    rank = None if model == "nbvcp" else rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-zero genes dropped, unconverged cells
        return ss.fit(adata, model=model, rank=rank, progress=False, **kw)


@given(data=count_data())
def test_count_validation_names_the_planted_problem(data):
    adata, problems = data
    note_data(adata)
    snap = snapshot(adata)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = _validate.counts_from_anndata(adata)
    except ValueError as exc:
        assert problems, f"valid data refused: {exc}"
        assert any(words in str(exc) for words in problems.values()), (problems, str(exc))
        assert_from_boundary(exc)
    else:
        assert not problems, f"{problems} not caught"
        assert ci.counts.dtype == np.int64 and ci.counts.shape[1] >= 2
        assert (ci.library_size > 0).all()
        dense = adata.X.toarray() if sp.issparse(adata.X) else adata.X
        np.testing.assert_array_equal(ci.counts, dense[:, ci.gene_mask])
        assert not np.shares_memory(ci.counts, dense)
    assert_unchanged(adata, snap)


@pytest.mark.parametrize("model", list(MODELS))
@given(data=count_data(), rank=st.integers(1, 3))
def test_fit_refuses_at_the_boundary_or_converges(model, data, rank):
    adata, problems = data
    note_data(adata)
    if not problems and model != "nbvcp":  # the rank against the data
        dense = adata.X.toarray() if sp.issparse(adata.X) else adata.X
        kept = int((dense.sum(axis=0) > 0).sum())
        if model in ("pln", "nbln") and rank >= kept:
            problems["rank"] = "is out of range"
        if model in ("lnm", "lnmvcp"):
            if kept < 3:
                problems["lnm_genes"] = "at least 3 genes"
            elif rank >= kept - 1:
                problems["rank"] = "is out of range"
            elif rank > adata.n_obs:
                problems["rank_cells"] = "exceeds the number of cells"
    snap = snapshot(adata)
    try:
        fit = fit_quietly(adata, model, rank=rank, max_iter=200)
    except (ValueError, TypeError) as exc:
        assert problems, f"valid data refused: {exc}"
        assert any(words in str(exc) for words in problems.values()), (problems, str(exc))
        assert_from_boundary(exc)
        assert_unchanged(adata, snap)
        return
    assert not problems, f"{problems} not caught"
    assert np.isfinite(fit.objective)
    assert fit.converged.all()
    out = fit.to_anndata(adata)
    assert out is not adata and out.n_obs == adata.n_obs
    assert out.obs[f"{model}_converged"].all()
    tree = fit.to_datatree(draws=3)
    assert np.isfinite(tree["log_likelihood"]["counts"].values).all()
    # lp is exact: -inf only for a draw of eta outside its support eta >= 0 (pln/nbln
    # draw eta from an untruncated Gaussian, which a mode on the bound puts half below)
    lp = tree["sample_stats"]["lp"].values[0]
    post = tree["posterior"]
    inside = ((post["eta"].values[0] >= 0).all(axis=-1) if "eta" in post
              else np.ones(lp.shape, bool))
    assert np.isfinite(lp[inside]).all() and not np.isnan(lp).any()
    assert list(tree["posterior"]["cell"].values) == list(adata.obs_names)
    assert_unchanged(adata, snap)


# ------------------------------------------------------------------ arguments and targets


@pytest.fixture(scope="module")
def fitted():
    """One small fit per model on the same valid data."""
    rng = np.random.default_rng(3)
    X = rng.poisson(4.0, size=(8, 5)) + (np.arange(5) == 0)
    adata = ad.AnnData(X=X.astype(np.float64),
                       obs=pd.DataFrame(index=[f"c{i}" for i in range(8)]),
                       var=pd.DataFrame(index=[f"g{j}" for j in range(5)]))
    return adata, {m: fit_quietly(adata, m, genes=4) for m in MODELS}


BAD_GENES = st.one_of(
    st.floats(allow_nan=True), st.booleans(), st.text(max_size=4),
    st.integers(-3, 1), st.integers(6, 50),
    st.just([]), st.lists(st.sampled_from(["g0", "g1", "g2"]), min_size=2, max_size=4)
    .filter(lambda names: len(set(names)) < len(names)),
    st.lists(st.text(min_size=1, max_size=3).filter(lambda t: t not in
                                                     {"g0", "g1", "g2", "g3", "g4"}),
             min_size=2, max_size=3, unique=True),
)


@pytest.mark.parametrize("model", list(MODELS))
@given(genes=BAD_GENES)
def test_bad_genes_argument_is_refused_before_fitting(fitted, model, genes):
    adata, _ = fitted
    snap = snapshot(adata)
    with pytest.raises((TypeError, ValueError)) as info:
        fit_quietly(adata, model, genes=genes)
    assert "genes" in str(info.value)
    assert_from_boundary(info.value)
    assert_unchanged(adata, snap)


@pytest.mark.parametrize("model", list(MODELS))
@given(draws=st.one_of(st.integers(-5, 0), st.floats(), st.booleans(), st.text(max_size=2)))
def test_bad_tree_draws_are_refused(fitted, model, draws):
    _, fits = fitted
    with pytest.raises((TypeError, ValueError), match="draws"):
        fits[model].to_datatree(draws=draws)


@st.composite
def other_anndata(draw, adata):
    """A reshuffled, subset or renamed copy of ``adata``, and whether it still holds
    the fitted cells in order and every fitted gene."""
    cells = list(range(adata.n_obs))
    genes = list(range(adata.n_vars))
    if draw(st.booleans()):
        cells = draw(st.permutations(cells))
    if draw(st.booleans()):
        cells = cells[: draw(st.integers(1, adata.n_obs))]
    if draw(st.booleans()):
        genes = draw(st.permutations(genes))
    if draw(st.booleans()):
        genes = draw(st.lists(st.sampled_from(genes), min_size=1, max_size=len(genes),
                              unique=True))
    other = adata[cells, genes].copy()
    if draw(st.booleans()):
        other.var_names = [f"x{j}" if j % 2 else name
                           for j, name in enumerate(other.var_names)]
    return other


@pytest.mark.parametrize("model", list(MODELS))
@given(data=st.data())
def test_to_anndata_needs_the_fitted_cells_and_genes(fitted, model, data):
    adata, fits = fitted
    fit = fits[model]
    other = data.draw(other_anndata(adata))
    same_cells = list(other.obs_names) == list(fit.obs_names)
    has_genes = set(fit.var_names) <= set(other.var_names)
    snap = snapshot(other)
    if not (same_cells and has_genes):
        with pytest.raises(ValueError, match="other cells|lacks"):
            fit.to_anndata(other)
        assert_unchanged(other, snap)
        return
    out = fit.to_anndata(other)
    assert_unchanged(other, snap)
    # each fitted gene's value lands in its own row, whatever the order of var_names
    if model == "nbvcp":
        key, values = "nbvcp_m", fit.m
    elif model in ("lnm", "lnmvcp"):
        key, values = f"{model}_mu_clr", fit.mu_clr
    else:
        key, values = f"{model}_mu", fit.mu
    np.testing.assert_array_equal(out.var.loc[list(fit.var_names), key].to_numpy(), values)
    assert out.var[key].drop(index=list(fit.var_names)).isna().all()
