"""Input checks at the boundary of the public API.

The numerical kernels assume valid input; every public entry point passes user data
through these functions first. Error messages name the argument, the offending value
and the allowed values. The caller's data is never modified: counts are always copied
into a new array.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "CountsInput",
    "counts_from_anndata",
    "counts_from_array",
    "check_choice",
    "check_rank",
    "check_positive",
    "check_positive_int",
    "check_unique_names",
]

_N_SHOWN = 5  # how many names to list in messages
_INT64_LIMIT = 2.0**63  # first float that does not fit into int64


@dataclass(frozen=True, eq=False)
class CountsInput:
    """Validated count matrix with its cell and gene names.

    Attributes
    ----------
    counts : numpy.ndarray of int64, shape (N, G)
        Dense, C-contiguous UMI counts (cells in rows), a new array never sharing memory
        with the caller's data. All-zero genes have been removed, and every cell has a
        positive library size.
    obs_names : pandas.Index
        Cell names, length N.
    var_names : pandas.Index
        Names of the kept genes, length G.
    dropped_genes : pandas.Index
        Names of the input genes dropped because they have zero counts in every cell.
    gene_mask : numpy.ndarray of bool
        Over the input genes: True where the gene was kept. ``var_names`` equals the
        input gene names selected by this mask.
    """

    counts: np.ndarray
    obs_names: pd.Index
    var_names: pd.Index
    dropped_genes: pd.Index
    gene_mask: np.ndarray

    @property
    def n_cells(self) -> int:
        """Number of cells N."""
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        """Number of kept genes G."""
        return int(self.counts.shape[1])

    @property
    def library_size(self) -> np.ndarray:
        """Library size L_c = sum_g u[c, g] per cell, int64 of shape (N,)."""
        return self.counts.sum(axis=1)


# ---------------------------------------------------------------------------
# scalar arguments
# ---------------------------------------------------------------------------


def _fmt_allowed(allowed: Iterable) -> str:
    return ", ".join(repr(a) for a in allowed)


def check_choice(name: str, value, allowed: Sequence):
    """Check that ``value`` is one of ``allowed``.

    Parameters
    ----------
    name : str
        Argument name used in the message (e.g. ``"model"``, ``"backend"``).
    value : object
        Value given by the user.
    allowed : sequence
        Allowed values (compared with ``==``, case-sensitive for strings).

    Returns
    -------
    object
        ``value`` unchanged.

    Raises
    ------
    ValueError
        ``"Unknown {name} {value!r}; allowed: ..."`` when ``value`` is not allowed.
    """
    allowed = list(allowed)
    try:
        ok = value in allowed
    except TypeError:  # e.g. unhashable against a set-like container
        ok = False
    if not ok:
        raise ValueError(f"Unknown {name} {value!r}; allowed: {_fmt_allowed(allowed)}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_rank(K, G) -> int:
    """Check a latent rank against the number of genes.

    Parameters
    ----------
    K : int
        Latent rank (number of factors).
    G : int
        Number of genes (after dropping all-zero genes).

    Returns
    -------
    int
        ``K`` as a Python int.

    Raises
    ------
    TypeError
        If ``K`` or ``G`` is not an integer (bools and floats are rejected).
    ValueError
        Unless ``1 <= K < G``; the message names both ``K`` and ``G``.
    """
    if not _is_int(K):
        raise TypeError(f"rank K must be an integer; got {K!r} of type {type(K).__name__}")
    if not _is_int(G):
        raise TypeError(
            f"number of genes G must be an integer; got {G!r} of type {type(G).__name__}"
        )
    K, G = int(K), int(G)
    if not 1 <= K < G:
        raise ValueError(
            f"rank K={K} is out of range for G={G} genes; allowed: 1 <= K < G "
            f"(K from 1 to {G - 1})"
        )
    return K


def check_positive(name: str, value) -> float:
    """Check a strictly positive, finite real scalar (e.g. ``sigma_M``, ``M0``).

    Parameters
    ----------
    name : str
        Argument name used in the message.
    value : real number
        Value given by the user (Python or NumPy int/float; bools are rejected).

    Returns
    -------
    float
        ``value`` as a Python float.

    Raises
    ------
    TypeError
        If ``value`` is not a real number.
    ValueError
        If ``value`` is NaN, infinite, zero or negative.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a positive finite number; got {value!r} "
            f"of type {type(value).__name__}"
        )
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(
            f"{name} must be a positive finite number; got {value!r}; "
            "allowed: 0 < value < inf"
        )
    return v


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    """Check an integer argument with a lower bound (e.g. ``draws``, ``max_iter``).

    Parameters
    ----------
    name : str
        Argument name used in the message.
    value : int
        Value given by the user (Python or NumPy integer; bools and floats are rejected).
    minimum : int
        Smallest allowed value.

    Returns
    -------
    int
        ``value`` as a Python int.

    Raises
    ------
    TypeError
        If ``value`` is not an integer.
    ValueError
        If ``value < minimum``.
    """
    if not _is_int(value):
        raise TypeError(
            f"{name} must be an integer >= {minimum}; got {value!r} of type "
            f"{type(value).__name__}"
        )
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value}")
    return int(value)


