"""Saving and loading fits: one open format for every model and method.

A fit is written as one xarray Dataset, to zarr (a directory; the default) or netCDF
(a ``.nc`` path, with the netCDF engine xarray finds). The layout is generic, so a new
fit class needs no code here:

- ``data__*``: the counts the fit modelled (CSR parts ``data__counts_data``,
  ``data__counts_indices``, ``data__counts_indptr``), ``data__log_lib``, and the cell
  and gene names;
- one variable per array of the fit's state, named by its path in the fit object with
  ``__`` between levels (e.g. ``solution__mu``, ``solution__modes__x``,
  ``draws__posterior__Sigma``); the solver problems are not stored whole: the arrays the
  fit class lists in ``_problem_state`` (per-cell modes, warm starts and priors) are, and
  the problem is rebuilt from the counts on load (``_build_problem``);
- the attribute ``scribe_stan_fit``: JSON with the fit class, the format version, the
  settings, package versions, the Stan program hash, and every non-array value of the
  state (scalars, strings, small dicts, the class of each nested dataclass).

Only classes of this package are re-created on load.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from scribe_stan.fit_data import FitData

FORMAT = "scribe-stan-fit"
FORMAT_VERSION = 1
_SEP = "__"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (pd.Index, tuple, set)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a fit's metadata")


def _class_path(obj):
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path):
    module, _, name = path.partition(":")
    if not module.startswith("scribe_stan."):
        raise ValueError(f"refusing to load class {path!r}: not a scribe_stan class")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def stan_hash(fit):
    """SHA-256 of the Stan program of a fit's model (None for a model without one)."""
    from scribe_stan import stan

    program = fit.settings.get("program", fit.model)
    if program is None:
        return None
    try:
        return stan.program_hash(program)
    except (FileNotFoundError, ValueError):
        return None


class _Encoder:
    """Walks a fit: arrays into ``arrays``, everything else into ``meta`` (JSON)."""

    def __init__(self, fit):
        self.fit = fit
        self.arrays = {}
        self.meta = {}

    def value(self, path, value, component):
        """Spec of one value; ``component`` is the fit's top-level field it lies in."""
        if isinstance(value, np.ndarray):
            self.arrays[path] = value
            return {"array": path}
        if dataclasses.is_dataclass(value):
            return self.dataclass(path, value, component)
        if isinstance(value, dict) and value and all(isinstance(v, np.ndarray)
                                                     for v in value.values()):
            return {"dict": {k: self.value(f"{path}{_SEP}{k}", v, component)
                             for k, v in value.items()}}
        if isinstance(value, tuple):
            return {"tuple": [self.value(f"{path}{_SEP}{i}", v, component)
                              for i, v in enumerate(value)]}
        if isinstance(value, list) and value and all(np.isscalar(v) for v in value):
            self.arrays[path] = np.asarray(value)
            return {"list": path}
        return {"json": json.loads(json.dumps(value, default=_json_default))}

    def dataclass(self, path, obj, component):
        fields = {}
        for f in dataclasses.fields(obj):
            if f.name.startswith("_") or f.name == "data":
                continue
            sub = f"{path}{_SEP}{f.name}" if path else f.name
            value = getattr(obj, f.name)
            if f.name == "problem":
                names = type(self.fit)._problem_state[component]
                fields[f.name] = {"problem": {n: self.value(f"{sub}{_SEP}{n}",
                                                            getattr(value, n), component)
                                              for n in names}}
            else:
                fields[f.name] = self.value(sub, value, component or f.name)
        return {"dataclass": _class_path(obj), "fields": fields}


class _Decoder:
    def __init__(self, cls, arrays, data, settings):
        self.cls, self.arrays, self.data, self.settings = cls, arrays, data, settings

    def value(self, spec, component, built):
        (kind, arg), = spec.items()
        if kind == "array":
            return np.array(self.arrays[arg])
        if kind == "list":
            return np.asarray(self.arrays[arg]).tolist()
        if kind == "json":
            return arg
        if kind == "tuple":
            return tuple(self.value(v, component, built) for v in arg)
        if kind == "dict":
            return {k: self.value(v, component, built) for k, v in arg.items()}
        if kind == "dataclass":
            raise ValueError("nested dataclass without its fields")
        raise ValueError(f"unknown entry {kind!r} in a saved fit")

    def dataclass(self, spec, component, top=False):
        cls = _import_class(spec["dataclass"])
        kwargs = {}
        problem_state = None
        for name, sub in spec["fields"].items():
            comp = name if top else component
            if "problem" in sub:
                problem_state = {k: self.value(v, comp, kwargs)
                                 for k, v in sub["problem"].items()}
            elif "dataclass" in sub:
                kwargs[name] = self.dataclass(sub, comp)
            else:
                kwargs[name] = self.value(sub, comp, kwargs)
        if problem_state is not None:
            problem = self.cls._build_problem(component, self.data, self.settings, kwargs,
                                              problem_state)
            for name, value in problem_state.items():
                _set_state(problem, name, value)
            kwargs["problem"] = problem
        if top:
            kwargs.update(data=self.data, settings=self.settings)
        return cls(**kwargs)


