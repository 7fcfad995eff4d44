"""Command line ``scribe-stan fit | hmc | validate`` (``scribe_stan.cli.main``)."""

import hashlib
import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import xarray as xr

import scribe_stan as ss
from scribe_stan import cli, convert
from scribe_stan.models import MODELS
from scribe_stan.stan import BACKENDS

FIT_GENES, FIT_RANK, TREE_DRAWS, TREE_GENES = 50, 3, 20, 5


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, "fit", "hmc", "validate"])
def test_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: scribe-stan" + ("" if command is None else f" {command}"))
    assert "examples:" in out
    assert "pbmc_donor_a" in out
    if command is not None:
        assert "--model" in out and "--seed" in out
        assert "(default: 0)" in out  # defaults shown


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "scribe_stan", "fit", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage: scribe-stan fit" in proc.stdout


def test_cli_choices_match_the_package():
    assert cli._MODELS == tuple(MODELS)
    assert "auto" in BACKENDS


# --------------------------------------------------------------------------------------
# fit on the bundled real data
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    inp = d / "pbmc.h5ad"
    ss.datasets.pbmc_donor_a().write_h5ad(inp)
    digest = sha256(inp)
    out = d / "res" / "pbmc_pln.h5ad"
    argv = ["fit", inp, "--model", "pln", "--genes", FIT_GENES, "--rank", FIT_RANK,
            "--max-iter", 30, "--out", out, "--draws", TREE_DRAWS, "--tree-genes", TREE_GENES,
            "--quiet"]
    rc = cli.main([str(a) for a in argv])
    return {"rc": rc, "input": inp, "digest": digest, "out": out}


def test_fit_writes_results_and_leaves_input_unchanged(fit_run, capsys):
    assert fit_run["rc"] == 0
    assert sha256(fit_run["input"]) == fit_run["digest"]
    src = ad.read_h5ad(fit_run["input"])
    res = ad.read_h5ad(fit_run["out"])
    assert res.shape == src.shape == (2896, 2000)
    assert (res.X != src.X).nnz == 0
    for key in ("pln_eta", "pln_capture_efficiency", "pln_converged"):
        assert key in res.obs.columns and key not in src.obs.columns
    assert res.obsm["pln_x"].shape == (2896, FIT_GENES)
    W = res.varm["pln_W"]
    assert W.shape == (2000, FIT_RANK)
    fitted = ~np.isnan(W).any(axis=1)
    assert fitted.sum() == FIT_GENES
    assert list(res.uns["pln"]["genes"]) == list(res.var_names[fitted])
    # the fitted genes are the highest-mean ones
    means = np.asarray(src.X.mean(axis=0)).ravel()
    assert means[fitted].min() >= means[~fitted].max()
    uns = res.uns["pln"]
    assert uns["rank"] == FIT_RANK and uns["max_iter"] == 30
    assert np.isfinite(uns["objective"]) and uns["outer_iterations"] <= 30
    np.testing.assert_allclose(res.obs["pln_capture_efficiency"], np.exp(-res.obs["pln_eta"]))


def test_fit_tree_loads_from_zarr(fit_run):
    path = fit_run["out"].with_suffix(".tree.zarr")
    assert path.is_dir()
    tree = xr.open_datatree(path, engine="zarr")
    assert set(convert.GROUPS) <= set(tree.children)
    post = tree["posterior"]
    assert post["x"].dims == ("chain", "draw", "cell", "gene")
    assert post["x"].shape == (1, TREE_DRAWS, 2896, TREE_GENES)
    assert {"lp", "lp_approx"} <= set(tree["sample_stats"].data_vars)
    assert tree.attrs["solver"] == "laplace"
    res = ad.read_h5ad(fit_run["out"])
    assert set(post["gene"].values) <= set(res.uns["pln"]["genes"])
    assert list(post["cell"].values) == list(res.obs_names)


def test_fit_summary_line(tmp_path, capsys):
    rc, out, err = run(["fit", "pbmc_donor_a", "--genes", 20, "--rank", 2, "--max-iter", 3,
                        "--out", tmp_path / "o.h5ad", "--draws", 0, "--quiet"], capsys)
    assert rc == 0, err
    summary = last_json(out)
    assert summary["cells_total"] == 2896 and summary["genes"] == 20
    assert 0 <= summary["cells_converged"] <= 2896
    assert summary["outer_iterations"] <= 3
    assert {"objective", "wall_s", "fit_wall_s"} <= set(summary)
    assert "tree" not in summary and not (tmp_path / "o.tree.zarr").exists()
    assert err == ""  # --quiet: no progress


