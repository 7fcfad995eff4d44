"""The narrow boundary to Stan: one call for both backends.

Backends
--------
``cmdstanpy``
    Used when a CmdStan installation is found (:func:`cmdstanpy.cmdstan_path` does not
    raise). The resolved program (all ``#include`` lines expanded) is written to
    ``<cache>/cmdstan/<key>/<name>.stan`` and compiled once; later calls reuse the
    executable.
``pystan``
    The embedded backend: the httpstan wheel carries stanc, the Stan headers and a
    C++ toolchain driver, so it needs nothing beyond the package index and a C++
    compiler. httpstan caches compiled models under a name that also hashes the path
    of the Python executable, so ``.venv/bin/python`` and ``.venv/bin/python3`` (the
    console scripts) would each build the same program. Every build is therefore also
    kept in ``<cache>/pystan/<key>/`` and copied into httpstan's cache for any other
    interpreter path before httpstan looks for it.

The build cache: ``<cache>`` is ``~/.cache/scribe-stan`` (``SCRIBE_STAN_CACHE``
overrides it); ``<key>`` hashes only the resolved program text and the versions that
make a build: httpstan (which fixes Stan and stanc) and the Python extension ABI for
pystan, the CmdStan version for cmdstanpy (:func:`build_key`). One process builds a
given key at a time (a lock file beside it); another waits and then takes the build.

Optimization level of pystan builds: ``SCRIBE_STAN_OPT`` (one of :data:`OPT_LEVELS`,
default ``"3"``, httpstan's own ``-O3``). A lower level builds faster and samples more
slowly; the test suite uses ``"1"`` (``tests/conftest.py``), where builds dominate and
the sampling runs are short. A non-default level is part of the build key and is named
in the program text httpstan sees, so each level has its own httpstan model directory
and a test run never removes the module of a validation run sampling at ``-O3``.

Output: with ``progress=False`` nothing is printed. pystan's build and sampling lines,
stanc's warnings and Stan's informational messages (and cmdstanpy's log) are captured
into :attr:`StanDraws.messages`; with ``progress=True`` they are shown on stderr (and
captured as well). Stan never writes to stdout, which stays free for machine-readable
output.

Both backends receive the same resolved program code (pystan cannot resolve
``#include`` itself), the same JSON-compatible data dict, and return the same
:class:`StanDraws` shapes: every array in ``posterior`` and ``sample_stats`` has
leading dims ``(chain, draw)`` followed by the variable's Stan shape in Stan's natural
(row-major) order, e.g. ``x`` -> ``(chain, draw, N, G)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "BACKENDS",
    "STAN_DIR",
    "StanDraws",
    "build_key",
    "data_variables",
    "fixed_param",
    "log_prob",
    "program_code",
    "program_hash",
    "resolve_backend",
    "sample",
]

#: Allowed values of ``backend=``.
BACKENDS = ("auto", "cmdstanpy", "pystan")

#: Allowed values of ``SCRIBE_STAN_OPT``, the C++ optimization level of pystan builds.
OPT_LEVELS = ("0", "1", "2", "3")

#: Directory holding the Stan programs (``<name>.stan``) and ``functions/``.
STAN_DIR = Path(__file__).resolve().parent.parent / "stan"

#: Sampler diagnostics: our name -> (pystan / CmdStan column name, dtype).
_SAMPLE_STATS = {
    "lp": ("lp__", np.float64),
    "acceptance_rate": ("accept_stat__", np.float64),
    "step_size": ("stepsize__", np.float64),
    "tree_depth": ("treedepth__", np.int64),
    "n_steps": ("n_leapfrog__", np.int64),
    "diverging": ("divergent__", np.bool_),
    "energy": ("energy__", np.float64),
}

#: Significant digits of CmdStan's CSV output: its default, 6, rounds draws and log
#: densities (``lp`` to 0.01); 18 (the most CmdStan allows) is more than the 17 that
#: give every double back exactly.
_SIG_FIGS = 18

_INCLUDE_RE = re.compile(r"^[ \t]*#include[ \t]+[<\"]?([^\s<>\"]+)[>\"]?[ \t]*$", re.M)


# --------------------------------------------------------------------------------------
# Programs
# --------------------------------------------------------------------------------------


def _program_path(name: str) -> Path:
    stem = name[:-5] if name.endswith(".stan") else name
    path = STAN_DIR / f"{stem}.stan"
    if not path.is_file():
        available = sorted(p.stem for p in STAN_DIR.glob("*.stan"))
        raise ValueError(
            f"unknown Stan program {name!r}; available programs in {STAN_DIR}: "
            f"{', '.join(available) or '(none)'}"
        )
    return path


def _resolve_includes(path: Path, stack: tuple[Path, ...]) -> str:
    if path in stack:
        chain = " -> ".join(str(p.name) for p in (*stack, path))
        raise ValueError(f"recursive #include in Stan program: {chain}")
    text = path.read_text()

    def expand(match: re.Match) -> str:
        target = match.group(1)
        for base in (path.parent, STAN_DIR):
            candidate = (base / target).resolve()
            if candidate.is_file():
                return _resolve_includes(candidate, (*stack, path)).rstrip("\n")
        raise FileNotFoundError(
            f"#include {target!r} in {path} not found relative to {path.parent} or {STAN_DIR}"
        )

    return _INCLUDE_RE.sub(expand, text)


def program_code(name: str) -> str:
    """Stan program code with every ``#include`` line expanded (recursively).

    Includes are looked up relative to the including file, then to :data:`STAN_DIR`.
    Both backends compile exactly this text.

    Parameters
    ----------
    name : str
        Program name, e.g. ``"pln"`` for ``stan/pln.stan`` (a ``.stan`` suffix is
        accepted).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Unknown program name (the message lists the available programs) or a
        recursive include.
    FileNotFoundError
        An included file does not exist.
    """
    return _resolve_includes(_program_path(name).resolve(), ())


def program_hash(name: str) -> str:
    """SHA-256 hex digest of :func:`program_code` ``(name)``."""
    return hashlib.sha256(program_code(name).encode()).hexdigest()


def _block(code: str, block: str) -> str:
    """Body of a top-level program block (``data``, ``parameters``, ...)."""
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    code = re.sub(r"//[^\n]*", "", code)
    match = re.search(rf"(?m)^\s*{re.escape(block)}\s*\{{", code)
    if match is None:
        return ""
    depth, start = 1, match.end()
    for i in range(start, len(code)):
        if code[i] == "{":
            depth += 1
        elif code[i] == "}":
            depth -= 1
            if depth == 0:
                return code[start:i]
    raise ValueError(f"unbalanced braces in the {block} block")


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets/parentheses/angle brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _declarations(block_text: str) -> dict[str, dict[str, Any]]:
    """Top-level variable declarations of a block: name -> {type, dims}.

    ``dims`` are the size expressions (strings) in Stan's order: array dims first,
    then vector/matrix dims, e.g. ``array[N, G] int`` -> ``("N", "G")`` and
    ``matrix[G, K]`` -> ``("G", "K")``.
    """
    out: dict[str, dict[str, Any]] = {}
    depth = 0
    stmt: list[str] = []
    for ch in block_text:
        if ch == "{":
            depth += 1
            continue
        if ch == "}":
            depth -= 1
            continue
        if depth:
            continue
        if ch == ";":
            _parse_declaration("".join(stmt).strip(), out)
            stmt = []
        else:
            stmt.append(ch)
    return out


_DECL_RE = re.compile(
    r"^(?:array\s*\[(?P<adims>[^\]]*)\]\s*)?"
    r"(?P<type>int|real|complex|vector|row_vector|matrix|simplex|cholesky_factor_cov|"
    r"cholesky_factor_corr|cov_matrix|corr_matrix|ordered|positive_ordered|"
    r"sum_to_zero_vector|unit_vector)\b\s*"
    r"(?P<rest>.*)$",
    re.S,
)


def _parse_declaration(stmt: str, out: dict) -> None:
    stmt = " ".join(stmt.split())
    match = _DECL_RE.match(stmt)
    if match is None:
        return  # a statement, not a declaration
    rest = match.group("rest")
    if rest.startswith("<"):  # bounds / offset / multiplier
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "<"
            depth -= ch == ">"
            if depth == 0:
                rest = rest[i + 1:].strip()
                break
    tdims: list[str] = []
    if rest.startswith("["):
        close = rest.index("]")
        tdims = _split_top(rest[1:close], ",")
        rest = rest[close + 1:].strip()
    name_match = re.match(r"(\w+)\s*(?:=\s*(?P<init>.*))?", rest, re.S)
    if name_match is None:
        return
    adims = _split_top(match.group("adims"), ",") if match.group("adims") else []
    out[name_match.group(1)] = {"type": match.group("type"), "dims": tuple(adims + tdims),
                                "init": name_match.group("init")}


def data_variables(name: str) -> dict[str, tuple[str, ...]]:
    """Variables of a program's ``data`` block and their size expressions.

    Parameters
    ----------
    name : str
        Program name, e.g. ``"pln"``.

    Returns
    -------
    dict of str to tuple of str
        In declaration order, e.g. ``{"N": (), ..., "counts": ("N", "G"), ...}``.
    """
    decls = _declarations(_block(program_code(name), "data"))
    return {k: v["dims"] for k, v in decls.items()}


_OUTPUT_BLOCKS = ("parameters", "transformed parameters", "generated quantities")


def _output_names(code: str) -> list[str]:
    """Every variable a run reports, in Stan's order (the blocks' declaration order)."""
    return [var for block in _OUTPUT_BLOCKS for var in _declarations(_block(code, block))]


_SIZE_TOKEN_RE = re.compile(r"\s*(\d+|[A-Za-z_]\w*|&&|\|\||==|!=|<=|>=|%/%|[-+*/%<>!?:()])")

# Binary operators of Stan integer expressions: symbol -> (precedence, function).
_SIZE_BINARY = {
    "||": (1, lambda a, b: int(bool(a) or bool(b))),
    "&&": (2, lambda a, b: int(bool(a) and bool(b))),
    "==": (3, lambda a, b: int(a == b)), "!=": (3, lambda a, b: int(a != b)),
    "<": (4, lambda a, b: int(a < b)), "<=": (4, lambda a, b: int(a <= b)),
    ">": (4, lambda a, b: int(a > b)), ">=": (4, lambda a, b: int(a >= b)),
    "+": (5, lambda a, b: a + b), "-": (5, lambda a, b: a - b),
    "*": (6, lambda a, b: a * b),
    # Stan's (C++'s) integer division and modulus truncate towards zero
    "/": (6, lambda a, b: int(a / b)), "%/%": (6, lambda a, b: int(a / b)),
    "%": (6, lambda a, b: a - b * int(a / b)),
}


def _eval_size(expr: str, lookup) -> int:
    """Value of a Stan integer size expression (literals, names, arithmetic, comparisons,
    ``&&``, ``||``, ``!`` and ``? :``); ``lookup(name)`` gives a name's value.

    Raises
    ------
    ValueError
        ``expr`` uses anything else (e.g. a function call).
    """
    tokens, pos = [], 0
    while pos < len(expr.rstrip()):
        match = _SIZE_TOKEN_RE.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot evaluate the Stan size expression {expr!r}")
        tokens.append(match.group(1))
        pos = match.end()
    tokens.append("")
    at = 0

    def take(expected=None):
        nonlocal at
        token = tokens[at]
        if expected is not None and token != expected:
            raise ValueError(f"cannot evaluate the Stan size expression {expr!r}")
        at += 1
        return token

    def operand():
        token = take()
        if token == "(":
            value = ternary()
            take(")")
            return value
        if token == "-":
            return -operand()
        if token == "!":
            return int(not operand())
        if token.isdigit():
            return int(token)
        if re.fullmatch(r"[A-Za-z_]\w*", token) and tokens[at] != "(":
            return lookup(token)
        raise ValueError(f"cannot evaluate the Stan size expression {expr!r}")

    def binary(min_prec):
        left = operand()
        while tokens[at] in _SIZE_BINARY and _SIZE_BINARY[tokens[at]][0] >= min_prec:
            prec, func = _SIZE_BINARY[take()]
            left = func(left, binary(prec + 1))
        return left

    def ternary():
        cond = binary(1)
        if tokens[at] != "?":
            return cond
        take("?")
        if_true = ternary()
        take(":")
        if_false = ternary()
        return if_true if cond else if_false

    value = ternary()
    take("")
    return value


def _declared_shape(code: str, name: str, data: Mapping[str, Any]) -> tuple[int, ...]:
    """Stan shape of output variable ``name`` from its declared sizes and the data.

    Sizes may use data variables and ``int`` transformed data defined from them.
    """
    transformed = _declarations(_block(code, "transformed data"))

    def lookup(var: str) -> int:
        if var in data and np.ndim(data[var]) == 0:
            return int(data[var])
        info = transformed.get(var)
        if info is not None and info["type"] == "int" and not info["dims"] and info["init"]:
            return _eval_size(info["init"], lookup)
        raise ValueError(f"size {var!r} of Stan variable {name!r} is neither integer data "
                         f"nor integer transformed data defined from it")

    for block in _OUTPUT_BLOCKS:
        info = _declarations(_block(code, block)).get(name)
        if info is not None:
            return tuple(_eval_size(expr, lookup) for expr in info["dims"])
    raise ValueError(f"{name!r} is not an output variable of the program")


def _int_outputs(code: str) -> set[str]:
    """Names of int-valued transformed parameters / generated quantities."""
    names = set()
    for block in ("transformed parameters", "generated quantities"):
        for var, info in _declarations(_block(code, block)).items():
            if info["type"] == "int":
                names.add(var)
    return names


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


def _cmdstan_available() -> bool:
    try:
        import cmdstanpy

        cmdstanpy.cmdstan_path()
    except Exception:
        return False
    return True


def resolve_backend(backend: str = "auto") -> str:
    """Pick the Stan interface.

    Parameters
    ----------
    backend : {"auto", "cmdstanpy", "pystan"}
        ``"auto"`` gives ``"cmdstanpy"`` when a CmdStan installation is found and
        ``"pystan"`` otherwise.

    Returns
    -------
    str
        ``"cmdstanpy"`` or ``"pystan"``.

    Raises
    ------
    ValueError
        ``backend`` is not one of :data:`BACKENDS`.
    RuntimeError
        ``"cmdstanpy"`` was asked for but no CmdStan installation was found.
    """
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown Stan backend {backend!r}; allowed values: "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    if backend == "pystan":
        return "pystan"
    if backend == "cmdstanpy":
        if not _cmdstan_available():
            raise RuntimeError(
                "backend='cmdstanpy' needs a CmdStan installation, and none was found "
                "(cmdstanpy.cmdstan_path() failed; set CMDSTAN or run "
                "cmdstanpy.install_cmdstan()). Use backend='pystan' or 'auto' instead."
            )
        return "cmdstanpy"
    return "cmdstanpy" if _cmdstan_available() else "pystan"


def _json_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """Data dict as plain JSON-compatible Python values (lists, ints, floats).

    The one place where NumPy inputs are converted for both backends.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        arr = np.asarray(value)
        if arr.dtype == np.bool_:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iuf":
            raise TypeError(f"Stan data {key!r} must be numeric, got dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"Stan data {key!r} contains NaN or infinite values")
        out[key] = arr.tolist()
    return out


def _check_data(name: str, data: Mapping[str, Any]) -> None:
    missing = [k for k in data_variables(name) if k not in data]
    if missing:
        raise ValueError(
            f"data for Stan program {name!r} lacks {', '.join(missing)} "
            f"(expected {', '.join(data_variables(name))})"
        )


def _ensure_event_loop_ok() -> None:
    """pystan calls asyncio.run(); under Jupyter a loop is already running."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    import nest_asyncio

    nest_asyncio.apply()


def _versions(backend: str, model=None) -> dict[str, str]:
    """Versions of scribe_stan, numpy, the Stan interface and Stan.

    For cmdstanpy, ``model`` is the compiled :class:`cmdstanpy.CmdStanModel`: the Stan
    version is the one its executable was built with (``exe_info()``), which need not
    be CmdStan's own release number (``cmdstan``, read from CmdStan's makefile).
    """
    import scribe_stan

    versions = {"scribe_stan": scribe_stan.__version__, "numpy": np.__version__}
    if backend == "pystan":
        import httpstan
        import stan

        versions["pystan"] = stan.__version__
        versions["httpstan"] = httpstan.__version__
        header = Path(httpstan.__file__).parent / "include" / "stan" / "version.hpp"
        try:
            text = header.read_text()
            parts = [re.search(rf"#define STAN_{k} (\d+)", text).group(1)
                     for k in ("MAJOR", "MINOR", "PATCH")]
            versions["stan"] = ".".join(parts)
        except (OSError, AttributeError):
            pass
    else:
        import cmdstanpy

        versions["cmdstanpy"] = cmdstanpy.__version__
        ver = cmdstanpy.cmdstan_version()
        if ver is not None:
            versions["cmdstan"] = ".".join(str(v) for v in ver)
        info = model.exe_info()
        parts = [info.get(f"stan_version_{k}") for k in ("major", "minor", "patch")]
        if all(parts):
            versions["stan"] = ".".join(parts)
    return versions


def _cache_root() -> Path:
    return Path(os.environ.get("SCRIBE_STAN_CACHE", "~/.cache/scribe-stan")).expanduser()


def _opt_level() -> str:
    """The ``SCRIBE_STAN_OPT`` optimization level for pystan builds (module docstring)."""
    level = os.environ.get("SCRIBE_STAN_OPT", "3")
    if level not in OPT_LEVELS:
        raise ValueError(f"SCRIBE_STAN_OPT={level!r} is not an optimization level; allowed: "
                         f"{', '.join(OPT_LEVELS)}")
    return level


def _build_versions(backend: str) -> str:
    """What, besides the program text, decides a build (no interpreter path).

    For pystan this includes httpstan's installation directory: a built model links
    the TBB library found there, so a build is shared by every interpreter of one
    environment (``python``, ``python3``) but never copied into another environment,
    where it would fail to load once the first environment is gone. For cmdstanpy it
    includes the CmdStan directory for the same reason (executables link its TBB), and
    because two installations of one CmdStan release may hold different Stan headers.
    """
    if backend == "pystan":
        import httpstan

        where = Path(httpstan.__file__).resolve().parent
        opt = "" if _opt_level() == "3" else f" -O{_opt_level()}"  # -O3 keys unchanged
        return f"httpstan {httpstan.__version__} {EXTENSION_SUFFIXES[0]} {where}{opt}"
    import cmdstanpy

    return f"cmdstan {cmdstanpy.cmdstan_version()} {Path(cmdstanpy.cmdstan_path()).resolve()}"


def build_key(name: str, backend: str) -> str:
    """Key of a program's build in the cache (see the module docstring).

    Parameters
    ----------
    name : str
        Program name, e.g. ``"pln"``.
    backend : {"pystan", "cmdstanpy"}

    Returns
    -------
    str
        SHA-256 hex digest of the resolved program code (:func:`program_code`) and the
        versions that make the build (httpstan version, its installation directory,
        the Python extension ABI and a non-default ``SCRIBE_STAN_OPT``, or the CmdStan
        version and directory). The Python executable's path is not part of it.
    """
    text = program_code(name) + "\n// " + _build_versions(backend)
    return hashlib.sha256(text.encode()).hexdigest()


def _has_module(directory: Path) -> bool:
    return directory.is_dir() and any(p.suffix in EXTENSION_SUFFIXES
                                      for p in directory.iterdir())


def _copy_build(src: Path, dst: Path) -> None:
    """Copy a built httpstan model (extension module and build logs) to a new ``dst``."""
    tmp = dst.with_name(f"{dst.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.suffix in EXTENSION_SUFFIXES or path.name in ("stanc.log", "stderr.log"):
            shutil.copy2(path, tmp / path.name)
    try:
        tmp.rename(dst)
    except OSError:  # another process got there first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _no_build_timeout():
    """Lift aiohttp's default 5-minute request limit while pystan builds a program.

    pystan asks its in-process httpstan server to build through an aiohttp session
    created with aiohttp's default timeout; a C++ build on a busy 2-core machine can
    take longer, and the build then fails with a bare ``TimeoutError``.
    """
    import aiohttp.client

    saved = aiohttp.client.DEFAULT_TIMEOUT
    aiohttp.client.DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None,
                                                           sock_connect=saved.sock_connect)
    try:
        yield
    finally:
        aiohttp.client.DEFAULT_TIMEOUT = saved


@contextlib.contextmanager
def _build_lock(key_dir: Path):
    """Hold the lock of one build key (a file beside its directory) while building."""
    key_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{key_dir}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _build_flags(level: str):
    """Have httpstan compile with ``-O<level>`` while pystan builds a program.

    httpstan's server builds through ``httpstan.models.build_services_extension_module``
    with its default flags (``-O3 -std=c++17 -Wno-sign-compare``); its optional
    ``extra_compile_args`` is the only place to set another level.
    """
    import httpstan.models

    saved = httpstan.models.build_services_extension_module
    if level == "3":
        yield
        return

    async def build(program_code, extra_compile_args=None):
        return await saved(program_code, extra_compile_args=[f"-O{level}", "-std=c++17",
                                                             "-Wno-sign-compare"])

    httpstan.models.build_services_extension_module = build
    try:
        yield
    finally:
        httpstan.models.build_services_extension_module = saved


@contextlib.contextmanager
def _compiler_stderr():
    """Send what the compiler writes to file descriptor 2 on to ``sys.stderr``.

    httpstan silences the compiler only when ``sys.stderr`` has a file descriptor; under
    :func:`_stan_output` it is a buffer, and the compiler's warnings would reach the
    terminal. They go to the buffer (and on to the terminal only with ``progress``).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            sys.stderr.write(caught.read().decode(errors="replace"))


