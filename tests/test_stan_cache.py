"""One Stan build per program text and versions, shared by every interpreter path, and
a Stan that prints nothing when asked to be quiet (``scribe_stan.stan``)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scribe_stan import stan
from scribe_stan.models import pln


def test_build_key_ignores_the_interpreter_path(monkeypatch):
    key = stan.build_key("pln", "pystan")
    assert len(key) == 64
    monkeypatch.setattr(sys, "executable", "/somewhere/else/bin/python3")
    assert stan.build_key("pln", "pystan") == key
    assert stan.build_key("nbvcp", "pystan") != key  # the program text counts


def test_cmdstan_build_key_tells_installations_apart(monkeypatch, tmp_path):
    """Two CmdStan directories of one release may hold different Stan headers (the
    offline assembly reports 2.36 around Stan 2.39), and executables link their own
    TBB: each directory gets its own builds."""
    import cmdstanpy

    monkeypatch.setattr(cmdstanpy, "cmdstan_version", lambda: (2, 36))
    keys = []
    for where in ("a", "b", "a"):
        monkeypatch.setattr(cmdstanpy, "cmdstan_path", lambda: str(tmp_path / where))
        keys.append(stan.build_key("pln", "cmdstanpy"))
    assert keys[0] == keys[2] != keys[1]
    assert keys[0] != stan.build_key("pln", "pystan")


def test_output_is_captured_and_never_on_stdout(capfd):
    with stan._stan_output(False) as messages:
        print("Building...")
        print("Informational Message: rejected", file=sys.stderr)
    assert capfd.readouterr() == ("", "")
    assert messages.getvalue() == "Building...\nInformational Message: rejected\n"
    with stan._stan_output(True) as messages:
        print("Sampling: 100%")
    out, err = capfd.readouterr()
    assert out == "" and err == "Sampling: 100%\n"  # progress: shown on stderr only
    assert messages.getvalue() == "Sampling: 100%\n"


def test_compiler_warnings_on_descriptor_2_are_captured(capfd):
    # The compiler is a child process writing to file descriptor 2, not to sys.stderr.
    with stan._stan_output(False) as messages, stan._compiler_stderr():
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'warning: x\\n')"],
                       check=True)
    assert capfd.readouterr() == ("", "")
    assert messages.getvalue() == "warning: x\n"


def test_builds_are_not_cut_at_five_minutes():
    import aiohttp
    import aiohttp.client

    before = aiohttp.client.DEFAULT_TIMEOUT
    assert before.total == 300  # aiohttp's default, which a slow C++ build exceeds
    with stan._no_build_timeout():
        assert aiohttp.client.DEFAULT_TIMEOUT.total is None
    assert aiohttp.client.DEFAULT_TIMEOUT is before


def _data():
    sim = pln.simulate(5, 3, 1, seed=2, lib_target=60.0, sigma_M=0.5)
    return pln.stan_data(sim["counts"], 1, log_M0=float(np.log(60.0)), sigma_M=0.7)


# Run by the other interpreter path: forget its own httpstan build of the program, then
# sample it (a fresh interpreter path, as the console scripts are).
_OTHER_ENTRY = """
import json, shutil, sys
import httpstan.cache, httpstan.models
from scribe_stan import stan
code = stan._pystan_code("pln")  # the text httpstan keys its directory by
own = httpstan.cache.model_directory(httpstan.models.calculate_model_name(code))
shutil.rmtree(own, ignore_errors=True)
data = json.load(open(sys.argv[1]))
draws = stan.sample("pln", data, backend="pystan", chains=1, draws=20, warmup=20, seed=1)
print(json.dumps({"dir": str(own), "build_s": draws.config["build_time_s"],
                  "messages": draws.messages}))