def check_unique_names(names, what: str) -> pd.Index:
    """Check that cell or gene names are unique.

    Results are matched to cells and genes by name (``obs_names``, ``var_names``), so a
    name used twice would make every lookup ambiguous.

    Parameters
    ----------
    names : sequence
        The names, e.g. ``adata.var_names``.
    what : str
        What they name, used in the message (e.g. ``"adata.var_names"``).

    Returns
    -------
    pandas.Index
        ``names`` as an Index.

    Raises
    ------
    ValueError
        Naming how many names are duplicated and the first few of them, with the
        anndata call that makes them unique.
    """
    index = pd.Index(names)
    if not index.is_unique:
        dup = index[index.duplicated()].unique()
        fix = "var_names_make_unique" if "var" in what else "obs_names_make_unique"
        raise ValueError(
            f"{what} must be unique; duplicated {_plural(len(dup), 'name')}: "
            f"{_first(dup)}; make them unique first, e.g. adata.{fix}()"
        )
    return index


# ---------------------------------------------------------------------------
# count matrices
# ---------------------------------------------------------------------------


def _first(names: pd.Index, n: int = _N_SHOWN) -> str:
    shown = ", ".join(repr(str(x)) for x in names[:n])
    return shown + (", ..." if len(names) > n else "")


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _materialize(X, where: str):
    """Return an in-memory ndarray or scipy sparse matrix for X (no copy guaranteed)."""
    if X is None:
        raise ValueError(f"{where} is None; no count matrix to read")
    if isinstance(X, np.ndarray) or sp.issparse(X):
        return X
    # anndata backed sparse datasets (CSRDataset/CSCDataset) and similar lazy containers
    if hasattr(X, "to_memory"):
        return _materialize(X.to_memory(), where)
    if hasattr(X, "compute"):  # dask
        return _materialize(X.compute(), where)
    try:  # h5py.Dataset (backed dense) and other array-likes
        import h5py

        if isinstance(X, h5py.Dataset):
            return X[()]
    except ImportError:  # pragma: no cover - h5py is a dependency of anndata
        pass
    try:
        arr = np.asarray(X)
    except Exception as exc:  # pragma: no cover - defensive
        raise TypeError(
            f"{where} has unsupported type {type(X).__name__}; allowed: numpy array, "
            "scipy sparse matrix (CSR/CSC/COO) or an anndata backed matrix"
        ) from exc
    if arr.dtype == object:
        raise TypeError(
            f"{where} has unsupported type {type(X).__name__}; allowed: numpy array, "
            "scipy sparse matrix (CSR/CSC/COO) or an anndata backed matrix"
        )
    return arr


