"""`neat-fx finetune --task causal-lm`: fine-tune a decoder LM with NEAT on prompt/completion pairs or plain text.

    neat-fx finetune --task causal-lm --model Qwen/Qwen2.5-0.5B --data train.jsonl [--eval-data eval.jsonl]

Steps: load the model (AutoModelForCausalLM, float32, captured without cache) and its tokenizer; read the data
(JSONL: string fields "prompt" and "completion" on every line, the loss on the completion and an appended EOS
token; .txt: one example per line, the loss on every token); transform with NEAT ("all-linear" by default: every
linear weight but the output head); evaluate (mean completion-token loss and perplexity, exact match of greedy
generations through neat_fx.generate); train (AdamW, warm-up then linear decay, checkpoints every --save-every
steps, --resume); evaluate again; save the adapters, merge them into the model, save it with its tokenizer to
OUT/merged, reload it with from_pretrained and check that it generates what the NEAT module does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import neat_fx

from . import quantized
from .card import write_model_card
from .jobs import (
    FinetuneError,
    fill_defaults,
    interrupted,
    interrupts_deferred,
    merge_report_rows,
    positive_int,
    print_table,
    quantization_config,
    quantized_base_line,
    resume_step,
    save_progress,
    training_settings,
    warmup_linear_schedule,
)
from .reporting import Reporters, StepLog, open_reporters

#: the weights adapted unless --patterns says otherwise (neat_fx.transform's preset, PEFT's meaning).
DEFAULT_PATTERNS = "all-linear"

#: this job's defaults of the options whose default depends on --task (train_rows: all).
DEFAULTS = dict(
    epochs=1,
    batch_size=8,
    max_len=512,
    patterns=[DEFAULT_PATTERNS],
    lr=1e-3,
    out=Path("runs") / "finetune-causal-lm",
)

#: held-out rows when there is no --eval-data and no --eval-rows: a tenth of --data, at most this many.
EVAL_ROWS = 200

#: tokens generated beyond the longest reference completion (its EOS and a few more).
EXTRA_NEW_TOKENS = 4

#: data files by suffix: JSONL prompt/completion pairs, or plain text (one example per line).
JSONL_SUFFIXES = (".jsonl", ".json")
TEXT_SUFFIXES = (".txt",)

#: the options only this job reads (argparse dests), all None unless given.
OPTIONS = ("eval_data", "eval_rows", "steps", "max_new_tokens", "device")

#: options that may differ between a run and its --resume (they do not change the training; the training rows
#: are compared by their fingerprint).
RESUME_MAY_CHANGE = (
    "--merge",
    "--save-every",
    "--threads",
    "--eval-data",
    "--eval-rows",
    "--max-new-tokens",
    "--device",
    "--report-to",
    "--log-every",
)


def add_arguments(group):
    group.add_argument(
        "--eval-data",
        type=Path,
        metavar="FILE",
        help="evaluation file in the format of --data (default: --eval-rows rows held out from --data)",
    )
    group.add_argument(
        "--eval-rows",
        type=positive_int,
        metavar="N",
        help=f"rows evaluated: the first N of --eval-data, or N rows held out from --data (default: {EVAL_ROWS}, "
        f"and at most a tenth of --data when held out)",
    )
    group.add_argument(
        "--steps",
        type=positive_int,
        metavar="N",
        help="optimizer steps, cycling over the data (default: --epochs passes)",
    )
    group.add_argument(
        "--max-new-tokens",
        type=positive_int,
        metavar="N",
        help=f"tokens generated per eval prompt (default: the longest eval completion + {EXTRA_NEW_TOKENS})",
    )
    group.add_argument("--device", choices=("cpu", "cuda"), help="where to train (default cpu)")


def given_options(args) -> list[str]:
    """This job's own options that `args` sets (for the other task to refuse)."""
    return ["--" + name.replace("_", "-") for name in OPTIONS if getattr(args, name, None) is not None]


# -- data --------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One row of a data file: `prompt` ("" for plain text) and `completion` (the text the loss is on)."""

    prompt: str
    completion: str
    where: str  # "FILE, line N", for messages


def data_kind(path: Path) -> str:
    """ "jsonl" or "text" by the file's suffix; FinetuneError for another."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in TEXT_SUFFIXES:
        return "text"
    raise FinetuneError(
        f"{path}: expected a .jsonl file (a JSON object with string fields prompt and completion on each line) "
        f"or a .txt file (one example per line), got {suffix or 'no suffix'}"
    )


def read_examples(path: Path) -> list[Example]:
    """The examples of a .jsonl or .txt file (blank lines skipped); FinetuneError naming the file and line of the
    first malformed one, or when there is none."""
    kind = data_kind(path)
    if not path.is_file():
        raise FinetuneError(f"{path} does not exist (or is not a file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{path} is not UTF-8 text ({exc})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        if kind == "text":
            rows.append(Example("", line, where))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FinetuneError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise FinetuneError(
                f'{where}: expected a JSON object {{"prompt": "...", "completion": "..."}}, got {type(obj).__name__}'
            )
        for field in ("prompt", "completion"):
            if field not in obj:
                raise FinetuneError(f'{where}: missing field "{field}" (each line needs "prompt" and "completion")')
            if not isinstance(obj[field], str):
                raise FinetuneError(f'{where}: field "{field}" must be a string, got {type(obj[field]).__name__}')
        rows.append(Example(obj["prompt"], obj["completion"], where))
    if not rows:
        what = "JSON lines with prompt and completion" if kind == "jsonl" else "non-blank lines"
        raise FinetuneError(f"{path} holds no examples (no {what})")
    return rows


@dataclass
class Row:
    """An example as token ids: `prompt` + `completion` (EOS appended) is the training sequence, cut to --max-len;
    `gen_prompt` is what generation starts from; `reference` the completion text exact match compares with (None
    for plain text)."""

    prompt: list[int]
    completion: list[int]
    gen_prompt: list[int]
    reference: str | None
    cut: bool


def encode(tok, examples: list[Example], max_len: int, eos: int, text: bool) -> list[Row]:
    """Token ids of each example. A sequence longer than `max_len` loses the start of its prompt first (it keeps
    the completion whole while it fits), then the end of its completion."""
    rows = []
    for ex in examples:
        if text:
            prompt, completion = [], tok(ex.completion)["input_ids"] + [eos]  # BOS too, if the tokenizer adds one
            gen_prompt = completion[: max(1, (len(completion) - 1) // 2)]  # generation check: the first half
        else:
            prompt = tok(ex.prompt)["input_ids"]
            if not prompt:
                raise FinetuneError(
                    f"{ex.where}: the prompt is empty and the tokenizer adds no BOS token: nothing to generate from"
                )
            completion = tok(ex.completion, add_special_tokens=False)["input_ids"] + [eos]
            gen_prompt = prompt
        full = prompt, completion
        room = max_len - len(completion)
        if len(prompt) > max(room, 1 if prompt else 0):
            prompt = prompt[-max(room, 1) :]
        completion = completion[: max_len - len(prompt)]
        rows.append(Row(prompt, completion, gen_prompt, None if text else ex.completion, (prompt, completion) != full))
    return rows


def collate(rows: list[Row], pad: int, device) -> dict:
    """Right-padded input_ids, attention_mask and labels (-100 on prompts and padding)."""
    length = max(len(r.prompt) + len(r.completion) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        p, n = len(r.prompt), len(r.prompt) + len(r.completion)
        ids[i, :n] = torch.tensor(r.prompt + r.completion)
        mask[i, :n] = 1
        labels[i, p:n] = torch.tensor(r.completion)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (generation appends on the right): input_ids, attention_mask."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    return ids.to(device), mask.to(device)


def fingerprint(rows: list[Row]) -> str:
    """A short hash of the training sequences, recorded in checkpoints: --resume must train on the same data."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.prompt, r.completion]).encode())
    return h.hexdigest()[:16]


# -- evaluation --------------------------------------------------------------------------------------------------


@torch.no_grad()
def completion_loss(module, rows: list[Row], pad: int, batch: int, device) -> float:
    """Mean cross-entropy over the completion tokens of `rows` (teacher forcing); the model computes it."""
    module.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        inputs = collate(rows[i : i + batch], pad, device)
        n = int((inputs["labels"][:, 1:] != -100).sum())  # the model shifts: token t predicts t + 1
        total += float(module(**inputs).loss) * n
        count += n
    return total / max(count, 1)


@torch.no_grad()
def greedy(generate_fn, prompts: list[list[int]], pad: int, eos: int, batch: int, device) -> list[list[int]]:
    """The new tokens `generate_fn(input_ids, attention_mask)` appends to each left-padded prompt, up to (not
    including) the first EOS."""
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = left_padded(prompts[i : i + batch], pad, device)
        for row in generate_fn(ids, mask)[:, ids.shape[1] :].tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
    return out


def exact_match(tok, generated: list[list[int]], rows: list[Row]) -> float | None:
    """The share of rows whose generated completion equals the reference (whitespace stripped); None for text."""
    if rows[0].reference is None:
        return None
    hits = sum(
        tok.decode(ids, skip_special_tokens=True).strip() == r.reference.strip() for ids, r in zip(generated, rows)
    )
    return hits / len(rows)


# -- the job -----------------------------------------------------------------------------------------------------


def run(args) -> int:
    """The causal-LM job, step by step; returns the exit code."""
    import transformers

    started = time.perf_counter()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # loading / saving bars: one tqdm bar, the training's
    if args.steps is not None and args.epochs is not None:
        raise FinetuneError("give --steps or --epochs, not both")
    fill_defaults(args, DEFAULTS)
    _check_arguments(args)
    job = _LmJob.start(args)  # reads the data and loads the model: their errors come before any work
    # Opened before any work: a reporter whose package is missing stops the job here, not after training.
    with open_reporters(args.report_to, args.out, job.report_config()) as reporter:
        job.reporter = reporter
        for name, where in reporter.where:
            print(f"reporting to {name}: {where}")
        return _steps(job, started)


def _steps(job: _LmJob, started: float) -> int:
    """The job once its model and data are loaded and its reporters open; returns the exit code."""
    args = job.args
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    transform_s = job.transform()
    before = job.evaluate("before", step=0)
    code = job.fit()
    if code is not None:
        return code
    after = job.evaluate("after", step=job.steps)
    base_line = quantized_base_line(job.model, args.quantize_base)
    rows = [
        *([("quantized base", base_line)] if base_line else []),
        ("trainable parameters", job.parameter_line()),
        ("transform", f"{transform_s:.1f} s"),
        job.training_row(),
        *job.step_log.row(),
        ("eval loss (perplexity) before → after", f"{before.loss_text()} → {after.loss_text()}"),
        ("exact match before → after", f"{before.em_text()} → {after.em_text()} ({len(job.eval)} rows)"),
        ("evaluation before / after", f"{before.seconds:.1f} s / {after.seconds:.1f} s"),
    ]
    rows += job.merge_and_reload(after)
    rows += [
        ("ONNX export", "not part of the causal-lm job yet"),
        ("adapters saved to", str(job.args.out / "adapters")),
        ("merged model saved to", str(job.merged_dir)),
        ("total", f"{time.perf_counter() - started:.0f} s"),
    ]
    rows += [(f"{name} logs", where) for name, where in job.reporter.where]
    print_table(rows)
    job.reporter.summary(dict(rows))
    return 0


def _check_arguments(args):
    """FinetuneError for options this job cannot run with (before anything is loaded)."""
    if args.model is None:
        raise FinetuneError("--task causal-lm needs --model: a Hugging Face folder or hub id (e.g. Qwen/Qwen2.5-0.5B)")
    if args.data is None:
        raise FinetuneError(
            "--task causal-lm needs --data FILE: .jsonl with prompt/completion per line, or .txt, one example a line"
        )
    args.data = Path(args.data)  # `--data hub` is the sequence-classification job's word; here it is a file name
    kind = data_kind(args.data)
    if args.eval_data is not None and data_kind(args.eval_data) != kind:
        raise FinetuneError(f"--eval-data {args.eval_data} and --data {args.data} must be in the same format")
    if args.max_len < 2:
        raise FinetuneError(f"--max-len {args.max_len}: a causal LM needs at least 2 tokens per row")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise FinetuneError("--device cuda: torch sees no CUDA device here")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise FinetuneError("--task causal-lm runs in one process (no torchrun / DDP yet)")


def load_model(name: str, device, quantize: str | None = None):
    """(model, tokenizer) of a Hugging Face causal LM, from a folder or the hub; FinetuneError when `name` is not
    one (no config, an encoder, an encoder-decoder, missing weights). `quantize`: a --quantize-base choice, the
    base loaded quantized (its layers placed on `device` by the loader: quantized weights do not move with .to)."""
    import transformers
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    path = Path(name)
    if path.exists() and not (path / "config.json").is_file():
        raise FinetuneError(
            f"--model {name} is not a Hugging Face model folder (no config.json); pass a folder saved with "
            f"save_pretrained or a hub id such as Qwen/Qwen2.5-0.5B"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(name)
    except Exception as exc:  # not on the hub, offline, malformed config
        raise FinetuneError(f"--model {name}: cannot load its configuration ({_first_line(exc)})") from None
    kind = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise FinetuneError(
            f"--model {name} is an encoder-decoder model ({kind}); --task causal-lm needs a decoder-only LM "
            f"(LLaMA, Qwen2, Mistral, GPT-2, ...)"
        )
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise FinetuneError(
            f"--model {name} is an encoder ({kind}: it reads the whole sequence in both directions), not a causal "
            f"LM; --task causal-lm needs a decoder-only LM (LLaMA, Qwen2, Mistral, GPT-2, ...), or use the default "
            f"--task sequence-classification"
        )
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FinetuneError(f"--model {name}: transformers has no causal-LM class for model type {kind!r}")
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name)
        quantization = quantization_config(quantize)
        placed = dict(quantization_config=quantization, device_map={"": str(device)}) if quantization else {}
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            name, dtype=torch.float32, output_loading_info=True, **placed
        )
    except Exception as exc:
        raise FinetuneError(f"--model {name}: cannot load it as a causal LM ({_first_line(exc)})") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise FinetuneError(
            f"--model {name} lacks weights a {type(model).__name__} needs ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): they would start random; pass a trained causal LM"
        )
    if tok.eos_token_id is None:
        raise FinetuneError(f"--model {name}: the tokenizer has no EOS token, which completions must end with")
    if tok.eos_token_id >= vocab_rows(model):
        raise FinetuneError(
            f"--model {name}: the tokenizer's EOS token id {tok.eos_token_id} is outside the model's embedding table "
            f"({vocab_rows(model)} rows): the tokenizer does not fit the model"
        )
    return (model if quantize else model.to(device)), tok


def vocab_rows(model) -> int:
    """The number of token ids the model embeds."""
    return model.get_input_embeddings().weight.shape[0]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class _Scores:
    loss: float
    em: float | None
    generated: list[list[int]]
    seconds: float

    def loss_text(self) -> str:
        return f"{self.loss:.4f} ({math.exp(min(self.loss, 50)):.2f})"

    def em_text(self) -> str:
        return "n/a (plain text)" if self.em is None else f"{100 * self.em:.1f} %"

    def metrics(self) -> dict:
        """What each evaluation reports (no exact match for plain text)."""
        return {"eval/loss": self.loss, "eval/perplexity": math.exp(min(self.loss, 50)), "eval/exact_match": self.em}


@dataclass
class _LmJob:
    args: argparse.Namespace
    model: torch.nn.Module
    tok: object
    train: list[Row]
    eval: list[Row]
    device: torch.device
    pad: int
    eos: int
    use_cache: object
    nm: neat_fx.NeatModule | None = None
    example: dict | None = None
    reporter: Reporters | None = None
    step_log: StepLog | None = None

    @classmethod
    def start(cls, args) -> _LmJob:
        a = args
        device = torch.device(a.device or "cpu")
        train_ex = read_examples(a.data)
        if a.eval_data is not None:
            eval_ex = read_examples(a.eval_data)[: a.eval_rows or EVAL_ROWS]
        else:
            n = a.eval_rows if a.eval_rows is not None else min(EVAL_ROWS, len(train_ex) // 10)
            if n < 1 or n >= len(train_ex):
                raise FinetuneError(
                    f"{a.data} holds {len(train_ex)} examples: too few to hold out "
                    f"{'--eval-rows ' + str(n) if a.eval_rows else 'a tenth'} for evaluation; pass --eval-data FILE "
                    f"or a smaller --eval-rows"
                )
            order = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(0)).tolist()
            held = set(order[:n])  # a fixed split, whatever --seed
            eval_ex = [train_ex[i] for i in sorted(held)]
            train_ex = [e for i, e in enumerate(train_ex) if i not in held]
        train_ex = train_ex[: a.train_rows]
        model, tok = load_model(a.model, device, a.quantize_base)
        base_line = quantized_base_line(model, a.quantize_base)
        if base_line:
            print(f"base quantized on load: {base_line}")
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = False  # decoders are captured without a KV cache
        eos, pad, rows = tok.eos_token_id, tok.pad_token_id, vocab_rows(model)
        if pad is not None and pad >= rows:  # a pad token added to the tokenizer but not to the model
            print(f"the pad token {tok.pad_token} (id {pad}) is not in the model's {rows} embeddings: padding with EOS")
        if pad is None or pad >= rows:
            pad = eos  # padding is masked out and never a label: any embedded id serves
        text = data_kind(a.data) == "text"
        train, evaluation = (encode(tok, ex, a.max_len, eos, text) for ex in (train_ex, eval_ex))
        for ex, r in zip(train_ex + eval_ex, train + evaluation):
            if max(r.prompt + r.completion + r.gen_prompt) >= rows:
                raise FinetuneError(
                    f"{ex.where}: token id {max(r.prompt + r.completion + r.gen_prompt)} is outside the model's "
                    f"embedding table ({rows} rows): the tokenizer does not fit the model"
                )
        job = cls(a, model, tok, train, evaluation, device, pad, eos, use_cache)
        cut = sum(r.cut for r in train)
        print(
            f"model {a.model} ({type(model).__name__}), {len(train)} training / {len(evaluation)} eval rows "
            f"({'plain text' if text else 'prompt/completion'}), device {device}"
        )
        if cut:
            print(f"{cut} of {len(train)} training rows were longer than --max-len {a.max_len} tokens and were cut")
        return job

    def transform(self) -> float:
        a = self.args
        example_rows = (self.train * 2)[: max(2, min(a.batch_size, len(self.train)))]  # batch ≥ 2: export
        self.example = collate(example_rows, self.pad, self.device)
        t0 = time.perf_counter()
        self.nm = neat_fx.transform(
            self.model,
            a.patterns,
            example_inputs=self.example,
            rank=a.rank,
            depth=a.depth,
            activation=a.activation,
            scale=a.scale,
            seed=a.seed,
        )
        seconds = time.perf_counter() - t0
        print(self.nm.summary())
        return seconds

    @property
    def max_new_tokens(self) -> int:
        if self.args.max_new_tokens is not None:
            return self.args.max_new_tokens
        return max(len(r.completion) for r in self.eval) - 1 + EXTRA_NEW_TOKENS  # completion's EOS counted once

    def generate_nm(self, ids, mask):
        return neat_fx.generate(
            self.nm, ids, mask, max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad
        )

    def evaluate(self, when: str, step: int) -> _Scores:
        """Completion loss and exact match of nm's greedy generations on the eval rows (reported at `step`)."""
        t0 = time.perf_counter()
        loss = completion_loss(self.nm, self.eval, self.pad, self.args.batch_size, self.device)
        generated = greedy(
            self.generate_nm, [r.gen_prompt for r in self.eval], self.pad, self.eos, self.args.batch_size, self.device
        )
        scores = _Scores(loss, exact_match(self.tok, generated, self.eval), generated, time.perf_counter() - t0)
        print(f"eval {when}: loss {scores.loss_text()}, exact match {scores.em_text()}")
        self.reporter.log(step, scores.metrics())
        return scores

    def report_config(self) -> dict:
        """The run's settings, as the reporters record them (the steps are known once training starts)."""
        a = self.args
        return dict(
            task="causal-lm", model=a.model, data=str(a.data), train_rows=len(self.train), **training_settings(a)
        )

    def write_card(self, metrics: dict | None = None, step: int | None = None):
        """The model card of OUT/adapters (after each save of the adapters; `step`: a save during training)."""
        a = self.args
        training = {
            "optimizer": "AdamW, linear warm-up then linear decay",
            "learning rate": a.lr,
            "steps": self.steps,
            "batch size": a.batch_size,
            "max length (tokens)": a.max_len,
            "seed": a.seed,
        }
        if step is not None:
            training["saved at step"] = f"{step} of {self.steps}"
        kind = "plain text" if data_kind(a.data) == "text" else "prompt/completion JSONL"
        data = f"{a.data} ({kind}): {len(self.train)} training rows; evaluated on {len(self.eval)} rows"
        base = Path(a.model).resolve() if Path(a.model).is_dir() else a.model  # a folder, else a hub id
        with interrupts_deferred():  # Ctrl-C lands once the card is in place (no temporary left behind)
            write_model_card(
                a.out / "adapters", self.nm, base_model=base, data=data, metrics=metrics, training=training
            )

    def settings(self) -> dict:
        """What a --resume must repeat (recorded in the checkpoint; the adapters' configuration is compared by
        load_checkpoint itself)."""
        a = self.args
        return dict(
            task="causal-lm",
            train_rows=len(self.train),
            train_data=fingerprint(self.train),
            steps=self.steps,
            **training_settings(a),
        )

    def fit(self) -> int | None:
        """Train (resuming if asked); None when done, else the exit code."""
        a, nm = self.args, self.nm
        self.per_epoch = math.ceil(len(self.train) / a.batch_size)
        self.steps = a.steps if a.steps is not None else a.epochs * self.per_epoch
        opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=a.lr)
        sched = warmup_linear_schedule(opt, self.steps)
        self.start = 0
        if a.resume:
            self.start = resume_step(
                a.out,
                nm,
                opt,
                sched,
                settings=self.settings(),
                steps=self.steps,
                may_change=RESUME_MAY_CHANGE,
                say=print,
            )
            if self.start is None:
                return 2
        self.step = self.start
        try:
            self._train_loop(opt, sched)
        except KeyboardInterrupt:
            return interrupted(self.step, self.steps, a.out / "adapters")
        return None

    def _batch(self, step: int) -> list[Row]:
        """The rows of global step `step`: epoch e = step // per_epoch is a permutation seeded by --seed + e."""
        epoch, i = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(self.args.seed + epoch)
        order = torch.randperm(len(self.train), generator=g).tolist()
        b = self.args.batch_size
        return [self.train[j] for j in order[i * b : (i + 1) * b]]

    def _train_loop(self, opt, sched):
        from tqdm.auto import tqdm

        a, nm = self.args, self.nm
        nm.train()
        t0, self.tokens = time.perf_counter(), 0
        self.step_log = StepLog(self.reporter, a.log_every, self.steps)
        with tqdm(total=self.steps, initial=self.start, desc="train", unit="step") as bar:
            while self.step < self.steps:
                inputs = collate(self._batch(self.step), self.pad, self.device)
                loss = nm(**inputs).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                lr = sched.get_last_lr()[0]  # the rate this step used
                sched.step()
                tokens = int(inputs["attention_mask"].sum())
                self.tokens += tokens
                self.step += 1
                self.step_log.step(self.step, loss.item(), lr=lr, samples=len(inputs["input_ids"]), tokens=tokens)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    tok_per_s=f"{self.tokens / (time.perf_counter() - t0):.0f}",
                    refresh=False,
                )
                if a.save_every and self.step % a.save_every == 0:
                    save_progress(a.out, nm, opt, sched, step=self.step, settings=self.settings())
                    self.write_card(step=self.step)
        self.train_s = time.perf_counter() - t0

    def parameter_line(self) -> str:
        trainable, total = self.nm.parameter_counts()
        return f"{trainable:,} of {total:,} ({100 * trainable / total:.2f} %), {len(self.nm.sites())} sites"

    def training_row(self) -> tuple[str, str]:
        resumed = f" (resumed at {self.start})" if self.start else ""
        done = self.steps - self.start
        return (
            "training",
            f"{self.train_s:.0f} s, {done} steps{resumed} of batch {self.args.batch_size}, "
            f"{self.tokens / max(self.train_s, 1e-9):.0f} tokens/s",
        )

    @property
    def merged_dir(self) -> Path:
        return self.args.out / "merged"

    def merge_and_reload(self, after: _Scores) -> list[tuple[str, str]]:
        """Save the adapters; merge W0 + ΔW into the model, save it with its tokenizer, reload it with
        from_pretrained and compare its greedy generations (Hugging Face generate) and logits with nm's."""
        import transformers

        t0 = time.perf_counter()
        neat_fx.save_adapters(self.nm, self.args.out / "adapters")
        self.write_card(
            metrics={
                "eval loss (perplexity)": after.loss_text(),
                "exact match": after.em_text(),
                "eval rows": len(self.eval),
            }
        )
        quantized_base = self.args.quantize_base is not None
        with torch.no_grad():
            probe = collate(self.eval[: self.args.batch_size], self.pad, self.device)
        merged = neat_fx.merge_into(
            self.model,
            self.nm,
            **(dict(requantize=self.args.merge == "requantize", example_inputs=probe) if quantized_base else {}),
        )
        self.model.config.use_cache = self.use_cache  # the saved model generates with its cache as before
        self.model.save_pretrained(self.merged_dir)
        self.tok.save_pretrained(self.merged_dir)
        placed = dict(device_map={"": str(self.device)}) if quantized_base else {}
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(self.merged_dir, dtype=torch.float32, **placed)
        reloaded = reloaded if quantized_base else reloaded.to(self.device)
        if quantized_base:  # bitsandbytes' own CPU eval path repacks weights in place: run it as QLoRA computes
            reloaded = quantized.eager_view(reloaded)
        reloaded = reloaded.eval()

        def hf_generate(ids, mask):
            return reloaded.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
            )

        prompts = [r.gen_prompt for r in self.eval]
        theirs = greedy(hf_generate, prompts, self.pad, self.eos, self.args.batch_size, self.device)
        same = sum(a == b for a, b in zip(after.generated, theirs))
        with torch.no_grad():
            batch = collate(self.eval[: self.args.batch_size], self.pad, self.device)
            mask = batch["attention_mask"].bool()
            drift = (self.nm.eval()(**batch).logits - reloaded(**batch).logits)[mask].abs().max()
        seconds = time.perf_counter() - t0
        print(f"merged model reloaded: greedy generations identical to NEAT on {same}/{len(prompts)} eval prompts")
        return [
            *merge_report_rows(merged),
            ("merged + reloaded: same greedy generations", f"{same}/{len(prompts)} eval prompts"),
            ("merged + reloaded: max |Δ logits| vs NEAT", f"{float(drift):.2e}"),
            ("save, merge, reload, compare", f"{seconds:.1f} s"),
        ]