def _set_state(problem, name, value):
    """Set a problem's attribute, in place where views of it exist (chunks of cells)."""
    current = getattr(problem, name, None)
    if (isinstance(current, np.ndarray) and isinstance(value, np.ndarray)
            and current.shape == value.shape):
        current[...] = value
    else:
        setattr(problem, name, value)


def _versions():
    """Versions of this package and of the libraries its Laplace solvers run on."""
    import numba
    import scipy

    import scribe_stan

    return {"scribe_stan": scribe_stan.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "numba": numba.__version__}


def _dims(name, arr):
    return tuple(f"{name}{_SEP}d{i}" for i in range(np.ndim(arr)))


def _to_dataset(fit):
    import xarray as xr

    enc = _Encoder(fit)
    tree = enc.dataclass("", fit, None)
    tree["fields"].pop("settings")
    data = fit.data
    csr = sparse.csr_matrix(data.counts)
    arrays = {f"data{_SEP}counts_data": csr.data.astype(np.int64),
              f"data{_SEP}counts_indices": csr.indices.astype(np.int64),
              f"data{_SEP}counts_indptr": csr.indptr.astype(np.int64),
              f"data{_SEP}log_lib": np.asarray(data.log_lib, dtype=np.float64),
              f"data{_SEP}obs_names": np.asarray(data.obs_names, dtype=str),
              f"data{_SEP}var_names": np.asarray(data.var_names, dtype=str)}
    for path, arr in enc.arrays.items():
        arrays[path] = arr.astype(np.int8) if arr.dtype == bool else arr
    bools = sorted(p for p, a in enc.arrays.items() if a.dtype == bool)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": _class_path(fit),
            "model": fit.model, "method": fit.method, "settings": fit.settings,
            "data": {"shape": list(data.counts.shape), "log_M0": data.log_M0,
                     "sigma_M": data.sigma_M},
            "state": tree, "bool_arrays": bools, "stan_hash": stan_hash(fit),
            "versions": _versions()}
    ds = xr.Dataset({k: (_dims(k, v), v) for k, v in arrays.items()})
    ds.attrs["scribe_stan_fit"] = json.dumps(meta, default=_json_default)
    return ds


def save_fit(fit, path):
    """Write ``fit`` to ``path`` (see the module docstring); :meth:`Fit.save` calls this.

    Raises
    ------
    ValueError
        ``path`` exists, or is a netCDF path and no netCDF engine is installed.
    """
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; a fit is never written over an existing path "
                         "(remove it or choose another)")
    ds = _to_dataset(fit)
    if path.suffix == ".nc":
        try:
            ds.to_netcdf(path)
        except ValueError as exc:
            raise ValueError(f"cannot write netCDF {path}: {exc}; give a .zarr path "
                             "instead") from exc
        return
    with warnings.catch_warnings():  # zarr 3 notes consolidated metadata is an extension
        warnings.simplefilter("ignore")
        ds.to_zarr(path, mode="w-")


def load_fit(path):
    """Load a fit written by ``fit.save(path)``.

    Parameters
    ----------
    path : str or path-like, a zarr directory or a ``.nc`` file.

    Returns
    -------
    Fit
        Of the saved class, with the same globals, per-cell modes (or draws), settings
        and data: ``to_datatree`` gives the same draws as the saved fit did. Laplace fits
        made on a GPU are re-created with the CPU kernels.

    Raises
    ------
    FileNotFoundError
        No such path.
    ValueError
        The path holds no scribe-stan fit, or a format version this package cannot read.
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no saved fit at {path}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = (xr.open_dataset(path) if path.suffix == ".nc"
              else xr.open_zarr(path, consolidated=None))
    raw = ds.attrs.get("scribe_stan_fit")
    if raw is None:
        raise ValueError(f"{path} holds no scribe-stan fit (attribute 'scribe_stan_fit' "
                         "missing)")
    meta = json.loads(raw)
    if meta.get("format") != FORMAT or meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported fit format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}; this package reads "
                         f"{FORMAT!r} up to version {FORMAT_VERSION}")
    arrays = {k: ds[k].values for k in ds.data_vars}
    for k in meta["bool_arrays"]:
        arrays[k] = arrays[k].astype(bool)
    N, G = meta["data"]["shape"]
    counts = sparse.csr_matrix((arrays[f"data{_SEP}counts_data"],
                                arrays[f"data{_SEP}counts_indices"],
                                arrays[f"data{_SEP}counts_indptr"]), shape=(N, G)).toarray()
    data = FitData(counts=np.ascontiguousarray(counts, dtype=np.int64),
                   log_lib=arrays[f"data{_SEP}log_lib"],
                   obs_names=pd.Index(arrays[f"data{_SEP}obs_names"].astype(str)),
                   var_names=pd.Index(arrays[f"data{_SEP}var_names"].astype(str)),
                   log_M0=float(meta["data"]["log_M0"]), sigma_M=float(meta["data"]["sigma_M"]))
    cls = _import_class(meta["class"])
    return _Decoder(cls, arrays, data, meta["settings"]).dataclass(meta["state"], None,
                                                                     top=True)
