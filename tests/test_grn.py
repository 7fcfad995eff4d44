"""GRN simulator: Lyapunov solution, stationarity, stability check, channels."""

import numpy as np
import pytest

from scribe_stan import grn


def _network(G=12, seed=3):
    rng = np.random.default_rng(seed)
    return grn.random_network(G, n_regulators=2, density=0.6, rng=rng)


def test_sigma_solves_the_lyapunov_equation():
    J, D, _ = _network()
    Sigma = grn.lyapunov_covariance(J, D)
    residual = J @ Sigma + Sigma @ J.T + 2 * D
    assert np.linalg.norm(residual) <= 1e-10 * np.linalg.norm(2 * D)
    np.testing.assert_allclose(Sigma, Sigma.T)
    assert np.linalg.eigvalsh(Sigma).min() > 0


def test_sigma_is_the_covariance_of_the_ou_process():
    """Euler-Maruyama path of dx = J x dt + B dW, B = sqrt(2 D): independent of SciPy."""
    J, D, _ = _network(G=4, seed=5)
    Sigma = grn.lyapunov_covariance(J, D)
    rng = np.random.default_rng(0)
    dt, n_paths, n_steps = 0.01, 4000, 1500  # t = 15 >> 1 / min decay rate
    B = np.linalg.cholesky(2 * D)
    x = np.zeros((n_paths, 4))
    for _ in range(n_steps):
        x = x + dt * x @ J.T + np.sqrt(dt) * rng.standard_normal((n_paths, 4)) @ B.T
    emp = np.cov(x.T)
    # Euler discretisation bias is O(dt) relative; Monte Carlo sd of a covariance
    # entry ~ sqrt((S_ii S_jj + S_ij^2) / n)
    se = np.sqrt((np.outer(np.diag(Sigma), np.diag(Sigma)) + Sigma**2) / n_paths)
    assert np.all(np.abs(emp - Sigma) <= 4 * se + 0.02 * np.abs(Sigma).max())


def test_sampled_covariance_converges_to_sigma():
    adata, truth = grn.simulate_grn(20000, 8, model="pln", seed=2)
    Sigma = truth["Sigma"]
    emp = np.cov(truth["x"].T)
    se = np.sqrt((np.outer(np.diag(Sigma), np.diag(Sigma)) + Sigma**2) / 20000)
    assert np.all(np.abs(emp - Sigma) <= 4.5 * se)
    np.testing.assert_allclose(truth["x"].mean(0), truth["mu"], atol=4.5 * np.sqrt(
        np.diag(Sigma).max() / 20000))


def test_unstable_jacobian_is_rejected():
    J = np.array([[-1.0, 3.0], [3.0, -1.0]])  # eigenvalues 2 and -4
    with pytest.raises(ValueError, match="not stable"):
        grn.check_stable(J)
    with pytest.raises(ValueError, match="not stable"):
        grn.lyapunov_covariance(J, np.eye(2))
    with pytest.raises(ValueError, match="no stable network"):
        # negative degradation (growth) makes every draw unstable
        grn.random_network(6, n_regulators=2, density=0.5, rng=np.random.default_rng(0),
                           degradation_range=(-1.0, -0.5), max_tries=3)


def test_low_rank_approximation_keeps_the_top_eigenspace():
    J, D, _ = _network()
    Sigma = grn.lyapunov_covariance(J, D)
    W, d = grn.low_rank_approximation(Sigma, 2)
    np.testing.assert_allclose(np.diag(W @ W.T) + d, np.diag(Sigma))
    vals = np.sort(np.linalg.eigvalsh(Sigma))[::-1]
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(W @ W.T))[::-1][:2], vals[:2])


@pytest.mark.parametrize("model", grn.MODELS)
def test_channels_return_counts_and_truth(model):
    adata, truth = grn.simulate_grn(60, 6, model=model, seed=4)
    assert adata.shape == (60, 6) and adata.X.dtype == np.int64 and (adata.X >= 0).all()
    assert truth["W"].shape == (6, 2) and truth["x"].shape == (60, 6)
    if model in ("lnm", "lnmvcp"):
        assert truth["y"].shape == (60, 5)
        np.testing.assert_allclose(truth["y"][:, 0], truth["x"][:, 1] - truth["x"][:, 0])
    if model in ("nbln", "nbvcp"):
        assert truth["r"].shape == (6,)
    assert (truth["eta"] is None) == (model == "lnm")


def test_same_seed_same_data_and_bad_model():
    a1, _ = grn.simulate_grn(10, 5, seed=9)
    a2, _ = grn.simulate_grn(10, 5, seed=9)
    np.testing.assert_array_equal(a1.X, a2.X)
    with pytest.raises(ValueError, match="allowed: pln, nbln"):
        grn.simulate_grn(10, 5, model="poisson")
