"""The `neat-fx` console script: one real run of the installed script, the rest of the argument handling in
process through `neat_fx.cli.main(argv)` (argparse's messages and exit codes are the same there)."""

import subprocess
import sys
from pathlib import Path

import pytest

import neat_fx
from neat_fx.cli import main


def test_installed_script_runs():
    script = Path(sys.executable).with_name("neat-fx")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "neat_fx.cli"]
    r = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"neat-fx {neat_fx.__version__}"


def _exit(argv, capsys):
    """main(argv) where argparse exits: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    out = capsys.readouterr()
    return info.value.code, out.out, out.err


def test_version_and_help(capsys):
    code, out, _ = _exit(["--version"], capsys)
    assert code == 0 and out.strip() == f"neat-fx {neat_fx.__version__}"
    code, out, _ = _exit(["--help"], capsys)
    assert code == 0 and "NEAT" in out and "--version" in out


def test_unknown_option_fails(capsys):
    code, _, err = _exit(["--frobnicate"], capsys)
    assert code == 2 and "unrecognized arguments" in err


def test_missing_folders_are_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what `neat-fx export` sets for itself, undone after the test
    rc = main(
        [
            "export",
            "--model",
            str(tmp_path / "none"),
            "--adapters",
            str(tmp_path / "ad"),
            "--out",
            str(tmp_path / "m.onnx"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--model" in err and "config.json" in err
    assert not (tmp_path / "m.onnx").exists()
    rc = main(["finetune", "--model", str(tmp_path / "none"), "--no-onnx", "--out", str(tmp_path / "run")])
    assert rc == 2 and "not a Hugging Face model folder" in capsys.readouterr().err
    rc = main(["finetune", "--data", str(tmp_path / "nodata"), "--no-onnx", "--out", str(tmp_path / "run")])
    assert rc == 2 and "train.tsv" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_export_logits_and_attention_options(tmp_path, capsys, monkeypatch):
    """--logits / --attention reach to_onnx with --task text-generation-with-past and are refused without it."""
    from neat_fx import export as export_package

    import decoders

    model = decoders.build("llama")
    nm = neat_fx.transform(model, "all-linear", decoders.example_inputs(), rank=2)
    model.save_pretrained(tmp_path / "base")
    neat_fx.save_adapters(nm, tmp_path / "adapters")
    argv = ["export", "--model", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters")]
    argv += ["--out", str(tmp_path / "m.onnx"), "--seq-len", "8"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv + ["--logits", "all"]) == 2
    assert "--task text-generation-with-past" in capsys.readouterr().err

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise neat_fx.NeatError("recorded")  # stop before any export work

    monkeypatch.setattr(export_package, "to_onnx", record)
    main(argv + ["--task", "text-generation-with-past", "--logits", "all", "--attention", "model"])
    assert seen["logits"] == "all" and seen["attention"] == "model"
