"""Public entry point :func:`fit`: validates what every model shares, then dispatches to
the model's spec (:mod:`scribe_stan.specs`), which checks its own options and fits.

Results are fits of :mod:`scribe_stan.fits` (one protocol); both methods' results turn
into one ArviZ DataTree shape (:mod:`scribe_stan.convert`), so they can be compared with
:func:`scribe_stan.compare`.
"""

from __future__ import annotations

import os
import warnings

from scribe_stan import _validate, specs, stan
from scribe_stan.fit_data import prepare
from scribe_stan.laplace.device import resolve_device
from scribe_stan.models import pln

DEVICES = ("cpu", "cuda", "auto")
DEFAULT_RANK = 10  # latent rank K when ``rank`` is not given (pln, nbln, lnm, lnmvcp)


def check_device(device, model, method="laplace"):
    """Check that the Laplace kernels of ``model`` can run on ``device`` here.

    Parameters
    ----------
    device : {"cpu", "cuda", "auto"}
    model : str
    method : {"laplace", "hmc"}
        HMC runs in Stan on the CPU; ``device`` is then not used.

    Raises
    ------
    ValueError
        Unknown ``device``, or ``"cuda"`` for a model whose kernels run on the CPU only
        (its spec lists no ``"cuda"``: nbvcp, lnm, lnmvcp; ``"auto"`` runs them on the
        CPU).
    RuntimeError
        ``"cuda"`` where numba-cuda or a GPU is missing
        (:func:`scribe_stan.laplace.device.resolve_device`).
    """
    _validate.check_choice("device", device, DEVICES)
    if method != "laplace" or device != "cuda":
        return
    spec = specs.get(model)
    if device not in spec.devices:
        raise ValueError(f"device='cuda' is not available for {model}: its Laplace kernels "
                         "run on the CPU only; allowed: 'cpu', 'auto'")
    resolve_device(device)