#: File in httpstan's model directory naming the build key its module was made for.
_KEY_FILE = "scribe_stan_build_key"


def _pystan_build(name: str) -> None:
    """Make sure httpstan's cache holds this interpreter's build of a program.

    From the shared cache when it has the build, else by compiling it (through pystan's
    in-process httpstan server, as ``stan.build`` does) and keeping a copy there.
    Raises RuntimeError with httpstan's message if the build fails.
    """
    import httpstan.cache
    import httpstan.models
    import stan.common

    _ensure_event_loop_ok()
    code = _pystan_code(name)
    key = build_key(name, "pystan")
    ours = httpstan.cache.model_directory(httpstan.models.calculate_model_name(code))
    shared = _cache_root() / "pystan" / key
    with _build_lock(shared):
        # httpstan's directory is keyed by the program text (which names a non-default
        # level) and interpreter only: a module made for another key is replaced.
        made_for = ours / _KEY_FILE
        if made_for.is_file():
            stale = made_for.read_text() != key
        else:  # built before keys were recorded, or by pystan directly: httpstan's -O3
            stale = _opt_level() != "3"
        if stale or not _has_module(ours):
            shutil.rmtree(ours, ignore_errors=True)  # also a failed build's leftovers
            if _has_module(shared):
                _copy_build(shared, ours)

        async def build():
            async with stan.common.HttpstanClient() as client:
                resp = await client.post("/models", json={"program_code": code})
                if resp.status != 201:
                    raise RuntimeError(f"building {name}.stan failed: "
                                       f"{resp.json()['message']}")

        with _no_build_timeout(), _build_flags(_opt_level()), _compiler_stderr():
            asyncio.run(build())
        (ours / _KEY_FILE).write_text(key)
        if not _has_module(shared):
            _copy_build(ours, shared)


