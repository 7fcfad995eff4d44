"""Shared pytest setup: hypothesis profiles and the two Stan backends.

Hypothesis: ``ci`` (the default) keeps the example budget small so the suite stays fast;
``HYPOTHESIS_PROFILE=dev pytest tests/test_properties.py`` runs many more examples
locally.

Stan backends: a test that takes the ``backend`` fixture runs once under pystan and once
under cmdstanpy (marked ``slow`` and ``cmdstan``). The cmdstanpy half runs the programs
of :data:`CMDSTAN_PROGRAMS`, one per program kind, and needs a CmdStan installation: the
one cmdstanpy finds (``CMDSTAN``, ``~/.cmdstan``), or else one that
``tests/stan_setup.py`` assembles offline with ``../shared/cmdstan/assemble.sh`` and
caches (once per httpstan version). Without either, the cmdstanpy half is skipped.

Stan builds are most of the suite's time: minutes of single-threaded g++ each. pystan
programs are built at ``-O1`` here (``SCRIBE_STAN_OPT``, unless set: about 30% less g++
time; the sampling runs of the tests are short), and when slow tests are selected a
background process (``tests/stan_setup.py``, lowest CPU priority) builds the programs of
:data:`PYSTAN_PROGRAMS` in the order the suite first needs them, then assembles CmdStan
and builds :data:`CMDSTAN_PROGRAMS`, while the tests run on the other core; the tests
that need CmdStan run last.
"""

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Before anything builds: the suite's pystan builds trade sampling speed for build time.
os.environ.setdefault("SCRIBE_STAN_OPT", "1")

#: The programs the cmdstanpy half runs: one per program kind (full joint,
#: conditional, embedded Laplace), built ahead in the background.
CMDSTAN_PROGRAMS = ("pln", "pln_conditional", "pln_laplace")

#: Every pystan program the suite builds, in about the order its modules first need them.
PYSTAN_PROGRAMS = ("pln", "nbvcp", "nbln", "lnm", "lnmvcp", "pln_conditional",
                   "pln_laplace", "nbln_conditional", "nbln_laplace", "lnm_conditional",
                   "lnmvcp_conditional", "grn")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cmdstan: runs the cmdstanpy backend (needs or assembles CmdStan)")


#: The background ``tests/stan_setup.py`` process and the file it writes to.
_setup: tuple[subprocess.Popen, Path] | None = None
#: Whether that process gets CmdStan ready (cmdstan items were selected).
_setup_cmdstan = False


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Run the items that need CmdStan last, and start the Stan builds now."""
    global _setup, _setup_cmdstan
    needs = [item for item in items if item.get_closest_marker("cmdstan")]
    items[:] = [item for item in items if not item.get_closest_marker("cmdstan")] + needs
    slow = any(item.get_closest_marker("slow") for item in items)
    if config.option.collectonly or not slow:
        return  # a quick selection builds what it needs on demand
    args = ["--pystan", ",".join(PYSTAN_PROGRAMS)]
    if needs:
        args += CMDSTAN_PROGRAMS
    log = Path(tempfile.mkstemp(prefix="scribe-stan-setup-", suffix=".log")[1])
    script = Path(__file__).with_name("stan_setup.py")
    with open(log, "w") as sink:
        # lowest CPU priority: the tests running meanwhile keep both cores when they
        # need them; the setup has the whole suite's time to finish
        proc = subprocess.Popen(["nice", "-n", "19", sys.executable, str(script), *args],
                                stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    _setup, _setup_cmdstan = (proc, log), bool(needs)


@pytest.fixture(scope="session")
def cmdstan_dir():
    """Directory of a CmdStan installation with :data:`CMDSTAN_PROGRAMS` built."""
    if _setup is None or not _setup_cmdstan:
        pytest.fail("the cmdstan_dir fixture is for tests marked cmdstan")
    proc, log = _setup
    status = proc.wait()
    lines = log.read_text().splitlines() or [""]
    if status not in (0, 3):  # 3: stan_setup.NO_CMDSTAN
        pytest.fail(f"CmdStan setup failed (exit {status}); last lines of {log}:\n"
                    + "\n".join(lines[-40:]))
    log.unlink()
    if status == 3:
        pytest.skip(lines[-1])
    return next(line for line in reversed(lines) if line.startswith("CMDSTAN=")).split("=", 1)[1]


def pytest_unconfigure(config):
    """An interrupted session leaves no build running behind it: the setup and the
    make/g++ it started form their own process group."""
    if _setup is not None and _setup[0].poll() is None:
        os.killpg(_setup[0].pid, signal.SIGTERM)
        _setup[0].wait()


@pytest.fixture(scope="module",
                params=["pystan", pytest.param("cmdstanpy", marks=[pytest.mark.slow,
                                                                    pytest.mark.cmdstan])])
def backend(request):
    """Stan backend name; under ``"cmdstanpy"`` CMDSTAN points at :func:`cmdstan_dir`
    for the module's cmdstanpy items only, so ``backend="auto"`` elsewhere does not
    depend on the order the tests run in."""
    if request.param == "pystan":
        yield "pystan"
        return
    path = request.getfixturevalue("cmdstan_dir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CMDSTAN", path)
        yield "cmdstanpy"