def fit(adata, *, model="pln", method="laplace", rank=None, layer=None, genes=None,
        library_size=None, M0=pln.M0_DEFAULT, sigma_M=pln.SIGMA_M_DEFAULT, seed=0,
        device="cpu", tol=1e-8, max_iter=1000, progress=True, backend="auto", chains=4, draws=1000, warmup=1000,
        adapt_delta=0.9, metric="diag_e", conditional_on=None, client=None, **options):
    """Fit a count model to an AnnData with the Laplace solver or Stan HMC.

    Parameters
    ----------
    adata : anndata.AnnData, or str / os.PathLike
        Cells x genes raw UMI counts in ``.X`` or ``.layers[layer]`` (dense or sparse).
        Never modified. All-zero genes are dropped with a warning. A path (an AnnData
        ``.zarr`` store or ``.h5ad`` file), or an AnnData opened backed, runs the chunked
        fit instead (see ``client``).
    model : str
        A registered model (:func:`scribe_stan.specs.names`): ``"pln"``, ``"nbln"``,
        ``"lnm"``, ``"lnmvcp"``, ``"nbvcp"``, and any model a spec registers.
    method : {"laplace", "hmc"}
    rank : int, optional
        Latent rank K, ``1 <= K < G`` (lnm, lnmvcp: ``K < G - 1``); default 10
        (:data:`DEFAULT_RANK`). nbvcp has no latent factors: a rank given for it is
        ignored with a ``UserWarning``.
    layer : str, optional
    genes : None, int or list of str
        Genes to model: all (default), the ``n`` highest-mean ones (``n >= 2``), or those
        names (at least 2, no repeats; a single string is rejected, not split into
        characters). Library sizes (capture prior) always use all genes of the cell.
    library_size : (N,) array of positive floats, optional
        Library sizes L_c for the capture prior, e.g. totals over a larger gene set than
        ``adata`` holds, or the design value of a simulation. Default: the counts of
        ``adata`` summed over all its genes.
    M0, sigma_M : float
        Capture prior: median total mRNA per cell and log-scale sd
        (defaults and sources in :mod:`scribe_stan.models.pln`).
    seed : int, >= 0
    device : {"cpu", "cuda", "auto"}
        Laplace kernels: CPU, CUDA (needs numba-cuda and a GPU), or CUDA when available
        (:func:`scribe_stan.laplace.device.resolve_device`).
    tol, max_iter : outer-optimizer tolerance (> 0) and iterations (>= 1) (Laplace).
    progress : bool
        Show a tqdm bar (Laplace) or the sampler's progress (HMC). With
        ``progress=False`` Stan's build and sampling messages are kept in
        ``fit.draws.messages`` instead of being printed.
    backend : {"auto", "cmdstanpy", "pystan"}
        Stan interface (HMC only: another value with ``method="laplace"`` is an error).
    chains, draws, warmup, adapt_delta : NUTS settings (HMC).
    metric : {"diag_e", "dense_e"}
        HMC: the Euclidean metric adapted in warmup (``"dense_e"`` needs
        ``backend="cmdstanpy"``; :func:`scribe_stan.stan.sample`).
    conditional_on : Laplace fit, optional
        HMC only: sample the per-cell latents with the globals fixed at this fit's
        values (``stan/pln_conditional.stan`` etc.; models whose spec has a conditional
        program), the exact target the Laplace step approximates. Genes and cells must
        match; ``rank`` is taken from the fit.
    client : ``dask.distributed.Client``, optional
        Fit pln / nbln by the chunked Laplace fit on this Dask cluster
        (:func:`scribe_stan.distributed.fit_distributed`): the workers read their own
        cells from the store ``adata`` names (a path, or a backed AnnData's file; an
        in-memory AnnData is refused: write it with
        :func:`scribe_stan.distributed.write_store` first) and keep each chunk's counts
        and modes across iterations; only the globals and sums travel. A store path
        without a client runs the same chunks in this process. Laplace on the CPU only;
        every gene is modelled and library sizes are the cells' totals (``genes``,
        ``library_size`` and ``device`` keep their defaults). Chunked-fit options
        (:data:`CHUNKED_OPTIONS`, passed on to ``fit_distributed``): ``modes``,
        ``counts``, ``chunk_cells``, ``out``, ``checkpoint``, ``checkpoint_every``,
        ``resume_from``, ``x_dtype``, ``em_iterations``, and ``loadings_prior``.
    **options
        Model-specific options, checked by the model's spec
        (:meth:`scribe_stan.specs.ModelSpec.check_options`): one that does not apply to
        ``model`` (or to ``method``) is an error naming the models it applies to. The
        built-in ones:

    reference_gene : None, str or int
        lnm/lnmvcp only: the ALR reference gene (name or column index); default
        :func:`scribe_stan.models.lnm.default_reference`.
    mode : {"full", "low_rank"}
        lnm/lnmvcp Laplace only: per-cell latent y in ALR coordinates (default) or
        factor scores with d = 0 (:mod:`scribe_stan.laplace.lnm_solver`).
    init_from : Laplace fit, optional
        pln/nbln HMC only: start each chain at this fit's MAP globals and its own draw
        of every cell's Laplace Gaussian (:func:`scribe_stan.nuts.laplace_inits`);
        same cells, genes, model and rank. Default: Stan's random starts.
    init_metric : {"unit", "laplace"}
        pln/nbln HMC with ``init_from``: the diagonal metric warmup starts from, Stan's
        unit metric (default) or the variances of the fit's nested Laplace draws on
        Stan's unconstrained scale (:func:`scribe_stan.nuts.laplace_metric`), so that a
        short warmup suffices. Needs ``backend="cmdstanpy"`` and ``metric="diag_e"``.
    loadings_prior : {"normal", "gaussian", "horseshoe", "neg"}
        pln/nbln prior on the loadings: iid normal (default) or a columnwise shrinkage
        prior on the gauge-invariant loadings for adaptive rank (fit with a generous
        ``rank``; unsupported columns shrink to ~0 and ``fit.effective_rank`` counts the
        rest). Definitions and sources: :mod:`scribe_stan.models.loadings`.
    informative_priors_from : nbvcp fit, optional
        nbln Laplace only: the cascade (:mod:`scribe_stan.cascade`). The nbvcp fit's
        (Laplace or HMC) posterior for the dispersions ``log r_g``, the log mean
        expression ``m_g`` (prior on nbln's ``mu_g + Sigma_gg / 2``) and the capture
        ``eta_c`` becomes Gaussian priors with sds widened by ``tau``; genes and cells
        are matched by name and must be the same sets.
    tau : float > 0
        Widening of the cascade's prior sds (default 1).
    freeze : iterable of str
        Cascade parameters held at the nbvcp posterior means instead (default
        ``("r", "eta")``); names ``r``, ``mu``, ``eta`` or the aliases ``dispersion``,
        ``expression``/``mean_expression``, ``capture_efficiency``. Naming one
        parameter twice is an error.

    Returns
    -------
    scribe_stan.fits.Fit
        Laplace: LaplaceFit (pln, nbln), NbvcpFit, LnmLaplaceFit; HMC: HmcFit,
        LnmHmcFit. All share the protocol of :mod:`scribe_stan.fits.base`. The chunked
        fit (a store or ``client``) returns a
        :class:`scribe_stan.distributed.DistributedFit`: the globals and summaries,
        with the per-cell outputs left in the store.

    Raises
    ------
    ValueError
        Unknown model, method, device or backend; a backend other than "auto" for the
        Laplace method; a model-specific option given for another model or method;
        ``conditional_on`` outside HMC or for a model without a conditional program;
        invalid counts or duplicated
        names (see :func:`scribe_stan._validate.counts_from_anndata`); rank, genes,
        tol, max_iter or seed out of range. All are checked before any fitting.
    TypeError
        ``adata`` is not an AnnData; ``rank``, ``genes``, ``max_iter`` or ``seed`` of
        the wrong type; an option no registered model knows.
    RuntimeError
        ``device="cuda"`` without a usable GPU, or ``backend="cmdstanpy"`` without
        CmdStan.
    """
    if client is not None or isinstance(adata, (str, os.PathLike)) or getattr(
            adata, "isbacked", False):
        return _fit_chunked(adata, client=client, model=model, method=method, rank=rank,
                            layer=layer, genes=genes, library_size=library_size, M0=M0,
                            sigma_M=sigma_M, seed=seed, device=device, tol=tol,
                            max_iter=max_iter, progress=progress,
                            conditional_on=conditional_on, options=options)
    spec = specs.get(model)
    _validate.check_choice("method", method, spec.methods)
    _validate.check_choice("backend", backend, stan.BACKENDS)
    _validate.check_positive_int("seed", seed, 0)
    if method == "hmc":
        stan.resolve_backend(backend)
        _validate.check_choice("metric", metric, stan.METRICS)
        if metric != "diag_e" and stan.resolve_backend(backend) != "cmdstanpy":
            raise ValueError(f"metric={metric!r} needs backend='cmdstanpy' (pystan adapts "
                             "a diagonal metric only); allowed with pystan: 'diag_e'")
    else:
        if backend != "auto":
            raise ValueError(f"backend={backend!r} applies to method='hmc' (the Stan "
                             "interface); method='laplace' runs the Numba solvers; allowed "
                             "with method='laplace': 'auto'")
        _validate.check_positive("tol", tol)
        _validate.check_positive_int("max_iter", max_iter)
    check_device(device, model, method)
    if conditional_on is not None and (method != "hmc" or spec.conditional_program is None):
        with_cond = [n for n in specs.names() if specs.get(n).conditional_program]
        raise ValueError(f"conditional_on applies to method='hmc' of the models "
                         f"{', '.join(with_cond)}; got model={model!r}, method={method!r}")
    options = spec.check_options(options, method)
    if not spec.latent_rank:
        if rank is not None:  # warn, not refuse: loops over models pass one
            warnings.warn(f"rank={rank!r} is ignored for model={model!r} (no latent "
                          "factors)", UserWarning, stacklevel=2)
        rank = None
    elif rank is None:
        rank = DEFAULT_RANK
    data = prepare(adata, layer, genes, M0, sigma_M, library_size)
    common = specs.Common(rank=rank, seed=int(seed), device=device, tol=tol,
                          max_iter=max_iter, progress=progress, backend=backend,
                          chains=chains, draws=draws, warmup=warmup, adapt_delta=adapt_delta,
                          conditional_on=conditional_on, metric=metric)
    settings = {"model": model, "method": method, "layer": layer, "M0": float(M0),
                "sigma_M": float(sigma_M), "seed": int(seed)}
    return spec.fit(data, method, common, options, settings)


