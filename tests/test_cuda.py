"""CUDA kernels against the CPU kernels (simulator), PTX compilation, device selection.

No GPU is needed. Two kinds of check run in subprocesses, because numba reads
``NUMBA_ENABLE_CUDASIM`` once, when it is first imported: setting it in this process
would turn every later ``numba.cuda`` use of the test session into the simulator (and
it cannot be turned off again). So this file is also a script:

* ``python tests/test_cuda.py sim CASE`` runs every kernel of
  :mod:`scribe_stan.laplace.cuda` under the simulator and the same call of
  :mod:`scribe_stan.laplace.cpu`, and prints the max relative differences as JSON;
* ``python tests/test_cuda.py resident CASE`` runs outer evaluations of a
  ``LaplaceProblem`` on the device (simulator) and on the CPU's batched path, and
  prints their differences and the device's host <-> device traffic;
* ``python tests/test_cuda.py ptx`` compiles every kernel for a real GPU (sm_90) with
  explicit signatures and the simulator off, so code the simulator tolerates but the
  CUDA compiler rejects fails here.

The tests below start those subprocesses and assert on what they print.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: float64 CUDA vs CPU: same algorithm, different summation order.
RTOL64 = 1e-10
#: float32 storage (sums in float64) vs the float64 CPU kernels, relative to each
#: array's largest entry. Measured on "nb-dense-float32" (Newton tol 1e-6 on both): modes
#: 7e-8, values 2e-7, log density 1e-7, gradients 1.4e-6; bounds leave a factor ~10.
RTOL32 = {"x": 1e-6, "eta": 1e-6, "value": 2e-6, "grad": 2e-5, "log_density": 2e-6}

# name: (N, G, K, NB dispersions?, CSR?, dtype)
CASES = {
    "pln-dense": (3, 10, 2, False, False, "float64"),
    "nb-csr": (3, 10, 2, True, True, "float64"),
    "pln-csr-rank5": (3, 11, 5, False, True, "float64"),  # two 4 x 4 tile rows of M
    "nb-dense-float32": (3, 10, 2, True, False, "float32"),
}


# ---------------------------------------------------------------- subprocess side


def _inputs(N, G, K, nb, seed=1):
    from scribe_stan.laplace.solver import pair_products, shared_factor
    from scribe_stan.models import pln

    sim = pln.simulate(N, G, K, seed=seed, lib_target=80.0)
    rng = np.random.default_rng(seed)
    u = sim["counts"].astype(float)
    u[:, 0] = 0.0  # an all-zero gene: only its rate terms exist (CSR has no entry)
    mu = sim["mu"] + 0.2 * rng.standard_normal(G)
    W, d = sim["W"], sim["d"]
    inv_r = np.where(np.arange(G) % 3 == 0, 0.0, 0.4) if nb else np.zeros(G)
    a = pln.capture_prior_mean(sim["log_lib"], sim["log_M0"])
    sigma = rng.uniform(0.4, 1.0, N)
    x0 = np.log(u + 0.5) + np.maximum(a, 0.0)[:, None]
    return dict(u=u, a=a, sigma=sigma, mu=mu, W=W, d=d, inv_r=inv_r, WW=pair_products(W),
                Lc=shared_factor(W, d), x0=x0, eta0=np.maximum(a, 0.0), rng=rng)


def _rel(ref, got):
    ref, got = np.asarray(ref, float), np.asarray(got, float)
    scale = max(np.max(np.abs(ref)), 1e-300)
    return float(np.max(np.abs(ref - got)) / scale)


def _sim_case(name):
    """Run every kernel on CPU and CUDA (simulator) for one case; max relative diffs."""
    from scipy import sparse

    from scribe_stan.laplace import cpu
    from scribe_stan.laplace import cuda as gpu

    N, G, K, nb, csr, dtype = CASES[name]
    p = _inputs(N, G, K, nb)
    counts = gpu.to_device_counts(sparse.csr_matrix(p["u"]) if csr else p["u"], dtype)
    tol = 1e-12 if dtype == "float64" else 1e-6
    glob = (p["mu"], p["W"], p["d"], p["inv_r"], p["WW"], p["Lc"])
    out = {}
    for fix in (False, True):
        tag = "fixed" if fix else "free"
        xc, ec = p["x0"].copy(), p["eta0"].copy()
        xg, eg = p["x0"].copy(), p["eta0"].copy()
        rc = cpu.newton_all(p["u"], p["a"], p["sigma"], *glob, xc, ec, fix, tol, 100, 2)
        rg = gpu.newton_all(counts, p["a"], p["sigma"], *glob, xg, eg, fix, tol, 100, 2)
        out[f"newton_{tag}_x"] = _rel(xc, xg)
        out[f"newton_{tag}_eta"] = _rel(ec, eg)
        out[f"newton_{tag}_flags_equal"] = all(np.array_equal(r, s) for r, s in zip(rc[1:], rg[1:]))
        out[f"newton_{tag}_converged"] = bool(rc[1].all() and rg[1].all())
        out[f"newton_{tag}_iter_diff"] = int(np.max(np.abs(rc[0] - rg[0])))
        # value and gradient at the CPU modes, so they test the kernel, not Newton
        const = np.linspace(-3.0, 1.0, N)
        vc = cpu.laplace_value_grad(p["u"], const, p["a"], p["sigma"], *glob, xc, ec, fix, True,
                                    2)
        vg = gpu.laplace_value_grad(counts, const, p["a"], p["sigma"], *glob, xc, ec, fix, True,
                                    2)
        out[f"value_{tag}"] = _rel(vc[0], vg[0])
        for k, nm in enumerate(("g_mu", "g_W", "g_d", "g_log_r")[: len(vc) - 1], start=1):
            if np.any(vc[k]):
                out[f"grad_{tag}_{nm}"] = _rel(vc[k], vg[k])
    out["log_density"] = _rel(
        cpu.log_density_cells(p["u"], p["a"], p["sigma"], p["mu"], p["W"], p["d"], p["inv_r"],
                              p["Lc"], xc, ec),
        gpu.log_density_cells(counts, p["a"], p["sigma"], p["mu"], p["W"], p["d"], p["inv_r"],
                              p["Lc"], xc, ec))
    if dtype == "float64":
        out.update(_sample_diffs(p, counts, glob, xc, ec))
    return out


def _sample_diffs(p, counts, glob, x, eta):
    from scribe_stan.laplace import cpu
    from scribe_stan.laplace import cuda as gpu

    N, G = p["u"].shape
    K = p["W"].shape[1]
    S, genes = 2, np.array([0, 3, G - 1])
    rng = p["rng"]
    eps = (rng.standard_normal((S, N, G)), rng.standard_normal((S, N, K)),
           rng.standard_normal((S, N)))
    const, lgam = np.linspace(-2.0, 0.0, N), np.linspace(-1.0, -0.5, N)

    def outs():
        return [np.empty((S, N, genes.size))] + [np.empty((S, N)) for _ in range(4)]

    oc, og = outs(), outs()
    cpu.sample_cells(p["u"], const, lgam, p["a"], p["sigma"], *glob, x, eta, genes, *eps, *oc)
    gpu.sample_cells(counts, const, lgam, p["a"], p["sigma"], *glob, x, eta, genes, *eps, *og)
    names = ("x", "eta", "loglik", "lp", "lp_approx")
    return {f"sample_{n}": _rel(c, g) for n, c, g in zip(names, oc, og)}


def _ptx_all():
    """PTX sizes of every kernel for sm_90, both dtypes (raises on a compile error)."""
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    # compile_ptx takes the target cc for the kernel, but the device functions it calls
    # ask the current device for theirs, and there is none: give them the same target.
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    from scribe_stan.laplace import cuda as gpu

    sizes = {}
    for dtype in ("float64", "float32"):
        for name, (kernel, sig) in gpu.kernel_signatures(dtype).items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
            assert ".target sm_90" in ptx
            sizes[f"{dtype}-{name}"] = len(ptx)
    return sizes


#: name: (NB dispersions?, eta held?, CSR?) of the resident-state cases
RESIDENT = {"pln-free-csr": (False, False, True), "nb-held-dense": (True, True, False)}


def _resident_case(name):
    """Evaluations of one LaplaceProblem on the device against the CPU's batched path.

    Two outer evaluations at different globals (the second warm-started), then
    keep/restore and a third with 3 Newton iterations per call, so cells fail and are
    restarted from the data-driven start. Reports the largest relative differences of
    values, gradients and modes, whether the device arrays of the cells are the same
    objects throughout, and the host <-> device traffic of the second evaluation.
    """
    from scipy import sparse

    from scribe_stan.laplace import cuda as gpu
    from scribe_stan.laplace.solver import LaplaceProblem

    nb, held, csr = RESIDENT[name]
    N, G, K = 6, 8, 2  # N > K + 3: a mode array outweighs every reduction that comes back
    p = _inputs(N, G, K, nb, seed=4)
    counts = sparse.csr_matrix(p["u"]) if csr else p["u"]
    log_r = np.log(2.5) + 0.3 * p["rng"].standard_normal(G) if nb else None
    eta = np.maximum(p["a"], 0.0) + 0.1 if held else None
    kw = {"log_lib": np.log(p["u"].sum(axis=1)), "newton_tol": 1e-12}
    P = {dev: LaplaceProblem(counts, device=dev, chunk_cells=4, **kw) for dev in ("cpu", "cuda")}
    dc = P["cuda"]._device
    resident = (dc.x, dc.eta, dc.n_iter, dc.converged, dc.at_bound, dc.counts.data)
    steps = [(p["mu"], p["W"], p["d"]),
             (p["mu"] + 0.05, p["W"] * 1.1, p["d"] * 0.9)]
    out = {}
    for i, (mu, W, d) in enumerate(steps):
        if i == 1:
            gpu.reset_transfers()
        res = {dev: prob.log_marginal(mu, W, d, log_r=log_r, eta=eta, grad=True)
               for dev, prob in P.items()}
        if i == 1:
            out["transfers"] = dict(gpu.TRANSFERS)
        for k, (c, g) in enumerate(zip(res["cpu"], res["cuda"])):
            out[f"eval{i}_out{k}"] = _rel(c, g)
        P["cuda"].sync_modes()
        for key in ("x", "eta"):
            out[f"eval{i}_{key}"] = _rel(getattr(P["cpu"], key), getattr(P["cuda"], key))
        out[f"eval{i}_converged"] = bool(P["cpu"].converged.all() and P["cuda"].converged.all())
        out[f"eval{i}_iter_diff"] = int(np.abs(P["cpu"].n_iter - P["cuda"].n_iter).max())
    mu, W, d = steps[1]
    gpu.reset_transfers()
    stats = {dev: prob.em_statistics(mu, W, d, log_r=log_r, eta=eta) for dev, prob in P.items()}
    out["em_transfers"] = dict(gpu.TRANSFERS)
    for key, val in stats["cpu"].items():
        out[f"em_{key}"] = _rel(val, stats["cuda"][key])
    for prob in P.values():
        prob.keep_modes()
    P["cuda"].max_newton = P["cpu"].max_newton = 3
    for prob in P.values():
        prob.log_marginal(p["mu"] - 0.3, p["W"], p["d"] * 2.0, log_r=log_r, eta=eta)
    out["restarted"] = int((~P["cpu"].converged).sum())
    for prob in P.values():
        prob.restore_modes()
        prob.sync_modes()
    out["restored_x"] = _rel(P["cpu"].x, P["cuda"].x)
    for prob in P.values():
        prob.max_newton = 3
        prob.modes(p["mu"] - 0.3, p["W"], p["d"] * 2.0, log_r=log_r, eta=eta)
    for key in ("x", "eta"):
        out[f"short_{key}"] = _rel(getattr(P["cpu"], key), getattr(P["cuda"], key))
    out["short_flags_equal"] = all(np.array_equal(getattr(P["cpu"], k), getattr(P["cuda"], k))
                                   for k in ("n_iter", "converged", "at_bound"))
    out["same_device_arrays"] = all(a is b for a, b in zip(
        resident, (dc.x, dc.eta, dc.n_iter, dc.converged, dc.at_bound, dc.counts.data)))
    out["shape"] = [N, G, K]
    return out


def _fit_case():
    """A few outer iterations of fit_laplace on both devices from the same start.

    One Laplace-EM iteration (the EM statistics' parity has its own test), so the slow
    simulator runs a few evaluations only.
    """
    from scribe_stan.laplace.solver import fit_laplace
    from scribe_stan.models import pln

    sim = pln.simulate(4, 6, 1, seed=3, lib_target=200.0, sigma_M=0.5)
    fits = {dev: fit_laplace(sim["counts"], 1, log_lib=sim["log_lib"], sigma_M=0.5,
                             max_iter=3, em_iterations=1, device=dev) for dev in ("cpu", "cuda")}
    cpu_fit, gpu_fit = fits["cpu"], fits["cuda"]
    return {"objective": _rel(cpu_fit.objective, gpu_fit.objective),
            "mu": _rel(cpu_fit.mu, gpu_fit.mu), "W": _rel(cpu_fit.W, gpu_fit.W),
            "iterations_equal": cpu_fit.n_iter == gpu_fit.n_iter}


# ---------------------------------------------------------------- pytest side


def _run(args, simulator):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if simulator:
        env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][5] == "float64"])
def test_simulator_float64_matches_cpu(case):
    diffs = _run(["sim", case], simulator=True)
    for key, val in diffs.items():
        if key.endswith("flags_equal") or key.endswith("converged"):
            assert val is True, key
        elif key.endswith("iter_diff"):
            assert val == 0, key
        else:
            assert val <= RTOL64, (key, val)
    assert "grad_free_g_W" in diffs and "sample_lp_approx" in diffs
    if CASES[case][3]:
        assert "grad_free_g_log_r" in diffs


def test_simulator_float32_accuracy():
    diffs = _run(["sim", "nb-dense-float32"], simulator=True)
    assert diffs["newton_free_converged"] and diffs["newton_fixed_converged"]
    for key, val in diffs.items():
        if key.startswith("newton_") and key.endswith(("_x", "_eta")):
            assert val <= RTOL32[key.rsplit("_", 1)[1]], (key, val)
        elif key.startswith("value_"):
            assert val <= RTOL32["value"], (key, val)
        elif key.startswith("grad_"):
            assert val <= RTOL32["grad"], (key, val)
        elif key == "log_density":
            assert val <= RTOL32["log_density"], (key, val)
    # float32 is not float64: the comparison is informative only if it shows rounding
    assert diffs["value_free"] > 1e-12


def test_simulator_fit_laplace_matches_cpu():
    # the solver end to end on the device: counts placed once, kernels through
    # resolve_device; three outer iterations from the same start on both devices
    diffs = _run(["fit"], simulator=True)
    assert diffs.pop("iterations_equal") is True
    for key, val in diffs.items():
        assert val <= 1e-8, (key, val)


@pytest.mark.parametrize("case", list(RESIDENT))
def test_simulator_modes_stay_on_device(case):
    # a LaplaceProblem on the device against the CPU's batched path, evaluation by
    # evaluation; the cells' device arrays are allocated once and never copied
    diffs = _run(["resident", case], simulator=True)
    N, G, K = diffs.pop("shape")
    t = diffs.pop("transfers")
    t_em = diffs.pop("em_transfers")
    assert diffs.pop("same_device_arrays") is True
    assert diffs.pop("short_flags_equal") is True
    assert diffs.pop("restarted") > 0  # the short Newton left cells to restart
    for i in range(2):
        assert diffs.pop(f"eval{i}_converged") is True
        # same rule from the same start; a decrement at the tolerance may round either way
        assert diffs.pop(f"eval{i}_iter_diff") <= 1
    for key, val in diffs.items():
        assert val <= RTOL64, (key, val)
    # second evaluation: the globals go in (mu, W', d, 1/d, inv_r, Lc for each of the
    # Newton and value/gradient launches; a held eta and the per-cell constants are
    # unchanged, so not sent again) and only reductions come back: the converged flags,
    # the per-cell values and the (K + 3, G) gradient sums; never x or eta
    globals_bytes = 8 * (4 * G + K * G + K * K)
    assert t["to_device"] == 12 and t["to_device_bytes"] == 2 * globals_bytes, t
    assert t["to_host"] == 3 and t["to_host_bytes"] == N + 8 * N + 8 * (K + 3) * G, t
    assert max(t["to_device_max"], t["to_host_max"]) < 8 * N * G
    # EM statistics at the same globals (modes already there): Newton's globals, the
    # statistics' mu, W', d, inv_r, (Sigma^{-1} W)' in; flags and two sums out
    assert t_em["to_device_bytes"] == globals_bytes + 8 * (3 * G + 2 * K * G), t_em
    assert t_em["to_host_bytes"] == N + 8 * (K + 2) * G + 8 * K, t_em


def test_kernels_compile_for_sm90_without_gpu():
    sizes = _run(["ptx"], simulator=False)
    assert len(sizes) == 14 and min(sizes.values()) > 0


def test_resolve_device_names_and_fallback(caplog):
    from scribe_stan.laplace import cpu
    from scribe_stan.laplace.device import check_dtype, cuda_status, resolve_device

    assert resolve_device("cpu") is cpu
    with pytest.raises(ValueError, match=r"device='gpu' is not one of \('cpu', 'cuda', 'auto'\)"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="float32.*CUDA"):
        check_dtype(cpu, "float32")
    with pytest.raises(ValueError, match="float16"):
        check_dtype(cpu, "float16")
    if cuda_status()[0]:
        pytest.skip("a CUDA device is present: the no-GPU errors cannot be checked here")
    with pytest.raises(RuntimeError, match="device='cuda' requested but CUDA is unavailable"):
        resolve_device("cuda")
    with caplog.at_level(logging.INFO, logger="scribe_stan.laplace.device"):
        assert resolve_device("auto") is cpu
    assert "using the CPU kernels" in caplog.text


def test_simulator_counts_as_available():
    code = ("from scribe_stan.laplace.device import resolve_device; "
            "print(resolve_device('cuda').__name__)")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.stdout.strip() == "scribe_stan.laplace.cuda", proc.stderr[-2000:]


if __name__ == "__main__":
    if sys.argv[1] == "sim":
        print(json.dumps(_sim_case(sys.argv[2])))
    elif sys.argv[1] == "resident":
        print(json.dumps(_resident_case(sys.argv[2])))
    elif sys.argv[1] == "fit":
        print(json.dumps(_fit_case()))
    elif sys.argv[1] == "ptx":
        print(json.dumps(_ptx_all()))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}; use 'sim CASE', 'resident CASE', "
                         "'fit' or 'ptx'")
