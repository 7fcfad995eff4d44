"""The nbvcp -> nbln cascade: parameter names, matching and prior construction."""

from __future__ import annotations

import numpy as np
import pytest

from scribe_stan import cascade


def _moments(G=4, N=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"m": (rng.normal(size=G), rng.uniform(0.1, 0.2, G)),
            "log_r": (rng.normal(2, 1, G), rng.uniform(0.2, 0.4, G)),
            "eta": (rng.uniform(0, 3, N), rng.uniform(0.05, 0.1, N)),
            "var_names": [f"g{i}" for i in range(G)],
            "obs_names": [f"c{i}" for i in range(N)]}


@pytest.mark.parametrize("freeze, expected", [
    (("r", "eta"), ("r", "eta")),
    (("dispersion", "capture_efficiency"), ("r", "eta")),
    ("expression", ("mu",)),
    (["mean_expression", "r"], ("mu", "r")),
    ((), ()),
])
def test_freeze_names_and_aliases(freeze, expected):
    assert cascade.resolve_freeze(freeze) == expected


@pytest.mark.parametrize("freeze, pattern", [
    (("r", "dispersion"), "'r' twice"),
    (("expression", "mean_expression"), "'mu' twice"),
    (("eta", "capture_efficiency"), "'eta' twice"),
    (("size_factor",), "allowed: r, mu, eta, dispersion"),
])
def test_bad_freeze_names(freeze, pattern):
    with pytest.raises(ValueError, match=pattern):
        cascade.resolve_freeze(freeze)


def test_default_freeze_holds_r_and_eta_and_widens_the_rest():
    mom = _moments()
    args = cascade.cascade_arguments(mom, mom["var_names"], mom["obs_names"], tau=2.0)
    assert set(args) == {"log_r", "eta", "log_mean_prior"}
    np.testing.assert_array_equal(args["log_r"], mom["log_r"][0])
    np.testing.assert_array_equal(args["eta"], mom["eta"][0])
    loc, scale = args["log_mean_prior"]
    np.testing.assert_array_equal(loc, mom["m"][0])
    np.testing.assert_allclose(scale, 2.0 * mom["m"][1])


def test_nothing_frozen_gives_priors_everywhere():
    mom = _moments()
    args = cascade.cascade_arguments(mom, mom["var_names"], mom["obs_names"], freeze=())
    assert set(args) == {"log_r_prior", "log_mean_prior", "eta_loc", "eta_scale"}
    np.testing.assert_allclose(args["log_r_prior"][1], mom["log_r"][1])
    np.testing.assert_allclose(args["eta_scale"], mom["eta"][1])


def test_genes_and_cells_are_matched_by_name():
    mom = _moments()
    genes, cells = mom["var_names"][::-1], mom["obs_names"][::-1]
    args = cascade.cascade_arguments(mom, genes, cells, freeze=("r", "mu", "eta"))
    np.testing.assert_array_equal(args["log_r"], mom["log_r"][0][::-1])
    np.testing.assert_array_equal(args["log_mean"], mom["m"][0][::-1])
    np.testing.assert_array_equal(args["eta"], mom["eta"][0][::-1])


def test_mismatched_genes_or_cells_raise():
    mom = _moments()
    with pytest.raises(ValueError, match=r"other genes .*missing from it \['x'\]"):
        cascade.cascade_arguments(mom, mom["var_names"][:3] + ["x"], mom["obs_names"])
    with pytest.raises(ValueError, match="other cells"):
        cascade.cascade_arguments(mom, mom["var_names"], mom["obs_names"][:2])
    with pytest.raises(ValueError, match="tau must be a positive"):
        cascade.cascade_arguments(mom, mom["var_names"], mom["obs_names"], tau=0.0)


# ------------------------------------------------------------------ through ss.fit