def _pystan_code(name: str) -> str:
    """Program text handed to httpstan: a non-default ``SCRIBE_STAN_OPT`` is named in a
    closing comment, so that each level has its own httpstan model directory (keyed by
    the text). With one directory, a build at another level would delete the modules,
    and the fits, of a sampler running at the first."""
    level = _opt_level()
    return program_code(name) + ("" if level == "3" else f"\n// built with -O{level}\n")


def _pystan_model(name: str, data: Mapping[str, Any], seed: int):
    import stan

    _pystan_build(name)
    with _no_build_timeout():
        return stan.build(_pystan_code(name), data=_json_data(data), random_seed=int(seed))


def _cmdstanpy_model(name: str):
    import cmdstanpy

    stem = _program_path(name).stem
    directory = _cache_root() / "cmdstan" / build_key(name, "cmdstanpy")
    directory.mkdir(parents=True, exist_ok=True)
    stan_file = directory / f"{stem}.stan"
    code = program_code(name)
    if not stan_file.is_file() or stan_file.read_text() != code:
        stan_file.write_text(code)
    # cmdstanpy compiles only when the executable is missing or older than the file.
    return cmdstanpy.CmdStanModel(stan_file=str(stan_file))


class _Tee(io.TextIOBase):
    """A text stream writing to several streams."""

    def __init__(self, *streams):
        self._streams = streams

    def write(self, text):
        for stream in self._streams:
            stream.write(text)
        return len(text)

    def flush(self):
        for stream in self._streams:
            stream.flush()


