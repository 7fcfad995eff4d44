"""Real single-cell count data shipped with the package."""

from __future__ import annotations

from importlib import resources

import anndata

__all__ = ["pbmc_donor_a"]

_PBMC_DONOR_A = "pbmc_donor_a.h5ad"


def pbmc_donor_a() -> anndata.AnnData:
    """Frozen PBMCs of donor A (10x GemCode v1), 2896 cells x 2000 genes.

    Raw UMI counts of frozen peripheral blood mononuclear cells from donor A, measured
    with the 10x Genomics GemCode (v1) chemistry in Zheng et al. (2017). The counts are
    those redistributed in the public JEFworks/MUDAN repository as ``data/pbmcA.rda``
    (GPL-3), converted to h5ad without filtering (2896 cells x 13939 genes).

    The shipped subset keeps **all 2896 cells** and the **2000 genes with the highest
    mean UMI count** over all cells (ties at the cut broken by original gene order;
    genes kept in their original order). Counts are unchanged. The file is regenerated
    deterministically by ``validation/make_pbmc_subset.py`` from the full
    ``pbmc_donor_a.h5ad``.

    Returns
    -------
    anndata.AnnData
        A new object on every call (safe to modify). ``.X`` holds the counts as a
        ``scipy.sparse`` CSR matrix of dtype int32, cells in rows (``obs_names``:
        barcodes) and genes in columns (``var_names``: gene symbols).
        ``uns["source"]`` records the provenance and the subset rule. Library sizes
        range from 482 to 6309 UMIs, and every gene has a nonzero count.

    References
    ----------
    .. [1] G. X. Y. Zheng et al., "Massively parallel digital transcriptional profiling
       of single cells", Nature Communications 8:14049 (2017),
       doi:10.1038/ncomms14049.
    .. [2] JEFworks/MUDAN, https://github.com/JEFworks/MUDAN, file ``data/pbmcA.rda``
       (GPL-3).

    Examples
    --------
    >>> import scribe_stan as ss
    >>> adata = ss.datasets.pbmc_donor_a()
    >>> adata.shape
    (2896, 2000)
    """
    ref = resources.files("scribe_stan").joinpath("data", _PBMC_DONOR_A)
    with resources.as_file(ref) as path:
        return anndata.read_h5ad(path)
