"""pystan and cmdstanpy give the same results, to the last digit.

Both backends run the same Stan services on the same program text with the same seed
(and inits), so draws, sampler diagnostics and log densities must be identical, not
merely close: CmdStan's CSV, written with 18 significant digits, reads back as the same
doubles. One program per kind: the full joint (``pln``, through ``ss.fit``), the
conditional program (``pln_conditional``, ``conditional_on=``), the embedded Laplace
program (``pln_laplace``, the fixed_param path) and ``log_prob``.
"""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import xarray as xr

import scribe_stan as ss
from scribe_stan import stan
from scribe_stan.models import pln

pytestmark = [pytest.mark.slow, pytest.mark.cmdstan]

#: Attributes that name the backend or time the run: the only ones allowed to differ.
BACKEND_ATTRS = {"backend", "wall_time_s", "pystan_version", "httpstan_version",
                 "cmdstanpy_version", "cmdstan_version"}


@pytest.fixture
def both(cmdstan_dir, monkeypatch):
    """Run ``call(backend)`` under each backend; {backend: result}."""
    monkeypatch.setenv("CMDSTAN", cmdstan_dir)
    return lambda call: {b: call(b) for b in ("pystan", "cmdstanpy")}


@pytest.fixture(scope="module")
def adata():
    sim = pln.simulate(12, 4, 1, seed=5, lib_target=150.0, sigma_M=0.5)
    return ad.AnnData(X=sim["counts"].astype(np.float32),
                      obs=pd.DataFrame(index=[f"cell{i}" for i in range(12)]),
                      var=pd.DataFrame(index=[f"gene{g}" for g in range(4)]))


def assert_same_draws(a, b):
    """Every variable (zero-size ones too) and diagnostic: same order, shape, dtype,
    values."""
    assert list(a.posterior) == list(b.posterior)
    assert list(a.sample_stats) == list(b.sample_stats)
    for group in ("posterior", "sample_stats"):
        for name, arr in getattr(a, group).items():
            other = getattr(b, group)[name]
            assert arr.dtype == other.dtype and arr.shape == other.shape, name
            np.testing.assert_array_equal(arr, other, err_msg=name, strict=True)


def assert_same_tree(a, b):
    """Same groups, variables, dims, coords and values; attrs equal up to the backend."""
    assert sorted(a.children) == sorted(b.children)
    for group in a.children:
        left, right = a[group].to_dataset(), b[group].to_dataset()
        assert list(left.data_vars) == list(right.data_vars), group
        assert dict(left.sizes) == dict(right.sizes), group
        xr.testing.assert_equal(left, right)  # values, dims and coords, exactly
    assert a.attrs["backend"] == "pystan" and b.attrs["backend"] == "cmdstanpy"
    assert ({k: v for k, v in a.attrs.items() if k not in BACKEND_ATTRS}
            == {k: v for k, v in b.attrs.items() if k not in BACKEND_ATTRS})


@pytest.mark.parametrize("kind", ["full", "conditional"])
def test_hmc_fits_are_identical(kind, adata, both):
    given = None
    if kind == "conditional":
        given = ss.fit(adata, model="pln", rank=1, progress=False)
    fits = both(lambda b: ss.fit(adata, model="pln", method="hmc", rank=1, backend=b,
                                 chains=2, draws=100, warmup=100, seed=5, progress=False,
                                 conditional_on=given))
    py, cmd = fits["pystan"].draws, fits["cmdstanpy"].draws
    assert py.program == cmd.program == ("pln" if kind == "full" else "pln_conditional")
    assert_same_draws(py, cmd)
    if kind == "full":
        assert cmd.posterior["tau"].shape == (2, 100, 0)  # zero-size: none of the CSV
    # Stan's own version: pystan's from httpstan's headers, cmdstanpy's from the
    # executable; both backends compile against the same Stan here
    assert py.versions["stan"] == cmd.versions["stan"]
    assert_same_tree(fits["pystan"].to_datatree(), fits["cmdstanpy"].to_datatree())


def test_inits_fixed_param_and_log_prob_are_identical(both):
    sim = pln.simulate(6, 3, 1, seed=9, lib_target=80.0, sigma_M=0.5)
    data = pln.stan_data(sim["counts"], 1, log_M0=sim["log_M0"], sigma_M=sim["sigma_M"])
    first = stan.sample("pln", data, backend="pystan", chains=2, draws=5, warmup=20, seed=1)
    names = stan._declarations(stan._block(stan.program_code("pln"), "parameters"))
    # a later run started from the first one's last draws, per chain
    inits = [{k: first.posterior[k][c, -1] for k in names} for c in range(2)]
    draws = both(lambda b: stan.sample("pln", data, backend=b, chains=2, draws=30,
                                       warmup=30, seed=2, inits=inits))
    assert_same_draws(draws["pystan"], draws["cmdstanpy"])

    lap = pln.laplace_stan_data(sim["counts"], sim["mu"], sim["W"], sim["d"], sim["eta"],
                                log_M0=sim["log_M0"], sigma_M=sim["sigma_M"])
    gq = both(lambda b: stan.fixed_param("pln_laplace", lap, backend=b))
    assert list(gq["pystan"]) == list(gq["cmdstanpy"]) == ["log_marginal"]
    np.testing.assert_array_equal(gq["pystan"]["log_marginal"],
                                  gq["cmdstanpy"]["log_marginal"], strict=True)

    for c, jacobian in [(0, False), (1, True)]:
        lp = both(lambda b: stan.log_prob("pln", data, inits[c], backend=b,
                                          jacobian=jacobian))
        assert lp["pystan"] == lp["cmdstanpy"], (jacobian, lp)