def _adata(counts):
    import anndata as ad
    import pandas as pd

    n, g = counts.shape
    return ad.AnnData(X=counts.astype(float),
                      obs=pd.DataFrame(index=[f"cell{i}" for i in range(n)]),
                      var=pd.DataFrame(index=[f"gene{j}" for j in range(g)]))


@pytest.fixture(scope="module")
def nb_data():
    from scribe_stan.models import nbln

    sim = nbln.simulate(150, 6, 1, seed=2, lib_target=400.0, sigma_M=0.5)
    return sim, _adata(sim["counts"])


@pytest.fixture(scope="module")
def nbvcp_fit(nb_data):
    import scribe_stan as ss

    return ss.fit(nb_data[1], model="nbvcp", method="laplace", progress=False)


def test_cascade_holds_frozen_values(nb_data, nbvcp_fit):
    import scribe_stan as ss
    from scribe_stan.fits.nbvcp import posterior_moments

    mom = posterior_moments(nbvcp_fit)
    fit = ss.fit(nb_data[1], model="nbln", rank=1, progress=False,
                 informative_priors_from=nbvcp_fit)
    np.testing.assert_allclose(np.log(fit.r), mom["log_r"][0], rtol=1e-12)
    np.testing.assert_allclose(fit.eta_hat, np.maximum(mom["eta"][0], 0.0), rtol=1e-12)
    assert fit.converged.all() and np.isfinite(fit.objective)
    # expression frozen too: the log-normal mean of every gene equals nbvcp's m
    held = ss.fit(nb_data[1], model="nbln", rank=1, progress=False,
                  informative_priors_from=nbvcp_fit, freeze=("dispersion", "expression",
                                                             "capture_efficiency"))
    np.testing.assert_allclose(held.mu + 0.5 * np.diag(held.Sigma), mom["m"][0], rtol=1e-10)


def test_cascade_priors_pull_toward_the_source(nb_data, nbvcp_fit):
    import scribe_stan as ss

    mom = nbvcp_fit.posterior_moments()
    kw = dict(model="nbln", rank=1, progress=False, informative_priors_from=nbvcp_fit,
              freeze=())
    tight = ss.fit(nb_data[1], tau=0.01, **kw)
    loose = ss.fit(nb_data[1], tau=100.0, **kw)
    dist = lambda f: np.abs(np.log(f.r) - mom["log_r"][0]).max()  # noqa: E731
    assert dist(tight) < 0.05 < dist(loose)
    np.testing.assert_allclose(tight.eta_hat, mom["eta"][0], atol=0.05)


def test_cascade_from_hmc_nbvcp(nb_data):
    import scribe_stan as ss

    adata = nb_data[1][:30].copy()
    hmc = ss.fit(adata, model="nbvcp", method="hmc", chains=2, draws=200, warmup=200,
                 progress=False)
    fit = ss.fit(adata, model="nbln", rank=1, progress=False, informative_priors_from=hmc)
    draws = np.asarray(hmc.draws.posterior["eta"]).reshape(-1, 30)
    np.testing.assert_allclose(fit.eta_hat, draws.mean(axis=0), rtol=1e-10)


def test_cascade_bad_inputs(nb_data, nbvcp_fit):
    import scribe_stan as ss

    adata = nb_data[1]
    with pytest.raises(ValueError, match="does not apply to model='pln'; it applies to: nbln"):
        ss.fit(adata, model="pln", rank=1, progress=False, informative_priors_from=nbvcp_fit)
    with pytest.raises(ValueError, match="must be an nbvcp fit"):
        ss.fit(adata, model="nbln", rank=1, progress=False, informative_priors_from="x")
    with pytest.raises(ValueError, match="other genes"):
        ss.fit(adata, model="nbln", rank=1, progress=False, genes=4,
               informative_priors_from=nbvcp_fit)
    with pytest.raises(ValueError, match="'r' twice"):
        ss.fit(adata, model="nbln", rank=1, progress=False, informative_priors_from=nbvcp_fit,
               freeze=("r", "dispersion"))