"""


@pytest.mark.slow
def test_one_build_serves_every_interpreter_path(tmp_path, capfd):
    import httpstan.cache
    import httpstan.models

    exe = Path(sys.executable)
    other = exe.with_name("python" if exe.name != "python" else "python3")
    if not other.exists():
        pytest.skip(f"no second interpreter path next to {exe}")
    data = _data()
    draws = stan.sample("pln", data, backend="pystan", chains=1, draws=20, warmup=20,
                        seed=1, progress=False)
    assert capfd.readouterr() == ("", "")  # quiet: build and sampling lines captured
    assert "Building" in draws.messages and "Sampling" in draws.messages
    shared = stan._cache_root() / "pystan" / stan.build_key("pln", "pystan")
    assert stan._has_module(shared)

    path = tmp_path / "data.json"
    path.write_text(json.dumps(stan._json_data(data)))
    proc = subprocess.run([str(other), "-c", _OTHER_ENTRY, str(path)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 1  # Stan printed nothing on stdout
    result = json.loads(proc.stdout)
    code = stan._pystan_code("pln")
    ours = httpstan.cache.model_directory(httpstan.models.calculate_model_name(code))
    assert result["dir"] != str(ours)  # httpstan alone would have built it again
    assert "found in cache" in result["messages"]
    assert result["build_s"] < 60  # a copy, not a C++ build (1-2 min)
    assert stan._has_module(Path(result["dir"]))


def test_optimization_level_is_checked_and_keys_builds(monkeypatch):
    monkeypatch.setenv("SCRIBE_STAN_OPT", "3")
    default = stan.build_key("pln", "pystan")
    monkeypatch.delenv("SCRIBE_STAN_OPT")
    assert stan.build_key("pln", "pystan") == default  # "3" is httpstan's own level
    monkeypatch.setenv("SCRIBE_STAN_OPT", "1")
    assert stan.build_key("pln", "pystan") != default
    monkeypatch.setenv("SCRIBE_STAN_OPT", "-O2")
    with pytest.raises(ValueError, match="SCRIBE_STAN_OPT.*allowed: 0, 1, 2, 3"):
        stan.build_key("pln", "pystan")


def test_each_optimization_level_has_its_own_httpstan_directory(monkeypatch):
    # httpstan keys its model directory by the program text: a shared directory let a
    # build at another level delete a running sampler's module and fits
    import httpstan.models

    names = {}
    for level in ("3", "1", "0"):
        monkeypatch.setenv("SCRIBE_STAN_OPT", level)
        names[level] = httpstan.models.calculate_model_name(stan._pystan_code("pln"))
    assert len(set(names.values())) == 3
    monkeypatch.setenv("SCRIBE_STAN_OPT", "3")
    assert stan._pystan_code("pln") == stan.program_code("pln")  # -O3 builds unchanged


def test_build_flags_reach_httpstan(monkeypatch):
    import asyncio

    import httpstan.models

    seen = []

    async def fake_build(program_code, extra_compile_args=None):
        seen.append(extra_compile_args)

    monkeypatch.setattr(httpstan.models, "build_services_extension_module", fake_build)
    with stan._build_flags("1"):
        asyncio.run(httpstan.models.build_services_extension_module("code"))
    with stan._build_flags("3"):  # httpstan's defaults untouched
        asyncio.run(httpstan.models.build_services_extension_module("code"))
    assert seen[0][0] == "-O1" and "-std=c++17" in seen[0]
    assert seen[1] is None
    assert httpstan.models.build_services_extension_module is fake_build


def test_one_process_builds_a_key_at_a_time(tmp_path):
    import threading
    import time

    order = []

    def hold(tag, delay):
        with stan._build_lock(tmp_path / "key"):
            order.append(f"{tag} in")
            time.sleep(delay)
            order.append(f"{tag} out")

    first = threading.Thread(target=hold, args=("a", 0.3))
    first.start()
    time.sleep(0.1)
    hold("b", 0.0)  # waits for "a" to leave
    first.join()
    assert order == ["a in", "a out", "b in", "b out"]