@contextlib.contextmanager
def _stan_output(progress: bool):
    """Capture everything pystan and cmdstanpy print; also show it on stderr if
    ``progress``. Yields the buffer that receives it.

    pystan writes its "Building..." line to stdout and the rest (stanc warnings,
    sampling progress, Stan's informational messages) to stderr; cmdstanpy logs
    through :mod:`logging`. Nothing reaches stdout.
    """
    buffer = io.StringIO()
    sink = _Tee(buffer, sys.stderr) if progress else buffer
    logger = logging.getLogger("cmdstanpy")
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [logging.StreamHandler(sink)], False
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield buffer
    finally:
        logger.handlers, logger.propagate = saved


def _pystan_posterior(fit, int_names: set[str]) -> tuple[dict, dict]:
    """(chain, draw, *shape) arrays from a pystan Fit."""
    n_chains = fit.num_chains
    # fit[name] has shape (*shape, draws * chains) with flat index draw * chains + chain.
    # Draws per chain from lp__: a zero-size parameter (e.g. tau without a shrinkage
    # prior) cannot infer the draw axis with reshape(..., -1, ...).
    n_draws = np.asarray(fit["lp__"]).size // n_chains
    posterior = {}
    for pname, dims in zip(fit.param_names, fit.dims):
        dims = [int(v) for v in dims]
        flat = np.asarray(fit[pname])
        arr = flat.reshape(*dims, n_draws, n_chains)
        arr = np.moveaxis(arr, (-1, -2), (0, 1))
        posterior[pname] = arr.astype(np.int64) if pname in int_names else np.array(arr)
    stats = {}
    for ours, (theirs, dtype) in _SAMPLE_STATS.items():
        if theirs in fit.sample_and_sampler_param_names:
            arr = np.asarray(fit[theirs]).reshape(-1, n_chains).T
            stats[ours] = arr.astype(dtype)
    return posterior, stats