# --------------------------------------------------------------------------------------
# bad input: one line on stderr, exit status 2
# --------------------------------------------------------------------------------------


@pytest.fixture
def bad_h5ad(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.poisson(3.0, size=(10, 6)).astype(float)
    X[2, 4] = -1.0
    path = tmp_path / "bad.h5ad"
    ad.AnnData(X=X).write_h5ad(path)
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "missing.h5ad", "--out", "{tmp}/o.h5ad"],
         "input file 'missing.h5ad' not found; give an .h5ad file or one of the shipped "
         "datasets: pbmc_donor_a"),
        (["fit", "pbmc_donor_a", "--model", "nbx", "--out", "{tmp}/o.h5ad"],
         "Unknown model 'nbx'; allowed: 'pln'"),
        (["hmc", "pbmc_donor_a", "--backend", "stan", "--out", "{tmp}/h"],
         "Unknown backend 'stan'; allowed: 'auto', 'cmdstanpy', 'pystan'"),
        (["fit", "pbmc_donor_a", "--layer", "spliced", "--out", "{tmp}/o.h5ad"],
         "Unknown layer 'spliced'; available layers: none"),
        (["fit", "pbmc_donor_a", "--genes", 5, "--rank", 5, "--out", "{tmp}/o.h5ad"],
         "rank K=5 is out of range for G=5 genes; allowed: 1 <= K < G"),
        (["fit", "{bad}", "--rank", 2, "--out", "{tmp}/o.h5ad"],
         "must hold finite, non-negative integer counts; found 1 negative entry"),
        (["fit", "{bad}", "--out", "{bad}"], "--out must differ from INPUT"),
        (["validate", "pbmc_donor_a", "--genes", 1], "--genes must be >= 2; got 1"),
        (["fit", "{tmp}", "--out", "{tmp}/o.h5ad"], "is a directory; expected an .h5ad file"),
    ],
    ids=["missing-file", "model", "backend", "layer", "rank", "negative-counts",
         "out-is-input", "genes", "directory"],
)
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, bad_h5ad, capsys):
    argv = [str(a).format(tmp=tmp_path, bad=bad_h5ad) for a in argv] + ["--quiet"]
    digest = sha256(bad_h5ad)
    rc, out, err = run(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("scribe-stan: error: ")
    assert message in lines[0]
    assert "Traceback" not in err
    assert sha256(bad_h5ad) == digest
    assert not (tmp_path / "o.h5ad").exists()


def test_unreadable_input_and_process_exit_status(tmp_path):
    bogus = tmp_path / "bogus.h5ad"
    bogus.write_text("not hdf5")
    proc = subprocess.run([sys.executable, "-m", "scribe_stan", "fit", str(bogus), "--out",
                           str(tmp_path / "o.h5ad")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"scribe-stan: error: cannot read '{bogus}' as .h5ad")
    assert "Traceback" not in proc.stderr


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "pbmc_donor_a"])  # --out missing
    assert exc.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# HMC diagnostics (synthetic draws with known behaviour)
# --------------------------------------------------------------------------------------


def _tree(shift, n_div=0, seed=0):
    rng = np.random.default_rng(seed)
    C, S, Nc, Gc = 4, 400, 3, 3
    A = rng.standard_normal((C, S, Gc, Gc))
    Sigma = A @ np.swapaxes(A, -1, -2) + np.eye(Gc)
    Sigma = Sigma + shift * np.arange(C)[:, None, None, None]  # chains disagree
    # loadings with a different sign per chain (the same W W'): not identified, skipped
    sign = np.array([1.0, -1.0, 1.0, -1.0])[:, None, None, None]
    W = sign * (2.0 + 0.1 * rng.standard_normal((C, S, Gc, 1)))
    div = np.zeros((C, S), bool)
    div.flat[:n_div] = True
    return convert.build_datatree(
        posterior={"Sigma": Sigma, "x": rng.standard_normal((C, S, Nc, Gc)),
                   "eta": rng.random((C, S, Nc)), "W": W,
                   "W_perp": W - W.mean(axis=-2, keepdims=True)},
        sample_stats={"diverging": div, "lp": rng.standard_normal((C, S))},
        cell_names=["a", "b", "c"], gene_names=["g1", "g2", "g3"], n_factors=1)


