"""Every Laplace model's outer optimization goes through the one driver.

Each model is fitted (a few outer iterations) with ``driver.maximize`` wrapped by a
spy, and SciPy's ``optimize.minimize`` wrapped too: the driver must run, and no
optimizer call may happen outside it (a model with its own L-BFGS loop through ``optimize.minimize`` would show up as a
call with the driver not on the stack).
"""

from __future__ import annotations

import anndata as ad
import pytest
from scipy import optimize

import scribe_stan as ss
from scribe_stan.laplace import driver
from scribe_stan.models import pln


@pytest.fixture(scope="module")
def adata():
    return ad.AnnData(pln.simulate(40, 6, 1, seed=5)["counts"].astype(float))


@pytest.mark.parametrize("model", ["pln", "nbln", "nbvcp", "lnm", "lnmvcp"])
def test_every_laplace_model_runs_the_one_driver(adata, model, monkeypatch):
    state = {"depth": 0, "driver_calls": 0, "minimize_inside": 0, "minimize_outside": 0}
    real_maximize, real_minimize = driver.maximize, optimize.minimize

    def maximize(*args, **kwargs):
        state["driver_calls"] += 1
        state["depth"] += 1
        try:
            return real_maximize(*args, **kwargs)
        finally:
            state["depth"] -= 1

    def minimize(*args, **kwargs):
        state["minimize_inside" if state["depth"] else "minimize_outside"] += 1
        return real_minimize(*args, **kwargs)

    monkeypatch.setattr(driver, "maximize", maximize)
    monkeypatch.setattr(optimize, "minimize", minimize)
    kw = {} if model == "nbvcp" else {"rank": 1}
    ss.fit(adata, model=model, max_iter=3, progress=False, **kw)
    assert state["driver_calls"] >= 1, state
    assert state["minimize_inside"] >= state["driver_calls"], state
    assert state["minimize_outside"] == 0, state