#: Options of the chunked fit (``ss.fit(store, client=...)``), passed to
#: :func:`scribe_stan.distributed.fit_distributed`.
CHUNKED_OPTIONS = ("modes", "counts", "chunk_cells", "out", "checkpoint",
                   "checkpoint_every", "resume_from", "x_dtype", "em_iterations",
                   "loadings_prior")


def _fit_chunked(adata, *, client, model, method, rank, layer, genes, library_size, M0,
                 sigma_M, seed, device, tol, max_iter, progress, conditional_on, options):
    """:func:`fit` of a counts store by :func:`scribe_stan.distributed.fit_distributed`,
    after checking that what the caller asked for is what the chunked fit does."""
    import numpy as np

    from scribe_stan import distributed

    if isinstance(adata, (str, os.PathLike)):
        store = os.fspath(adata)
    elif getattr(adata, "isbacked", False):
        store = os.fspath(adata.filename)
    else:
        raise TypeError("client= needs the counts where the workers can read them: the path "
                        "of an AnnData .zarr store or .h5ad file, or an AnnData opened with "
                        "backed='r'; write an in-memory AnnData with "
                        "scribe_stan.distributed.write_store(adata, 'cells.zarr') first")
    _validate.check_choice("model", model, distributed.MODELS)
    _validate.check_choice("method", method, ("laplace",))
    _validate.check_choice("device", device, ("cpu",))
    _validate.check_positive_int("seed", seed, 0)
    for name, value in (("genes", genes), ("library_size", library_size),
                        ("conditional_on", conditional_on)):
        if value is not None:
            raise ValueError(f"{name}= does not apply to the chunked fit of a store (every "
                             "gene is modelled; library sizes are the cells' totals); "
                             f"allowed: {name}=None")
    unknown = sorted(set(options) - set(CHUNKED_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) for the chunked fit: {', '.join(unknown)}; "
                        f"allowed: {', '.join(CHUNKED_OPTIONS)}")
    from tqdm.auto import tqdm

    bar = tqdm(total=max_iter, desc=f"{model} Laplace (chunked)", unit="it",
               disable=not progress, leave=False)
    try:
        return distributed.fit_distributed(
            store, client=client, model=model,
            rank=DEFAULT_RANK if rank is None else rank,
            key="X" if layer is None else f"layers/{layer}", log_M0=float(np.log(M0)),
            sigma_M=sigma_M, tol=tol, max_iter=max_iter, seed=int(seed), progress=bar,
            **options)
    finally:
        bar.close()
