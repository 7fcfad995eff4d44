"""Regenerate the dataset shipped in ``scribe_stan/data/pbmc_donor_a.h5ad``.

Reads ``../shared/data/pbmc_donor_a.h5ad`` (relative to the project root, or the path
given as the first argument), keeps all cells and the 2000 genes with the highest mean
count, and writes a gzip-compressed h5ad with CSR int32 counts in ``.X``.

The selection is deterministic: genes are ranked by their total count (equivalent to
the mean over all cells) in decreasing order, ties broken by the original gene order
(stable sort), and the kept genes are written in their original order.

Usage::

    python validation/make_pbmc_subset.py [SOURCE.h5ad] [OUT.h5ad]
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

N_GENES = 2000
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "pbmc_donor_a.h5ad"
DEFAULT_OUT = ROOT / "scribe_stan" / "data" / "pbmc_donor_a.h5ad"


def top_mean_genes(X, n_genes: int = N_GENES) -> np.ndarray:
    """Indices (ascending) of the ``n_genes`` genes with the highest mean count.

    Parameters
    ----------
    X : scipy.sparse matrix or numpy.ndarray, shape (N, G)
        Integer counts, cells in rows.
    n_genes : int
        Number of genes to keep.

    Returns
    -------
    numpy.ndarray of int
        Column indices of the kept genes, in their original order. Ties at the cut
        are broken in favour of the gene that comes first.
    """
    totals = np.asarray(X.sum(axis=0, dtype=np.int64)).ravel()
    order = np.argsort(-totals, kind="stable")
    return np.sort(order[:n_genes])


def make_subset(source: Path = DEFAULT_SOURCE, out: Path = DEFAULT_OUT) -> ad.AnnData:
    """Build and write the shipped subset; return it."""
    full = ad.read_h5ad(source)
    keep = top_mean_genes(full.X, N_GENES)
    X = sp.csr_matrix(full.X[:, keep], dtype=np.int32)
    X.sort_indices()
    src = str(full.uns.get("source", "")).strip()
    subset_note = (
        f"Subset shipped with scribe-stan: all {full.n_obs} cells and the {N_GENES} "
        f"genes (of {full.n_vars}) with the highest mean UMI count over all cells "
        "(ties broken by original gene order; genes kept in original order); counts "
        "unchanged, CSR int32; made by validation/make_pbmc_subset.py."
    )
    sub = ad.AnnData(
        X=X,
        obs=full.obs.copy(),
        var=full.var.iloc[keep].copy(),
    )
    sub.uns["source"] = f"{src.rstrip('.')}. {subset_note}" if src else subset_note
    out.parent.mkdir(parents=True, exist_ok=True)
    sub.write_h5ad(out, compression="gzip")
    return sub


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0]) if len(argv) > 0 else DEFAULT_SOURCE
    out = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    sub = make_subset(source, out)
    size = out.stat().st_size
    print(f"wrote {out} ({sub.n_obs} x {sub.n_vars}, nnz={sub.X.nnz}, {size} bytes)")
    if size > 5 * 1024 * 1024:
        print("ERROR: file exceeds 5 MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
