"""`neat-fx finetune --quantize-base nf4|nf4-dq|int8` (issue 22, item 5): both jobs load the base quantized, train
NEAT on it, say so in the report, merge with `--merge plain|requantize` (the requantization error reported), reload
the merged model and check it against NEAT; a resume on another base is refused; a missing library is named before
anything is loaded. Runs in process (`neat_fx.cli.main`) on tiny random models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from neat_fx.cli import main

import lm_fixture
from lm_fixture import numbers, table

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlm")
    tok = lm_fixture.make_tokenizer()
    model = lm_fixture.make_model(tok)  # hidden 64: whole bitsandbytes 4-bit blocks
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    lm_fixture.write_jsonl(root / "train.jsonl", lm_fixture.addition(200, seed=1))
    return root


def _lm_args(root: Path, out: Path, *extra) -> list[str]:
    return [
        "finetune", "--task", "causal-lm", "--model", str(root / "model"), "--data", str(root / "train.jsonl"),
        "--steps", "6", "--eval-rows", "16", "--out", str(out), "--threads", "1", "--save-every", "3", *extra,
    ]  # fmt: skip


def _run(argv, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return table(out.out)


@pytest.mark.parametrize(
    "kind, merge", [("nf4", "plain"), ("nf4-dq", "requantize"), ("int8", "plain"), ("int8", "requantize")]
)
def test_causal_lm_job_on_a_quantized_base(lm, tmp_path, capsys, monkeypatch, kind, merge):
    rows = _run(_lm_args(lm, tmp_path / "run", "--quantize-base", kind, "--merge", merge), capsys, monkeypatch)
    base = rows["quantized base"]
    assert ("NF4" if kind.startswith("nf4") else "int8") in base and numbers(base)[-2:] == [14.0, 7.0]  # 14 linears
    same, total = numbers(rows["merged + reloaded: same greedy generations"])
    drift = numbers(rows["merged + reloaded: max |Δ logits| vs NEAT"])[0]
    if merge == "plain":  # W0_deq + ΔW in float: the merged model is NEAT's function
        assert rows["merged into the quantized base"].startswith("14 sites as plain float weights")
        assert same == total == 16 and drift < 1e-5
    else:  # quantized again: the error is reported, and the reloaded model carries it
        assert rows["merged into the quantized base"].startswith("14 sites requantized")
        error = numbers(rows["requantization error, worst site"])
        assert error[0] > 0 and error[2] > 0  # max, and as a multiple of the site's max |ΔW|
        out_max = numbers(rows["requantized vs NEAT outputs"])[0]
        assert 0 < drift and abs(drift - out_max) <= 0.5 * out_max + 1e-6  # the reload computes what was reported
    # the saved adapters record the base they were trained on
    import neat_fx

    loaded = neat_fx.read_adapters(tmp_path / "run" / "adapters")
    assert all(meta.get("quantization") for meta in loaded.site_meta.values())


def test_resume_on_another_base_is_refused(lm, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _run(_lm_args(lm, out, "--quantize-base", "nf4"), capsys, monkeypatch)
    rc = main(_lm_args(lm, out, "--resume"))  # the same run, but on the float base
    err = capsys.readouterr().err
    assert rc == 2 and "quantize_base" in err


def test_sequence_classification_job_on_an_nf4_base(tmp_path, capsys, monkeypatch):
    import test_finetune

    test_finetune.write_data(tmp_path / "data", 96, 40)
    test_finetune.write_model(tmp_path / "base")
    argv = [
        "finetune", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "data"), "--train-rows", "96",
        "--batch-size", "16", "--max-len", "16", "--rank", "4", "--lr", "5e-3", "--out", str(tmp_path / "run"),
        "--quantize-base", "nf4",
    ]  # fmt: skip
    rows = _run(argv, capsys, monkeypatch)
    assert "NF4" in rows["quantized base"]
    for key in ("folded", "merged", "reloaded"):
        assert numbers(rows[f"max |Δ logits| {key} vs NEAT"])[0] <= 1e-5, key
    assert numbers(rows["ONNX fp32: max |Δ logits| vs NEAT (test set)"])[0] <= 1e-5  # exported from the NF4 base


def test_a_missing_library_is_named_before_loading(lm, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    rc = main(_lm_args(lm, tmp_path / "run", "--quantize-base", "nf4"))
    err = capsys.readouterr().err
    assert rc == 2 and "pip install 'neat-fx[quantized]'" in err
    assert not (tmp_path / "run" / "adapters").exists()
