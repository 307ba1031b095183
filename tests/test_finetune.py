"""`neat-fx finetune` end to end on a tiny random BERT with its own tokenizer and synthetic TSV data."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import neat_fx
from neat_fx.checkpoint import STATE_JSON

from lm_fixture import numbers, table

pytest.importorskip("tqdm")
pytest.importorskip("onnxruntime")

WORDS = {1: ["good", "great", "fine", "lovely", "superb"], 0: ["bad", "awful", "poor", "dull", "boring"]}
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "quite"]


def write_data(folder: Path, n_train: int, n_test: int):
    rng = random.Random(0)
    folder.mkdir()
    for name, n in (("train.tsv", n_train), ("test.tsv", n_test)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = rng.sample(FILLER, 4) + [rng.choice(WORDS[label])]
            rng.shuffle(words)
            lines.append(f"{' '.join(words)}\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")


def write_model(folder: Path):
    import torch
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER + WORDS[0] + WORDS[1]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"))
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(folder)


def cli():
    script = Path(sys.executable).with_name("neat-fx")
    return [str(script)] if script.exists() else [sys.executable, "-m", "neat_fx.cli"]


@pytest.fixture
def setup(tmp_path):
    write_data(tmp_path / "data", 96, 40)
    write_model(tmp_path / "base")
    return tmp_path


def test_finetune_end_to_end(setup):
    out = setup / "run"
    r = subprocess.run(
        cli()
        + [
            "finetune",
            "--model",
            str(setup / "base"),
            "--data",
            str(setup / "data"),
            "--train-rows",
            "96",
            "--batch-size",
            "16",
            "--max-len",
            "16",
            "--rank",
            "4",
            "--lr",
            "5e-3",
            "--save-every",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = table(r.stdout)
    _, after = numbers(rows["test accuracy before → after"])
    assert numbers(rows["accuracy folded / merged"]) == [after, after]
    for key in ("folded", "merged", "reloaded"):
        assert numbers(rows[f"max |Δ logits| {key} vs NEAT"])[0] <= 1e-5, key
    # ONNX: the fp32 file is the folded model (parity 1e-5, same accuracy); the int8 file is quantized (its
    # logits move, here ≈ 2e-4, within the export's int8 check) and classifies as fp32 does: at most one of
    # the 40 test rows (2.5 points) differs (measured: none).
    fp32_acc = numbers(rows["ONNX fp32: accuracy / latency batch 32"])[0]
    int8_acc = numbers(rows["ONNX int8: accuracy / latency batch 32"])[0]
    fp32_drift = numbers(rows["ONNX fp32: max |Δ logits| vs NEAT (test set)"])[0]
    int8_drift = numbers(rows["ONNX int8: max |Δ logits| vs NEAT (test set)"])[0]
    assert fp32_acc == after and fp32_drift <= 1e-5
    assert abs(int8_acc - fp32_acc) <= 2.5, (fp32_acc, int8_acc)
    assert 10 * fp32_drift < int8_drift <= 0.05, (fp32_drift, int8_drift)
    assert numbers(rows["ONNX fp32: verified by ONNX Runtime"])[0] <= 1e-4  # max rel, the fp32 tolerance
    assert numbers(rows["ONNX int8: verified by ONNX Runtime"])[0] <= 0.5  # the export's int8 tolerance
    assert (out / "adapters" / "neat_config.json").exists()
    assert (out / "model_fp32.onnx").exists()
    int8 = pytest.importorskip("onnx").load(str(out / "model_int8.onnx"))
    assert sum(n.op_type == "MatMulInteger" for n in int8.graph.node) >= 12  # q k v o, 2 FFN matmuls × 2 layers


def test_ctrl_c_keeps_the_last_saved_adapters(setup):
    out = setup / "run"
    write_data(setup / "big", 20000, 40)
    proc = subprocess.Popen(
        cli()
        + [
            "finetune",
            "--model",
            str(setup / "base"),
            "--data",
            str(setup / "big"),
            "--train-rows",
            "20000",
            "--batch-size",
            "8",
            "--max-len",
            "16",
            "--rank",
            "4",
            "--save-every",
            "3",
            "--no-onnx",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell that started us in the background may have left SIGINT ignored (inherited).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    config = out / "adapters" / "neat_config.json"
    deadline = time.time() + 300
    while not config.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert config.exists(), "no checkpoint was written"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at step" in err
    # the folder holds a complete, loadable save (weights match the checksum in the config)
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(setup / "base", num_labels=2)
    import torch

    example = {"input_ids": torch.randint(5, 20, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    nm = neat_fx.load_adapters(model, out / "adapters", example_inputs=example)
    assert len(nm.sites()) == 4
    assert not list((out / "adapters").glob(".*.tmp"))


def _finetune(setup, out, *extra, data="data", rows="160", rank="4"):
    return cli() + [
        "finetune",
        "--model",
        str(setup / "base"),
        "--data",
        str(setup / data),
        "--train-rows",
        rows,
        "--batch-size",
        "8",
        "--max-len",
        "16",
        "--rank",
        rank,
        "--lr",
        "5e-3",
        "--save-every",
        "2",
        "--no-onnx",
        "--out",
        str(out),
        *extra,
    ]


def test_killed_run_resumes_to_the_same_adapters(setup):
    """A run killed (SIGKILL, no cleanup) mid-way and resumed ends with the adapters of an uninterrupted run."""
    import json

    import torch
    from safetensors.torch import load_file

    write_data(setup / "mid", 160, 40)
    full = subprocess.run(_finetune(setup, setup / "full", data="mid"), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    out = setup / "killed"
    proc = subprocess.Popen(
        _finetune(setup, out, data="mid"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                if json.loads(state.read_text())["step"] >= 6:
                    break
            except (ValueError, OSError):  # being swapped in right now
                pass
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    step = json.loads(state.read_text())["step"]
    assert 6 <= step < 20, f"killed at checkpoint step {step}: expected mid-way through 20 steps"

    resumed = subprocess.run(_finetune(setup, out, "--resume", data="mid"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {step}/20" in resumed.stdout
    a = load_file(str(setup / "full" / "adapters" / "adapters.safetensors"))
    b = load_file(str(out / "adapters" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed adapters differ from the uninterrupted run's by {worst}"
    assert any(float(a[k].abs().max()) > 0 for k in a if k.endswith("neat_B"))  # training did move B

    # Resuming with another configuration is refused, one line naming every difference (the adapters' rank, checked
    # by load_checkpoint's signature; batch size and lr, by the run's settings; not --save-every, which may change),
    # and the checkpoint and the adapters are left as they were. (Once the home of test_cli_hardening's check too.)
    before = {str(p.relative_to(out)): p.read_bytes() for p in (out / "checkpoint").rglob("*") if p.is_file()}
    assert {"checkpoint/trainer_state.json", "checkpoint/trainer_state.safetensors"} <= before.keys()
    adapters = (out / "adapters" / "adapters.safetensors").read_bytes()
    args = _finetune(setup, out, "--resume", data="mid", rank="8")
    args[args.index("--batch-size") + 1] = "4"
    args[args.index("--lr") + 1] = "1e-3"
    args[args.index("--save-every") + 1] = "3"  # may change on resume: not listed
    bad = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    for needle in (
        "cannot resume",
        "another model or configuration",
        "rank",
        "batch_size: checkpoint 8, this run 4",
        "lr: checkpoint 0.005, this run 0.001",
    ):
        assert needle in bad.stderr, (needle, bad.stderr[-3000:])
    assert "save_every" not in bad.stderr
    assert {str(p.relative_to(out)): p.read_bytes() for p in (out / "checkpoint").rglob("*") if p.is_file()} == before
    assert (out / "adapters" / "adapters.safetensors").read_bytes() == adapters
    assert torch.equal(load_file(str(out / "adapters" / "adapters.safetensors"))[next(iter(b))], b[next(iter(b))])

    # A corrupt checkpoint without a `.old` copy to fall back to: refused, naming the file.
    assert not (out / "checkpoint.old").exists()
    (out / "checkpoint" / STATE_JSON).write_text('{"format": "neat_fx.checkp')  # truncated
    corrupt = subprocess.run(_finetune(setup, out, "--resume", data="mid"), capture_output=True, text=True, timeout=600)
    assert corrupt.returncode == 2 and "Traceback" not in corrupt.stderr, corrupt.stderr[-3000:]
    assert "cannot resume" in corrupt.stderr and STATE_JSON in corrupt.stderr, corrupt.stderr[-3000:]


def test_finetune_under_torchrun(setup):
    """`neat-fx finetune` unchanged under torchrun: DDP on 2 CPU processes, rank 0 reports and saves."""
    out = setup / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "neat_fx.cli",
        *_finetune(setup, out)[len(cli()) :],
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "DDP over 2 processes: global batch 2 × 8" in r.stdout
    assert r.stdout.count("test accuracy before → after") == 1  # one report, from rank 0
    training = next(line for line in r.stdout.splitlines() if line.startswith("training"))
    assert " 6 steps" in training  # 96 sentences = 12 batches of 8, 6 global steps of 2 × 8
    assert (out / "adapters" / "neat_config.json").exists() and (out / "checkpoint" / "trainer_state.json").exists()


def test_checkpoint_bad_input(tmp_path):
    import torch

    with pytest.raises(TypeError, match="NeatModule"):
        neat_fx.save_checkpoint(tmp_path / "c", torch.nn.Linear(2, 2), step=1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    nm = neat_fx.transform(model, ["0"], (torch.randn(2, 4),), rank=2)
    with pytest.raises(FileNotFoundError, match="no neat_fx checkpoint"):
        neat_fx.load_checkpoint(tmp_path / "missing", nm)
    assert not list(tmp_path.iterdir())  # nothing written by the failed calls


def test_ctrl_c_during_a_save_lands_after_it():
    """A SIGINT that arrives while the adapters are being written is held until the save is complete."""
    import os

    from neat_fx.finetune import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("save finished")
    assert done == ["save finished"]
    with interrupts_deferred():  # no signal: nothing raised, the handler restored
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
