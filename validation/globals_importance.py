"""Experiment: can importance weights correct the globals' Gaussian (nested Laplace)?

For each pair, draws the globals from their Laplace Gaussian
(:meth:`scribe_stan.fits.LaplaceFit.globals_posterior`), evaluates the Laplace marginal
``log p(theta) + sum_c log p_hat(u_c | theta)`` at each draw (every cell's Newton run to
convergence, :func:`scribe_stan.laplace.nested.nested_draws` with ``values=True``) and
prints JSON: the importance weights' effective sample size (Kish's, 1 / sum w^2 with
normalized weights), the sd of the log weights, and the median sd ratio of the Sigma entries against the
stored NUTS reference, unweighted and weighted. This is INLA's correction of a Gaussian
over the hyperparameters (Rue, Martino & Chopin 2009, doi:10.1111/j.1467-9868.2008.00700.x);
it is usable only where the weights keep a useful effective sample size. With log
weights of sd sigma (roughly Gaussian) that is about draws * exp(-sigma^2).

    python validation/globals_importance.py pbmc20-pln grn-pln --draws 400
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import xarray as xr

import scribe_stan as ss
from scribe_stan.laplace.nested import nested_draws

sys.path.insert(0, str(Path(__file__).resolve().parent))
import references


def probe(pair, draws, seed):
    """Importance diagnostics of one pln/nbln pair's globals Gaussian (a JSON-able dict)."""
    adata, fit_args, _, _ = references.load_data(pair)
    fit = ss.fit(adata, method="laplace", progress=False, **fit_args)
    out = nested_draws(fit.solution, fit.globals_posterior(), draws,
                       np.random.default_rng(seed), values=True)
    log_w = out["log_prior"] + out["laplace"].sum(axis=1) - out["log_q"]
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    Sigma = (np.einsum("sgk,shk->sgh", out["W"], out["W"])
             + out["d"][:, :, None] * np.eye(out["d"].shape[1]))
    weighted_mean = np.einsum("s,sgh->gh", w, Sigma)
    sd = {"unweighted": Sigma.std(axis=0),
          "weighted": np.sqrt(np.einsum("s,sgh->gh", w, (Sigma - weighted_mean) ** 2))}
    ref = xr.open_dataset(references.ROOT / pair / "draws.nc")["Sigma"].values
    ref_sd = ref.reshape(-1, *ref.shape[-2:]).std(axis=0)
    upper = np.triu_indices(ref_sd.shape[0])
    return {"pair": pair, "draws": draws, "importance_ess": float(1.0 / np.sum(w**2)),
            "log_weight_sd": float(log_w.std()),
            **{f"sigma_sd_ratio_{k}": float(np.median(v[upper] / ref_sd[upper]))
               for k, v in sd.items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", help="pln/nbln pairs of validation/references.py")
    p.add_argument("--draws", type=int, default=400)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    for pair in args.pairs:
        if references.check_pair(pair)[1] not in ("pln", "nbln"):
            raise ValueError(f"{pair}: pln and nbln pairs only")
    for pair in args.pairs:
        print(json.dumps(probe(pair, args.draws, args.seed)), flush=True)


if __name__ == "__main__":
    main()