def _cmdstanpy_posterior(fit, n_chains: int, code: str, data: Mapping[str, Any],
                         int_names: set[str]) -> tuple[dict, dict]:
    """(chain, draw, *shape) arrays from a cmdstanpy CmdStanMCMC.

    CmdStan's CSV has no column for a zero-size variable (e.g. ``tau`` without a
    shrinkage prior), so cmdstanpy does not know it; it is added here, in its declared
    place and with its declared shape, as pystan reports it.
    """
    method_vars = fit.method_variables()  # name -> (draws, chains[, 1])
    n_draws = np.asarray(method_vars["lp__"]).shape[0]
    present = fit.metadata.stan_vars
    names = _output_names(code)
    posterior = {}
    for pname in names + [v for v in present if v not in names]:
        if pname in present:
            arr = np.asarray(fit.stan_variable(pname))  # (chains * draws, *shape), chain-major
            arr = arr.reshape(n_chains, n_draws, *arr.shape[1:])
        else:
            shape = _declared_shape(code, pname, data)
            if np.prod(shape) != 0:
                raise RuntimeError(f"CmdStan reported no values of {pname!r}, declared "
                                   f"with shape {shape}")
            arr = np.empty((n_chains, n_draws, *shape))
        posterior[pname] = arr.astype(np.int64) if pname in int_names else np.array(arr)
    stats = {}
    for ours, (theirs, dtype) in _SAMPLE_STATS.items():
        if theirs in method_vars:
            arr = np.asarray(method_vars[theirs])
            stats[ours] = arr.reshape(arr.shape[0], arr.shape[1]).T.astype(dtype)
    return posterior, stats