def test_hmc_diagnostics_on_mixed_and_unmixed_chains():
    good = cli.hmc_diagnostics(_tree(0.0))
    assert good["max_rhat_Sigma"] < 1.02 and good["max_rhat"] < 1.02  # W's sign ignored
    assert good["min_ess_bulk"] > 800 and good["min_ess_tail"] > 500  # iid draws
    assert good["divergences"] == 0 and good["chains"] == 4 and good["draws"] == 400
    bad = cli.hmc_diagnostics(_tree(5.0, n_div=7))
    assert bad["max_rhat_Sigma"] > 1.5 and bad["max_rhat"] >= bad["max_rhat_Sigma"]
    assert bad["min_ess_bulk"] < 100
    assert bad["divergences"] == 7


# --------------------------------------------------------------------------------------
# Stan runs (build Stan programs: slow the first time, cached afterwards)
# --------------------------------------------------------------------------------------

TINY = ["--genes", 4, "--cells", 30, "--rank", 1, "--chains", 2, "--draws", 100,
        "--warmup", 100, "--quiet"]


@pytest.mark.slow
def test_hmc_command(tmp_path, capsys):
    outdir = tmp_path / "hmc"
    rc, out, err = run(["hmc", "pbmc_donor_a", "--model", "pln", *TINY, "--out", outdir],
                       capsys)
    assert rc == 0, err
    summary = last_json(out)
    for key in ("max_rhat_Sigma", "max_rhat", "min_ess_bulk", "min_ess_tail", "divergences",
                "wall_s"):
        assert key in summary
    assert summary["cells"] == 30 and summary["genes"] == 4 and summary["chains"] == 2
    assert summary["max_rhat"] >= summary["max_rhat_Sigma"] > 0.9
    tree = xr.open_datatree(outdir / "hmc.tree.zarr", engine="zarr")
    assert tree["posterior"]["x"].shape == (2, 100, 30, 4)
    assert tree.attrs["solver"] == "hmc"
    assert json.loads((outdir / "diagnostics.json").read_text())["divergences"] == \
        summary["divergences"]


@pytest.mark.slow
def test_validate_command(tmp_path, capsys):
    outdir = tmp_path / "val"
    rc, out, err = run(["validate", "pbmc_donor_a", "--model", "pln", *TINY,
                        "--laplace-draws", 200, "--out", outdir], capsys)
    assert rc == 0, err
    assert "Laplace vs conditional NUTS" in out and "mean_abs_smd" in out
    for name in ("comparison.png", "compare_conditional.csv", "compare_full.csv",
                 "compare_conditional_detail.csv", "compare_full_detail.csv",
                 "summary.json"):
        assert (outdir / name).is_file(), name
    import pandas as pd

    cond = pd.read_csv(outdir / "compare_conditional.csv", index_col=0)
    assert list(cond.index) == ["x", "eta"]
    assert cond.loc["x", "n"] == 30 * 4
    full = pd.read_csv(outdir / "compare_full.csv", index_col=0)
    assert list(full.index) == ["Sigma", "corr"] and full["point_estimate"].all()
    summary = last_json(out)
    assert summary["cells"] == 30 and "conditional_max_rhat" in summary


@pytest.mark.slow
@pytest.mark.parametrize("model, conditional, full", [
    ("lnm", ["y"], ["Sigma_alr", "corr_clr"]),
    ("nbvcp", None, ["m", "r", "eta"]),
])
def test_validate_command_other_models(tmp_path, capsys, model, conditional, full):
    """validate compares each model's own quantities: ALR latents and CLR correlations for
    lnm; nbvcp (no conditional program) compares m, r and eta with the full joint."""
    import pandas as pd

    outdir = tmp_path / model
    rc, out, err = run(["validate", "pbmc_donor_a", "--model", model, *TINY,
                        "--laplace-draws", 100, "--out", outdir], capsys)
    assert rc == 0, err
    full_table = pd.read_csv(outdir / "compare_full.csv", index_col=0)
    assert list(full_table.index) == full
    assert np.isfinite(full_table["mean_abs_smd"]).all()
    assert (outdir / "comparison.png").is_file()
    summary = last_json(out)
    if conditional is None:
        assert not (outdir / "compare_conditional.csv").exists()
        assert "conditional_max_rhat" not in summary
    else:
        cond = pd.read_csv(outdir / "compare_conditional.csv", index_col=0)
        assert list(cond.index) == conditional
        assert cond.loc["y", "n"] == 30 * 3  # ALR: G - 1 coordinates per cell
        assert 0 < cond.loc["y", "mean_coverage"] <= 1
