"""Command line ``scribe-stan fit | hmc | validate`` (``scribe_stan.cli.main``)."""

import hashlib
import json
import subprocess
import sys
import warnings

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


@pytest.mark.parametrize("command", [None, "fit", "transform", "hmc", "validate"])
def test_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: scribe-stan" + ("" if command is None else f" {command}"))
    assert "examples:" in out
    assert "pbmc_donor_a" in out
    if command not in (None, "transform"):  # transform takes the model from the fit
        assert "--model" in out and "--seed" in out
        assert "(default: 0)" in out  # defaults shown


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "scribe_stan", "fit", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "usage: scribe-stan fit" in proc.stdout


def test_cli_choices_match_the_package():
    assert cli._MODELS == ss.specs.names() and set(cli._MODELS) == set(MODELS)
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
        (["validate", "pbmc_donor_a", "--genes", 1], "--genes must be an integer >= 2; got 1"),
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
        cli.main(["fit", "--out", "o.h5ad"])  # INPUT missing
    assert exc.value.code == 2
    assert "the following arguments are required: INPUT" in capsys.readouterr().err
    # --out is optional for the parser (a chunked fit writes into its store) but
    # required for the in-memory fit
    assert cli.main(["fit", "pbmc_donor_a"]) == 2
    assert "--out OUT.h5ad is required" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# every model through the CLI, and the error paths that must fail before the work
# --------------------------------------------------------------------------------------

SLICE_CELLS = 60


@pytest.fixture(scope="module")
def slice_h5ad(tmp_path_factory):
    """The first cells of the shipped data, as a file."""
    path = tmp_path_factory.mktemp("slice") / "slice.h5ad"
    ss.datasets.pbmc_donor_a()[:SLICE_CELLS].copy().write_h5ad(path)
    return path


def only_json(out):
    """stdout must hold exactly one JSON line (machine-readable)."""
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return json.loads(lines[0])


# per model: rank argument, summary keys of its own, posterior variables in its tree
MODEL_OUTPUTS = {
    "pln": (["--rank", 2], {"rank", "effective_rank", "median_capture_efficiency"},
            {"x", "eta", "Sigma"}),
    "nbln": (["--rank", 2], {"rank", "effective_rank", "median_dispersion_r",
                             "median_capture_efficiency"}, {"x", "eta", "r"}),
    "nbvcp": ([], {"median_dispersion_r", "median_capture_efficiency"}, {"m", "r", "eta"}),
    "lnm": (["--rank", 2], {"rank", "mode", "reference_gene", "m_T", "r_T"},
            {"y", "Sigma_alr", "corr_clr"}),
    "lnmvcp": (["--rank", 2], {"rank", "reference_gene", "m_T", "r_T",
                               "median_capture_efficiency"}, {"y", "eta", "corr_clr"}),
}


@pytest.mark.parametrize("model", list(MODELS))
def test_fit_every_model(model, slice_h5ad, tmp_path, capsys):
    rank, keys, variables = MODEL_OUTPUTS[model]
    out = tmp_path / f"{model}.h5ad"
    rc, stdout, err = run(["fit", slice_h5ad, "--model", model, "--genes", 6, *rank,
                           "--max-iter", 40, "--draws", 5, "--out", out, "--quiet"], capsys)
    assert rc == 0, err
    assert err == ""
    summary = only_json(stdout)
    assert keys <= set(summary), set(summary)
    assert summary["model"] == model and summary["genes"] == 6
    assert summary["cells_total"] == SLICE_CELLS and np.isfinite(summary["objective"])
    assert ("rank" in summary) == (model != "nbvcp")
    res = ad.read_h5ad(out)
    assert f"{model}_converged" in res.obs and model in res.uns
    tree = xr.open_datatree(summary["tree"], engine="zarr")
    assert variables <= set(tree["posterior"].data_vars)
    assert tree.attrs["model"] == model
    # per-gene models store the --tree-genes highest-mean genes (default 20 > 6: all six);
    # lnm and lnmvcp every fitted gene
    assert tree["posterior"].sizes["gene"] == 6


