"""What the `neat-fx finetune` jobs share (sequence classification in finetune.py, causal LM in lm_finetune.py):
the error they report, argparse types, the learning-rate schedule, atomic progress saves that Ctrl-C cannot cut
in half, --resume, and the results table."""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
from pathlib import Path

import torch

from .errors import NeatError


class FinetuneError(NeatError, ValueError):
    """The job cannot run as asked (missing model package, malformed data); `neat-fx` prints the message."""


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {'positive' if low == 1 else '≥ ' + str(low)}, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def warmup_linear_schedule(optimizer, total_steps: int, warmup: float = 0.06):
    """Linear warm-up over the first `warmup` fraction of `total_steps`, then linear decay to zero: the
    schedule of the main jobs and of the SST-2 benchmarks (one home, so they train alike)."""
    warm = max(1.0, warmup * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * max(0.0, (total_steps - s) / total_steps)
    )


@contextlib.contextmanager
def interrupts_deferred():
    """Run the block with Ctrl-C held back, then raise KeyboardInterrupt if one came. A KeyboardInterrupt raised
    inside a C extension mid-save (safetensors' read-back) can surface as another error (a ValueError from its
    tensor conversion), which would end the run with a traceback instead of the last save kept."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
        signal.SIG_IGN,
        None,
    ):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def save_progress(out: Path, nm, opt, sched, *, step: int, settings: dict):
    """Adapters to OUT/adapters and a resumable checkpoint to OUT/checkpoint. Both atomic: a kill keeps the
    previous save; Ctrl-C lands once they are done."""
    import neat_fx

    with interrupts_deferred():
        neat_fx.save_adapters(nm, out / "adapters")
        neat_fx.save_checkpoint(out / "checkpoint", nm, opt, sched, step=step, extra=settings)


def resume_step(out: Path, nm, opt, sched, *, settings: dict, steps: int, may_change, say) -> int | None:
    """--resume: restore OUT/checkpoint into nm, opt, sched (and the RNGs) and return the step to start from
    (0 when there is no checkpoint yet); None, with the reason on stderr, if the saved run does not fit this one
    (`settings` must equal the saved run's; the options in `may_change` are not recorded)."""
    from .checkpoint import find_checkpoint, load_checkpoint

    checkpoint_dir = out / "checkpoint"
    if find_checkpoint(checkpoint_dir) is None:
        print(f"--resume: no checkpoint in {checkpoint_dir} yet; starting from step 0", file=sys.stderr)
        return 0
    try:  # every check (settings, model, optimizer, files) runs before anything is restored
        state = load_checkpoint(checkpoint_dir, nm, opt, sched, expect=settings)  # and the RNGs
    except NeatError as exc:
        print(
            f"neat-fx finetune: cannot resume: {exc}\n(use another --out, or the options of the saved run; only "
            f"{', '.join(may_change)} may change on --resume)",
            file=sys.stderr,
        )
        return None
    say(f"resuming from step {state['step']}/{steps} ({state['path']})")
    return state["step"]


def interrupted(step: int, steps: int, adapters_dir: Path) -> int:
    """Ctrl-C during training: say where the last save is; the exit code 130."""
    last = (
        f"the adapters saved at the last checkpoint are in {adapters_dir}; continue with --resume"
        if adapters_dir.exists()
        else "no checkpoint had been saved yet"
    )
    print(f"\ninterrupted at step {step}/{steps}; {last}", file=sys.stderr)
    return 130


def print_table(rows: list[tuple[str, str]], say=print):
    """The results table: one `key  value` line per row, keys padded to one width."""
    width = max(len(k) for k, _ in rows)
    say()
    for k, v in rows:
        say(f"{k.ljust(width)}  {v}")


def fill_defaults(args, defaults: dict):
    """Set each option in `defaults` that was not given (None) to the task's default."""
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def training_settings(args) -> dict:
    """The options both jobs' checkpoints record, which --resume must find unchanged (each job adds its own)."""
    return dict(
        quantize_base=getattr(args, "quantize_base", None),
        batch_size=args.batch_size,
        seed=args.seed,
        max_len=args.max_len,
        lr=args.lr,
        patterns=list(args.patterns),
        rank=args.rank,
        depth=args.depth,
        activation=args.activation,
        scale=args.scale,
    )


#: --quantize-base: how the base is quantized on load (QLoRA-style; neat_fx.quantized).
QUANTIZE_BASE = {
    "nf4": "NF4 4-bit (bitsandbytes, as QLoRA)",
    "nf4-dq": "NF4 4-bit with double quantization (bitsandbytes)",
    "int8": "int8 weight-only (torchao)",
}


def quantization_config(kind: str | None, compute_dtype=None, keep_float=()):
    """The transformers `quantization_config` that loads a base in `kind` (QUANTIZE_BASE), or None; `keep_float`:
    module names left unquantized (a new head trained in full). Its library missing → FinetuneError naming the
    install, before anything is loaded."""
    if kind is None:
        return None
    import importlib.util

    import torch
    import transformers

    library = "torchao" if kind == "int8" else "bitsandbytes"
    if importlib.util.find_spec(library) is None:
        raise FinetuneError(f"--quantize-base {kind} needs {library}: pip install 'neat-fx[quantized]'")
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=list(keep_float) or None)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=list(keep_float) or None,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=kind == "nf4-dq",
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def quantized_base_line(model, kind: str | None) -> str | None:
    """The report's line on a quantized base: the format and how many weights it holds quantized."""
    if kind is None:
        return None
    from . import quantized

    params = list(model.parameters())
    held = [p for p in params if quantized.format_of(p)]
    if not held:
        raise FinetuneError(
            f"--quantize-base {kind}: the model loaded without a quantized weight (the library found no layer to "
            f"quantize); load it without --quantize-base"
        )
    return f"{QUANTIZE_BASE[kind]}: {len(held)} weights quantized, {len(params) - len(held)} kept in float"


def merge_report_rows(report) -> list[tuple[str, str]]:
    """The report's rows on merging into a quantized base (neat_fx.quantized.MergeReport), else none."""
    if not hasattr(report, "sites"):
        return []
    if not report.requantize:
        return [("merged into the quantized base", f"{len(report.sites)} sites as plain float weights (--merge plain)")]
    worst = max(report.sites, key=lambda s: s.error_to_update, default=None)
    rows = [("merged into the quantized base", f"{len(report.sites)} sites requantized (--merge requantize)")]
    if worst is not None:
        rows.append(
            (
                "requantization error, worst site",
                f"max {worst.error_max:.3g} (rel {worst.error_rel:.3g}) = {worst.error_to_update:.2f}× its max |ΔW| "
                f"({worst.name})",
            )
        )
    if report.output_max is not None:
        rows.append(("requantized vs NEAT outputs", f"max {report.output_max:.3g} (rel {report.output_rel:.3g})"))
    return rows
