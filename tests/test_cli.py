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


def test_missing_folders_are_named(tmp_path):
    r = _run(
        "export",
        "--model",
        str(tmp_path / "none"),
        "--adapters",
        str(tmp_path / "ad"),
        "--out",
        str(tmp_path / "m.onnx"),
    )
    assert r.returncode == 2 and "--model" in r.stderr and "config.json" in r.stderr
    assert not (tmp_path / "m.onnx").exists()
    r = _run("finetune", "--model", str(tmp_path / "none"), "--no-onnx", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "not a Hugging Face model folder" in r.stderr
    r = _run("finetune", "--data", str(tmp_path / "nodata"), "--no-onnx", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "train.tsv" in r.stderr
    assert not (tmp_path / "run").exists()
