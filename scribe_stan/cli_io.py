"""Input and output checks shared by the CLI commands (:mod:`scribe_stan.cli`,
:mod:`scribe_stan.grn_cli`): reading an INPUT argument and refusing unwritable outputs
before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

#: Names accepted in place of an INPUT path (functions of :mod:`scribe_stan.datasets`).
DATASETS = ("pbmc_donor_a",)


def load_input(path: str, cells: int | None = None):
    """AnnData from an .h5ad path or a shipped dataset name; first ``cells`` rows."""
    import anndata

    from scribe_stan import datasets

    if path in DATASETS:
        adata = getattr(datasets, path)()
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(
                f"input file {path!r} not found; give an .h5ad file or one of the shipped "
                f"datasets: {', '.join(DATASETS)}"
            )
        if p.is_dir():
            raise ValueError(f"input {path!r} is a directory; expected an .h5ad file")
        try:
            adata = anndata.read_h5ad(p)
        except Exception as exc:  # h5py/anndata raise OSError, KeyError, ...
            raise ValueError(f"cannot read {path!r} as .h5ad: {exc}") from exc
    if cells is not None and cells < adata.n_obs:
        adata = adata[:cells].copy()
    return adata


def check_writable(path: Path, option: str, *, force: bool = False,
                    directory: bool = False) -> None:
    """Fail before any work if ``path`` cannot be written.

    A file path (``directory=False``) must not be an existing directory (a ``.zarr``
    tree is one) and must not exist unless ``force``; an output directory may exist
    but must not be a file. Either way the nearest existing parent must be a writable
    directory.
    """
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is an existing file; give a directory")
    if not directory:
        if path.is_dir() and path.suffix != ".zarr":
            raise ValueError(f"{option} {str(path)!r} is an existing directory; give a file "
                             "path")
        if path.exists() and not force:
            raise ValueError(f"{option} {str(path)!r} exists; pass --force to overwrite it or "
                             "choose another path")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {str(path)!r} lies under {str(parent)!r}, which is a file, "
                         "not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {str(path)!r}: directory {str(parent)!r} is not writable")
