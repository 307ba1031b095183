"""`neat-fx finetune --report-to` and the model card of adapter folders: tiny runs of both jobs (the SST-2-style
job on a random BERT, the causal-LM job on an untrained tiny LLaMA), their TensorBoard event files read back with
TensorBoard's own reader, an offline W&B run read back from its log, the errors, and the card checked against
quantities computed here and by running its loading snippet."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_finetune import cli, write_data, write_model

import neat_fx
from neat_fx.card import FOLDER_PLACEHOLDER, model_card
from neat_fx.cli import main
from neat_fx.io.fingerprint import fingerprint
from neat_fx.reporting import ReporterError, open_reporters, report_to

import lm_fixture

pytest.importorskip("tqdm")
pytest.importorskip("tensorboard")

table, numbers = lm_fixture.table, lm_fixture.numbers

#: the sequence-classification run: 48 rows in batches of 8 (6 steps), logged every 4 steps and at the last.
CLS_ARGS = ["--train-rows", "48", "--batch-size", "8", "--max-len", "16", "--rank", "4", "--lr", "5e-3"]
CLS_ARGS += ["--save-every", "3", "--log-every", "4", "--no-onnx", "--threads", "1"]
CLS_STEPS, CLS_LR = 6, 5e-3


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """`neat-fx ARGV` in this process: (exit code, stdout). The job sets torch's thread count: restored."""
    threads, out = torch.get_num_threads(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        torch.set_num_threads(threads)
    return code, out.getvalue()


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard run in `run_dir`: [(step, value)], read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_text(run_dir: Path, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return "".join(e.tensor_proto.string_val[0].decode() for e in acc.Tensors(f"{tag}/text_summary"))


def schedule_lr(step: int, steps: int, lr: float, warmup: float = 0.06) -> float:
    """The rate optimizer step `step` (1-based) uses: linear warm-up over `warmup` of the steps, linear decay."""
    s = step - 1
    return lr * min(1.0, (s + 1) / max(1.0, warmup * steps)) * max(0.0, (steps - s) / steps)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """The sequence-classification job with --report-to tensorboard: (root, out, exit code, stdout)."""
    root = tmp_path_factory.mktemp("cls")
    write_data(root / "data", 48, 40)
    write_model(root / "base")
    out = root / "run"
    argv = ["finetune", "--model", str(root / "base"), "--data", str(root / "data"), *CLS_ARGS, "--out", str(out)]
    code, stdout = run_in_process([*argv, "--report-to", "tensorboard"])
    return root, out, code, stdout


def test_classification_job_reports_to_tensorboard(cls_run):
    _, out, code, stdout = cls_run
    assert code == 0, stdout[-3000:]
    rows = table(stdout)
    run_dir = Path(rows["tensorboard logs"])
    assert run_dir.parent == out / "runs" and f"reporting to tensorboard: {run_dir}" in stdout
    logged = scalars(run_dir)
    train = ["train/loss", "train/learning_rate", "train/samples_per_second", "train/tokens_per_second"]
    assert set(train + ["eval/accuracy", "eval/loss"]) <= set(logged), sorted(logged)
    for tag in train:  # every 4th step and the last
        assert [s for s, _ in logged[tag]] == [4, 6], tag
    for tag in ("eval/accuracy", "eval/loss"):  # before and after training
        assert [s for s, _ in logged[tag]] == [0, 6], tag
    assert all(math.isfinite(v) for values in logged.values() for _, v in values)
    # the numbers the job printed
    assert "(mean of steps 5–6)" in rows["training loss, last logged"]
    assert logged["train/loss"][-1][1] == pytest.approx(numbers(rows["training loss, last logged"])[0], abs=6e-5)
    before, after = numbers(rows["test accuracy before → after"])
    assert [100 * v for _, v in logged["eval/accuracy"]] == pytest.approx([before, after], abs=0.051)
    assert logged["eval/loss"][-1][1] == pytest.approx(numbers(rows["test loss after"])[0], abs=6e-5)
    for step, value in logged["train/learning_rate"]:
        assert value == pytest.approx(schedule_lr(step, CLS_STEPS, CLS_LR), rel=1e-6), step
    assert all(v > 0 for _, v in logged["train/samples_per_second"] + logged["train/tokens_per_second"])
    assert "test accuracy before → after" in tb_text(run_dir, "summary")
    assert "| rank | 4 |" in tb_text(run_dir, "config")


def test_model_card_matches_the_adapters_and_its_snippet_loads_them(cls_run, tmp_path):
    import transformers
    from safetensors.torch import load_file

    root, out, code, _ = cls_run
    assert code == 0
    folder = out / "adapters"
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert not list(folder.glob(".*.tmp"))
    front = card.split("---\n")[1]
    assert "library_name: neat-fx" in front and f"base_model: {json.dumps(str((root / 'base').resolve()))}" in front
    assert "- neat\n" in front and "- peft-style\n" in front
    assert "(`BertForSequenceClassification`)" in card
    # options: from the saved tensors (A is d_out × r; depth 2 has no encoders) and the job's defaults
    tensors = load_file(str(folder / "adapters.safetensors"))
    adapters = {k: t for k, t in tensors.items() if ".neat_" in k}
    ranks = {t.shape[1] for k, t in adapters.items() if k.endswith(".neat_A")}
    assert ranks == {4} and "| rank | 4 |" in card
    assert not any(".neat_encoders." in k for k in adapters) and "| depth | 2 |" in card
    assert "| activation | relu |" in card and "| patterns | `*query`, `*value` |" in card
    sites = sorted(k[: -len(".neat_A")] for k in adapters if k.endswith(".neat_A"))
    assert len(sites) == 4 and "| sites | 4 |" in card
    # the base fingerprint: the weights of a fresh copy of the base model, hashed here
    base = transformers.AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=2)
    prints = {name: fingerprint(base.get_parameter(name)) for name in sites}
    digest = hashlib.sha256(json.dumps(prints, sort_keys=True).encode()).hexdigest()[:16]
    assert f"base fingerprint: `{digest}`" in card
    # trainable of total: the saved tensors (adapters + the head trained in full); the base plus the adapters
    trainable = sum(t.numel() for t in tensors.values())
    total = sum(p.numel() for p in base.parameters()) + sum(t.numel() for t in adapters.values())
    assert f"| trainable parameters | {trainable:,} of {total:,} (" in card
    assert "| test accuracy |" in card and "saved at step" not in card  # the final save's card

    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert FOLDER_PLACEHOLDER in snippet
    example = {"input_ids": torch.randint(5, 20, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    example["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    scope = {"example_inputs": example}
    exec(snippet.replace(FOLDER_PLACEHOLDER, str(folder)), scope)  # noqa: S102 (the card's own code)
    nm = scope["nm"]
    neat_fx.save_adapters(nm, tmp_path / "again")
    saved, again = neat_fx.read_adapters(folder), neat_fx.read_adapters(tmp_path / "again")
    assert saved.sites.keys() == again.sites.keys() == set(sites)
    for name in sites:
        for part in ("A", "B"):
            assert torch.equal(saved.sites[name][part], again.sites[name][part]), (name, part)
    assert saved.trainable.keys() == again.trainable.keys()
    assert all(torch.equal(saved.trainable[k], again.trainable[k]) for k in saved.trainable)
    assert any(float(t.abs().max()) > 0 for k, t in adapters.items() if k.endswith(".neat_B"))  # trained
    assert model_card(nm) == model_card(nm) and f"`{digest}`" in model_card(nm)  # deterministic, same base


def test_causal_lm_job_reports_to_tensorboard_and_writes_a_card(tmp_path):
    tok = lm_fixture.make_tokenizer()
    lm_fixture.make_model(tok).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    lm_fixture.write_jsonl(tmp_path / "d.jsonl", lm_fixture.addition(40, seed=4))
    out = tmp_path / "run"
    code, stdout = run_in_process(
        ["finetune", "--task", "causal-lm", "--model", str(tmp_path / "lm"), "--data", str(tmp_path / "d.jsonl")]
        + ["--eval-rows", "8", "--steps", "4", "--batch-size", "8", "--lr", "1e-2", "--log-every", "2"]
        + ["--save-every", "2", "--threads", "1", "--report-to", "tensorboard", "--out", str(out)]
    )
    assert code == 0, stdout[-3000:]
    rows = table(stdout)
    logged = scalars(Path(rows["tensorboard logs"]))
    for tag in ("train/loss", "train/learning_rate", "train/samples_per_second", "train/tokens_per_second"):
        assert [s for s, _ in logged[tag]] == [2, 4], tag
    for tag in ("eval/loss", "eval/perplexity", "eval/exact_match"):
        assert [s for s, _ in logged[tag]] == [0, 4], tag
    assert all(math.isfinite(v) for values in logged.values() for _, v in values)
    loss_before, _, loss_after, _ = numbers(rows["eval loss (perplexity) before → after"])
    assert [v for _, v in logged["eval/loss"]] == pytest.approx([loss_before, loss_after], abs=6e-5)
    assert logged["eval/perplexity"][-1][1] == pytest.approx(math.exp(logged["eval/loss"][-1][1]), rel=1e-5)
    em_before, em_after, _ = numbers(rows["exact match before → after"])
    assert [100 * v for _, v in logged["eval/exact_match"]] == pytest.approx([em_before, em_after], abs=0.051)
    assert logged["train/loss"][-1][1] == pytest.approx(numbers(rows["training loss, last logged"])[0], abs=6e-5)
    for step, value in logged["train/learning_rate"]:
        assert value == pytest.approx(schedule_lr(step, 4, 1e-2), rel=1e-6), step
    card = (out / "adapters" / "README.md").read_text(encoding="utf-8")
    assert f"base_model: {json.dumps(str((tmp_path / 'lm').resolve()))}" in card and "(`LlamaForCausalLM`)" in card
    assert "| sites | 14 |" in card and "| patterns | `all-linear` |" in card and "| exact match |" in card
    assert "transformers.LlamaForCausalLM.from_pretrained(" in card


def read_wandb_log(path: Path) -> list:
    """The records of a W&B run log (`run-<id>.wandb`: LevelDB's log format, a 7-byte header ':W&B', 0xBEE1,
    version; 32 KiB blocks of chunks with a 7-byte header crc32, length, type), as wandb's protobuf Records.
    W&B 0.31 offline writes no wandb-summary.json or history file, only this log."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_wandb_offline_run_holds_the_metrics(cls_run, tmp_path):
    """`--report-to wandb` in a subprocess, as a user runs it, offline (WANDB_MODE), its files under WANDB_DIR."""
    pytest.importorskip("wandb")
    root, _, _, _ = cls_run
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_PROJECT": "neat-fx-test"}
    (tmp_path / "wb").mkdir()
    r = subprocess.run(
        cli()
        + ["finetune", "--model", str(root / "base"), "--data", str(root / "data"), *CLS_ARGS, "--out", str(out)]
        + ["--report-to", "wandb"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    rows = table(r.stdout)
    run_dir = Path(rows["wandb logs"])
    assert run_dir.parent == tmp_path / "wb" / "wandb" and run_dir.name.startswith("offline-run-")
    records = read_wandb_log(next(run_dir.glob("run-*.wandb")))
    history: dict[str, list[tuple[int, float]]] = {}
    summary: dict[str, object] = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history.setdefault(key, []).append((rec.history.step.num, json.loads(item.value_json)))
        elif kind == "summary":
            summary.update(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.summary.update}
            )
        elif kind == "run":
            summary["project"] = rec.run.project
    assert [s for s, _ in history["train/loss"]] == [4, 6] and [s for s, _ in history["eval/accuracy"]] == [0, 6]
    assert history["train/loss"][-1][1] == pytest.approx(numbers(rows["training loss, last logged"])[0], abs=6e-5)
    before, after = numbers(rows["test accuracy before → after"])
    assert [100 * v for _, v in history["eval/accuracy"]] == pytest.approx([before, after], abs=0.051)
    assert summary["test accuracy before → after"] == rows["test accuracy before → after"]
    assert summary["project"] == "neat-fx-test"  # $WANDB_PROJECT
    assert summary["train/loss"] == history["train/loss"][-1][1]


def test_unknown_reporter_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["finetune", "--report-to", "tensorboard,comet"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--report-to" in err and "tensorboard, wandb or none" in err and "comet" in err
    assert report_to("tensorboard, wandb,tensorboard") == ("tensorboard", "wandb") and report_to("none") == ()
    with pytest.raises(Exception, match="cannot go with"):
        report_to("none,wandb")


@pytest.mark.parametrize("reporter, module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_missing_reporter_package_stops_the_job_before_training(
    cls_run, tmp_path, monkeypatch, capsys, reporter, module
):
    root, _, _, _ = cls_run
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package gives: ImportError
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(root / "base"), "--data", str(root / "data"), *CLS_ARGS, "--out", str(out)]
    code, stdout = run_in_process([*argv, "--report-to", reporter])
    err = capsys.readouterr().err
    assert code == 2 and f"--report-to {reporter} needs the package" in err and f"pip install {reporter}" in err
    assert "NEAT rank=" not in stdout and not (out / "adapters").exists() and not (out / "runs").exists()


def test_reporters_close_on_errors(tmp_path):
    with pytest.raises(RuntimeError), open_reporters(["tensorboard"], tmp_path, {"rank": 4}) as reporter:
        reporter.log(3, {"train/loss": 0.5, "eval/exact_match": None})
        raise RuntimeError("a failing step")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert scalars(run_dir) == {"train/loss": [(3, 0.5)]}
    with pytest.raises(ReporterError, match="pip install wandb"):
        with pytest.MonkeyPatch.context() as m:
            m.setitem(sys.modules, "wandb", None)
            open_reporters(["tensorboard", "wandb"], tmp_path / "other")
    assert not (tmp_path / "other").exists()  # nothing created when one package is missing
