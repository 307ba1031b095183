"""`neat-fx finetune` end to end on a tiny random BERT with its own tokenizer and synthetic TSV data."""
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import neat_fx

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
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
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
    r = subprocess.run(cli() + ["finetune", "--model", str(setup / "base"), "--data", str(setup / "data"),
                                "--train-rows", "96", "--batch-size", "16", "--max-len", "16", "--rank", "4",
                                "--lr", "5e-3", "--save-every", "2", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout
    for needle in ("test accuracy before → after", "max |Δ logits| folded vs NEAT", "ONNX fp32: verified",
                   "ONNX int8: accuracy"):
        assert needle in text
    assert (out / "adapters" / "neat_config.json").exists()
    assert (out / "model_fp32.onnx").exists() and (out / "model_int8.onnx").exists()
    folded_line = next(l for l in text.splitlines() if l.startswith("max |Δ logits| folded vs NEAT"))
    assert float(folded_line.split()[-1]) <= 1e-5


def test_ctrl_c_keeps_the_last_saved_adapters(setup):
    out = setup / "run"
    write_data(setup / "big", 20000, 40)
    proc = subprocess.Popen(cli() + ["finetune", "--model", str(setup / "base"), "--data", str(setup / "big"),
                                     "--train-rows", "20000", "--batch-size", "8", "--max-len", "16", "--rank", "4",
                                     "--save-every", "3", "--no-onnx", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
