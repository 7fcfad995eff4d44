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
