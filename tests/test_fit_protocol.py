"""One model interface: the registry, the result protocol, save/load and transform.

References: a saved-and-loaded fit must give the very same trees as the fit it was
saved from (same modes, same random draws); ``transform`` of the training cells must
land on the fit's own per-cell modes (a cold-started Newton solve to the same optimum);
a spec registered from outside the package (``tests/example_spec.py``) must go through
``ss.fit``, save/load and transform without any other change.
"""

import json
import warnings

import anndata
import numpy as np
import pytest

import scribe_stan as ss
from scribe_stan.models import pln

LAPLACE_MODES = {"pln": "x_hat", "nbln": "x_hat", "nbvcp": "eta_hat", "lnm": "y_hat",
                 "lnmvcp": "y_hat"}
GROUPS = ("posterior", "sample_stats", "log_likelihood", "posterior_predictive",
          "observed_data")


@pytest.fixture(scope="module")
def adata():
    sim = pln.simulate(120, 10, 2, seed=3, lib_target=800.0)
    ad = anndata.AnnData(sim["counts"].astype(np.float64))
    ad.obs_names = [f"cell{i}" for i in range(ad.n_obs)]
    ad.var_names = [f"gene{j}" for j in range(ad.n_vars)]
    return ad


def _fit(adata, model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return ss.fit(adata, model=model, rank=None if model == "nbvcp" else 2,
                      progress=False, **kw)


@pytest.fixture(scope="module")
def fits(adata):
    return {m: _fit(adata, m) for m in LAPLACE_MODES}


def assert_same_tree(a, b):
    for group in GROUPS:
        da, db = a[group].to_dataset(), b[group].to_dataset()
        assert set(da.data_vars) == set(db.data_vars), group
        for v in da.data_vars:
            np.testing.assert_array_equal(da[v].values, db[v].values, err_msg=f"{group}/{v}")
    assert a.attrs == b.attrs


@pytest.mark.parametrize("model", list(LAPLACE_MODES))
def test_protocol_core(fits, adata, model):
    fit = fits[model]
    assert isinstance(fit, ss.Fit) and fit.model == model and fit.method == "laplace"
    assert fit.obs_names.equals(adata.obs_names) and fit.var_names.equals(adata.var_names)
    assert fit.settings["model"] == model
    summary = fit.summary()
    json.dumps(summary)  # JSON-ready
    assert summary["cells"] == adata.n_obs and summary["genes"] == adata.n_vars
    assert summary["objective"] == fit.objective
    assert summary["cells_converged"] == int(fit.converged.sum())
    glob = fit.globals()
    assert set(glob) == set(ss.specs.get(model).globals) - {"Sigma", "Sigma_clr"}
    for name, value in glob.items():
        assert value is getattr(fit, name) or np.array_equal(value, getattr(fit, name))
    out = fit.to_anndata(adata)
    assert f"{model}_converged" in out.obs and model in out.uns


@pytest.mark.parametrize("model", list(LAPLACE_MODES))
def test_save_load_round_trip(fits, model, tmp_path):
    fit = fits[model]
    path = tmp_path / f"{model}.zarr"
    fit.save(path)
    back = ss.load_fit(path)
    assert type(back) is type(fit) and back.model == fit.model
    assert back.settings == json.loads(json.dumps(fit.settings))
    assert back.obs_names.equals(fit.obs_names) and back.var_names.equals(fit.var_names)
    np.testing.assert_array_equal(back.data.counts, fit.data.counts)
    for name, value in fit.globals().items():
        np.testing.assert_array_equal(getattr(back, name), value)
    np.testing.assert_array_equal(getattr(back, LAPLACE_MODES[model]),
                                  getattr(fit, LAPLACE_MODES[model]))
    assert back.objective == fit.objective
    kw = {} if model in ("lnm", "lnmvcp") else {"genes": 4}
    assert_same_tree(fit.to_datatree(40, seed=5, **kw), back.to_datatree(40, seed=5, **kw))
    with pytest.raises(ValueError, match="exists"):
        fit.save(path)


@pytest.mark.parametrize("model", ["pln", "lnmvcp"])
def test_save_load_netcdf(fits, model, tmp_path):
    fit = fits[model]
    fit.save(tmp_path / "f.nc")
    back = ss.load_fit(tmp_path / "f.nc")
    kw = {} if model == "lnmvcp" else {"genes": 3}
    assert_same_tree(fit.to_datatree(10, seed=1, **kw), back.to_datatree(10, seed=1, **kw))


def test_save_load_nbln_laplace_globals_draws(fits, tmp_path):
    """The nested-Laplace draws need the fit's objective layout: it survives a round trip."""
    fit = fits["nbln"]
    fit.save(tmp_path / "f.zarr")
    back = ss.load_fit(tmp_path / "f.zarr")
    a = fit.to_datatree(5, genes=3, seed=1, globals="laplace")
    b = back.to_datatree(5, genes=3, seed=1, globals="laplace")
    np.testing.assert_allclose(a["posterior"]["x"].values, b["posterior"]["x"].values,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model", list(LAPLACE_MODES))
def test_transform_of_training_cells_reproduces_modes(fits, adata, model):
    fit = fits[model]
    # the same cells, genes shuffled among extra ones: matched by name
    extra = adata.copy()
    extra = anndata.concat([extra, anndata.AnnData(
        np.ones((adata.n_obs, 2)), obs=extra.obs.copy())], axis=1)
    extra.var_names = list(adata.var_names) + ["other0", "other1"]
    extra = extra[:, np.random.default_rng(0).permutation(extra.n_vars)].copy()
    lib = np.asarray(adata.X.sum(axis=1)).ravel()  # the training library sizes
    new = fit.transform(extra, library_size=lib)
    assert type(new) is type(fit) and new.model == fit.model
    assert new.var_names.equals(fit.var_names)
    np.testing.assert_allclose(getattr(new, LAPLACE_MODES[model]),
                               getattr(fit, LAPLACE_MODES[model]), rtol=0, atol=1e-8)
    for name, value in fit.globals().items():
        np.testing.assert_array_equal(getattr(new, name), value)
    assert new.converged.all()
    assert new.settings["transform_of"]["cells"] == adata.n_obs
    out = new.to_anndata(extra)
    assert f"{model}_converged" in out.obs


def test_transform_new_cells_and_bad_input(fits, adata):
    fit = fits["pln"]
    sub = adata[:30, ::-1].copy()
    sub.X[:, 0] = 0  # a fitted gene absent from the new batch is kept (zero counts)
    new = fit.transform(sub)
    assert new.x_hat.shape == (30, adata.n_vars) and new.converged.all()
    tree = new.to_datatree(10, genes=3)
    assert tree["posterior"].sizes["cell"] == 30
    with pytest.raises(ValueError, match=r"lacks 2 of the 10 fitted genes: \['gene0', 'gene1'\]"):
        fit.transform(adata[:, 2:].copy())
    with pytest.raises(TypeError, match="AnnData"):
        fit.transform(np.ones((3, 10)))


def test_model_options_are_checked_by_the_spec(adata):
    with pytest.raises(ValueError, match=r"mode= does not apply to model='pln'; it applies "
                                          r"to: lnm, lnmvcp"):
        ss.fit(adata, model="pln", mode="low_rank", progress=False)
    with pytest.raises(ValueError, match=r"loadings_prior= does not apply to model='nbvcp'"):
        ss.fit(adata, model="nbvcp", loadings_prior="horseshoe", progress=False)
    with pytest.raises(ValueError, match=r"mode= applies to method='laplace'"):
        ss.fit(adata, model="lnm", method="hmc", mode="low_rank", progress=False)
    with pytest.raises(ValueError, match=r"Unknown mode 'diag'"):
        ss.fit(adata, model="lnm", mode="diag", progress=False)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'colour'"):
        ss.fit(adata, model="pln", colour="blue", progress=False)
    with pytest.raises(ValueError, match=r"conditional_on applies to method='hmc'"):
        ss.fit(adata, model="pln", conditional_on=object(), progress=False)
    with pytest.raises(ValueError, match=r"init_from= applies to method='hmc'"):
        ss.fit(adata, model="pln", init_from=object(), progress=False)
    with pytest.raises(ValueError, match=r"init_from= does not apply to model='lnm'; it "
                                          r"applies to: pln, nbln"):
        ss.fit(adata, model="lnm", method="hmc", init_from=object(), progress=False)
    with pytest.raises(ValueError, match=r"init_from must be a pln or nbln Laplace fit"):
        ss.fit(adata, model="pln", method="hmc", init_from=object(), progress=False)
    with pytest.raises(ValueError, match=r"Unknown metric 'unit_e'"):
        ss.fit(adata, model="pln", method="hmc", metric="unit_e", progress=False)


def test_a_model_added_as_a_spec_alone(adata, tmp_path):
    import example_spec

    ss.specs.register(example_spec.SPEC)
    try:
        with pytest.raises(ValueError, match="registered already"):
            ss.specs.register(example_spec.SPEC)
        fit = ss.fit(adata, model="nbln_known_r", rank=2, dispersion=5.0, progress=False)
        assert isinstance(fit, ss.LaplaceFit) and fit.model == "nbln_known_r"
        np.testing.assert_allclose(fit.r, 5.0)
        assert fit.settings["dispersion"] == 5.0 and fit.success
        with pytest.raises(ValueError, match="dispersion= does not apply to model='pln'; "
                                             "it applies to: nbln_known_r"):
            ss.fit(adata, model="pln", dispersion=5.0, progress=False)
        with pytest.raises(ValueError, match="Unknown method 'hmc'"):
            ss.fit(adata, model="nbln_known_r", method="hmc", progress=False)
        with pytest.raises(ValueError, match="dispersion must be a positive"):
            ss.fit(adata, model="nbln_known_r", dispersion=-1.0, progress=False)
        fit.save(tmp_path / "k.zarr")
        back = ss.load_fit(tmp_path / "k.zarr")
        assert_same_tree(fit.to_datatree(20, genes=3, seed=2),
                         back.to_datatree(20, genes=3, seed=2))
        new = back.transform(adata, library_size=np.asarray(adata.X.sum(axis=1)).ravel())
        np.testing.assert_allclose(new.x_hat, fit.x_hat, atol=1e-8)
        # predictive checks and LOO go by the spec's family and n_globals
        ss.posterior_predictive(fit, level="map", draws=5, genes=3)
        assert ss.loo(fit, draws=100).p == 10 * 4 - 1
    finally:
        ss.specs.unregister("nbln_known_r")
    with pytest.raises(ValueError, match="Unknown model 'nbln_known_r'"):
        ss.fit(adata, model="nbln_known_r", progress=False)


def test_load_fit_errors(tmp_path, adata):
    with pytest.raises(FileNotFoundError):
        ss.load_fit(tmp_path / "nothing.zarr")
    import xarray as xr

    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(tmp_path / "plain.zarr")
    with pytest.raises(ValueError, match="holds no scribe-stan fit"):
        ss.load_fit(tmp_path / "plain.zarr")


@pytest.mark.slow
def test_hmc_started_from_a_laplace_fit(fits, adata):
    small = adata[:30, :5].copy()
    lap = _fit(small, "pln")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hmc = ss.fit(small, model="pln", method="hmc", rank=2, init_from=lap, chains=2,
                     draws=20, warmup=20, seed=1, progress=False)
    assert hmc.settings["init"] == "laplace" and hmc.settings["metric"] == "diag_e"
    with pytest.raises(ValueError, match="rank 2; this fit is pln of rank 1"):
        ss.fit(small, model="pln", method="hmc", rank=1, init_from=lap, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pln", "nbln", "nbvcp", "lnm", "lnmvcp"])
def test_hmc_save_load_round_trip(adata, model, tmp_path):
    small = adata[:30, :5].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = ss.fit(small, model=model, method="hmc", rank=None if model == "nbvcp" else 1,
                     chains=2, draws=30, warmup=30, seed=1, progress=False)
    assert fit.method == "hmc" and isinstance(fit, ss.Fit)
    summary = fit.summary()
    json.dumps(summary)
    assert summary["chains"] == 2 and summary["draws"] == 30
    fit.save(tmp_path / "h.zarr")
    back = ss.load_fit(tmp_path / "h.zarr")
    assert type(back) is type(fit) and back.program == fit.program
    assert back.draws.stan_hash == fit.draws.stan_hash
    assert_same_tree(fit.to_datatree(), back.to_datatree())
    out = back.to_anndata(small)
    assert f"{model}_eta" in out.obs or f"{model}_y" in out.obsm
    with pytest.raises(TypeError, match="transform applies to Laplace fits"):
        back.transform(small)
