"""Build ahead what the Stan tests need: pystan programs, then CmdStan (see conftest).

Run as a script, by ``conftest.py`` in the background (and usable by hand):
``python tests/stan_setup.py [--pystan NAME,NAME,...] [PROGRAM...]``. It first builds
the ``--pystan`` programs in the order given (the order the suite first needs them;
each build holds the build key's lock, so a test that needs a program meanwhile waits
for it instead of building it twice). Then, if PROGRAMs are given, it takes the CmdStan
that cmdstanpy finds
(``CMDSTAN``, ``~/.cmdstan``) or else assembles one offline with
``../shared/cmdstan/assemble.sh`` into ``<cache>/cmdstan-offline/<key>/`` (once per key;
concurrent sessions wait for each other), builds the given Stan programs with it, and
prints ``CMDSTAN=<its directory>`` last. Exit status 3 with a reason on the last line:
no CmdStan and no assembly script.
"""

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ASSEMBLE = Path(__file__).resolve().parents[1].parent / "shared" / "cmdstan" / "assemble.sh"
NO_CMDSTAN = 3


def offline_dir() -> Path:
    """Where the assembled CmdStan goes: keyed by httpstan's version (the Stan headers
    and stanc the script takes from it) and a hash of the script and its sources."""
    import httpstan

    digest = hashlib.sha256()
    for path in sorted(ASSEMBLE.parent.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    cache = Path(os.environ.get("SCRIBE_STAN_CACHE", "~/.cache/scribe-stan")).expanduser()
    key = f"httpstan-{httpstan.__version__}-{digest.hexdigest()[:12]}"
    return cache / "cmdstan-offline" / key


def assemble() -> Path:
    """Assemble CmdStan into :func:`offline_dir` unless already done; its directory."""
    out = offline_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = out / ".assembled"  # written last: a half-assembled directory is redone
    with open(f"{out}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.is_file():
            print(f"assembling CmdStan into {out}", flush=True)
            subprocess.run(["bash", str(ASSEMBLE), str(out), sys.executable], check=True)
            done.touch()
    return out


def main(args: list[str]) -> int:
    if args[:1] == ["--pystan"]:
        from scribe_stan.stan import _pystan_build

        for name in args[1].split(","):
            print(f"building {name} (pystan)", flush=True)
            try:
                _pystan_build(name)
            except Exception as exc:  # noqa: BLE001  (the test that needs it builds it
                print(f"  failed: {exc!r}", flush=True)  # again and reports the error)
        args = args[2:]
    if not args:
        return 0
    return cmdstan(args)


def cmdstan(programs: list[str]) -> int:
    """Find or assemble CmdStan, build ``programs`` with it; print ``CMDSTAN=<dir>``."""
    import cmdstanpy

    try:
        path = cmdstanpy.cmdstan_path()
    except (ValueError, RuntimeError):  # cmdstanpy's "no CmdStan installation found"
        if not ASSEMBLE.is_file():
            print(f"no CmdStan found (set CMDSTAN) and no {ASSEMBLE} to assemble one from")
            return NO_CMDSTAN
        path = str(assemble())
        os.environ["CMDSTAN"] = path
    from scribe_stan.stan import _cmdstanpy_model

    for name in programs:
        print(f"building {name}", flush=True)
        _cmdstanpy_model(name)
    print(f"CMDSTAN={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
