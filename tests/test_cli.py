"""The `neat-fx` console script."""
import subprocess
import sys
from pathlib import Path

import neat_fx


def _run(*args):
    script = Path(sys.executable).with_name("neat-fx")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "neat_fx.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)


def test_version_and_help():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"neat-fx {neat_fx.__version__}"
    r = _run("--help")
    assert r.returncode == 0 and "NEAT" in r.stdout and "--version" in r.stdout


def test_unknown_option_fails():
    r = _run("--frobnicate")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr
