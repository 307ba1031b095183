"""Training step time and memory: neat_fx NEAT vs PEFT LoRA vs PEFT PEANuT at equal rank and targets (issue 4).

Protocol: pre-trained MiniLM-L6 with a 2-class head, q/v targets at rank 8 (+ the head), AdamW; batches of 32
real SST-2 sentences padded to 64 tokens (the quality protocol's max length, a fixed shape so every method
sees the same work). One process holds the three models and interleaves them step by step (the order rotates
every step), so machine drift hits all alike; median over --steps steps after --warmup.

Memory, two ways: the bytes autograd saves for backward in one step (counted exactly with
saved_tensors_hooks, each storage once), and the peak RSS of a fresh process per method that loads the model,
builds the method and trains --rss-steps steps (VmHWM; the load is the same for all). Writes
results/train_speed.{json,md}.

    python benchmarks/train_speed.py [--steps 40 --warmup 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from common import (
    METHOD_LABELS,
    fixed_batches,
    interleave,
    load_minilm,
    peak_rss_mb,
    rss_mb,
    save_results,
    speed_setup,
    train_step,
    trainable_parameters,
)

SPEED_METHODS = ("neat", "lora", "peanut", "head")  # head only: the frozen model's own cost, the floor


def build(method: str, rank: int, tok, data):
    torch.manual_seed(0)
    _, model = load_minilm()
    return speed_setup(method, model, data[0][0], rank=rank)


def saved_bytes(module, inputs, labels) -> int:
    """Bytes autograd keeps for backward in one forward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(module(**inputs).logits, labels)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(seen.values())


def rss_child(method: str, rank: int, steps: int, batch: int, max_len: int, threads: int) -> dict:
    """Runs in a fresh process: peak RSS of load + build + `steps` training steps."""
    torch.set_num_threads(threads)
    tok, _ = load_minilm()
    data = fixed_batches(tok, steps, batch, max_len)
    before = rss_mb()
    module, opt = build(method, rank, tok, data)
    for inputs, labels in data:
        train_step(module, opt, None, inputs, labels)
    return dict(peak_rss_mb=peak_rss_mb(), rss_before_build_mb=before)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rss-steps", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=list(SPEED_METHODS), choices=list(SPEED_METHODS))
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="train_speed", help="result file stem in benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rss_child:
        print(
            json.dumps(
                rss_child(args.rss_child, args.rank, args.rss_steps, args.batch_size, args.max_len, args.threads)
            )
        )
        return

    from tqdm.auto import tqdm

    tok, _ = load_minilm()
    data = fixed_batches(tok, args.warmup + args.steps, args.batch_size, args.max_len)
    models = {m: build(m, args.rank, tok, data) for m in args.methods}
    result = {
        m: dict(
            trainable=sum(p.numel() for p in trainable_parameters(models[m][0])),
            saved_mb=saved_bytes(models[m][0], *data[0]) / 2**20,
            steps_ms=[],
        )
        for m in args.methods
    }
    names = list(args.methods)
    times = interleave(
        {m: (lambda i, built=models[m]: train_step(*built, None, *data[i])) for m in names},
        args.steps,
        args.warmup,
        "interleaved steps",
    )
    for m in names:
        result[m]["steps_ms"] = times[m]
    del models
    for m in tqdm(names, desc="peak RSS, one process each"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--rss-child",
                m,
                "--rank",
                str(args.rank),
                "--rss-steps",
                str(args.rss_steps),
                "--batch-size",
                str(args.batch_size),
                "--max-len",
                str(args.max_len),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result[m].update(json.loads(out.stdout.strip().splitlines()[-1]))
    for m in names:
        result[m]["median_step_ms"] = statistics.median(result[m]["steps_ms"])
    base = "lora" if "lora" in result else names[0]
    floor = result.get("head", {}).get("median_step_ms")
    meta = dict(
        command="python benchmarks/train_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        machine=platform.machine(),
        threads=args.threads,
        batch=args.batch_size,
        seq=args.max_len,
        rank=args.rank,
        steps=args.steps,
        warmup=args.warmup,
    )
    try:
        import peft
        import transformers

        meta.update(peft=peft.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    lines = [
        f"# Training step: {', '.join(METHOD_LABELS[m] for m in names)}",
        "",
        f"`{meta['command']}` — {meta['date']}, torch {meta['torch']}, peft {meta.get('peft')}, "
        f"transformers {meta.get('transformers')}, {args.threads} threads. MiniLM-L6, q/v r={args.rank} + head, "
        f"batch {args.batch_size}×{args.max_len} tokens, AdamW; interleaved, median of {args.steps} steps after "
        f"{args.warmup} warm-up.",
        "",
        "| method | trainable params | median step (ms) | × LoRA | × PEANuT | saved for backward (MB) | × LoRA | "
        "peak RSS (MB) | × LoRA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in names:
        r = result[m]
        ratio = lambda key, ref, r=r: f"{r[key] / result[ref][key]:.3f}" if ref in result else "—"  # noqa: E731
        lines.append(
            f"| {METHOD_LABELS[m]} | {r['trainable']:,} | {r['median_step_ms']:.1f} | "
            f"{ratio('median_step_ms', base)} | {ratio('median_step_ms', 'peanut')} | {r['saved_mb']:.1f} | "
            f"{ratio('saved_mb', base)} | {r['peak_rss_mb']:.0f} | {ratio('peak_rss_mb', base)} |"
        )
    if floor is not None:
        over = {m: result[m]["median_step_ms"] - floor for m in names if m != "head"}
        lines += [
            "",
            "Step time − the head-only step (which runs no backward through the encoder, so this is the "
            "backward through the frozen encoder plus the adapters' own work): "
            + ", ".join(f"{METHOD_LABELS[m]} {v:+.1f} ms" for m, v in over.items())
            + (
                f"; NEAT's is {over['neat'] / over['peanut']:.2f}× PEANuT's"
                if "neat" in over and "peanut" in over and over["peanut"] > 0
                else ""
            )
            + ".",
        ]
    save_results(args.out, dict(meta=meta, results=result), lines)


if __name__ == "__main__":
    main()