def test_fit_save_fit_then_transform_and_grn(slice_h5ad, tmp_path, capsys):
    """--save-fit writes a fit that `transform` applies to cells (here the training cells,
    whose modes it must reproduce) and that `grn` reads as its input."""
    out, saved = tmp_path / "fit.h5ad", tmp_path / "fit.zarr"
    rc, stdout, err = run(["fit", slice_h5ad, "--genes", 6, "--rank", 2, "--max-iter", 40,
                           "--draws", 0, "--out", out, "--save-fit", saved, "--quiet"], capsys)
    assert rc == 0, err
    assert only_json(stdout)["fit"] == str(saved) and saved.is_dir()
    rc, _, err = run(["fit", slice_h5ad, "--genes", 6, "--rank", 2, "--draws", 0, "--out",
                      tmp_path / "again.h5ad", "--save-fit", saved, "--quiet"], capsys)
    assert rc == 2 and "--save-fit" in err and "exists" in err
    new = tmp_path / "new.h5ad"
    before = sha256(slice_h5ad)
    rc, stdout, err = run(["transform", saved, new, slice_h5ad, "--quiet"], capsys)
    assert rc == 0, err
    summary = only_json(stdout)
    assert summary["command"] == "transform" and summary["cells"] == SLICE_CELLS
    assert summary["cells_converged"] == SLICE_CELLS
    fitted, placed = ad.read_h5ad(out), ad.read_h5ad(new)
    np.testing.assert_allclose(placed.obsm["pln_x"], fitted.obsm["pln_x"], atol=1e-8)
    np.testing.assert_allclose(placed.obs["pln_eta"], fitted.obs["pln_eta"], atol=1e-8)
    assert sha256(slice_h5ad) == before
    rc, _, err = run(["transform", saved, new, slice_h5ad], capsys)
    assert rc == 2 and "exists" in err
    rc, _, err = run(["transform", tmp_path / "none.zarr", tmp_path / "x.h5ad", slice_h5ad],
                     capsys)
    assert rc == 2 and "no saved fit" in err
    rc, stdout, err = run(["grn", saved, "--method", "correlation", "--out",
                           tmp_path / "grn.csv"], capsys)
    assert rc == 0, err
    assert last_json(stdout)["genes"] == 6