# --------------------------------------------------------------------------------------
# Public calls
# --------------------------------------------------------------------------------------


@dataclass
class StanDraws:
    """Draws of one Stan run, identical in shape for both backends.

    Attributes
    ----------
    posterior : dict of str to ndarray
        Every parameter, transformed parameter and generated quantity of the program,
        each shaped ``(chain, draw, *stan_shape)`` (e.g. ``x``: ``(chain, draw, N, G)``,
        ``y_rep``: int64 ``(chain, draw, N, G)``). The raw sampled coordinates (e.g.
        pln: ``theta_z``, ``theta_e``, ``eta_q``; nbvcp: ``m_free``, ``eta_level``,
        ``eta_dev``) are included as well. Loadings ``W`` are sampled unconstrained and are identified
        only up to rotation (``W -> W R``): diagnose and compare ``Sigma``,
        correlations or per-cell latents, not ``W``.
    sample_stats : dict of str to ndarray
        ``(chain, draw)`` arrays ``lp`` (log density incl. Jacobian), ``diverging``
        (bool), ``tree_depth`` (int), ``n_steps`` (int, leapfrog steps), ``energy``,
        ``step_size``, ``acceptance_rate``.
    backend : str
        ``"pystan"`` or ``"cmdstanpy"``.
    program : str
        Program name, e.g. ``"pln"``.
    stan_hash : str
        SHA-256 of the resolved program code.
    seed : int
    versions : dict of str to str
        Versions of scribe_stan, numpy, the Stan interface and Stan.
    wall_time_s : float
        Wall time of sampling (excluding the build).
    config : dict
        Sampler settings (chains, draws, warmup, adapt_delta, max_depth) and the
        build wall time ``build_time_s``.
    messages : str
        Everything the Stan interface printed while building and sampling (build
        lines, stanc warnings, Stan's informational messages), shown on stderr only
        with ``progress=True``.
    """

    posterior: dict[str, np.ndarray]
    sample_stats: dict[str, np.ndarray]
    backend: str
    program: str
    stan_hash: str
    seed: int
    versions: dict[str, str]
    wall_time_s: float
    config: dict[str, Any] = field(default_factory=dict)
    messages: str = ""

    @property
    def num_chains(self) -> int:
        return int(next(iter(self.sample_stats.values())).shape[0])

    @property
    def num_draws(self) -> int:
        return int(next(iter(self.sample_stats.values())).shape[1])