def _value_problems(values: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Masks of invalid entries, with labels, for a numeric array."""
    kind = values.dtype.kind
    if kind == "u":
        if values.dtype.itemsize >= 8:
            return [("too large for int64", values > np.iinfo(np.int64).max)]
        return []
    if kind == "i":
        return [("negative", values < 0)]
    # float
    nan = np.isnan(values)
    inf = np.isinf(values)
    finite = ~(nan | inf)
    with np.errstate(invalid="ignore"):
        neg = finite & (values < 0)
        frac = finite & (values != np.trunc(values))
        big = finite & (values >= _INT64_LIMIT)
    return [
        ("NaN", nan),
        ("infinite", inf),
        ("negative", neg),
        ("non-integer (fractional)", frac),
        ("too large for int64", big),
    ]


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in "iuf":
        raise ValueError(
            f"{where} has dtype {dtype}, which cannot hold counts; allowed: integer "
            "dtypes, or float dtypes holding whole numbers"
        )


def _check_values(X, where: str, obs_names: pd.Index, var_names: pd.Index) -> None:
    """Raise ValueError listing NaN, infinite, negative and non-integer entries."""
    if sp.issparse(X):
        values = X.data
        indptr, indices = X.indptr, X.indices

        def locate(k: int) -> tuple[int, int]:
            return int(np.searchsorted(indptr, k, side="right") - 1), int(indices[k])

        flat = values
    else:
        flat = X.reshape(-1)

        def locate(k: int) -> tuple[int, int]:
            return divmod(int(k), X.shape[1])

    found = []
    for label, mask in _value_problems(flat):
        n = int(np.count_nonzero(mask))
        if n == 0:
            continue
        k = int(np.flatnonzero(mask)[0])
        r, c = locate(k)
        found.append(
            f"{_plural(n, label + ' entry', label + ' entries')} (first at cell "
            f"{str(obs_names[r])!r}, gene {str(var_names[c])!r}: {flat[k].item()!r})"
        )
    if found:
        raise ValueError(
            f"{where} must hold finite, non-negative integer counts; found "
            + "; ".join(found)
        )


def _validate_matrix(
    X, where: str, obs_names: pd.Index, var_names: pd.Index, drop_zero_genes: bool = True
) -> CountsInput:
    """Shared checks for counts_from_anndata and counts_from_array."""
    if X.ndim != 2:
        raise ValueError(
            f"{where} must be 2-D (cells x genes); got shape {tuple(X.shape)}"
        )
    N, G = X.shape
    obs_names = check_unique_names(obs_names, "obs_names (cell names)")
    var_names = check_unique_names(var_names, "var_names (gene names)")
    if len(obs_names) != N:
        raise ValueError(
            f"obs_names has length {len(obs_names)} but {where} has {N} rows (cells); "
            "they must match"
        )
    if len(var_names) != G:
        raise ValueError(
            f"var_names has length {len(var_names)} but {where} has {G} columns "
            "(genes); they must match"
        )
    if N == 0 or G == 0:
        raise ValueError(
            f"{where} is empty (shape {(N, G)}); need at least 1 cell and 2 genes"
        )
    _check_dtype(X.dtype, where)

    if sp.issparse(X):
        # canonical CSR copy: duplicates summed, caller's object untouched
        Xc = sp.csr_matrix(X, copy=True)
        Xc.sum_duplicates()
        _check_values(Xc, where, obs_names, var_names)
        counts = np.ascontiguousarray(Xc.toarray().astype(np.int64, copy=False))
    else:
        _check_values(X, where, obs_names, var_names)
        counts = np.array(X, dtype=np.int64, order="C", copy=True)

    lib = counts.sum(axis=1)
    zero_cells = obs_names[lib == 0]
    if len(zero_cells):
        raise ValueError(
            f"{where} has {_plural(len(zero_cells), 'cell')} with zero library size "
            f"(no counts in any gene): {_first(zero_cells)}; filter them before "
            "fitting, e.g. adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0]"
        )

    gene_mask = (counts.sum(axis=0) > 0) if drop_zero_genes else np.ones(G, bool)
    dropped = var_names[~gene_mask]
    if len(dropped):
        warnings.warn(
            f"Dropping {_plural(len(dropped), 'all-zero gene')} of {G} from {where} "
            f"(zero counts in every cell): {_first(dropped)}",
            UserWarning,
            stacklevel=3,
        )
        counts = np.ascontiguousarray(counts[:, gene_mask])
    n_kept = int(gene_mask.sum())
    if n_kept < 2:
        raise ValueError(
            f"{where} has only {_plural(n_kept, 'gene')} with nonzero counts after "
            f"dropping {_plural(len(dropped), 'all-zero gene')}; at least 2 genes "
            "are needed"
        )
    return CountsInput(
        counts=counts,
        obs_names=obs_names.copy(),
        var_names=var_names[gene_mask].copy(),
        dropped_genes=dropped.copy(),
        gene_mask=gene_mask,
    )


def _layer_names(adata) -> list:
    # anndata >= 0.13 lists ``None`` (meaning ``.X``) among the layer keys
    return [k for k in adata.layers.keys() if k is not None]


def counts_from_anndata(adata, *, layer: str | None = None,
                        drop_zero_genes: bool = True) -> CountsInput:
    """Validate and copy the counts of an AnnData object.

    Parameters
    ----------
    adata : anndata.AnnData
        Cells x genes. In-memory or backed; views are accepted. Never modified.
    layer : str, optional
        Read ``adata.layers[layer]``; by default ``adata.X``. The matrix may be a dense
        ndarray, a scipy sparse matrix or array (CSR, CSC, COO) or an anndata backed
        matrix, of integer dtype or of float dtype holding whole numbers.
    drop_zero_genes : bool
        Drop the genes with no count in any cell (default), or keep every gene (e.g.
        new cells matched to a fit's genes, where a gene may be absent from a batch).

    Returns
    -------
    CountsInput
        Dense int64 counts (a new array), cell and gene names, and the all-zero genes
        that were dropped.

    Raises
    ------
    TypeError
        If ``adata`` is not an :class:`anndata.AnnData`.
    ValueError
        For an unknown ``layer`` (the message lists the available layers); an empty
        matrix; NaN, infinite, negative or non-integer entries (the message says which
        and how many, and where the first one is); cells with zero library size (the
        message names how many and the first few ``obs_names``); fewer than 2 genes
        left after dropping all-zero genes; duplicated ``obs_names`` or ``var_names``.

    Warns
    -----
    UserWarning
        When all-zero genes are dropped (the message gives how many and the first few
        names).
    """
    import anndata

    if not isinstance(adata, anndata.AnnData):
        raise TypeError(
            f"adata must be an anndata.AnnData; got {type(adata).__name__}. "
            "For a plain array use counts_from_array"
        )
    if layer is None:
        where = "adata.X"
        X = adata.X
        if X is None:
            avail = _layer_names(adata)
            hint = f"; available layers: {_fmt_allowed(avail)}" if avail else ""
            raise ValueError(f"adata.X is None; pass layer=... to read a layer{hint}")
    else:
        avail = _layer_names(adata)
        if layer not in avail:
            allowed = _fmt_allowed(avail) if avail else "none (adata has no layers)"
            raise ValueError(
                f"Unknown layer {layer!r}; available layers: {allowed}; "
                "or layer=None for adata.X"
            )
        where = f"adata.layers[{layer!r}]"
        X = adata.layers[layer]
    X = _materialize(X, where)
    return _validate_matrix(X, where, pd.Index(adata.obs_names), pd.Index(adata.var_names),
                            drop_zero_genes)


def counts_from_array(counts, obs_names=None, var_names=None) -> CountsInput:
    """Validate and copy a plain count matrix (lower-level APIs).

    Parameters
    ----------
    counts : array_like or scipy sparse matrix, shape (N, G)
        Cells x genes, integer dtype or float dtype holding whole numbers. Never
        modified.
    obs_names : sequence, optional
        Cell names of length N; default ``"0", "1", ...``.
    var_names : sequence, optional
        Gene names of length G; default ``"0", "1", ...``.

    Returns
    -------
    CountsInput
        As for :func:`counts_from_anndata`.

    Raises
    ------
    ValueError
        If ``counts`` is not 2-D, the names do not match its shape or are duplicated,
        or for any of the problems listed in :func:`counts_from_anndata`.

    Warns
    -----
    UserWarning
        When all-zero genes are dropped.
    """
    X = _materialize(counts, "counts")
    if X.ndim != 2:
        raise ValueError(f"counts must be 2-D (cells x genes); got shape {tuple(X.shape)}")
    N, G = X.shape
    obs = pd.Index([str(i) for i in range(N)]) if obs_names is None else pd.Index(obs_names)
    var = pd.Index([str(i) for i in range(G)]) if var_names is None else pd.Index(var_names)
    return _validate_matrix(X, "counts", obs, var)
