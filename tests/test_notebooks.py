"""The notebooks run top to bottom on small settings and draw their figures.

Each notebook is executed with nbclient under ``SCRIBE_STAN_NOTEBOOK_SMALL=1`` (read in
its first cell); a cell error fails the test with the cell's traceback.
"""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# (notebook, least number of image outputs it draws)
CASES = [("pln_pbmc_laplace_vs_nuts.ipynb", 6), ("nbln_cascade.ipynb", 3),
         ("lnm_compositional.ipynb", 3), ("grn_inference.ipynb", 3)]


@pytest.mark.slow
@pytest.mark.parametrize("name, min_figures", CASES)
def test_notebook_runs(name, min_figures, monkeypatch, tmp_path):
    monkeypatch.setenv("SCRIBE_STAN_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    images = [o for c in code for o in c.outputs
              if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]
    assert len(images) >= min_figures, f"{name}: {len(images)} figures"