#: Euclidean metrics :func:`sample` accepts ("dense_e": CmdStan only).
METRICS = ("diag_e", "dense_e")


def sample(
    name: str,
    data: Mapping[str, Any],
    *,
    backend: str = "auto",
    chains: int = 4,
    draws: int = 1000,
    warmup: int = 1000,
    seed: int = 0,
    adapt_delta: float = 0.8,
    max_depth: int = 10,
    progress: bool = False,
    inits: Mapping[str, Any] | list[Mapping[str, Any]] | None = None,
    metric: str = "diag_e",
    inv_metric: np.ndarray | None = None,
) -> StanDraws:
    """Run Stan's NUTS sampler (adapted Euclidean metric) on a program.

    Parameters
    ----------
    name : str
        Program in :data:`STAN_DIR`, e.g. ``"pln"`` or ``"pln_conditional"``.
    data : mapping
        The program's data (NumPy arrays or Python values), e.g. from
        :func:`scribe_stan.models.pln.stan_data`. Its keys must cover the program's
        data block.
    backend : {"auto", "cmdstanpy", "pystan"}
        See :func:`resolve_backend`.
    chains, draws, warmup : int
        Number of chains, saved draws per chain and warmup iterations per chain.
        ``warmup=0`` samples without adaptation (unit metric); pystan, whose only
        sampler is the adaptive one, still starts from Stan's step-size
        initialization heuristic, CmdStan from step size 1, so only then do the two
        backends give different draws for the same seed.
    seed : int
        Random seed (non-negative).
    adapt_delta : float
        Target acceptance rate of step-size adaptation, in (0, 1); unused when
        ``warmup=0``.
    max_depth : int
        Maximum tree depth.
    progress : bool
        Show the build and sampling output on stderr (it is captured into
        :attr:`StanDraws.messages` either way; nothing is printed to stdout).
    inits : mapping or list of mappings, optional
        Initial (constrained) parameter values, one mapping for all chains or one
        per chain. Stan's default is uniform(-2, 2) on the unconstrained scale.
    metric : {"diag_e", "dense_e"}
        Euclidean metric adapted in warmup: diagonal (both backends) or dense (CmdStan
        only: httpstan 4.17, pystan's server, runs ``hmc_nuts_diag_e_adapt`` and no
        dense variant).
    inv_metric : 1-D array, optional
        Initial diagonal inverse metric (variances of the unconstrained coordinates, in
        Stan's order, e.g. :func:`scribe_stan.nuts.laplace_metric`), which warmup then
        adapts; Stan's default is the unit metric. CmdStan and ``diag_e`` only
        (httpstan's sampler takes no initial metric).

    Returns
    -------
    StanDraws
        Arrays shaped ``(chain, draw, ...)``.

    Raises
    ------
    ValueError
        Unknown backend or program name, missing data keys, non-finite data, or
        sampler arguments out of range.
    RuntimeError
        The backend fails (compilation, data validation in Stan, sampling).
    """
    backend = resolve_backend(backend)
    if chains < 1 or draws < 1 or warmup < 0:
        raise ValueError(f"need chains >= 1, draws >= 1, warmup >= 0; got {chains}, {draws}, {warmup}")
    if not 0.0 < adapt_delta < 1.0:
        raise ValueError(f"adapt_delta must lie in (0, 1), got {adapt_delta}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if metric != "diag_e" and backend == "pystan":
        raise ValueError(f"metric={metric!r} needs backend='cmdstanpy': pystan (httpstan) "
                         "offers only the diagonal metric 'diag_e'")
    if inv_metric is not None:
        inv_metric = np.asarray(inv_metric, float)
        if backend == "pystan" or metric != "diag_e":
            raise ValueError("inv_metric needs backend='cmdstanpy' and metric='diag_e' "
                             f"(got backend={backend!r}, metric={metric!r}): httpstan's "
                             "sampler takes no initial metric")
        if inv_metric.ndim != 1 or not np.all(np.isfinite(inv_metric) & (inv_metric > 0)):
            raise ValueError("inv_metric must be a 1-D array of positive finite variances, "
                             f"got shape {inv_metric.shape}")
    _check_data(name, data)
    code = program_code(name)
    int_names = _int_outputs(code)
    if inits is None:
        init_list = None
    elif isinstance(inits, Mapping):
        init_list = [_json_data(inits) for _ in range(chains)]
    else:
        init_list = [_json_data(i) for i in inits]
        if len(init_list) != chains:
            raise ValueError(f"inits has {len(init_list)} entries for {chains} chains")

    with _stan_output(progress) as messages:
        t0 = time.perf_counter()
        if backend == "pystan":
            model = _pystan_model(name, data, seed)
            build_time = time.perf_counter() - t0
            t1 = time.perf_counter()
            kwargs = dict(
                num_chains=int(chains),
                num_samples=int(draws),
                num_warmup=int(warmup),
                delta=float(adapt_delta),
                max_depth=int(max_depth),
                refresh=max(1, (draws + warmup) // 10) if progress else draws + warmup,
            )
            if init_list is not None:
                kwargs["init"] = init_list
            fit = model.sample(**kwargs)
            wall = time.perf_counter() - t1
            posterior, stats = _pystan_posterior(fit, int_names)
        else:
            model = _cmdstanpy_model(name)
            build_time = time.perf_counter() - t0
            t1 = time.perf_counter()
            json_data = _json_data(data)
            fit = model.sample(
                data=json_data,
                chains=int(chains),
                iter_sampling=int(draws),
                iter_warmup=int(warmup),
                seed=int(seed),
                # CmdStan refuses adaptation without warmup iterations (adapt_delta
                # then has nothing to act on, and cmdstanpy refuses it too)
                adapt_engaged=warmup > 0,
                adapt_delta=float(adapt_delta) if warmup > 0 else None,
                max_treedepth=int(max_depth),
                metric=metric if inv_metric is None else {"inv_metric": inv_metric.tolist()},
                inits=init_list,
                show_progress=bool(progress),
                sig_figs=_SIG_FIGS,
            )
            wall = time.perf_counter() - t1
            posterior, stats = _cmdstanpy_posterior(fit, int(chains), code, json_data,
                                                    int_names)

    return StanDraws(
        posterior=posterior,
        sample_stats=stats,
        backend=backend,
        program=_program_path(name).stem,
        stan_hash=hashlib.sha256(code.encode()).hexdigest(),
        seed=int(seed),
        versions=_versions(backend, model),
        wall_time_s=wall,
        config=dict(chains=int(chains), draws=int(draws), warmup=int(warmup),
                    adapt_delta=float(adapt_delta), max_depth=int(max_depth),
                    metric=metric, initial_metric="unit" if inv_metric is None else "given",
                    build_time_s=build_time),
        messages=messages.getvalue(),
    )


def fixed_param(
    name: str, data: Mapping[str, Any], *, backend: str = "auto", seed: int = 0
) -> dict[str, np.ndarray]:
    """One draw of a program's generated quantities, without sampling parameters.

    For programs without parameters, e.g. ``pln_laplace``.

    Parameters
    ----------
    name : str
        Program name.
    data : mapping
        The program's data.
    backend : {"auto", "cmdstanpy", "pystan"}
    seed : int

    Returns
    -------
    dict of str to ndarray
        Each generated quantity (and transformed parameter) with its Stan shape, e.g.
        ``log_marginal``: ``(N,)``.

    Raises
    ------
    ValueError, RuntimeError
        As for :func:`sample`.
    """
    backend = resolve_backend(backend)
    _check_data(name, data)
    code = program_code(name)
    int_names = _int_outputs(code)
    if backend == "pystan":
        with _stan_output(False):
            model = _pystan_model(name, data, seed)
            fit = model.fixed_param(num_chains=1, num_samples=1, refresh=1)
        posterior = {}
        for pname, dims in zip(fit.param_names, fit.dims):
            arr = np.asarray(fit[pname]).reshape([int(v) for v in dims])
            posterior[pname] = arr.astype(np.int64) if pname in int_names else np.array(arr)
        return posterior
    json_data = _json_data(data)
    with _stan_output(False):
        model = _cmdstanpy_model(name)
        fit = model.sample(data=json_data, fixed_param=True, chains=1, iter_sampling=1,
                           seed=int(seed), show_progress=False, sig_figs=_SIG_FIGS)
    posterior, _ = _cmdstanpy_posterior(fit, 1, code, json_data, int_names)
    return {pname: arr[0, 0] for pname, arr in posterior.items()}


def log_prob(
    name: str,
    data: Mapping[str, Any],
    params: Mapping[str, Any],
    *,
    backend: str = "auto",
    jacobian: bool = False,
) -> float:
    """The program's log density at given constrained parameter values.

    Parameters
    ----------
    name : str
        Program name.
    data : mapping
        The program's data.
    params : mapping
        Values of every variable of the ``parameters`` block on the constrained
        scale (e.g. for ``pln``: ``mu, W, d, theta_z, theta_e, eta_q``).
    backend : {"auto", "cmdstanpy", "pystan"}
    jacobian : bool
        Add the log Jacobian of the constraining transforms (the density of the
        unconstrained parameters). ``False`` gives the density written in the
        ``model`` block.

    Returns
    -------
    float
        ``target`` with all constants (the programs use normalized ``_lpdf`` calls).

    Raises
    ------
    ValueError, RuntimeError
        As for :func:`sample`, or parameters missing / out of support.
    """
    backend = resolve_backend(backend)
    _check_data(name, data)
    pars = _json_data(params)
    with _stan_output(False):
        if backend == "pystan":
            model = _pystan_model(name, data, 1)
            upars = model.unconstrain_pars(pars)
            return float(model.log_prob(upars, adjust_transform=bool(jacobian)))
        model = _cmdstanpy_model(name)
        frame = model.log_prob(params=pars, data=_json_data(data), jacobian=bool(jacobian),
                               sig_figs=_SIG_FIGS)
    return float(frame["lp__"].iloc[0])
