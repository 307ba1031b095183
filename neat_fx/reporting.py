"""Where the `neat-fx finetune` jobs report their training: TensorBoard and/or Weights & Biases (Hugging Face's
`report_to` words), or nowhere. One interface for both jobs:

    with open_reporters(["tensorboard"], out_dir, config) as reporter:   # ReporterError at once if a package is
        reporter.log(step, {"train/loss": 0.41, ...})                    # missing, before any training
        reporter.summary({"test accuracy": "91.2 %"})

TensorBoard writes to `<out_dir>/runs/<run name>`; W&B runs offline unless WANDB_MODE says otherwise (its project:
$WANDB_PROJECT, else "neat-fx"; its folder: $WANDB_DIR, else `<out_dir>`). Both packages are imported only when
asked for."""

from __future__ import annotations

import argparse
import math
import os
import socket
import time
from pathlib import Path

from .errors import NeatError

#: the reporters `--report-to` accepts (and "none"), with the package each needs.
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
NONE = "none"
#: W&B's project when $WANDB_PROJECT is not set.
WANDB_PROJECT = "neat-fx"


class ReporterError(NeatError, ImportError):
    """A reporter asked for cannot start (its package is missing); the message names the `pip install`."""


def report_to(text: str) -> tuple[str, ...]:
    """argparse type of --report-to: `none`, or reporter names separated by commas (`tensorboard,wandb`)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    choices = f"{', '.join(REPORTERS)} or {NONE} (several: comma-separated, e.g. tensorboard,wandb)"
    unknown = [n for n in names if n not in REPORTERS and n != NONE]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected {choices}, got {text!r}")
    if NONE in names and len(names) > 1:
        raise argparse.ArgumentTypeError(f"{NONE} reports nowhere: it cannot go with {text!r}")
    return tuple(dict.fromkeys(n for n in names if n != NONE))


def open_reporters(names, folder, config: dict | None = None, *, run_name: str | None = None) -> Reporters:
    """The reporters `names` (from REPORTERS; empty: report nowhere) of a run whose outputs go to `folder`, with
    `config` (the run's settings, JSON values) recorded. Every package is imported before anything is created, so
    a missing one raises ReporterError before the run starts. Close the result (or use it as a context manager)."""
    names = list(dict.fromkeys(names))
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"unknown reporter {name!r}; expected one of {', '.join(REPORTERS)}")
    modules = {name: _import(name) for name in names}
    run_name = run_name or f"{time.strftime('%Y%m%d-%H%M%S')}_{socket.gethostname()}"
    config = {k: _plain(v) for k, v in (config or {}).items()}
    opened = Reporters([])
    try:
        for name in names:
            opened._backends.append(_OPEN[name](modules[name], Path(folder), config, run_name))
    except BaseException:
        opened.close()
        raise
    return opened


class Reporters:
    """The open reporters of one run: `log(step, metrics)` at each logging step and evaluation, `summary(values)`
    at the end, `close()` (on errors too: the context manager does it). `where` names what each one writes."""

    def __init__(self, backends):
        self._backends = list(backends)

    @property
    def where(self) -> list[tuple[str, str]]:
        return [(b.name, b.location) for b in self._backends]

    def log(self, step: int, metrics: dict):
        """Numbers only: None and non-finite values are left out (a metric the job does not have)."""
        values = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        for b in self._backends:
            b.log(step, values)

    def summary(self, values: dict):
        for b in self._backends:
            b.summary({str(k): _plain(v) for k, v in values.items()})

    def close(self, failed: bool = False):
        backends, self._backends = self._backends, []
        for b in backends:
            b.close(failed)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(failed=exc_type is not None)
        return False


def _import(name: str):
    try:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter  # torch's writer; needs the tensorboard package

            return SummaryWriter
        import wandb

        return wandb
    except ImportError as exc:
        raise ReporterError(
            f"--report-to {name} needs the package {REPORTERS[name]}, which cannot be imported here ({exc}); "
            f"`pip install {REPORTERS[name]}`, or leave {name} out of --report-to"
        ) from None


def _plain(value):
    """A value W&B's config and summary take: numbers, strings, booleans, None and lists of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, SummaryWriter, folder: Path, config: dict, run_name: str):
        self.location = str(folder / "runs" / run_name)
        self.writer = SummaryWriter(log_dir=self.location)
        self.step = 0
        if config:
            self.writer.add_text("config", _markdown_table(config), 0)

    def log(self, step, values):
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.step = max(self.step, step)

    def summary(self, values):
        self.writer.add_text("summary", _markdown_table(values), self.step)

    def close(self, failed):
        self.writer.close()


class _WandB:
    name = "wandb"

    def __init__(self, wandb, folder: Path, config: dict, run_name: str):
        # Offline unless the user chose a mode: a job must not need a network (or a login) to report.
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT,
            name=run_name,
            config=config,
            mode=mode,
            dir=None if os.environ.get("WANDB_DIR") else str(folder),
        )
        self.location = str(Path(self.run.dir).parent)

    def log(self, step, values):
        self.run.log(values, step=step)

    def summary(self, values):
        self.run.summary.update(values)

    def close(self, failed):
        self.run.finish(exit_code=1 if failed else 0)


_OPEN = {"tensorboard": _TensorBoard, "wandb": _WandB}


def _markdown_table(values: dict) -> str:
    rows = [f"| {k} | {str(v).replace('|', '/')} |" for k, v in values.items()]
    return "\n".join(["| | |", "|---|---|", *rows])


class StepLog:
    """What both jobs report at each logging step: over the steps since the last one, the mean training loss,
    samples/s and tokens/s (under DDP rank 0 reports: its share times the ranks, which train equal shares), and
    the learning rate of the step. A logging step is every `every`-th step and the last one (`last_step`)."""

    def __init__(self, reporter: Reporters, every: int, last_step: int, world: int = 1):
        self.reporter, self.every, self.last_step, self.world = reporter, every, last_step, world
        self.logged: tuple[int, int, float] | None = None  # (first step, last step, mean loss) last logged
        self._reset()

    def _reset(self):
        self.first, self.losses, self.samples, self.tokens = None, [], 0, 0
        self.t0 = time.perf_counter()

    def step(self, step: int, loss: float, *, lr: float, samples: int, tokens: int | None = None):
        """Record optimizer step `step` (1-based); log if it is a logging step."""
        if self.first is None:
            self.first = step
        self.losses.append(float(loss))
        self.samples += samples
        self.tokens = None if tokens is None or self.tokens is None else self.tokens + tokens
        if step % self.every and step != self.last_step:
            return
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        mean = sum(self.losses) / len(self.losses)
        metrics = {
            "train/loss": mean,
            "train/learning_rate": lr,
            "train/samples_per_second": self.samples * self.world / seconds,
        }
        if self.tokens is not None:
            metrics["train/tokens_per_second"] = self.tokens * self.world / seconds
        self.reporter.log(step, metrics)
        self.logged = (self.first, step, mean)
        self._reset()

    def row(self) -> list[tuple[str, str]]:
        """The results table's row of the last logged window (none if no step was trained)."""
        if self.logged is None:
            return []
        first, last, mean = self.logged
        steps = f"step {last}" if first == last else f"steps {first}–{last}"
        return [("training loss, last logged", f"{mean:.4f} (mean of {steps})")]