def _no_fit(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the fit ran although the input was bad")

    monkeypatch.setattr(ss, "fit", boom)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "{tmp}"], "is an existing directory; give a file path"),
        (["--out", "{file}/o.h5ad"], "which is a file, not a directory"),
        (["--out", "{file}"], "exists; pass --force to overwrite it"),
        (["--tree", "{file}", "--out", "{tmp}/o.h5ad"], "--tree '{file}' exists; pass --force"),
        (["--tol", -1, "--out", "{tmp}/o.h5ad"], "--tol must be a positive finite number"),
        (["--genes", 0, "--out", "{tmp}/o.h5ad"], "--genes must be an integer >= 2; got 0"),
        (["--model", "nbvcp", "--rank", 3, "--out", "{tmp}/o.h5ad"],
         "--rank does not apply to --model nbvcp"),
        (["--model", "lnm", "--tree-genes", 5, "--out", "{tmp}/o.h5ad"],
         "--tree-genes does not apply to --model lnm"),
        (["--model", "lnm", "--draws", 10**6, "--out", "{tmp}/o.h5ad"],
         "draws*cells*genes = 1000000*60*2000 exceeds 2e+08; allowed: draws <= 1666"),
        (["--model", "nbvcp", "--device", "cuda", "--out", "{tmp}/o.h5ad"],
         "device='cuda' is not available for nbvcp: its Laplace kernels run on the CPU only"),
    ],
    ids=["out-dir", "out-under-file", "out-exists", "tree-exists", "tol", "genes", "rank-nbvcp",
         "tree-genes-lnm", "tree-size", "cuda-nbvcp"],
)
def test_fit_errors_before_the_work(argv, message, slice_h5ad, tmp_path, capsys, monkeypatch):
    _no_fit(monkeypatch)
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    fmt = {"tmp": tmp_path, "file": existing}
    rc, out, err = run(["fit", slice_h5ad, *[str(a).format(**fmt) for a in argv], "--quiet"],
                       capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("scribe-stan: error: "), err
    assert message.format(**fmt) in err
    assert existing.read_text() == "keep me"
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.parametrize("command", ["hmc", "validate"])
@pytest.mark.parametrize("argv, message", [
    (["--out", "{file}"], "--out '{file}' is an existing file; give a directory"),
    (["--out", "{file}/sub"], "which is a file, not a directory"),
    (["--tol", 0], "--tol must be a positive finite number"),
    (["--model", "nbvcp", "--rank", 2], "--rank does not apply to --model nbvcp"),
], ids=["out-file", "out-under-file", "tol", "rank-nbvcp"])
def test_stan_commands_check_before_the_work(command, argv, message, slice_h5ad, tmp_path,
                                             capsys, monkeypatch):
    if command == "hmc" and "--tol" in argv:
        pytest.skip("hmc has no --tol")
    _no_fit(monkeypatch)
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me")
    argv = [str(a).format(file=existing) for a in argv]
    rc, out, err = run([command, slice_h5ad, *argv, "--quiet"], capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message.format(file=existing) in err, err
    assert existing.read_text() == "keep me"


def test_fit_force_overwrites(slice_h5ad, tmp_path, capsys):
    out = tmp_path / "o.h5ad"
    out.write_text("old")
    argv = ["fit", slice_h5ad, "--genes", 4, "--rank", 1, "--max-iter", 5, "--draws", 2,
            "--out", out, "--quiet"]
    assert run(argv, capsys)[0] == 2
    rc, stdout, err = run(argv + ["--force"], capsys)
    assert rc == 0, err
    assert ad.read_h5ad(out).n_obs == SLICE_CELLS
    assert run(argv + ["--force"], capsys)[0] == 0  # the tree is replaced as well


@pytest.mark.parametrize("names, message", [
    ("var", "var_names (gene names) must be unique; duplicated 1 name: 'A'"),
    ("obs", "obs_names (cell names) must be unique"),
])
def test_duplicate_names_exit_2(names, message, tmp_path, capsys):
    rng = np.random.default_rng(1)
    a = ad.AnnData(X=rng.poisson(3.0, size=(6, 4)).astype(np.float32) + 1)
    setattr(a, f"{names}_names", ["A", "B", "A", "C"] + (["D", "E"] if names == "obs" else []))
    path = tmp_path / "dup.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about the names too
        a.write_h5ad(path)
    rc, out, err = run(["fit", path, "--rank", 1, "--out", tmp_path / "o.h5ad", "--quiet"],
                       capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o.h5ad").exists()


def test_missing_cuda_and_cmdstan_exit_2(slice_h5ad, tmp_path, capsys, monkeypatch):
    from scribe_stan.laplace.device import cuda_status
    from scribe_stan.stan import _cmdstan_available

    _no_fit(monkeypatch)
    checked = 0
    if not cuda_status()[0]:
        rc, out, err = run(["fit", slice_h5ad, "--device", "cuda", "--out",
                            tmp_path / "o.h5ad", "--quiet"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "CUDA is unavailable" in err, err
        checked += 1
    if not _cmdstan_available():
        rc, out, err = run(["hmc", slice_h5ad, "--backend", "cmdstanpy", "--out",
                            tmp_path / "h", "--quiet"], capsys)
        assert rc == 2 and err.count("\n") == 1 and "needs a CmdStan installation" in err, err
        checked += 1
    if not checked:
        pytest.skip("both a GPU and CmdStan are present here")


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

TINY = ["--genes", 4, "--cells", 30, "--chains", 2, "--draws", 100, "--warmup", 100,
        "--quiet"]


@pytest.mark.slow
def test_hmc_command(tmp_path, capsys):
    outdir = tmp_path / "hmc"
    rc, out, err = run(["hmc", "pbmc_donor_a", "--model", "pln", "--rank", 1, *TINY,
                        "--out", outdir], capsys)
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
def test_hmc_command_without_warmup(backend, slice_h5ad, tmp_path, capsys):
    outdir = tmp_path / "hmc0"
    rc, out, err = run(["hmc", slice_h5ad, "--model", "pln", "--rank", 1, "--genes", 4,
                        "--cells", 30, "--chains", 1, "--draws", 20, "--warmup", 0,
                        "--backend", backend, "--quiet", "--out", outdir], capsys)
    assert rc == 0, err
    assert last_json(out)["chains"] == 1
    tree = xr.open_datatree(outdir / "hmc.tree.zarr", engine="zarr")
    assert tree["posterior"]["x"].shape == (1, 20, 30, 4)
    assert tree.attrs["backend"] == backend


@pytest.mark.slow
def test_validate_command(tmp_path, capsys):
    outdir = tmp_path / "val"
    argv = ["validate", "pbmc_donor_a", "--model", "pln", "--rank", 1, *TINY,
            "--laplace-draws", 200, "--out", outdir]
    rc, out, err = run([a for a in argv if a != "--quiet"], capsys)
    assert rc == 0, err
    # the tables go to stderr: stdout holds only the JSON line
    assert "Laplace vs conditional NUTS" in err and "mean_abs_smd" in err
    only_json(out)
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
    rank = [] if model == "nbvcp" else ["--rank", 1]
    rc, out, err = run(["validate", "pbmc_donor_a", "--model", model, *rank, *TINY,
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


@pytest.mark.slow
@pytest.mark.parametrize("command", ["hmc", "validate"])
@pytest.mark.parametrize("model", list(MODELS))
def test_stan_commands_every_model(command, model, slice_h5ad, tmp_path, capfd):
    """Every Stan command for every model: exit 0, one JSON line on stdout (checked at the
    file-descriptor level), and with --quiet none of Stan's build or sampling lines."""
    rank = [] if model == "nbvcp" else ["--rank", 1]
    extra = ["--laplace-draws", 50] if command == "validate" else []
    rc = cli.main([str(a) for a in [command, slice_h5ad, "--model", model, *rank, "--genes", 4,
                                    "--cells", 30, "--chains", 2, "--draws", 50,
                                    "--warmup", 50, *extra, "--out", tmp_path / "o",
                                    "--quiet"]])
    out, err = capfd.readouterr()
    assert rc == 0, err[-3000:]
    summary = only_json(out)
    assert summary["command"] == command and summary["model"] == model
    assert summary["cells"] == 30 and summary["genes"] == 4
    for line in ("Building", "Sampling", "Informational Message", "stanc"):
        assert line not in err, err[-3000:]
    log = tmp_path / "o" / ("stan.log" if command == "hmc" else "stan_full.log")
    assert "Building" in log.read_text()  # kept in a log file instead
