"""Choice of the kernel module (CPU or CUDA) for the Laplace solvers, in one place.

:func:`resolve_device` maps ``device="cpu" | "cuda" | "auto"`` to a module exporting
``newton_all``, ``laplace_value_grad``, ``sample_cells`` and ``log_density_cells`` with
identical signatures (:mod:`scribe_stan.laplace.cpu`, :mod:`scribe_stan.laplace.cuda`).
A fit on the CUDA module keeps its cells on the device in a
:class:`scribe_stan.laplace.cuda.DeviceCells` (the CPU fits use
:mod:`scribe_stan.laplace.batched`; :class:`scribe_stan.laplace.solver.LaplaceProblem`
picks one or the other).
The CUDA module is imported only when asked for, so the CPU path never needs numba-cuda.
The CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported) counts as
an available GPU, which is how the CUDA kernels are tested without one.
"""

from __future__ import annotations

import importlib
import logging

import numpy as np

DEVICES = ("cpu", "cuda", "auto")
DTYPES = ("float64", "float32")

_log = logging.getLogger(__name__)


def cuda_status():
    """Whether CUDA kernels can run here, and why not.

    Returns
    -------
    (ok, reason) : (bool, str)
        ``reason`` names the missing piece (numba-cuda not installed, no GPU/driver)
        or the kind of device found.
    """
    try:
        importlib.import_module("numba_cuda")
        from numba import cuda
    except ImportError as exc:
        return False, (f"the numba-cuda package is not installed or fails to import ({exc}); "
                       "pip install 'scribe-stan[cuda]' (or 'numba-cuda[cu13]')")
    from numba import config

    if config.ENABLE_CUDASIM:
        return True, "CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
    if not cuda.is_available():
        return False, "no CUDA GPU or driver found (numba.cuda.is_available() is False)"
    return True, f"CUDA device {cuda.get_current_device().name}"


def resolve_device(device):
    """Kernel module for ``device``.

    Parameters
    ----------
    device : {"cpu", "cuda", "auto"}
        ``"auto"`` picks CUDA when :func:`cuda_status` says it can run and the CPU
        otherwise (logged at INFO level).

    Returns
    -------
    module
        :mod:`scribe_stan.laplace.cpu` or :mod:`scribe_stan.laplace.cuda`.

    Raises
    ------
    ValueError
        Unknown ``device`` (the message lists the allowed values).
    RuntimeError
        ``device="cuda"`` where numba-cuda is missing or no GPU is present.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not one of {DEVICES}")
    if device == "cpu":
        from scribe_stan.laplace import cpu

        return cpu
    ok, reason = cuda_status()
    if ok:
        from scribe_stan.laplace import cuda

        return cuda
    if device == "cuda":
        raise RuntimeError(f"device='cuda' requested but CUDA is unavailable: {reason}. "
                           f"Use device='cpu' or 'auto' (allowed: {DEVICES}).")
    _log.info("device='auto': using the CPU kernels (%s)", reason)
    from scribe_stan.laplace import cpu

    return cpu


def check_dtype(kernels, dtype):
    """Validate the floating type for a kernel module; returns a numpy dtype.

    float32 is offered by the CUDA kernels only (the CPU kernels are float64).

    Raises
    ------
    ValueError
        ``dtype`` not in :data:`DTYPES`, or float32 with the CPU kernels.
    """
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {DTYPES}")
    if name == "float32" and not kernels.__name__.endswith(".cuda"):
        raise ValueError("dtype='float32' needs the CUDA kernels (device='cuda' or 'auto' "
                         "with a GPU); the CPU kernels compute in float64")
    return np.dtype(name)


def device_counts(kernels, counts, dtype="float64"):
    """Counts in the form ``kernels`` take, placed once per fit.

    CPU: a C-contiguous float64 ndarray. CUDA: a
    :class:`scribe_stan.laplace.cuda.DeviceCounts` on the GPU (CSR kept sparse).

    Parameters
    ----------
    kernels : module from :func:`resolve_device`
    counts : (N, G) ndarray or scipy.sparse matrix of counts (validated by the caller)
    dtype : {"float64", "float32"}, see :func:`check_dtype`
    """
    dtype = check_dtype(kernels, dtype)
    if hasattr(kernels, "to_device_counts"):
        return kernels.to_device_counts(counts, dtype)
    if hasattr(counts, "toarray"):
        counts = counts.toarray()
    return np.ascontiguousarray(counts, dtype=np.float64)
