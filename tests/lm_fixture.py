"""A tiny decoder LM made offline for the causal-LM tests: a 2-layer LLaMA over a character-level tokenizer
(digits, + - = and space), pre-trained briefly from scratch on two-digit addition so that it is partly competent,
and the addition data set as prompt/completion JSONL ("12+7=" → "19").

The one home of the causal-LM quality protocol: tests/test_causal_lm.py and benchmarks/causal_lm_quality.py
(which loads this file by path) both build the fixture with `build_folder` and run `neat-fx finetune` with
`job_args`, and read its results table with `table` / `numbers`."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

CHARS = "0123456789+=- "
#: the fixture pre-trains until the model gets this share of the 200 probe sums right.
PRETRAIN_TARGET = 0.3
#: the NEAT run of the quality protocol: 500 steps of 32 rows at lr 1e-2 (default patterns: all-linear).
NEAT_ARGS = ["--steps", "500", "--batch-size", "32", "--lr", "1e-2"]
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"


def make_tokenizer(bos: bool = True):
    """A character-level PreTrainedTokenizerFast: one token per character, decode joins. bos=True: BOS
    prepended and a pad token (as LLaMA's); False: neither, only EOS (as GPT-2's)."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    if not bos:
        return transformers.PreTrainedTokenizerFast(tokenizer_object=t, eos_token=EOS, unk_token=UNK)
    t.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=t, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def make_model(tok, seed: int = 0):
    """A random 2-layer LLaMA (hidden 64, 4 heads, 2 KV heads, intermediate 128), output head untied."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def make_qwen2(tok, seed: int = 0):
    """A random 2-layer Qwen2 (the architecture of Qwen/Qwen2.5-0.5B: biases on q/k/v, output head tied to the
    embedding)."""
    import torch
    import transformers

    cfg = transformers.Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg)


def addition(n: int, seed: int) -> list[dict]:
    """`n` rows {"prompt": "a+b=", "completion": "a+b"} with a, b uniform in 0..99."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _batch(tok, rows: list[dict]):
    """Right-padded input_ids, attention_mask and labels (the loss on the completion and EOS)."""
    import torch

    seqs = [
        (
            tok(r["prompt"])["input_ids"],
            tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        )
        for r in rows
    ]
    length = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), length), tok.pad_token_id)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, c) in enumerate(seqs):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        mask[i, : len(p) + len(c)] = 1
        labels[i, len(p) : len(p) + len(c)] = torch.tensor(c)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def exact_match(model, tok, rows: list[dict]) -> float:
    """Greedy completions (Hugging Face generate, left-padded prompts) equal to the reference: the share."""
    import torch

    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(rows), 100):
            chunk = rows[i : i + 100]
            prompts = [tok(r["prompt"])["input_ids"] for r in chunk]
            length = max(len(p) for p in prompts)
            ids = torch.tensor([[tok.pad_token_id] * (length - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=5,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
            texts = tok.batch_decode(out[:, length:], skip_special_tokens=True)
            hits += sum(t.strip() == r["completion"] for t, r in zip(texts, chunk))
    return hits / len(rows)


def pretrain(model, tok, *, target: float, chunk: int = 50, max_steps: int = 3000, lr: float = 3e-3, seed: int = 0):
    """Plain full training (AdamW, batch 64, fresh addition rows each step) in chunks of `chunk` steps until greedy
    exact match on 200 probe sums (not the tests' eval rows) reaches `target`: partly competent whatever the
    machine's arithmetic does to the path there. Returns (steps, exact match)."""
    import torch

    rows = addition(max_steps * 64, seed=1000 + seed)
    probe = addition(200, seed=999)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    steps, em = 0, 0.0
    while steps < max_steps:
        model.train()
        for _ in range(chunk):
            loss = model(**_batch(tok, rows[steps * 64 : (steps + 1) * 64])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        em = exact_match(model, tok, probe)
        if em >= target:
            break
    model.eval()
    return steps, em


def build(folder: Path, target: float, seed: int = 0) -> dict:
    """Save a tiny LLaMA pre-trained until it gets `target` of the probe sums right, and its tokenizer, to
    `folder`; returns the steps, the probe exact match and the seconds it took."""
    import torch

    t0, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is as fast, and it never fights another process
    try:
        tok = make_tokenizer()
        model = make_model(tok, seed=seed)
        steps, em = pretrain(model, tok, target=target, seed=seed)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"steps": steps, "exact_match": em, "seconds": time.perf_counter() - t0}


def build_folder(root: Path, seed: int = 0) -> dict:
    """root/model (the fixture pre-trained with `seed` to PRETRAIN_TARGET), root/train.jsonl (2000 sums, seed 1)
    and root/eval.jsonl (200 sums, seed 2; of 10,000 possible sums, some are in the training rows by chance);
    returns what `build` returns."""
    info = build(root / "model", PRETRAIN_TARGET, seed=seed)
    write_jsonl(root / "train.jsonl", addition(2000, seed=1))
    write_jsonl(root / "eval.jsonl", addition(200, seed=2))
    return info


def job_args(root: Path, out: Path) -> list[str]:
    """`neat-fx ARGS`: the quality protocol's causal-LM job on a `build_folder` folder, one thread."""
    args = ["finetune", "--task", "causal-lm", "--model", str(root / "model"), "--data", str(root / "train.jsonl")]
    return args + ["--eval-data", str(root / "eval.jsonl"), *NEAT_ARGS, "--out", str(out), "--threads", "1"]


def table(stdout: str) -> dict[str, str]:
    """The job's results table's rows, key → value (keys are separated from values by two or more spaces)."""
    rows = {}
    for line in stdout.splitlines():
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        if len(parts) == 2:
            rows[parts[0]] = parts[1]
    return rows


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def weights_digest(folder: Path) -> str:
    """sha256 of the saved model's tensors (names, shapes and bytes in name order): equal digests, equal weights."""
    import hashlib

    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(folder / "model.safetensors")).items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
